"""Range arithmetic against a page-set model (pure logic: no kernel involved)."""

from hypothesis import given
from hypothesis import strategies as st

from checkpointer.pageruns import intersect, normalize, subtract, total

ranges = st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=12,
)


def as_set(rs):
    return {p for s, e in rs for p in range(s, e)}


@given(ranges)
def test_normalize_keeps_the_set_and_sorts(rs):
    out = normalize(rs)
    assert as_set(out) == as_set(rs)
    assert all(a[1] < b[0] for a, b in zip(out, out[1:], strict=False))
    assert total(out) == len(as_set(rs))


@given(ranges, ranges)
def test_intersect_and_subtract_match_sets(a, b):
    a, b = normalize(a), normalize(b)
    assert as_set(intersect(a, b)) == as_set(a) & as_set(b)
    assert as_set(subtract(a, b)) == as_set(a) - as_set(b)
    assert normalize(subtract(a, b)) == subtract(a, b)


def test_subtract_examples():
    assert subtract([(0, 10)], [(2, 3), (5, 7)]) == [(0, 2), (3, 5), (7, 10)]
    assert subtract([(0, 10)], []) == [(0, 10)]
    assert subtract([(0, 10)], [(0, 10)]) == []


@given(ranges, ranges)
def test_a_private_plan_lists_every_segment_once_in_address_order(a, b):
    from checkpointer.plan import _merged

    page_ranges = normalize(a)
    held = intersect(page_ranges, normalize(b))
    data = subtract(page_ranges, held)
    plan = _merged(7, data, held)
    assert [(s.start, s.end) for s in plan] == sorted(data + held)
    assert all(s.where == ("parent" if (s.start, s.end) in held else "data") for s in plan)
    assert all(s.pid == 7 and s.vaddr == s.start for s in plan)

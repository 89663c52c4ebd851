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


@given(ranges, st.one_of(st.none(), ranges), ranges)
def test_a_plan_copies_dirty_and_unheld_pages_and_refers_the_rest(present, dirty, held):
    """private_plan against the page-set model; data_segments (a capture's) gives
    exactly its data segments."""
    from checkpointer.plan import data_segments, private_plan
    from checkpointer.trackers import VmaPages
    from checkpointer.vmas import Policy, Vma

    vma = Vma(0, 300, "rw-p", 0, "00:00", 0, "", ("rd", "wr"))
    assert vma.policy is Policy.PRIVATE
    present, held = normalize(present), normalize(held)
    pages = {0: VmaPages(present, None if dirty is None else normalize(dirty))}
    plan = private_plan(7, [vma], pages, held)
    data = as_set((s.start, s.end) for s in plan if s.where == "data")
    parent = as_set((s.start, s.end) for s in plan if s.where == "parent")
    if dirty is None:
        assert data == as_set(present) and not parent
    else:
        assert data == as_set(dirty) | (as_set(present) - as_set(held))
        assert parent == (as_set(present) & as_set(held)) - as_set(dirty)
    assert [s.start for s in plan] == sorted(s.start for s in plan)
    assert [s for s in plan if s.where == "data"] == data_segments(7, [vma], pages, held)


@given(ranges, ranges, st.booleans())
def test_a_plan_where_the_parent_holds_just_the_present_pages(present, dirty, neighbours):
    """The common case of a chain, planned without walking the runs twice: the
    parent holds exactly the present pages (and, with `neighbours`, pages of the
    VMAs around, which its held ranges join to the VMA's own)."""
    from checkpointer.pageruns import clip
    from checkpointer.plan import data_segments, private_plan
    from checkpointer.trackers import VmaPages
    from checkpointer.vmas import Vma

    vma = Vma(50, 250, "rw-p", 0, "00:00", 0, "", ("rd", "wr"))
    present, dirty = clip(normalize(present), 50, 250), normalize(dirty)
    held = normalize(present + ([(0, 50), (250, 300)] if neighbours else []))
    pages = {50: VmaPages(present, dirty)}
    plan = private_plan(7, [vma], pages, held)
    data = as_set((s.start, s.end) for s in plan if s.where == "data")
    parent = as_set((s.start, s.end) for s in plan if s.where == "parent")
    assert data == as_set(dirty)
    assert parent == as_set(present) - as_set(dirty)
    assert [s.start for s in plan] == sorted(s.start for s in plan)
    assert [s for s in plan if s.where == "data"] == data_segments(7, [vma], pages, held)


@given(ranges, st.integers(0, 240), st.integers(0, 60))
def test_within_is_the_part_inside_a_window(rs, lo, size):
    from checkpointer.pageruns import within

    rs, hi = normalize(rs), lo + size
    out = within(rs, lo, hi)
    assert as_set(out) == as_set(rs) & set(range(lo, hi))
    assert out == normalize(out) and all(lo <= s < e <= hi for s, e in out)

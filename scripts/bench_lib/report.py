"""Render the benchmark's JSON as markdown tables, with the goals checked."""

from __future__ import annotations

from bench_lib import native


def _t(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def throughput(r: dict) -> str:
    rows = r["rows"]
    lines = ["### 1. Dump throughput (`dump --leave-running`, no tracking)", ""]
    lines.append(
        _t(
            [
                "target",
                "present MiB",
                "raw read GB/s",
                "dump end-to-end GB/s",
                "dump/raw",
                "copy loop GB/s",
                "read part GB/s",
                "frozen ms",
                "tool RSS MiB",
                "tool CPU s",
                "image MB",
            ],
            [
                [
                    f"{x['target_mb']} MiB",
                    x["present_bytes"] >> 20,
                    f"{x['raw_read_gbs']:.2f}",
                    f"{x['dump_e2e_gbs']:.2f}",
                    f"{x['dump_e2e_gbs'] / x['raw_read_gbs']:.2f}",
                    f"{x['dump_copy_gbs']:.2f}",
                    f"{x['read_only_gbs']:.2f}",
                    f"{x['frozen_ms']:.0f}",
                    f"{x['tool_rss_mb']:.0f}",
                    f"{x['tool_cpu_s']:.1f}",
                    f"{x['image_bytes'] / 1e6:.0f}",
                ]
                for x in rows
            ],
        )
    )
    ratios = [x["dump_e2e_gbs"] / x["raw_read_gbs"] for x in rows]
    rss = [x["tool_rss_mb"] for x in rows]
    lines += [
        "",
        f"- dump ≥ half the raw read rate: {_met(min(ratios) >= 0.5)} (worst {min(ratios):.2f})",
        f"- tool RSS < 100 MiB and flat: {_met(max(rss) < 100 and max(rss) - min(rss) < 20)}"
        f" ({' / '.join(f'{v:.0f}' for v in rss)} MiB)",
    ]
    return "\n".join(lines)


def trackers(r: dict) -> str:
    lines = ["### 2. Tracker cost (0.1% of pages written per interval)", ""]
    lines.append(
        _t(
            [
                "tracker",
                "target",
                "first pre-dump s",
                "incremental pre-dump s",
                "s per GiB tracked",
                "CPU s",
                "pages written",
                "bytes on disk",
                "tool RSS MiB",
            ],
            [
                [
                    x["tracker"],
                    f"{x['target_mb']} MiB",
                    f"{x['first_wall_s']:.2f}",
                    f"{x['inc_wall_s']:.2f}",
                    f"{x['inc_s_per_gib']:.3f}",
                    f"{x['inc_cpu_s']:.2f}",
                    int(x["inc_pages"]),
                    int(x["inc_bytes"]),
                    f"{x['tool_rss_mb']:.0f}",
                ]
                for x in r["rows"]
            ],
        )
    )
    ws = r["write_slowdown"]
    rows = []
    for tracker in ("uffd-wp", "full"):
        if tracker in ws:
            a, b = ws[tracker]["after_reset_ms"]
            rows.append(
                [
                    tracker,
                    f"{ws['untracked_ms']:.1f}",
                    f"{a:.1f} / {b:.1f}",
                    f"x{max(a, b) / ws['untracked_ms']:.1f}",
                    f"{ws[tracker]['no_reset_ms']:.1f}",
                ]
            )
    lines += [
        "",
        f"Write slowdown: the target's own memset over {ws['mb']} MiB (ms):",
        "",
        _t(
            [
                "tracker",
                "untracked",
                "first pass after a reset (two resets)",
                "slowdown",
                "second pass, no reset",
            ],
            rows,
        ),
    ]
    return "\n".join(lines)


def converge(r: dict) -> str:
    rows, lines = [], []
    for mode, m in r["modes"].items():
        rows.append([
            f"{r['target_mb']} MiB", mode, r["hot_pages"], f"{m['plain_frozen_ms']:.0f}",
            f"{m['converge_frozen_ms']:.1f}", f"x{m['ratio']:.1f}", m["tracker"], m["stop_rule"],
        ])  # fmt: skip
        its = ", ".join(
            f"{i['kind']} {i['pages_written']}p/{i['frozen_ms']:.0f}ms" for i in m["iterations"]
        )
        lines.append(f"- {mode}: iterations {its}")
    head = ["target", "mode", "hot pages", "plain dump frozen ms", "converge final frozen ms",
            "ratio", "tracker", "stop rule"]  # fmt: skip
    met = {mode: _met(m["ratio"] >= 20) for mode, m in r["modes"].items()}
    return "\n".join(
        ["### 3. Converge (1% hot set)", "", _t(head, rows), "", *lines, "",
         f"- final frozen time ≥ 20x shorter than a plain dump: {met}"]
    )  # fmt: skip


def workloads(r: dict, title: str, baseline: str | None = None) -> str:
    lines = [f"### {title}", "", f"Sizes: {r['sizes']}; {r['interval_s']} s between passes.", ""]
    rows = []
    summary = []
    for name, entry in r["workloads"].items():
        if "error" in entry:
            rows.append([name, "-", "-", entry["error"], "", "", "", "", ""])
            continue
        for tool, its in entry.items():
            if tool == "target_rss_mb":
                continue
            if isinstance(its, dict):
                rows.append(
                    [
                        name,
                        tool,
                        "-",
                        "error: " + its["error"][:300].replace("\n", " "),
                        "",
                        "",
                        "",
                        "",
                        "",
                    ]
                )
                continue
            for n, i in enumerate(its, 1):
                rows.append(
                    [
                        f"{name} ({entry['target_rss_mb']:.0f} MiB RSS)",
                        tool,
                        f"{n} {i['kind']}",
                        f"{i['frozen_ms']:.1f}",
                        i["pages_written"],
                        f"{i['bytes'] / 1e6:.1f}",
                        f"{i['wall_s']:.2f}",
                        f"{i['cpu_s']:.2f}",
                        f"{i['rss_mb']:.0f}",
                    ]
                )
        if baseline and isinstance(entry.get(baseline), list):
            for tool, its in entry.items():
                if tool in (baseline, "target_rss_mb") or not isinstance(its, list):
                    continue
                base = entry[baseline]
                fz = its[-1]["frozen_ms"] / base[-1]["frozen_ms"]
                by = sum(i["bytes"] for i in its) / sum(i["bytes"] for i in base)
                cpu = sum(i["cpu_s"] for i in its) / sum(i["cpu_s"] for i in base)
                summary.append(
                    [
                        name,
                        f"{tool} / {baseline}",
                        f"{fz:.2f}",
                        _met(fz <= 0.5),
                        f"{by:.2f}",
                        _met(by <= 0.5),
                        f"{cpu:.2f}",
                        f"{max(i['rss_mb'] for i in its):.0f} / "
                        f"{max(i['rss_mb'] for i in base):.0f}",
                    ]
                )
    lines.append(
        _t(
            [
                "workload",
                "tool",
                "pass",
                "frozen ms",
                "pages written",
                "MB on disk",
                "wall s",
                "CPU s",
                "peak RSS MiB",
            ],
            rows,
        )
    )
    if summary:
        lines += [
            "",
            _t(
                [
                    "workload",
                    "ratio",
                    "final frozen",
                    "goal ≤ 0.5",
                    "bytes (chain)",
                    "goal ≤ 0.5",
                    "CPU (chain)",
                    "peak RSS MiB",
                ],
                summary,
            ),
        ]
    return "\n".join(lines)


def restore(r: dict, title: str) -> str:
    rows = []
    for row in r["rows"]:
        for tool in ("checkpointer", "criu"):
            if tool in row:
                t = row[tool]
                rows.append([
                    f"{row['target_mb']} MiB", tool, f"{t['wall_s']:.2f}",
                    f"{t['restored_gbs']:.2f}", f"{t['rss_mb']:.0f}", f"{t['cpu_s']:.2f}",
                    f"{t['image_mb']:.0f}",
                ])  # fmt: skip
        if "ratio_vs_criu" in row:
            rows.append(
                ["", "ratio (≤ 1.0 is the goal)", f"{row['ratio_vs_criu']:.2f}", "", "", "", ""]
            )
    header = ["target", "tool", "restore wall s", "GB/s", "tool RSS MiB", "CPU s", "image MiB"]
    return f"### {title}\n\n" + _t(header, rows)


def restore_tree(r: dict, title: str) -> str:
    rows = [
        [tool, f"{t['pss_before_mb']:.0f}", f"{t['pss_after_mb']:.0f}", f"{t['pss_ratio']:.2f}",
         f"{t['wall_s']:.2f}", f"{t['dump_wall_s']:.2f}", f"{t['image_mb']:.0f}"]
        for tool, t in r.items() if tool in ("checkpointer", "criu")
    ]  # fmt: skip
    header = ["tool", "PSS before MiB", "PSS after MiB", "after / before", "restore wall s",
              "dump wall s", "image MiB"]  # fmt: skip
    return f"### {title} ({r['target_mb']} MiB shared by a parent and 4 children)\n\n" + _t(
        header, rows
    )


def redis_gap(r: dict, title: str) -> str:
    rows = []
    for run in r["runs"]:
        if "error" in run:
            rows.append([str(run.get("run", "")), run.get("tool", ""), run["error"]] + [""] * 8)
            continue
        frozen = run["final_frozen_ms"]
        rows.append([
            str(run.get("run", "")), run.get("tool", "checkpointer"),
            "" if frozen is None else f"{frozen:.0f}",
            f"{run['checkpoint_wall_s']:.2f}", f"{run['restore_wall_s']:.2f}",
            f"{run['kept_gap_ms']:.0f}",
            " / ".join(f"{x:.0f}" for x in run["kept_gap_split_ms"]),
            "yes" if run["kept_alive"] else "NO",
            f"{run['new_client_gap_ms']:.0f}",
            f"{run['keys_before']} / {run['keys_after']}",
            "yes" if run["load_alive"] else "NO",
        ])  # fmt: skip
    header = ["run", "tool", "final dump frozen ms", "checkpoint wall s", "restore wall s",
              "kept connection: gap ms", "of which checkpoint / restore ms",
              "kept connection answered after", "new clients: gap ms",
              "keys before / after", "load goes on"]  # fmt: skip
    out = f"### {title} ({r['keys']} keys, redis-benchmark load)\n\n" + _t(header, rows)
    ratios = r.get("ratio_vs_criu") or {}
    if ratios and not isinstance(next(iter(ratios.values())), dict):
        ratios = {"checkpointer": ratios}  # one tool: JSON of before 2026-11-28
    for name, ratio in ratios.items():
        if not ratio:
            continue
        out += f"\n\nMedian gap, {name} / CRIU (goal ≤ 0.5): " + ", ".join(
            f"{k.removesuffix('_gap_ms').replace('_', ' ')} {v:.2f} {_met(v <= 0.5)}"
            for k, v in ratio.items()
        )
    return out


def render(res: dict) -> str:
    out = [
        f"## checkpointer benchmarks ({res['meta']['date']}, "
        f"{'quick' if res['meta']['quick'] else 'full'})",
        "",
        f"Host: {res['meta']['host']}",
        "",
    ]
    if "guest" in res and "meta" in res["guest"]:
        g = res["guest"]["meta"]
        start = f"; CLI start floor {g['cli_start_s']:.2f} s" if "cli_start_s" in g else ""
        out += [f"Guest: {g['host']}{start}", ""]
    out += [f"CLI start floor (`checkpointer --version`): {res['meta']['cli_start_s']:.2f} s", ""]
    if "throughput" in res:
        out += [throughput(res["throughput"]), ""]
    if "native" in res:
        out += [native.render(res["native"]), ""]
    if "trackers" in res:
        out += [trackers(res["trackers"]), ""]
    if "converge" in res:
        out += [converge(res["converge"]), ""]
    if "workloads" in res:
        out += [workloads(res["workloads"], "4a. Workloads natively (uffd-wp, full)"), ""]
    if "restore" in res:
        out += [restore(res["restore"], "5a. Restore natively (dump, kill, restore -d)"), ""]
    if "restore_tree" in res:
        out += [restore_tree(res["restore_tree"], "5b. A forked tree's memory after restore"), ""]
    if "redis_gap" in res:
        out += [
            redis_gap(res["redis_gap"], "6. redis service gap across a checkpoint and restore"),
            "",
        ]
    if "guest" in res:
        g = res["guest"]
        if "restore" in g:
            out += [restore(g["restore"], "5. Restore side by side with CRIU (guest, TCG)"), ""]
        if "redis_gap" in g:
            title = "6b. redis service gap, soft-dirty vs CRIU (guest, TCG)"
            out += [redis_gap(g["redis_gap"], title), ""]
        if "error" in g:
            out += ["### 4. Side by side with CRIU (guest)", "", f"Not run: {g['error']}", ""]
        elif "workloads" in g:
            out += [
                workloads(
                    g["workloads"], "4. Side by side with CRIU (soft-dirty guest, TCG)", "criu"
                ),
                "",
            ]
    return "\n".join(out)

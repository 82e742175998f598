"""Markdown tables and target verdicts for the residency benchmark's JSON (studio/bench/residency.py)."""

from __future__ import annotations

from typing import Any

from studio.units import fmt_bytes

GiB = 2**30
TARGETS = "targets: swap-in >= 80% of raw pinned bandwidth; 0 OOM; total >= 3x better than unload-after-use; "
TARGETS += "swaps >= 5x faster than naive .to()"


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def verdicts(r: dict) -> dict[str, Any]:
    """The four targets, each with the measured figure (None when the part did not run)."""
    out: dict[str, Any] = {}
    rows = [x for x in r.get("swap_in", []) if "fraction_of_raw" in x]
    if rows:
        out["swap_in_fraction_of_raw_min"] = min(x["fraction_of_raw"] for x in rows)
    trips = [x for x in rows if x.get("naive_to_cpu_s") and x.get("dirty_swap_out_s")]
    if trips:  # a full round trip, both ways really copied: naive .to(cpu)+.to(cuda) vs pinned out+in
        out["round_trip_speedup_vs_naive_min"] = min(
            (x["naive_to_cpu_s"] + x["naive_to_gpu_s"]) / (x["dirty_swap_out_s"] + x["swap_in_s"]) for x in trips
        )
    st = r.get("strategies", {})
    ours = st.get("ours")
    if ours:
        c = ours.get("counters", {})
        out["ours_oom_failures"] = c.get("oom_failures", 0) + len(ours.get("failures", []))
        out["ours_oom_retries"] = c.get("oom_retries", 0)
        unload = st.get("unload")
        if unload:
            out["total_speedup_vs_unload"] = _ratio(unload.get("projected_total_s"), ours.get("projected_total_s"))
        naive = st.get("naive")
        if naive:
            out["trace_swap_wait_ratio_vs_naive"] = _ratio(naive.get("swap_mean_s"), ours.get("swap_mean_s"))
            out["per_family_swap_speedup_vs_naive"] = _family_speedups(r)
    return out


def _family_speedups(r: dict) -> dict[str, float | None]:
    """(naive .to(cpu) + .to(cuda)) / (ours gpu->ram + ram->gpu), per family, medians over the trace."""
    naive, ours = r["strategies"]["naive"], r["strategies"]["ours"]
    out = {}
    for k in r.get("families", {}):
        n_in, n_out = naive.get("swap_in", {}).get(k), naive.get("swap_out", {}).get(k)
        o = [x for x in ours["rows"] if x["key"] == k and x["from"] == "ram" and x["switch_s"] is not None]
        if n_in and n_out and o:
            naive_swap = sorted(n_in)[len(n_in) // 2] + sorted(n_out)[len(n_out) // 2]
            ours_swap = sorted(x["switch_s"] for x in o)[len(o) // 2]
            out[k] = naive_swap / ours_swap if ours_swap else None
    return out


def markdown(r: dict) -> str:
    m = r.get("meta", {})
    lines = [
        "# Residency benchmark",
        "",
        f"Machine: {m.get('machine')}; date {m.get('date')}; cap {fmt_bytes(m.get('cap_bytes'), missing='-')}, reserve "
        f"{fmt_bytes(m.get('reserve_bytes'), missing='-')}; torch {m.get('versions', {}).get('torch')}.",
        f"Command: `{m.get('command')}`",
        "",
    ]
    bw = r.get("bandwidth")
    if bw:
        lines += [f"Raw host->device copy in this run: pinned **{bw['pinned_h2d_gbps']:.1f} GB/s**, pageable "
                  f"{bw['pageable_h2d_gbps']:.1f} GB/s.", ""]  # fmt: skip
    if r.get("swap_in"):
        lines += ["## (a) Swap-in from pinned RAM (ResidencyManager.use)", "",
                  "| model | swap-in | GB/s | of raw pinned | first swap-out (pins) | swap-out, weights changed "
                  "| swap-out, unchanged | naive .to(cpu) | naive .to(cuda) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for x in r["swap_in"]:
            if "error" in x:
                lines.append(f"| {fmt_bytes(x['bytes'])} | error: {x['error']} |||||||| ")
                continue
            lines.append(
                f"| {fmt_bytes(x['bytes'])} | {_s(x['swap_in_s'])} | {x['gbps']:.1f} | {x['fraction_of_raw']:.0%} | "
                f"{_s(x['first_swap_out_s'])} | {_s(x['dirty_swap_out_s'])} | {_s(x['clean_swap_out_s'])} | "
                f"{_s(x.get('naive_to_cpu_s'))} | {_s(x.get('naive_to_gpu_s'))} |"
            )
        lines += ["", "Every move is the median of 3 warm repetitions, ours and naive alike. The round-trip ratio is like for "
                  "like: naive `.to(cpu)` + `.to(cuda)` against our swap-out with a weight changed (every byte copied) + "
                  "swap-in; the unchanged swap-out (no copy) is not used in any ratio.", ""]  # fmt: skip
    if r.get("families"):
        fam = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r["families"].items())
        lines += [f"Families (weights): {fam}. Trace: {r.get('trace')}.", ""]
    if r.get("check"):
        lines += [f"Outputs identical after disk load / pinned swap / clean swap: {r['check']}", ""]
    st = r.get("strategies", {})
    if st:
        lines += ["## (b) Mixed trace", "",
                  "| strategy | requests done | total | total for the whole trace | switch p50 | switch p95 "
                  "| model moves (from disk) | swaps from RAM | their mean / p95 wait | OOM retries | OOM failures |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, x in st.items():
            c = x.get("counters", {})
            proj = _s(x["projected_total_s"]) + ("" if x["complete"] else " (projected from per-family means)")
            lines.append(
                f"| {name} | {x['requests_done']}/{x['requests']} | {_s(x['total_s'])} | {proj} | "
                f"{_s(x['switch_p50_s'])} | {_s(x['switch_p95_s'])} | {x['moves']} ({x['moves'] - x['swaps_from_ram']}) | "
                f"{x['swaps_from_ram']} | {_s(x['swap_mean_s'])} / {_s(x['swap_p95_s'])} | "
                f"{c.get('oom_retries', x.get('oom_retries', 0))} | {c.get('oom_failures', 0) + len(x['failures'])} |"
            )
        lines.append("")
    v = verdicts(r)
    if v:
        lines += ["## Targets", "", TARGETS, ""]
        lines += [f"- {k}: {val:.2f}" if isinstance(val, float) else f"- {k}: {val}" for k, val in v.items()]
        lines.append("")
    if r.get("errors"):
        lines += ["## Errors", ""] + [f"- {k}: {e}" for k, e in r["errors"].items()] + [""]
    return "\n".join(lines)

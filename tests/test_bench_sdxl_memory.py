"""The SDXL memory bench's allocator-trace replay on a synthetic trace (the real one needs CUDA)."""

from __future__ import annotations

from studio.bench.sdxl_memory import grouped, peak_allocations

GiB = 2**30


def _frames(*sites: str) -> list[dict]:
    return [
        {"filename": f"/x/site-packages/{s.split(':')[0]}", "line": int(s.split(":")[1]), "name": "f"} for s in sites
    ]


def test_the_peak_is_replayed_from_allocs_and_completed_frees():
    weights = _frames("torch/nn/modules/linear.py:109", "backends/image/tiny.py:220")
    decode = _frames("torch/nn/modules/conv.py:548", "backends/image/memory.py:131")
    events = [
        {"action": "alloc", "addr": 1, "size": 5 * GiB, "time_us": 0, "frames": weights},
        {"action": "alloc", "addr": 2, "size": 2 * GiB, "time_us": 1_000_000, "frames": decode},
        {"action": "free_requested", "addr": 2, "size": 2 * GiB, "time_us": 1_500_000, "frames": decode},
        {"action": "alloc", "addr": 3, "size": 1 * GiB, "time_us": 2_000_000, "frames": decode},  # 2 not yet freed
        {"action": "free_completed", "addr": 2, "size": 2 * GiB, "time_us": 2_500_000, "frames": decode},
        {"action": "alloc", "addr": 4, "size": 1 * GiB, "time_us": 3_000_000, "frames": decode},
    ]
    peak, at_s, live = peak_allocations({"device_traces": [events]})
    assert peak == 8 * GiB and at_s == 2.0 and {b["addr"] for b in live} == {1, 2, 3}
    by_studio = dict(grouped(live, ("backends/",), 1, 5))
    assert by_studio == {"image/memory.py:131 f": 3.0, "image/tiny.py:220 f": 5.0}

"""The residency benchmark's own logic: the trace, the summary and verdicts, and (slow) a --quick run end to end."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest

from studio.bench.residency_report import markdown, verdicts
from studio.bench.residency_trace import _summary, make_trace


def test_trace_is_bursty_chat_with_occasional_other_work():
    trace = make_trace(200, 0, ["llm", "sd", "yolo", "whisper"])
    assert len(trace) == 200 and trace == make_trace(200, 0, ["llm", "sd", "yolo", "whisper"])
    assert set(trace) == {"llm", "sd", "yolo", "whisper"}
    assert 0.55 < trace.count("llm") / 200 < 0.9
    switches = sum(a != b for a, b in itertools.pairwise(trace))
    assert 30 < switches < 120  # bursts, not a round robin
    assert "sd" not in make_trace(50, 1, ["llm", "yolo"])


def _rows(keys, total, frm="gpu"):
    return [{"key": k, "from": frm, "switch_s": 0.01, "compute_s": 0.1, "unload_s": 0, "total_s": total} for k in keys]


def test_summary_projects_unfinished_strategies_per_family():
    fams = {"llm": None, "sd": None}
    trace = ["llm"] * 6 + ["sd"] * 4
    done = _summary(_rows(["llm"] * 3 + ["sd"], 2.0), trace, fams, [])
    assert not done["complete"] and done["total_s"] == 8.0 and done["projected_total_s"] == 20.0
    full = _summary(_rows(trace, 1.0), trace, fams, [])
    assert full["complete"] and full["projected_total_s"] == 10.0 and full["swaps_from_ram"] == 0


def test_verdicts_and_markdown():
    trace = ["llm", "sd"] * 5
    ours = _summary(_rows(trace, 0.2, "ram"), trace, {"llm": 0, "sd": 0}, [])
    ours["counters"] = {"oom_retries": 1, "oom_failures": 0}
    unload = _summary(_rows(trace, 2.0, "disk"), trace, {"llm": 0, "sd": 0}, [])
    naive = _summary([dict(r, switch_s=0.5) for r in _rows(trace, 1.0, "ram")], trace, {"llm": 0, "sd": 0}, [])
    result = {"meta": {"machine": "test"}, "strategies": {"ours": ours, "unload": unload, "naive": naive},
              "swap_in": [{"bytes": 2**30, "swap_in_s": 0.02, "gbps": 50.0, "fraction_of_raw": 0.9,
                           "first_swap_out_s": 1.0, "clean_swap_out_s": 0.0, "dirty_swap_out_s": 0.02,
                           "naive_to_cpu_s": 0.6, "naive_to_gpu_s": 0.2}]}  # fmt: skip
    v = verdicts(result)
    assert v["total_speedup_vs_unload"] == pytest.approx(10.0) and v["trace_swap_wait_ratio_vs_naive"] == pytest.approx(
        50.0
    )
    assert v["round_trip_speedup_vs_naive_min"] == pytest.approx(20.0)
    assert v["ours_oom_retries"] == 1 and v["ours_oom_failures"] == 0 and v["swap_in_fraction_of_raw_min"] == 0.9
    text = markdown(result)
    assert "| ours | 10/10 |" in text and "90%" in text


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    from studio.bench.residency import main

    code = main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work"), "--requests", "16",
                 "--strategies", "ours,naive,unload"])  # fmt: skip
    result = json.loads((tmp_path / "residency-quick-cpu.json").read_text())
    assert code == 0 and not result["errors"]
    assert all(all(v for v in c.values()) for c in result["check"].values())
    assert {"ours", "naive", "unload"} == set(result["strategies"])
    assert result["strategies"]["ours"]["complete"] and (tmp_path / "residency-quick-cpu.md").exists()


def test_stress_tape_replays_the_same_random_inputs_on_any_thread():
    import threading

    import torch

    from studio.bench.residency_stress import Tape, capture

    fam = SimpleNamespace(request=lambda m: m(torch.randn(2, 4) + torch.randint(5, (2, 1), dtype=torch.float32)))
    model = torch.nn.Linear(4, 3)
    tape = {"recording": True, "items": [], "i": 0}
    Tape.install()
    try:
        first = capture(fam, model, tape)
        tape["recording"] = False
        out = []
        t = threading.Thread(target=lambda: out.append(capture(fam, model, dict(tape, i=0))))
        t.start()
        torch.randn(10)  # another thread's draws do not disturb the replay
        t.join()
        assert torch.equal(out[0], first) and len(tape["items"]) == 2
    finally:
        Tape.uninstall()
    assert torch.randn.__name__ == "randn"  # the real function is back


@pytest.mark.slow
def test_stress_quick_run_end_to_end(tmp_path):
    from studio.bench.residency_stress import main

    main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    result = json.loads(next(tmp_path.glob("residency-stress-quick-*.json")).read_text())  # named after the device
    by_name = {t["name"]: t for t in result["targets"]}
    assert by_name["failed requests"]["value"] == 0 and by_name["wrong outputs"]["value"] == 0
    assert result["stress"]["training"]["pauses"] >= 1 and len(result["targets"]) == 5


def test_output_digest_makes_no_full_size_copy_of_the_weights():
    """The digest runs inside the request's lease: a `.float()` copy of a large embedding there was measured as the
    8B model's working memory on the H200 (1.96 GB for a 128-token prefill) and reserved for every later lease."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from studio.bench.residency import digest

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:  # new memory
                    Largest.biggest = max(Largest.biggest, t.untyped_storage().nbytes())
            return out

    emb = torch.nn.Embedding(4096, 256).to(torch.bfloat16)
    packed = torch.nn.Module()
    packed.register_buffer("q", torch.randint(0, 255, (4096, 128), dtype=torch.uint8))
    model = torch.nn.Sequential(emb, packed)
    logits = torch.randn(1, 1, 50_000, dtype=torch.bfloat16)
    with Largest():
        d = digest(model, logits)
    assert Largest.biggest < emb.weight.numel() * emb.weight.element_size() // 8  # no copy of any weight
    expected = [emb.weight.float().sum(), packed.q.float().sum()]
    assert torch.allclose(d[:2], torch.stack(expected), rtol=1e-4) and d[2:].shape == (4096,)
    assert torch.equal(d[2:], logits.flatten()[:4096].float())

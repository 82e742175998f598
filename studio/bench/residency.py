"""Residency benchmark: swap-in bandwidth from pinned RAM, and a mixed trace under four strategies, side by side.

(a) Swap-in from pinned RAM for models of 0.5-7 GB through `ResidencyManager.use()`: effective GB/s against the
    raw pinned host-to-device bandwidth measured in the same run (and the naive pageable `.to()` for reference).
(b) A mixed trace of chat bursts with occasional image / detection / transcription requests over four families
    sized like the real ones (studio/bench/residency_families.py), under a 12 GB cap:
      ours   - ResidencyManager, GreedyDual-Size-Frequency eviction, pinned pools
      lru    - the same manager with least-recently-used eviction
      naive  - an LRU cache that moves models with `model.to("cpu")` / `.to("cuda")` (pageable)
      unload - load from disk for every request, release after it
    Total time, switch time p50/p95 (request -> model ready), OOM retries/failures. A strategy that would overrun
    the time budget stops early; its total is then projected from its per-family mean request time (marked).
Correctness: each family's output after a disk load, after a pinned swap and after a clean (copy-skipped) swap
must be identical.

    python -m studio.bench.residency --out studio/bench/results          # GPU (H200, capped to 12 GB)
    python -m studio.bench.residency --quick --out /tmp/bench            # CPU, simulated card, tiny models
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from studio.bench.common import device_tag
from studio.bench.residency_families import prepare
from studio.bench.residency_trace import Neighbour, make_trace, run_managed, run_naive
from studio.offline import OFFLINE_ENV, QUIET_ENV
from studio.residency import ResidencyManager
from studio.residency.pinned import naive_move, tensor_slots
from studio.residency.probes import CardReading, detect_probe
from studio.residency.simulated import FakeProbe, SimulatedAccelerator

log = logging.getLogger("studio.bench.residency")
GiB, MiB = 2**30, 2**20
REPS = 3  # timed repetitions of every move, ours and the naive baseline alike (medians reported)


# ---- environment ------------------------------------------------------------------------------------------------
class Env:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick, self.cuda = args.quick, torch.cuda.is_available() and not args.quick
        if not self.cuda and not self.quick:
            raise SystemExit("No CUDA GPU: run with --quick (tiny models on a simulated card)")
        self.device = "cuda" if self.cuda else "cpu"
        self.cap = int(args.cap_gb * GiB) if self.cuda else None
        self.reserve = int(args.reserve_gb * GiB) if self.cuda else 2 * MiB
        self.deadline = time.monotonic() + args.deadline_s
        if self.cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.cap / total))  # the 12 GB card's hard wall

        self.fake_probe = FakeProbe(28 * MiB, "simulated 28 MB card")  # --quick: the tiny families need ~35 MB

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def manager(self, policy: str = "gds", monitor: bool = False) -> ResidencyManager:
        common = dict(reserve_bytes=self.reserve, policy=policy, wait_timeout_s=30.0, ram_cap_bytes=64 * GiB)
        if self.cuda:
            m = ResidencyManager("cuda", probe=CappedProbe(detect_probe(), self.cap), vram_cap_bytes=self.cap, **common)
        else:
            m = ResidencyManager(probe=self.fake_probe, accelerator=SimulatedAccelerator(self.fake_probe), **common)
        if monitor:
            m.start_monitor(0.5)  # as the studio runs it: the good-neighbour check in the background
        return m

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class CappedProbe:
    """The H200 seen as the 12 GB card it emulates: total = the cap, used = what is really used on the card (our
    process and any other), so another program's memory shrinks the budget as it would on the small card."""

    def __init__(self, inner: Any, total_bytes: int) -> None:
        self.inner, self.total, self.name = inner, total_bytes, f"{inner.name}, as a {total_bytes / GiB:.0f} GB card"

    def read(self) -> CardReading | None:
        r = self.inner.read()
        if r is None:
            return None
        total = min(
            self.total, r.total_bytes
        )  # used is kept as is (it may exceed the small card): others = used - ours
        return dataclasses.replace(r, name=f"{r.name} as {total / GiB:.0f} GB", total_bytes=total,
                                   free_bytes=max(0, total - r.used_bytes))  # fmt: skip


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ---- (a) swap-in bandwidth -------------------------------------------------------------------------------------
def raw_bandwidth(env: Env, nbytes: int) -> dict:
    m = env.manager()
    accel = m._accel
    host, dev = accel.host_buffer(nbytes), accel.alloc(nbytes)
    pageable = torch.ones(nbytes, dtype=torch.uint8)
    out = {"bytes": nbytes, "pinned": host.pinned}
    for name, src in (("pinned_h2d_gbps", host.tensor), ("pageable_h2d_gbps", pageable)):
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            dev.copy_(src, non_blocking=src is host.tensor)
            env.sync()
            times.append(time.perf_counter() - t0)
        out[name] = nbytes / min(times[1:]) / 1e9
    host.close()
    return out


class SizedLoader:
    """A model of `nbytes` in bf16 tensors of 64 MB (plus a small norm-like tensor each), like an LLM's layers."""

    def __init__(self, nbytes: int, chunk: int) -> None:
        self.key, self.nbytes, self.chunk = f"sized:{nbytes / GiB:.2f}GB", nbytes, chunk

    def estimate_bytes(self) -> int:
        return self.nbytes

    def load(self, device: str) -> torch.nn.Module:
        device = device if torch.cuda.is_available() else "cpu"
        n = max(1, self.nbytes // self.chunk)
        params = [torch.empty(self.chunk // 2, dtype=torch.bfloat16, device=device) for _ in range(n)]
        params += [torch.ones(2048, dtype=torch.bfloat16, device=device) for _ in range(n)]
        return torch.nn.ParameterList([torch.nn.Parameter(p, requires_grad=False) for p in params])

    def release(self, obj: Any) -> None:
        pass


def swap_in_sizes(env: Env, sizes: list[int], chunk: int, raw_gbps: float, naive_max: int) -> list[dict]:
    rows = []
    for nbytes in sizes:
        if env.left() < 20:
            log.warning("time budget: skipping swap-in sizes from %.2f GB", nbytes / GiB)
            break
        m, loader = env.manager(), SizedLoader(nbytes, chunk)
        m.register(loader)
        try:
            with m.use(loader.key, working_bytes=0):
                pass
            t0 = time.perf_counter()
            m.offload(loader.key)  # first swap-down: pins the pool, copies
            first_out = time.perf_counter() - t0
            ins, clean_outs, dirty_outs = [], [], []
            for rep in range(2 * REPS):  # REPS clean round trips, then REPS where a weight changed
                t0 = time.perf_counter()
                with m.use(loader.key, working_bytes=0) as model:
                    ins.append(time.perf_counter() - t0)
                    if rep >= REPS:
                        with torch.no_grad():
                            model[0].add_(0)  # a weight changed: the next swap-down must copy (into the same pool)
                t0 = time.perf_counter()
                m.offload(loader.key)
                (dirty_outs if rep >= REPS else clean_outs).append(time.perf_counter() - t0)
            size = m.snapshot().models[0].bytes
            row = {"bytes": size, "swap_in_s": _median(ins), "swap_in_all_s": ins, "first_swap_out_s": first_out,
                   "clean_swap_out_s": _median(clean_outs), "dirty_swap_out_s": _median(dirty_outs)}  # fmt: skip
            row["gbps"] = size / row["swap_in_s"] / 1e9
            row["fraction_of_raw"] = row["gbps"] / raw_gbps if raw_gbps else None
            if nbytes <= naive_max:
                row.update(naive_round_trips(env, loader, reps=REPS))  # as many as our dirty round trips
            rows.append(row)
            log.info("swap-in %.2f GB: %.3f s = %.1f GB/s", size / GiB, row["swap_in_s"], row["gbps"])
        except Exception as e:
            log.exception("swap-in case %s failed", loader.key)
            rows.append({"bytes": nbytes, "error": f"{type(e).__name__}: {e}"})
        finally:
            m.unregister(loader.key)
            if env.cuda:
                torch.cuda.empty_cache()
    return rows


def naive_round_trips(env: Env, loader: SizedLoader, reps: int) -> dict:
    """The naive baseline timed like ours: warm (one untimed round trip first), `reps` repetitions, medians."""
    obj = loader.load(env.device)
    naive_move(obj, "cpu")
    naive_move(obj, env.device)  # warm-up: the allocator and the copy kernels are ready, as for our swaps
    env.sync()
    outs, ins = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        naive_move(obj, "cpu")
        env.sync()
        t1 = time.perf_counter()
        naive_move(obj, env.device)
        env.sync()
        outs.append(t1 - t0)
        ins.append(time.perf_counter() - t1)
    del obj
    return {"naive_to_cpu_s": _median(outs), "naive_to_gpu_s": _median(ins), "naive_reps": reps,
            "naive_to_cpu_all_s": outs, "naive_to_gpu_all_s": ins}  # fmt: skip


# ---- correctness of moves on the real families ------------------------------------------------------------------
def check_outputs(env: Env, families: dict, loaders: dict) -> dict:
    out = {}
    m = env.manager()
    for name, fam in families.items():
        if env.left() < 30:
            break
        m.register(loaders[name])
        results = []
        try:
            for step in ("after disk load", "after pinned swap", "after clean swap"):
                torch.manual_seed(0)
                digest = m.run(name, lambda model, fam=fam: _capture(fam, model), working_bytes=fam.working_hint)
                results.append((step, digest))
                m.offload(name)
            ref = results[0][1]
            out[name] = {step: bool(torch.equal(ref, r)) for step, r in results[1:]}
        except Exception as e:
            log.exception("check of %s failed", name)
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        m.unregister(name)
    return out


def _capture(fam: Any, model: Any) -> torch.Tensor:
    """Run one request; digest = sums of the first weights + the last tensor any module produced."""
    last: list[torch.Tensor] = []

    def keep(mod: Any, inp: Any, outp: Any) -> None:
        if isinstance(outp, torch.Tensor):
            last[:] = [outp]

    hook = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        fam.request(model)
    finally:
        hook.remove()
    return digest(model, last[0] if last else None)


def digest(model: Any, final: torch.Tensor | None) -> torch.Tensor:
    """Sums of the model's first weights + the first 4,096 values of a request's last output, on the CPU.
    No full-size copy on the device: the sums accumulate in fp32 (`sum(dtype=)`) and the output is sliced before
    it is cast. It runs inside the request's lease, so a `.float()` copy of an 8B model's 128k x 4096 embedding
    (2.1 GB) would be measured as the request's working memory and reserved for every later lease."""
    weights = torch.stack([t.detach().sum(dtype=torch.float32) for t in tensor_slots(model)[:8]]).cpu()
    tail = final.detach().flatten()[:4096].float().cpu() if final is not None else torch.zeros(1)
    return torch.cat([weights, tail])


# ---- main -------------------------------------------------------------------------------------------------------
WEIGHTS = {"ours": 1.5, "lru": 1.0, "naive": 1.5, "unload": 0.6}  # share of the remaining time budget


def _meta(env: Env, args: argparse.Namespace) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "bitsandbytes", "diffusers", "ultralytics", "safetensors", "nvidia-ml-py"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name(0) if env.cuda else f"CPU ({platform.processor() or platform.machine()}), simulated card",
        "command": "python -m studio.bench.residency " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "quick": env.quick, "cap_bytes": env.cap, "reserve_bytes": env.reserve, "python": platform.python_version(),
        "versions": versions,
    }  # fmt: skip


def _save(out: Path, tag: str, result: dict) -> str:
    from studio.bench.residency_report import markdown
    from studio.safety import atomic_write_json, atomic_write_text

    text = markdown(result)
    atomic_write_json(out / f"residency-{tag}.json", result)
    atomic_write_text(out / f"residency-{tag}.md", text)
    return text


def bench(env: Env, args: argparse.Namespace, out: Path, tag: str) -> dict:
    result: dict[str, Any] = {"meta": _meta(env, args), "errors": {}, "strategies": {}}
    neighbour = None
    save = lambda: _save(out, tag, result)  # noqa: E731
    try:
        neighbour = Neighbour(env) if "trace" in args.parts else None  # starts now: torch imports take a while
        bw = raw_bandwidth(env, GiB if env.cuda else 8 * MiB)
        result["bandwidth"] = bw
        if "swap" in args.parts:
            sizes = [int(g * GiB) for g in (0.5, 1, 2, 4, 7)] if env.cuda else [2 * MiB, 4 * MiB, 8 * MiB]
            chunk = 64 * MiB if env.cuda else 256 * 1024
            result["swap_in"] = swap_in_sizes(env, sizes, chunk, bw["pinned_h2d_gbps"], naive_max=sizes[2])
            save()
        if "trace" not in args.parts:
            return result
        families, loaders, errors = prepare(env.device, env.quick, Path(args.work))
        result["families"] = {k: f.bytes for k, f in families.items()}
        result["errors"].update({f"build {k}": v for k, v in errors.items()})
        save()
        if "check" in args.parts:
            result["check"] = check_outputs(env, families, loaders)
            save()
        trace = make_trace(args.requests, args.seed, list(families))
        result["trace"] = {k: trace.count(k) for k in families}
        nb = int(args.neighbour_gb * GiB) if env.cuda else 6 * MiB
        window = (int(0.3 * len(trace)), int(0.8 * len(trace)), nb)
        result["neighbour"] = {"from_request": window[0], "to_request": window[1], "bytes": nb}
        if not neighbour.wait_ready():
            result["errors"]["neighbour"] = "the second CUDA process did not start; no memory pressure mid-trace"
        names = [s for s in args.strategies.split(",") if s in WEIGHTS]
        for i, name in enumerate(names):
            share = WEIGHTS[name] / sum(WEIGHTS[n] for n in names[i:])
            budget = max(5.0, (env.left() - 10) * share)
            log.info("strategy %s: %.0f s budget", name, budget)
            try:
                if name == "naive":
                    result["strategies"][name] = run_naive(env, families, loaders, trace, budget, neighbour, window)
                else:
                    run = run_managed(env, name, families, loaders, trace, budget, neighbour, window)
                    result["strategies"][name] = run
            except Exception as e:
                log.exception("strategy %s failed", name)
                result["errors"][name] = f"{type(e).__name__}: {e}"
            save()
    except Exception as e:
        log.exception("benchmark stopped early")
        result["errors"]["bench"] = f"{type(e).__name__}: {e}"
    finally:
        if neighbour is not None:
            neighbour.close()
        print(save())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models on a simulated card (CPU)")
    p.add_argument("--out", type=Path, default=Path("studio/bench/results"))
    p.add_argument("--tag", default=None, help="file name suffix (default: h200 / gpu / quick)")
    p.add_argument("--work", default="/tmp/residency-bench", help="where the disk tier's files go")
    p.add_argument("--cap-gb", type=float, default=12.0)
    p.add_argument("--reserve-gb", type=float, default=0.8)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=900.0, help="stop starting new work after this long")
    p.add_argument("--strategies", default="ours,naive,unload,lru")
    p.add_argument("--parts", default="swap,check,trace", help="which parts to run: swap (a), check, trace (b)")
    p.add_argument("--neighbour-gb", type=float, default=2.0, help="another program's GPU memory mid-trace")
    args = p.parse_args(argv)
    args.argv = argv
    for k, v in {**QUIET_ENV, **OFFLINE_ENV, "YOLO_CONFIG_DIR": f"{args.work}/ultralytics"}.items():
        os.environ.setdefault(k, v)  # before ultralytics/transformers are imported: nothing may touch the network
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    env = Env(args)
    tag = args.tag or ("quick-cpu" if env.quick else device_tag())  # named after the GPU it ran on
    args.out.mkdir(parents=True, exist_ok=True)
    result = bench(env, args, args.out, tag)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

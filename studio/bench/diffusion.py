"""Image generation and LoRA training benchmark: the studio's diffusion backend vs diffusers' defaults.

Full run (GPU): SD1.5- and SDXL-architecture pipelines with random fp16 weights built from the real configs
(backends/image/tiny.py; speed and memory do not depend on the weight values), under a 12 GB cap (studio VRAM
cap + torch's per-process memory fraction). Side by side in one process:
- generation: it/s (steady-state denoising steps), seconds per image and peak VRAM at 512x512 (SD1.5) and
  1024x1024 (SDXL), for diffusers' default use (`pipe.to("cuda")`, `pipe(prompt)`), for diffusers'
  `enable_model_cpu_offload()` (SDXL) and for the studio (per-component residency leases + memory plan);
- switch cost: a 6.8 GB LLM-sized module is resident, then an SDXL image is asked for. Studio: the residency
  manager parks the module in pinned RAM and brings the UNet back. Default diffusers: `llm.to("cpu")` and
  `pipe.to("cuda")` by hand. Reported as the extra seconds over a warm generation;
- LoRA training (SD1.5, rank 16, 512x512, batch 1, gradient checkpointing, fp16 autocast, 8-bit AdamW): s/step
  and peak VRAM, through the studio's training job.

    python -m studio.bench.diffusion --out studio/bench/results      # GPU
    python -m studio.bench.diffusion --quick                          # tiny pipelines on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

GiB = 2**30


# ---- measuring -----------------------------------------------------------------------------------------
class PeakVram:
    """Peak allocated bytes over a block, even when the residency manager resets torch's peak counter per lease."""

    def __enter__(self) -> PeakVram:
        self.peak = 0
        if torch.cuda.is_available():
            self._orig = torch.cuda.reset_peak_memory_stats
            torch.cuda.reset_peak_memory_stats = self._reset  # fold the peak in before anyone resets it
            self._orig()
        return self

    def _reset(self, device: Any = None) -> None:
        self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        self._orig(device)

    def __exit__(self, *exc: Any) -> None:
        if torch.cuda.is_available():
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats = self._orig

    @property
    def gib(self) -> float | None:
        return round(self.peak / GiB, 2) if torch.cuda.is_available() else None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """Time stamps at the end of each denoising step (after a device sync, so queued kernels are counted)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def progress(self, fraction: float, message: str) -> None:  # the studio backend's progress callback
        if message.startswith("step"):
            _sync()
            self.stamps.append(time.perf_counter())

    def callback(self, pipe: Any, i: int, t: Any, kwargs: dict) -> dict:  # diffusers' callback_on_step_end
        _sync()
        self.stamps.append(time.perf_counter())
        return kwargs

    def its(self) -> float:
        """Steps per second between the first and the last step (excludes text encoding and decoding)."""
        s = self.stamps
        return (len(s) - 1) / (s[-1] - s[0]) if len(s) >= 3 else 0.0


# ---- models with random weights, built on the device by the residency manager ----------------------------
@dataclass
class RandomComponentLoader:
    """Residency Loader that builds an architecture-true component with random weights instead of reading files."""

    key: str
    root: Path
    component: str
    dtype: Any
    configs: dict[str, Any]

    def estimate_bytes(self) -> int:
        from backends.image.tiny import build_component

        with torch.device("meta"):
            model = build_component(self.configs, self.component, torch.float32, "meta")
        return sum(p.numel() for p in model.parameters()) * self.dtype.itemsize

    def load(self, device: str) -> Any:
        from backends.image.tiny import build_component

        return build_component(self.configs, self.component, self.dtype, device)

    def release(self, obj: Any) -> None:
        pass


class DummyLLM(torch.nn.Module):
    def __init__(self, nbytes: int, chunks: int = 32) -> None:
        super().__init__()
        per = nbytes // chunks // 2
        self.chunks = torch.nn.ParameterList(
            torch.nn.Parameter(torch.empty(per, dtype=torch.float16), requires_grad=False) for _ in range(chunks)
        )


@dataclass
class DummyLLMLoader:
    key: str
    nbytes: int

    def estimate_bytes(self) -> int:
        return self.nbytes

    def load(self, device: str) -> Any:
        with torch.device(device):
            return DummyLLM(self.nbytes).eval()

    def release(self, obj: Any) -> None:
        pass


# ---- the runs ------------------------------------------------------------------------------------------
def make_ctx(data_dir: Path, vram_cap_gb: float | None) -> Any:
    from studio.app import build_context
    from studio.settings import Settings

    settings = Settings(data_dir=data_dir, models_dir=data_dir / "models", vram_cap_gb=vram_cap_gb,
                        open_browser=False)  # fmt: skip
    return build_context(settings)


def prepare_model(ctx: Any, configs: dict[str, Any], root: Path) -> Any:
    from backends.image.tiny import write_skeleton

    write_skeleton(root, configs)
    backend = ctx.backends.diffusion
    backend.loader_factory = lambda key, r, comp, dtype: RandomComponentLoader(key, r, comp, dtype, configs)
    return backend, backend.prepare(str(root))


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """First call (loads, warms up) reported apart; speed = best of the later calls."""
    later = runs[1:] or runs
    return {"it_s": max(r["it_s"] for r in later), "s_per_image": min(r["s_per_image"] for r in later),
            "peak_vram_gib": max((r["peak_vram_gib"] or 0) for r in runs) or None,
            "first_call_s": runs[0]["s_per_image"], "runs": runs}  # fmt: skip


def bench_ours(backend: Any, rec: Any, size: int, steps: int, runs: int = 3) -> dict[str, Any]:
    from backends.image.diffusion import GenerateRequest

    req = GenerateRequest("a lighthouse on a cliff at dusk, oil painting", model=str(rec.source.root), width=size,
                          height=size, steps=steps, seed=1, scheduler="Default")  # fmt: skip
    done, memory = [], ""
    for _ in range(runs):  # the first run loads the components and warms up kernels
        clock = StepClock()
        with PeakVram() as peak:
            t0 = time.perf_counter()
            result = backend.generate_with(rec, req, progress=clock.progress)
            _sync()
            seconds = time.perf_counter() - t0
        memory = result.memory
        done.append({"it_s": round(clock.its(), 2), "s_per_image": round(seconds, 3), "peak_vram_gib": peak.gib})
    return {**_summary(done), "memory_mode": memory}


def bench_diffusers(configs: dict, size: int, steps: int, device: str, offload: bool = False, runs: int = 3) -> Any:
    """diffusers used as its docs show: build the pipeline, `.to(device)` (or model CPU offload), call it."""
    from backends.image.tiny import assemble_pipeline, build_components

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = assemble_pipeline(configs["arch"], build_components(configs, dtype=dtype, device=device))
    if offload:  # built on the GPU (fast random init), parked on the CPU, then accelerate's per-call hooks
        pipe.to("cpu")
        _free()
        pipe.enable_model_cpu_offload()
    pipe.set_progress_bar_config(disable=True)
    done = []
    try:
        for _ in range(runs):
            clock = StepClock()
            with PeakVram() as peak:
                t0 = time.perf_counter()
                pipe("a lighthouse on a cliff at dusk, oil painting", width=size, height=size, num_inference_steps=steps,
                     generator=torch.Generator("cpu").manual_seed(1), callback_on_step_end=clock.callback)  # fmt: skip
                _sync()
                seconds = time.perf_counter() - t0
            done.append({"it_s": round(clock.its(), 2), "s_per_image": round(seconds, 3), "peak_vram_gib": peak.gib})
    except torch.OutOfMemoryError as e:
        return {"error": f"CUDA out of memory under the cap: {str(e).splitlines()[0][:160]}", "runs": done}, pipe
    return _summary(done), pipe


def switch_diffusers(pipe: Any, llm_bytes: int, size: int, steps: int, warm_s: float, device: str) -> dict:
    """Default diffusers around an LLM: move the LLM off by hand, move the pipeline on, generate. As many rounds as
    the studio's switch (two), each starting from the LLM on the GPU and the pipeline on the CPU; the second round
    is the one compared (like for like with the studio's second round)."""
    llm = DummyLLM(llm_bytes)
    rounds = []
    for _ in range(2):
        pipe.to("cpu")
        llm.to(device)
        _sync()
        t0 = time.perf_counter()
        llm.to("cpu")
        pipe.to(device)
        _sync()
        moved = time.perf_counter() - t0
        pipe("a lighthouse", width=size, height=size, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(1))  # fmt: skip
        _sync()
        total = time.perf_counter() - t0
        rounds.append({"moves_s": round(moved, 3), "image_s": round(total, 3),
                       "extra_over_warm_s": round(total - warm_s, 3)})  # fmt: skip
    del llm
    last = rounds[-1]
    return {"moves_s": last["moves_s"], "total_s": last["image_s"], "extra_over_warm_s": last["extra_over_warm_s"],
            "first_round": rounds[0], "second_round": rounds[1]}  # fmt: skip


def switch_ours(ctx: Any, backend: Any, rec: Any, llm_bytes: int, size: int, steps: int, warm_s: float) -> dict:
    """LLM used, then an image asked for; twice (the first time the manager also allocates its pinned pools)."""
    from backends.image.diffusion import GenerateRequest

    res = ctx.residency
    res.register(DummyLLMLoader("llm:dummy-6.8gb", llm_bytes))
    req = GenerateRequest("a lighthouse", model=str(rec.source.root), width=size, height=size, steps=steps, seed=1,
                          scheduler="Default")  # fmt: skip
    rounds = []
    for _ in range(2):
        t0 = time.perf_counter()
        with res.use("llm:dummy-6.8gb") as llm:  # the LLM answers a question: it is on the GPU now
            float(llm.chunks[0][:16].float().sum())
        llm_in = time.perf_counter() - t0
        t0 = time.perf_counter()
        backend.generate_with(rec, req)
        _sync()
        total = time.perf_counter() - t0
        rounds.append({"llm_in_s": round(llm_in, 3), "image_s": round(total, 3),
                       "extra_over_warm_s": round(total - warm_s, 3)})  # fmt: skip
    snap = res.snapshot()
    return {"total_s": rounds[-1]["image_s"], "extra_over_warm_s": rounds[-1]["extra_over_warm_s"],
            "first_round": rounds[0], "second_round": rounds[1],
            "tiers_after": {m.key: m.tier for m in snap.models}, "metrics": _metrics(snap)}  # fmt: skip


def _metrics(snap: Any) -> dict[str, Any]:
    import dataclasses

    m = getattr(snap, "metrics", None)
    if m is None:
        return {}
    data = dataclasses.asdict(m) if dataclasses.is_dataclass(m) else getattr(m, "__dict__", {})
    return {k: v for k, v in data.items() if isinstance(v, (int, float, str, dict))}


def bench_lora(ctx: Any, root: Path, data_dir: Path, resolution: int, steps: int, rank: int) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from backends.image.lora_train import LoraTrainConfig

    images = data_dir / "lora-images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(images / f"{i}.png")
    cfg = LoraTrainConfig(dataset=(str(images),), model=str(root), instance_prompt="a photo of sks texture",
                          rank=rank, steps=steps, learning_rate=1e-4, resolution=resolution)  # fmt: skip
    job = _StandInJob()
    with PeakVram() as peak:
        t0 = time.perf_counter()
        result = ctx.backends.sd_lora.train(cfg, job)
        _sync()
        seconds = time.perf_counter() - t0
    times = [row["time"] for row in ctx.runs.get(result.run_id).metrics()]
    skip = min(3, len(times) - 2)
    s_step = (times[-1] - times[skip]) / max(1, len(times) - 1 - skip) if len(times) > 2 else None
    return {"s_per_step": round(s_step, 4) if s_step else None, "peak_vram_gib": peak.gib, "total_s": round(seconds, 2),
            "steps": result.steps_done, "final_loss": result.final_loss, "rank": rank, "resolution": resolution,
            "optimizer": next((ln.split("optimizer: ")[1] for ln in job.logs if "optimizer: " in ln), "torch AdamW")}  # fmt: skip


class _StandInJob:
    def __init__(self) -> None:
        self.logs: list[str] = []

    def set_progress(self, fraction: float, message: str = "") -> None:
        pass

    def log(self, msg: str) -> None:
        self.logs.append(msg)

    def should_stop(self) -> bool:
        return False


# ---- main ------------------------------------------------------------------------------------------------
def guarded(entry: dict[str, Any], key: str, fn: Any, *args: Any) -> Any:
    """Run one measurement; a failure is recorded under `key` and the benchmark goes on."""
    try:
        entry[key] = fn(*args)
    except Exception as e:
        traceback.print_exc()
        entry[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    return entry[key]


def diffusers_section(name: str, configs: dict, size: int, steps: int, device: str, llm_bytes: int) -> dict:
    entry: dict[str, Any] = {"size": size}
    print(f"[{name}] diffusers default ...", flush=True)
    pipe = None
    try:
        entry["diffusers_default"], pipe = bench_diffusers(configs, size, steps, device)
        if name == "sdxl" and "error" not in entry["diffusers_default"]:
            print("[sdxl] switch with diffusers (manual .to moves) ...", flush=True)
            warm = entry["diffusers_default"]["s_per_image"]
            guarded(entry, "switch_diffusers", switch_diffusers, pipe, llm_bytes, size, steps, warm, device)
    except Exception as e:
        traceback.print_exc()
        entry.setdefault("diffusers_default", {"error": f"{type(e).__name__}: {e}"})
    del pipe
    _free()
    if name == "sdxl" and device == "cuda":  # accelerate's model offload needs an accelerator
        print("[sdxl] diffusers enable_model_cpu_offload ...", flush=True)
        guarded(entry, "diffusers_cpu_offload", lambda: bench_diffusers(configs, size, steps, device, True)[0])
        _free()
    return entry


def studio_section(name: str, configs: dict, size: int, steps: int, data: Path, args: Any, cuda: bool,
                   llm_bytes: int, report: dict[str, Any]) -> dict:  # fmt: skip
    entry: dict[str, Any] = {}
    print(f"[{name}] studio backend ...", flush=True)
    ctx = make_ctx(data / name, args.vram_cap_gb if cuda else None)
    try:
        backend, rec = prepare_model(ctx, configs, data / name / "model")
        ours = guarded(entry, "studio", bench_ours, backend, rec, size, steps)
        if name == "sdxl" and "error" not in ours:
            print("[sdxl] switch through the residency manager ...", flush=True)
            warm = ours["s_per_image"]
            guarded(entry, "switch_studio", switch_ours, ctx, backend, rec, llm_bytes, size, steps, warm)
        if name == "sd15" and args.lora_steps > 0:
            print("[sd15] LoRA training ...", flush=True)
            guarded(report, "lora_train", bench_lora, ctx, rec.source.root, data / name, size, args.lora_steps, 16)
    finally:  # give every byte back before the next measurement (the next section must start from zero)
        close_context(ctx)
        del ctx
        _free()
    return entry


def close_context(ctx: Any) -> None:
    """End the jobs, unregister every model (their memory goes back) and stop the residency monitor."""
    ctx.jobs.shutdown(timeout=5)
    for view in ctx.residency.snapshot().models:
        with contextlib.suppress(Exception):
            ctx.residency.unregister(view.key)
    with contextlib.suppress(Exception):
        ctx.residency.close()
    ctx.backends = type(ctx.backends)(ctx)


def run(args: argparse.Namespace, save: Any) -> dict[str, Any]:
    from backends.image.tiny import SD15_CONFIGS, SDXL_CONFIGS, TINY_SD15_CONFIGS, TINY_SDXL_CONFIGS

    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_cap_gb * GiB / total))
    sd15, sdxl = (SD15_CONFIGS, SDXL_CONFIGS) if cuda else (TINY_SD15_CONFIGS, TINY_SDXL_CONFIGS)
    s15, sxl, steps = (512, 1024, args.steps) if cuda else (64, 128, 4)
    llm_bytes = int(6.8e9) if cuda else 50_000_000
    data = Path(tempfile.mkdtemp(prefix="bench-diffusion-"))
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
                              "vram_cap_gb": args.vram_cap_gb if cuda else None, "steps": steps}  # fmt: skip
    report["order"] = "studio first" if args.studio_first else "diffusers first"
    known = {"sd15": (sd15, s15), "sdxl": (sdxl, sxl)}
    for name in args.sections.split(","):  # in the order given
        configs, size = known[name]
        report[name] = {"size": size}
        parts = [(diffusers_section, (name, configs, size, steps, device, llm_bytes)),
                 (studio_section, (name, configs, size, steps, data, args, cuda, llm_bytes, report))]  # fmt: skip
        for fn, fn_args in reversed(parts) if args.studio_first else parts:
            report[name].update(fn(*fn_args))
            save(report)
    return report


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def markdown(report: dict[str, Any]) -> str:
    rows = ["| case | setup | it/s | s/image | peak VRAM GiB | notes |", "|---|---|---|---|---|---|"]
    setups = (("diffusers default", "diffusers_default"), ("diffusers cpu offload", "diffusers_cpu_offload"),
              ("studio", "studio"))  # fmt: skip
    for name in ("sd15", "sdxl"):
        e = report.get(name, {})
        for label, key in setups:
            r = e.get(key)
            if r is not None:
                note = r.get("error") or r.get("memory_mode", "")
                rows.append(f"| {name} {e.get('size')}px | {label} | {r.get('it_s', '-')} | "
                            f"{r.get('s_per_image', '-')} | {r.get('peak_vram_gib', '-')} | {note} |")  # fmt: skip
    e = report.get("sdxl", {})
    for label, key in (("diffusers (manual .to)", "switch_diffusers"), ("studio (residency manager)", "switch_studio")):
        r = e.get(key)
        if r:
            note = r.get("error") or f"extra over a warm image: {r.get('extra_over_warm_s')} s"
            rows.append(f"| SDXL after a 6.8 GB LLM | {label} | - | {r.get('total_s', '-')} | - | {note} |")
    lo = report.get("lora_train")
    if lo:
        note = lo.get("error") or f"{lo.get('optimizer')}, gradient checkpointing, {lo.get('steps')} steps"
        rows.append(f"| LoRA SD1.5 rank 16 | studio | {lo.get('s_per_step', '-')} s/step | - | "
                    f"{lo.get('peak_vram_gib', '-')} | {note} |")  # fmt: skip
    return "\n".join(rows)


def targets(report: dict[str, Any], cap_gib: float) -> list[dict[str, Any]]:
    """The Image issue's targets for the sections that ran: generation and LoRA training fit under the cap, and
    generation is at least as fast as diffusers' defaults (same run)."""
    from studio.bench.common import Target

    out = []
    for name, arch in (("sd15", "SD1.5"), ("sdxl", "SDXL")):
        section = report.get(name)
        if not section or "studio" not in section:  # the section did not run (an error in it still counts)
            continue
        ours, theirs = section.get("studio") or {}, section.get("diffusers_default") or {}
        title = f"{arch} {section.get('size')}x{section.get('size')}"
        ratio = round(ours["it_s"] / theirs["it_s"], 3) if ours.get("it_s") and theirs.get("it_s") else None
        out.append(Target(f"{title} generation peak VRAM, studio", ours.get("peak_vram_gib"), cap_gib, "GiB",
                          higher_is_better=False))  # fmt: skip
        out.append(Target(f"{title} it/s, studio / diffusers default", ratio, 1.0, "x"))
    lora = report.get("lora_train")
    if lora:
        out.append(Target("SD1.5 LoRA training (rank 16) peak VRAM", lora.get("peak_vram_gib"), cap_gib, "GiB",
                          higher_is_better=False))  # fmt: skip
    return [t.as_dict() for t in out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studio.bench.diffusion", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny pipelines on the CPU (checks the script)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lora-steps", type=int, default=20)
    p.add_argument("--vram-cap-gb", type=float, default=12.0)
    p.add_argument("--sections", default="sd15,sdxl", help="comma-separated: sd15 (with LoRA training), sdxl")
    p.add_argument("--studio-first", action="store_true", help="run the studio before diffusers in each section")
    p.add_argument("--out", type=Path, default=None, help="folder for diffusion-<device>.json/.md")
    args = p.parse_args(argv)
    t0 = time.time()
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
            "python": platform.python_version()}  # fmt: skip

    def save(report: dict[str, Any]) -> None:
        report.update(meta, seconds=round(time.time() - t0, 1), targets=targets(report, args.vram_cap_gb))
        if args.out:  # named after the device it ran on, written atomically (a killed run leaves the old file)
            from studio.bench.common import device_tag, targets_table
            from studio.safety import atomic_write_json, atomic_write_text

            args.out.mkdir(parents=True, exist_ok=True)
            stem = f"diffusion-{'quick-' if args.quick else ''}{device_tag()}"
            atomic_write_json(args.out / f"{stem}.json", report)
            atomic_write_text(args.out / f"{stem}.md",
                              f"# Diffusion benchmark ({report['device']}, {report['date']})\n\n`{report['command']}`"
                              f"\n\n{markdown(report)}\n\n{targets_table(report['targets'])}\n")  # fmt: skip

    report = run(args, save)
    save(report)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

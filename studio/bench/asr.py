"""ASR benchmark on the CPU: WER per Whisper model, DER of the offline diarization engine, real-time factor.

All speech is synthesised here with Debian's espeak-ng (studio.bench.asr_data), so references are exact:
- WER (jiwer, corpus level, lower-cased, punctuation removed, numbers 0-20 spelled out) of each offline Whisper model over every voice x
  sentence, transcribed through the studio's own AsrBackend (streamed decode, VAD windows, residency lease);
- DER (pyannote.metrics, no collar and a 0.25 s collar, overlap counted) of the offline engine (Silero VAD +
  Resemblyzer GE2E + spectral clustering) on two-speaker dialogues with pauses and overlaps, with the speaker count
  found automatically and given; and on the real 30 s recording + RTTM that pyannote.audio ships;
- real-time factor (compute seconds per audio second, lower is faster): the studio end to end, and per VAD window
  CTranslate2 int8 (faster-whisper) against transformers' WhisperForConditionalGeneration in fp32, run alternately
  window by window so both see the same machine load, greedy, forced to the same number of tokens. No transformers
  Whisper weights exist offline, so that model has tiny.en's shape with RANDOM weights: only its speed is measured.

    python -m studio.bench.asr [--quick] [--out studio/bench/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from studio.bench.asr_data import SENTENCES, VOICES, Dialogue, espeak_available, make_dialogue, synthesize
from studio.bench.common import describe_machine, machine_info

ROOT = Path(__file__).resolve().parents[2]
PAIRS = (("en-us", "en-us+f3"), ("en-us+m7", "en-029+f4"), ("en-gb-scotland+klatt", "en-gb-x-rp+f2"))
GAPS = [0.6, -0.4, 1.2, 0.3, -0.6]  # seconds between lines; negative = the next speaker starts early (overlap)


def _context(tmp: Path):
    from studio.app import build_context
    from studio.settings import Settings

    return build_context(Settings(data_dir=tmp / "data", models_dir=tmp / "models", open_browser=False))


def _wer(refs: list[str], hyps: list[str]) -> float:
    from backends.audio.wer import wer

    return wer(refs, hyps)


def wer_section(ctx, tmp: Path, voices, sentences, models) -> list[dict]:
    from backends.audio.asr import TranscribeOptions
    from backends.audio.pcm import write_wav

    asr = ctx.backends.asr
    clips = {(v, s): write_wav(tmp / f"{v}-{i}.wav", synthesize(s, v)) for v in voices for i, s in enumerate(sentences)}
    rows = []
    for model in models:
        asr.transcribe(clips[(voices[0], sentences[0])], TranscribeOptions(model_id=model, language="en"))  # load
        for voice in voices:
            t0, hyps = time.perf_counter(), []
            for s in sentences:
                hyps.append(asr.transcribe(clips[(voice, s)], TranscribeOptions(model_id=model, language="en")).text)
            took = time.perf_counter() - t0
            rows.append({"model": model, "voice": voice, "wer": _wer(list(sentences), hyps), "seconds": took,
                         "example": hyps[0]})  # fmt: skip
            print(f"  WER {model:16s} {voice:22s} {rows[-1]['wer']:.3f}  ({took:.1f} s)", flush=True)
        rows.append({"model": model, "voice": "ALL", "wer": float(np.mean([r["wer"] for r in rows[-len(voices) :]]))})
    return rows


def _reference(d: Dialogue):
    from backends.audio.diarize import SpeakerTurn

    return [SpeakerTurn(t.start, t.end, t.speaker) for t in d.turns]


def _overlap_share(turns) -> float:
    """Fraction of speech time where two reference speakers talk at once."""
    grid = np.zeros(int(max(t.end for t in turns) * 100) + 1, int)
    for t in turns:
        grid[int(t.start * 100) : int(t.end * 100)] += 1
    return float((grid > 1).sum() / max(1, (grid > 0).sum()))


def der_section(ctx, tmp: Path, pairs, lines_per_dialogue: int) -> list[dict]:
    from backends.audio.diarize import DiarizeOptions, diarization_error_rate, read_rttm
    from backends.audio.pcm import write_wav
    from studio.catalog import package_dir

    engine = ctx.backends.asr.diarizer
    cases = []
    for a, b in pairs:
        lines = [("A" if i % 2 == 0 else "B", a if i % 2 == 0 else b, SENTENCES[i]) for i in range(lines_per_dialogue)]
        d = make_dialogue(lines, GAPS[: lines_per_dialogue - 1])
        cases.append((f"espeak {a} / {b}", write_wav(tmp / f"dlg-{a}-{b}.wav", d.pcm), _reference(d), d.duration_s))
    sample = package_dir("pyannote.audio") / "sample"
    ref = read_rttm(sample / "sample.rttm")
    cases.append(("pyannote sample.wav (real speech)", sample / "sample.wav", ref, 30.0))
    rows = []
    for name, path, ref, duration in cases:
        for given in (None, 2):
            t0 = time.perf_counter()
            hyp = engine.diarize(path, DiarizeOptions(num_speakers=given))
            took = time.perf_counter() - t0
            rows.append({
                "audio": name, "speakers_given": given, "speakers_found": len({t.speaker for t in hyp}),
                "der": diarization_error_rate(ref, hyp), "der_collar_0.25": diarization_error_rate(ref, hyp, 0.25),
                "overlap_share": _overlap_share(ref), "rtf": took / duration,
            })  # fmt: skip
            r = rows[-1]
            print(f"  DER {name:40s} k={given or 'auto'} {r['der']:.3f} / {r['der_collar_0.25']:.3f}", flush=True)
    return rows


def _random_transformers_whisper():
    """tiny.en's architecture (config values of openai/whisper-tiny.en) with random weights."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, decoder_layers=4,
        encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50257, eos_token_id=50256,
        pad_token_id=50256, bos_token_id=50256,
    )  # fmt: skip
    return WhisperForConditionalGeneration(cfg).eval()


def rtf_section(ctx, tmp: Path, pairs, lines_per_dialogue: int, models) -> dict:
    """End-to-end RTF of the studio per model, then per-window CTranslate2 vs transformers on tiny.en's shape."""
    import torch
    from faster_whisper import WhisperModel
    from transformers import GenerationConfig, WhisperFeatureExtractor
    from transformers.generation.utils import GenerationMixin

    from backends.audio.asr import TranscribeOptions
    from backends.audio.models import whisper_dir
    from backends.audio.pcm import load_pcm, write_wav
    from backends.audio.vad import SpeechWindows, VadConfig, load_silero_session

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    parts = []
    for a, b in pairs:
        lines = [("A" if i % 2 == 0 else "B", a if i % 2 == 0 else b, SENTENCES[i]) for i in range(lines_per_dialogue)]
        parts += [make_dialogue(lines, GAPS[: lines_per_dialogue - 1]).pcm, np.zeros(16000 * 3, np.float32)]
    path = write_wav(tmp / "rtf.wav", np.concatenate(parts))
    duration = load_pcm(path).size / 16000
    end_to_end = {}
    for model in models:
        opts = TranscribeOptions(model_id=model, language="en")
        ctx.backends.asr.transcribe(path, opts)  # warm: model loaded, caches filled
        t0 = time.perf_counter()
        ctx.backends.asr.transcribe(path, opts)
        end_to_end[model] = (time.perf_counter() - t0) / duration
        print(f"  RTF studio end to end {model}: {end_to_end[model]:.3f}", flush=True)

    windows = list(SpeechWindows(VadConfig(), load_silero_session()).feed(load_pcm(path), final=True))
    spec = ctx.catalog.get("whisper-tiny.en")
    ct2 = WhisperModel(str(whisper_dir(spec, ctx.catalog, ctx.settings.cache_dir)), device="cpu",
                       compute_type="int8", cpu_threads=threads)  # fmt: skip
    hf, fe = _random_transformers_whisper(), WhisperFeatureExtractor()

    def one_window(audio: np.ndarray) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        segs, _ = ct2.transcribe(audio, language="en", beam_size=1, condition_on_previous_text=False)
        n = sum(len(s.tokens) for s in segs)
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        feats = fe(audio, sampling_rate=16000, return_tensors="pt").input_features
        gen = GenerationConfig(decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, do_sample=False,
                               num_beams=1, max_new_tokens=max(1, n), min_new_tokens=max(1, n))  # fmt: skip
        with torch.inference_mode():
            GenerationMixin.generate(hf, input_features=feats, generation_config=gen)
        return ours, time.perf_counter() - t0, n

    one_window(windows[0].audio)  # warm-up of both, not counted
    ours_s, theirs_s, tokens = (sum(x) for x in zip(*(one_window(w.audio) for w in windows), strict=True))
    audio_s = sum(w.audio.size for w in windows) / 16000
    print(f"  RTF per window: ctranslate2 int8 {ours_s / audio_s:.3f}, transformers fp32 {theirs_s / audio_s:.3f}")
    return {
        "audio_seconds": duration, "end_to_end_rtf": end_to_end, "windows": len(windows), "window_audio_s": audio_s,
        "tokens": tokens, "ct2_int8_rtf": ours_s / audio_s, "transformers_fp32_rtf": theirs_s / audio_s,
        "threads": threads,
    }  # fmt: skip


def render(result: dict) -> str:
    m = result["machine"]
    out = [
        f"# ASR benchmark, CPU ({result['date']})", "",
        f"Machine: {describe_machine(m)}. 1-min load average before/after: {result['load_before']:.2f} / "
        f"{result['load_after']:.2f} (other work on the machine slows every timing).",
        f"Command: `{result['command']}`", "",
        "## WER (espeak-ng speech, 8 sentences per voice, language given as en; lower-cased, no punctuation, "
        "numbers 0-20 spelled out so '9' = 'nine')", "",
        "| model | voice | WER | example transcript of sentence 1 |", "|---|---|---|---|",
    ]  # fmt: skip
    for r in result["wer"]:
        out.append(f"| {r['model']} | {r['voice']} | {r['wer']:.3f} | {r.get('example', '')} |")
    out += ["", "## DER of the offline engine (Silero VAD + Resemblyzer GE2E + spectral clustering)", "",
            "| audio | speakers given | found | DER | DER (0.25 s collar) | overlapped speech | RTF |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["der"]:
        out.append(f"| {r['audio']} | {r['speakers_given'] or 'auto'} | {r['speakers_found']} | {r['der']:.3f} | "
                   f"{r['der_collar_0.25']:.3f} | {r['overlap_share']:.1%} | {r['rtf']:.3f} |")  # fmt: skip
    rtf = result["rtf"]
    out += ["", f"## Real-time factor on {rtf['threads']} CPU threads (seconds of compute per second of audio)", "",
            "| what | RTF |", "|---|---|"]  # fmt: skip
    for model, value in rtf["end_to_end_rtf"].items():
        out.append(
            f"| studio end to end, {model} int8, beam 5, VAD ({rtf['audio_seconds']:.0f} s file) | {value:.3f} |"
        )
    out += [
        f"| per VAD window, faster-whisper/CTranslate2 tiny.en int8, greedy ({rtf['windows']} windows, "
        f"{rtf['tokens']} tokens) | {rtf['ct2_int8_rtf']:.3f} |",
        f"| same windows, transformers WhisperForConditionalGeneration fp32, greedy, same token count "
        f"(**random weights**, tiny.en shape: speed only) | {rtf['transformers_fp32_rtf']:.3f} |",
        "", "No transformers Whisper weights exist offline here, so the transformers row uses a random-initialised "
        "model of tiny.en's architecture, forced to emit as many tokens per window as the real model did; its "
        "compute per window is what a real tiny.en would cost, its text is meaningless and not scored.",
    ]  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 voices x 2 sentences, 1 dialogue (checks the script)")
    p.add_argument("--out", type=Path, default=None, help="folder for asr-cpu.json and asr-cpu.md")
    args = p.parse_args(argv)
    if not espeak_available():
        print("espeak-ng is missing: apt-get install -y espeak-ng", file=sys.stderr)
        return 2
    from studio.safety import atomic_write_json, atomic_write_text

    voices, sentences = (VOICES[:2], SENTENCES[:2]) if args.quick else (VOICES, SENTENCES)
    pairs, n_lines = (PAIRS[:1], 4) if args.quick else (PAIRS, 6)
    models = ("whisper-tiny.en", "whisper-base")
    result = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "load_before": os.getloadavg()[0],
              "command": "python -m studio.bench.asr " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info("faster-whisper", "ctranslate2", "torch", "transformers")}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ctx = _context(tmp)
        print("WER", flush=True)
        result["wer"] = wer_section(ctx, tmp, voices, sentences, models)
        print("DER", flush=True)
        result["der"] = der_section(ctx, tmp, pairs, n_lines)
        print("RTF", flush=True)
        result["rtf"] = rtf_section(ctx, tmp, pairs, n_lines, models)
        ctx.jobs.shutdown(timeout=10)
    result["load_after"] = os.getloadavg()[0]
    md = render(result)
    print(md)
    if args.out is not None:
        atomic_write_json(args.out / "asr-cpu.json", result)
        atomic_write_text(args.out / "asr-cpu.md", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Audio quality benchmark (issue 16), side by side in one run, on espeak-ng speech made here:

1. WER parity: the studio pipeline (VAD windows, residency, streamed decode) against plain faster-whisper
   (`WhisperModel.transcribe(file, beam_size=5, language="en")`, its defaults otherwise) with the same model on the
   same clips, for tiny.en and base.
2. DER per dialogue type: 2, 3 and 4 espeak-ng speakers with several returns (A-B-A, A-B-A-B-A, A-B-C-A-B, ...),
   the speaker count automatic, and pyannote's real 30 s sample; speakers found and DER (pyannote.metrics).
3. Fine-tuning before/after: tiny.en tuned (decoder, frozen encoder) on sentences with made-up product names and
   surnames; the error on those words in held-out sentences, and general-sentence WER (tolerance stated).

    python -m studio.bench.asr_quality [--quick] [--sections parity,der,finetune] [--out studio/bench/results]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from studio.bench.asr_data import (
    DOMAIN_TERMS,
    SENTENCES,
    VOICES,
    espeak_available,
    make_dialogue,
    synthesize,
    write_domain_dataset,
)
from studio.bench.common import Target, describe_machine, machine_info, targets_table, write_results

DIALOGUE_VOICES = ("en-us+m7", "en-029+f4", "en-gb-scotland+klatt", "en-gb-x-rp+f2")  # GE2E tells these apart
DIALOGUES = {2: ("ABA", "ABABA"), 3: ("ABCAB", "ABCBCA"), 4: ("ABCDBADC", "ABACADAB")}
GAPS = (0.5, -0.3, 0.8, 0.3, 1.0, 0.4, 0.2, 0.6)
GENERAL_TOLERANCE = 0.03  # general-sentence WER may rise at most this much (absolute) after domain tuning


def _context(tmp: Path):
    from studio.app import build_context
    from studio.settings import Settings

    return build_context(Settings(data_dir=tmp / "data", models_dir=tmp / "models", open_browser=False))


def parity_section(ctx, tmp: Path, voices, sentences, models) -> list[dict]:
    from faster_whisper import WhisperModel

    from backends.audio import TranscribeOptions, write_wav
    from backends.audio.models import whisper_dir
    from backends.audio.wer import wer

    clips = [(write_wav(tmp / f"p-{v}-{i}.wav", synthesize(s, v)), s) for v in voices for i, s in enumerate(sentences)]
    rows = []
    for model in models:
        spec = ctx.catalog.get(model)
        plain = WhisperModel(str(whisper_dir(spec, ctx.catalog, ctx.settings.cache_dir)), device="cpu",
                             compute_type="int8")  # fmt: skip
        ours, theirs = [], []
        for path, _ in clips:
            ours.append(ctx.backends.asr.transcribe(path, TranscribeOptions(model_id=model, language="en")).text)
            segs, _ = plain.transcribe(str(path), language="en", beam_size=5)
            theirs.append(" ".join(s.text.strip() for s in segs))
        refs = [t for _, t in clips]
        rows.append({"model": model, "clips": len(clips), "pipeline_wer": wer(refs, ours),
                     "plain_wer": wer(refs, theirs)})  # fmt: skip
        print(f"  {model}: pipeline {rows[-1]['pipeline_wer']:.3f}  plain {rows[-1]['plain_wer']:.3f}", flush=True)
    return rows


def der_section(ctx, tmp: Path, kinds: dict[int, tuple[str, ...]]) -> list[dict]:
    from backends.audio import DiarizeOptions, SpeakerTurn, diarization_error_rate, read_rttm, write_wav
    from studio.catalog import package_dir

    cases = []
    for n, patterns in kinds.items():
        for pat in patterns:
            lines = [(s, DIALOGUE_VOICES[ord(s) - 65], SENTENCES[i % len(SENTENCES)]) for i, s in enumerate(pat)]
            d = make_dialogue(lines, list(GAPS[: len(lines) - 1]))
            ref = [SpeakerTurn(t.start, t.end, t.speaker) for t in d.turns]
            cases.append((f"{n} speakers {'-'.join(pat)}", n, write_wav(tmp / f"d-{pat}.wav", d.pcm), ref))
    sample = package_dir("pyannote.audio") / "sample"
    cases.append(
        ("pyannote sample.wav (real, 2 speakers)", 2, sample / "sample.wav", read_rttm(sample / "sample.rttm"))
    )
    rows = []
    for name, n, path, ref in cases:
        t0 = time.perf_counter()
        hyp = ctx.backends.asr.diarizer.diarize(path, DiarizeOptions())
        labels = [t.speaker for t in hyp]
        in_order = labels[:1] == ["SPEAKER_1"] and all(
            int(x.split("_")[1]) <= 1 + max([0, *(int(y.split("_")[1]) for y in labels[:i])]) for i, x in enumerate(labels)
        )  # fmt: skip
        rows.append({"audio": name, "speakers": n, "found": len(set(labels)), "der": diarization_error_rate(ref, hyp),
                     "der_collar_0.25": diarization_error_rate(ref, hyp, 0.25), "labels_in_order": in_order,
                     "seconds": time.perf_counter() - t0})  # fmt: skip
        print(f"  {name}: found {rows[-1]['found']}/{n}, DER {rows[-1]['der']:.3f}", flush=True)
    return rows


def finetune_section(ctx, tmp: Path, steps: int) -> dict:
    from backends.audio import TranscribeOptions, TuneConfig
    from backends.audio.wer import wer, word_error_on

    held = write_domain_dataset(tmp / "domain")
    cfg = TuneConfig(str(tmp / "domain" / "train"), output_name="domain-bench", max_steps=steps, learning_rate=3e-5,
                     batch_size=8, freeze_encoder=True, gradient_checkpointing=False)  # fmt: skip
    t0 = time.perf_counter()
    res = ctx.backends.whisper_tuner.train(cfg)
    took = time.perf_counter() - t0
    out = {"steps": res.steps_done, "train_seconds": took, "dev_wer_before": res.wer_before,
           "dev_wer_after": res.wer_after, "examples": res.examples}  # fmt: skip
    for tag, model in (("before", "whisper-tiny.en"), ("after", res.model_id)):
        for kind, clips in held.items():
            refs = [t for _, t in clips]
            hyps = [ctx.backends.asr.transcribe(p, TranscribeOptions(model_id=model, language="en")).text
                    for p, _ in clips]  # fmt: skip
            out[f"{kind}_wer_{tag}"] = wer(refs, hyps)
            if kind == "terms":
                out[f"term_error_{tag}"] = word_error_on(list(DOMAIN_TERMS), refs, hyps)
                out[f"term_examples_{tag}"] = hyps[:3]
    print(f"  term error {out['term_error_before']:.3f} -> {out['term_error_after']:.3f}; general WER "
          f"{out['general_wer_before']:.3f} -> {out['general_wer_after']:.3f} ({took:.0f} s)", flush=True)  # fmt: skip
    return out


def targets(result: dict) -> list[dict]:
    out = [Target(f"pipeline WER - plain faster-whisper WER, {r['model']}", round(r["pipeline_wer"] - r["plain_wer"], 4),
                  0.0, "WER", higher_is_better=False).as_dict() for r in result["parity"]]  # fmt: skip
    for r in result["der"]:
        out.append(Target(f"speakers found - true, {r['audio']}", abs(r["found"] - r["speakers"]), 0, "speakers",
                          higher_is_better=False).as_dict())  # fmt: skip
        out.append(Target(f"DER, {r['audio']}", round(r["der"], 4), 0.25 if "pyannote" in r["audio"] else 0.15,
                          "DER", higher_is_better=False).as_dict())  # fmt: skip
    ft = result.get("finetune")
    if ft:
        drop = (ft["term_error_before"] - ft["term_error_after"]) / max(ft["term_error_before"], 1e-9)
        out.append(Target("domain-word error, relative drop after tuning", round(drop, 4), 0.5, "fraction").as_dict())
        rise = ft["general_wer_after"] - ft["general_wer_before"]
        out.append(Target("general-sentence WER rise after tuning", round(rise, 4), GENERAL_TOLERANCE, "WER",
                          higher_is_better=False).as_dict())  # fmt: skip
    return out


def render(result: dict) -> str:
    m = result["machine"]
    out = [f"# Audio quality benchmark ({m['date']})", "", f"Machine: {describe_machine(m)}", f"Command: `{m['command']}`",
           "", "## WER parity: studio pipeline vs plain faster-whisper (same model, beam 5, same clips)", "",
           "| model | clips | pipeline WER | plain faster-whisper WER |", "|---|---|---|---|"]  # fmt: skip
    out += [
        f"| {r['model']} | {r['clips']} | {r['pipeline_wer']:.3f} | {r['plain_wer']:.3f} |" for r in result["parity"]
    ]
    out += [
        "",
        "## DER per dialogue type (offline engine, speaker count automatic)",
        "",
        "| audio | speakers | found | DER | DER (0.25 s collar) | labels in order |",
        "|---|---|---|---|---|---|",
    ]
    out += [f"| {r['audio']} | {r['speakers']} | {r['found']} | {r['der']:.3f} | {r['der_collar_0.25']:.3f} | "
            f"{'yes' if r['labels_in_order'] else 'no'} |" for r in result["der"]]  # fmt: skip
    ft = result.get("finetune")
    if ft:
        out += ["", f"## Fine-tuning tiny.en on made-up domain words ({ft['steps']} steps, frozen encoder, "
                f"{ft['train_seconds']:.0f} s on this CPU including conversion and export)", "",
                "| | before | after |", "|---|---|---|",
                f"| error on the domain words, held-out sentences | {ft['term_error_before']:.3f} | "
                f"{ft['term_error_after']:.3f} |",
                f"| WER, held-out domain sentences | {ft['terms_wer_before']:.3f} | {ft['terms_wer_after']:.3f} |",
                f"| WER, general sentences (tolerance +{GENERAL_TOLERANCE}) | {ft['general_wer_before']:.3f} | "
                f"{ft['general_wer_after']:.3f} |",
                f"| examples | {' / '.join(ft['term_examples_before'])} | {' / '.join(ft['term_examples_after'])} |"]  # fmt: skip
    out += ["", "## Targets", "", targets_table(result["targets"])]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 voices x 3 sentences, 2-speaker dialogues, no fine-tune")
    p.add_argument("--steps", type=int, default=20, help="fine-tuning steps")
    p.add_argument("--sections", default="parity,der,finetune", help="comma-separated subset to run")
    p.add_argument("--out", type=Path, default=None, help="folder for asr_quality-<device>.json/.md")
    args = p.parse_args(argv)
    if not espeak_available():
        print("espeak-ng is missing: apt-get install -y espeak-ng", file=sys.stderr)
        return 2
    voices, sentences = (VOICES[:2], SENTENCES[:3]) if args.quick else (VOICES, SENTENCES)
    kinds = {2: DIALOGUES[2]} if args.quick else DIALOGUES
    result: dict = {"machine": machine_info("faster-whisper", "ctranslate2", "torch", "transformers", "jiwer")}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        ctx = _context(tmp)
        sections = set(args.sections.split(","))
        result["parity"], result["der"] = [], []
        if "parity" in sections:
            print("WER parity", flush=True)
            result["parity"] = parity_section(ctx, tmp, voices, sentences, ("whisper-tiny.en",) if args.quick
                                              else ("whisper-tiny.en", "whisper-base"))  # fmt: skip
        if "der" in sections:
            print("DER", flush=True)
            result["der"] = der_section(ctx, tmp, kinds)
        if not args.quick and "finetune" in sections:
            print("fine-tuning", flush=True)
            result["finetune"] = finetune_section(ctx, tmp, args.steps)
        ctx.jobs.shutdown(timeout=10)
    result["targets"] = targets(result)
    md = render(result)
    print(md)
    if args.out is not None:
        write_results(args.out, "asr_quality", result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Whisper fine-tuning: training folders checked with file:line errors, the job (cancel, resume, export), and a real
offline fine-tune on espeak-ng speech with made-up domain words (slow)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from backends.audio import DatasetError, TuneConfig, extract_zip, write_wav
from backends.audio.tune_data import load_examples, srt_text
from studio.bench.asr_data import DOMAIN_TERMS, espeak_available, synthesize, write_domain_dataset
from tests._whisper_support import tiny_en_hf  # noqa: F401 (fixture)

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing")


def _tone(path, seconds=1.0):
    t = np.arange(int(16000 * seconds)) / 16000
    return write_wav(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))


def test_sidecar_txt_and_srt_transcripts(tmp_path):
    for i in range(4):
        _tone(tmp_path / f"a{i}.wav")
        (tmp_path / f"a{i}.txt").write_text(f"line {i}", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    _tone(tmp_path / "sub" / "b.wav")
    (tmp_path / "sub" / "b.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\nthere\n\n2\n00:00:01,000 --> "
                                            "00:00:02,000\nfriend\n", encoding="utf-8")  # fmt: skip
    examples = load_examples(tmp_path)
    assert len(examples) == 5 and sum(e.dev for e in examples) >= 1
    assert next(e for e in examples if e.audio.name == "b.wav").text == "hello there friend"
    assert srt_text("1\n00:00:00,000 --> 00:00:01,000\nHi.\n") == "Hi."


def test_manifest_problems_are_all_reported_with_file_and_line(tmp_path):
    _tone(tmp_path / "ok.wav")
    lines = [
        json.dumps({"audio": "ok.wav", "text": "fine"}),
        "{not json",
        json.dumps({"audio": "missing.wav", "text": "x"}),
        json.dumps({"audio": "ok.wav", "text": ""}),
        json.dumps({"audio": "../../etc/passwd", "text": "x"}),
        json.dumps({"file": "ok.wav"}),
        json.dumps({"audio": "ok.wav", "text": "fine"}),
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        load_examples(tmp_path)
    errs = e.value.errors
    assert any(x.startswith("manifest.jsonl:2: not valid JSON") for x in errs)
    assert any(x.startswith("manifest.jsonl:3:") and "not found" in x for x in errs)
    assert any(x.startswith("manifest.jsonl:4: empty text") for x in errs)
    assert any(x.startswith("manifest.jsonl:5:") and "outside" in x for x in errs)
    assert any(x.startswith("manifest.jsonl:6:") and "text column" in x for x in errs)
    assert any(x.startswith("manifest.jsonl:7: duplicate of manifest.jsonl:1") for x in errs)


def test_csv_manifest_with_a_dev_split_and_a_missing_transcript(tmp_path):
    for n in ("a", "b", "c"):
        _tone(tmp_path / f"{n}.wav")
    (tmp_path / "metadata.csv").write_text("file,transcript,split\na.wav,one,train\nb.wav,two,dev\nc.wav,three,"
                                           "holdout\n", encoding="utf-8")  # fmt: skip
    with pytest.raises(DatasetError, match=r"metadata\.csv:4: split 'holdout'"):
        load_examples(tmp_path)
    (tmp_path / "metadata.csv").write_text("file,transcript,split\na.wav,one,train\nb.wav,two,dev\n", encoding="utf-8")
    assert [(e.audio.name, e.dev) for e in load_examples(tmp_path)] == [("a.wav", False), ("b.wav", True)]
    (tmp_path / "metadata.csv").unlink()
    with pytest.raises(DatasetError, match=r"c\.wav: no transcript"):
        load_examples(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        load_examples(tmp_path / "nope")


def test_zip_upload_is_unpacked_inside_its_folder_only(tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("data/a.txt", "hello")
    assert (extract_zip(good, tmp_path / "out") / "data" / "a.txt").read_text() == "hello"
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(DatasetError, match="outside"):
        extract_zip(bad, tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out2").exists()
    (tmp_path / "fake.zip").write_bytes(b"PK not really")
    with pytest.raises(DatasetError, match="not a zip"):
        extract_zip(tmp_path / "fake.zip", tmp_path / "out3")


def test_config_is_checked():
    with pytest.raises(ValueError, match="output name"):
        TuneConfig("x", output_name="../evil")
    with pytest.raises(ValueError, match="method"):
        TuneConfig("x", method="magic")
    with pytest.raises(ValueError, match="SpecAugment"):
        TuneConfig("x", freeze_encoder=True, spec_augment=True)
    with pytest.raises(ValueError, match="learning rate"):
        TuneConfig("x", learning_rate=1.0)


@pytest.fixture
def tune_ctx(ctx, tiny_en_hf):  # noqa: F811
    """The studio context with tiny.en's transformers copy already in its cache (converted once per session)."""
    import shutil

    shutil.copytree(tiny_en_hf, ctx.settings.cache_dir / "whisper-hf" / "whisper-tiny.en")
    return ctx


def _small_set(folder, n=6):
    folder.mkdir()
    for i in range(n):
        text = f"Please call Zorvex at number {i}."
        write_wav(folder / f"s{i}.wav", synthesize(text, "en-us"))
        (folder / f"s{i}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.slow
@needs_espeak
def test_cancel_keeps_a_checkpoint_and_resume_finishes_and_exports(tune_ctx, tmp_path):
    """Cancel after two steps -> checkpoint; resume -> finishes, exports to CTranslate2, listed and usable.
    Slow: two short trainings, an export and a transcription (~1 min alone on 2 cores, 6.8 min on a loaded one)."""
    from backends.audio import TranscribeOptions

    data = _small_set(tmp_path / "clips")
    tuner = tune_ctx.backends.whisper_tuner
    steps = iter(range(100))

    class CancelAfterTwo:
        def set_progress(self, *a):
            pass

        def log(self, m):
            pass

        def should_stop(self):
            return next(steps) >= 2

    cfg = dict(data_dir=str(data), output_name="t1", max_steps=3, batch_size=2, learning_rate=1e-5,
               freeze_encoder=True, gradient_checkpointing=False)  # fmt: skip
    first = tuner.train(TuneConfig(**cfg), CancelAfterTwo())
    assert first.status == "cancelled" and first.steps_done == 2
    assert (tune_ctx.runs.get(first.run_id).dir / "checkpoint" / "state.json").is_file()
    assert tune_ctx.runs.get(first.run_id).status == "cancelled"
    done = tuner.train(TuneConfig(**cfg, resume_run=first.run_id))
    assert done.status == "done" and done.steps_done == 3 and done.model_id == "tuned:t1"
    assert done.wer_before is not None and done.wer_after is not None and done.examples
    ids = [m for m, _, _ in tune_ctx.backends.asr.models()]
    assert "tuned:t1" in ids
    folder = tune_ctx.settings.models_dir / "whisper-tuned" / "t1"
    assert json.loads((folder / "config.json").read_text())["alignment_heads"]  # word timestamps keep their heads
    tr = tune_ctx.backends.asr.transcribe(data / "s1.wav", TranscribeOptions(model_id="tuned:t1", word_timestamps=True))
    assert "call" in tr.text.lower() and tr.segments[0].words


@pytest.mark.slow
@needs_espeak
def test_fine_tuning_teaches_made_up_domain_words(tune_ctx, tmp_path):
    """tiny.en, frozen encoder, 20 steps on the CPU (several minutes on a busy 2-core machine): the error on the
    made-up names in held-out sentences falls by at least half and general WER rises by at most 0.03."""
    from backends.audio import TranscribeOptions
    from backends.audio.wer import wer, word_error_on

    held = write_domain_dataset(tmp_path / "domain")
    cfg = TuneConfig(str(tmp_path / "domain" / "train"), output_name="domain", max_steps=20, learning_rate=3e-5,
                     batch_size=8, freeze_encoder=True, gradient_checkpointing=False)  # fmt: skip
    res = tune_ctx.backends.whisper_tuner.train(cfg)
    asr = tune_ctx.backends.asr
    scores = {}
    for model in ("whisper-tiny.en", res.model_id):
        for kind, clips in held.items():
            refs = [t for _, t in clips]
            hyps = [asr.transcribe(p, TranscribeOptions(model_id=model, language="en")).text for p, _ in clips]
            scores[model, kind] = (wer(refs, hyps), word_error_on(list(DOMAIN_TERMS), refs, hyps))
    before, after = scores["whisper-tiny.en", "terms"][1], scores[res.model_id, "terms"][1]
    assert before > 0.5 and after <= before / 2, scores
    assert scores[res.model_id, "general"][0] <= scores["whisper-tiny.en", "general"][0] + 0.03, scores

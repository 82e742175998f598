"""Prompt carry-over across windows, per-segment no-speech probabilities, and the torch Whisper engine in the stream
(real tiny.en weights, espeak-ng speech)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from backends.audio.asr import TranscribeOptions
from backends.audio.pcm import SAMPLE_RATE, write_wav
from backends.audio.types import Segment
from backends.audio.vad import FRAME, SpeechWindow
from studio.bench.asr_data import SENTENCES, espeak_available, synthesize
from tests._whisper_support import tiny_en_hf  # noqa: F401 (session fixture)

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing (apt-get install -y espeak-ng)")
SR = SAMPLE_RATE


@pytest.fixture(scope="module")
def actx(tmp_path_factory, tiny_en_hf):  # noqa: F811
    from studio.app import build_context
    from studio.settings import Settings

    root = tmp_path_factory.mktemp("asr-engines")
    context = build_context(Settings(data_dir=root / "data", models_dir=root / "models", open_browser=False))
    shutil.copytree(tiny_en_hf, context.settings.cache_dir / "whisper-hf" / "whisper-tiny.en")
    yield context
    context.jobs.shutdown(timeout=10)


@pytest.fixture(scope="module")
def two_windows(tmp_path_factory):
    """Two sentences 3 s apart (the VAD closes a window after a 1.5 s pause): (path, [text1, text2])."""
    gap, pause = np.zeros(SR // 2, np.float32), np.zeros(3 * SR, np.float32)
    a, b = synthesize(SENTENCES[0], "en-us"), synthesize(SENTENCES[1], "en-us")
    path = write_wav(tmp_path_factory.mktemp("carry") / "two.wav", np.concatenate([gap, a, pause, b, gap]))
    return path, [SENTENCES[0], SENTENCES[1]]


class PromptSpy:
    """Wraps the real faster-whisper model: records the initial_prompt of each call, then lets it run."""

    def __init__(self, model) -> None:
        self.inner, self.prompts = model, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def transcribe(self, audio, **kw):
        self.prompts.append(kw.get("initial_prompt"))
        return self.inner.transcribe(audio, **kw)


def _spied(actx, opts):
    asr = actx.backends.asr
    key = asr._key(opts.model_id)
    real_run = actx.residency.run
    spies = {}

    def run(k, fn, *a, **kw):
        if k != key:
            return real_run(k, fn, *a, **kw)
        return real_run(k, lambda m: fn(spies.setdefault("s", PromptSpy(m))), *a, **kw)

    return run, spies


@pytest.mark.parametrize("carry", [False, True])
def test_each_window_is_conditioned_on_the_previous_windows_text(actx, two_windows, monkeypatch, carry):
    from backends.audio.wer import wer

    path, refs = two_windows
    opts = TranscribeOptions(language="en", carry_prompt=carry)
    run, spies = _spied(actx, opts)
    monkeypatch.setattr(actx.residency, "run", run)
    tr = actx.backends.asr.transcribe(path, opts)
    prompts = spies["s"].prompts
    prompts = prompts[-2:]  # the first call may be the model check's (none: it only reads the model's flags)
    assert len(prompts) == 2 and prompts[0] is None  # two windows; nothing before the first
    if carry:
        first_text = " ".join(s.text for s in tr.segments if s.end < tr.segments[-1].start + 0.01)
        assert prompts[1] and prompts[1] == first_text.strip()
    else:
        assert prompts[1] is None
    assert wer([" ".join(refs)], [tr.text]) < 0.2, tr.text


def test_an_unsure_window_is_not_carried(actx):
    from backends.audio.whisper_run import WindowRun

    run = WindowRun(actx.backends.asr, TranscribeOptions(language="en", carry_prompt=True), None, lambda: False)
    run._emit([Segment(0, 1, "Hello there.", avg_logprob=-0.2)], 0)
    assert run.prompt == "Hello there."
    run._emit([Segment(1, 2, "Fine.", avg_logprob=-0.1), Segment(2, 3, "um um um um", avg_logprob=-2.5)], 0)
    assert run.prompt == ""  # one unsure segment: the next window starts fresh, as after a temperature fallback
    off = WindowRun(actx.backends.asr, TranscribeOptions(language="en"), None, lambda: False)
    off._emit([Segment(0, 1, "Hello there.", avg_logprob=-0.2)], 0)
    assert off.prompt == ""


def test_speech_probability_of_a_span_comes_from_its_own_frames():
    probs = np.array([0.9] * 10 + [0.05] * 10 + [0.8] * 10, np.float32)
    w = SpeechWindow(start=5 * FRAME, audio=np.zeros(30 * FRAME, np.float32), regions=(), frame_probs=probs)
    t = FRAME / SR
    assert w.speech_prob(5 * t, 15 * t) == pytest.approx(0.9)
    assert w.speech_prob(15 * t, 25 * t) == pytest.approx(0.05)
    assert w.speech_prob(0, 1000) == pytest.approx(probs.mean())  # clipped to the window
    assert SpeechWindow(0, np.zeros(10, np.float32), ()).speech_prob(0, 1) is None


def test_segments_get_their_own_no_speech_probability(actx, tmp_path):
    """One window holding speech, a mumble-free pause and speech: Whisper's value would be one number for all."""
    a, b = synthesize(SENTENCES[2], "en-us"), synthesize(SENTENCES[3], "en-us")
    audio = np.concatenate([np.zeros(SR // 2, np.float32), a, np.zeros(SR, np.float32), b])
    tr = actx.backends.asr.transcribe(write_wav(tmp_path / "one.wav", audio), TranscribeOptions(language="en"))
    values = [s.no_speech_prob for s in tr.segments]
    assert len(values) >= 2 and all(0.0 <= v <= 1.0 for v in values)
    assert all(v < 0.5 for v in values)  # every segment is speech
    assert len(set(values)) > 1, values  # per segment, not one value per window


def test_torch_engine_transcribes_in_the_stream(actx, two_windows):
    from backends.audio.wer import wer

    path, refs = two_windows
    updates = list(actx.backends.asr.stream(path, TranscribeOptions(language="en", engine="torch", carry_prompt=True)))
    tr = updates[-1].transcript
    assert [u.new_segments for u in updates if u.new_segments]  # segments streamed as windows finished
    assert len(tr.segments) == 2 and tr.segments[0].end < tr.segments[1].start  # one per window, in file time
    assert wer([" ".join(refs)], [tr.text]) < 0.2, tr.text
    assert actx.residency.is_registered("asr-torch:whisper-tiny.en")
    with pytest.raises(ValueError, match="word timestamps need the faster-whisper engine"):
        TranscribeOptions(engine="torch", word_timestamps=True)
    with pytest.raises(ValueError, match="engine 'onnx'"):
        TranscribeOptions(engine="onnx")

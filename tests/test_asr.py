"""Transcription with the offline Whisper models: accuracy, streaming, windows/batching, cancel, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from backends.audio.asr import AsrBackend, TranscribeOptions
from backends.audio.models import ModelMissing, WhisperLoader
from backends.audio.pcm import SAMPLE_RATE, AudioInputError, write_wav
from studio.bench.asr_data import SENTENCES, espeak_available, synthesize, write_media, write_video_only

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing (apt-get install -y espeak-ng)")
SR = SAMPLE_RATE


def wer(reference: str, hypothesis: str) -> float:
    """The studio's WER normaliser (backends.audio.wer): Whisper writes '9' for 'nine', which is not an error."""
    from backends.audio.wer import wer as corpus_wer

    return corpus_wer([reference], [hypothesis])


@pytest.fixture(scope="module")
def actx(tmp_path_factory):
    from studio.app import build_context
    from studio.settings import Settings

    root = tmp_path_factory.mktemp("asr")
    context = build_context(Settings(data_dir=root / "data", models_dir=root / "models", open_browser=False))
    yield context
    context.jobs.shutdown(timeout=10)


@pytest.fixture(scope="module")
def asr(actx) -> AsrBackend:
    return actx.backends.asr


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Two sentences by two voices, 35 s of silence, then a third sentence: (path, reference, third start)."""
    a, b, c = (synthesize(SENTENCES[i], v) for i, v in ((0, "en-us"), (1, "en-us+f3"), (6, "en-gb")))
    gap = np.zeros(SR, np.float32)
    first = np.concatenate([gap, a, gap, b, gap])
    third_at = (first.size + 35 * SR) / SR
    audio = np.concatenate([first, np.zeros(35 * SR, np.float32), c, gap])
    path = write_wav(tmp_path_factory.mktemp("speech") / "speech.wav", audio)
    return path, " ".join(SENTENCES[i] for i in (0, 1, 6)), third_at


def test_transcribes_streams_and_places_segments(asr, speech):
    path, reference, third_at = speech
    updates = list(asr.stream(path, TranscribeOptions(word_timestamps=True)))
    tr = updates[-1].transcript
    assert tr is not None and not tr.cancelled and tr.language == "en"
    assert wer(reference, tr.text) < 0.3, tr.text
    streamed = [s for u in updates for s in u.new_segments]
    assert streamed == tr.segments
    assert sum(1 for u in updates[:-1] if u.new_segments) >= 2, "segments arrive window by window, not at the end"
    fractions = [u.fraction for u in updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    last = tr.segments[-1]
    assert last.start == pytest.approx(third_at, abs=0.6), "timestamps after a skipped silence stay absolute"
    assert tr.duration_s == pytest.approx(third_at + 4.5, abs=1.0)
    for seg in tr.segments:
        assert seg.words and seg.start - 0.05 <= seg.words[0].start and seg.words[-1].end <= seg.end + 0.05
        assert all(w1.start <= w2.start for w1, w2 in zip(seg.words, seg.words[1:], strict=False))
    assert asr.ctx.residency.is_registered("asr:whisper-tiny.en") and asr.ctx.residency.is_registered("vad:silero-vad")


@pytest.mark.parametrize(
    "opts", [TranscribeOptions(vad=False), TranscribeOptions(batch_size=4)], ids=["no-vad", "batched"]
)
def test_without_vad_and_batched(asr, speech, opts):
    path, reference, third_at = speech
    tr = asr.transcribe(path, opts)
    assert wer(reference, tr.text) < 0.35, tr.text
    assert any(abs(s.start - third_at) < 1.0 for s in tr.segments), [(s.start, s.text) for s in tr.segments]


@pytest.mark.parametrize("vad", [True, False])
def test_silence_gives_an_empty_transcript(asr, tmp_path, vad):
    path = write_wav(tmp_path / "silence.wav", np.zeros(5 * SR, np.float32))
    tr = asr.transcribe(path, TranscribeOptions(vad=vad))
    assert tr.segments == [] and tr.text == "" and tr.duration_s == pytest.approx(5.0, abs=0.05)


def test_bad_inputs_fail_with_a_clear_message(asr, tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.m4a"
    junk.write_bytes(b"\x00\x01garbage" * 100)
    video = write_video_only(tmp_path / "video.mp4")
    for path, words in ((empty, "0 bytes"), (junk, "not a readable"), (video, "no audio track")):
        with pytest.raises(AudioInputError, match=words):
            asr.transcribe(path)


def test_compressed_stereo_input(asr, tmp_path):
    path = write_media(tmp_path / "clip.ogg", synthesize(SENTENCES[3]), codec="libopus", rate=48000, channels=2)
    assert wer(SENTENCES[3], asr.transcribe(path).text) < 0.3


def test_cancel_keeps_what_is_done(asr, speech):
    path, _, third_at = speech
    seen = []
    updates = asr.stream(path, TranscribeOptions(), should_stop=lambda: bool(seen))
    for u in updates:
        seen.extend(u.new_segments)
    tr = u.transcript
    assert tr.cancelled and len(tr.segments) >= 1 and all(s.start < third_at for s in tr.segments)
    assert tr.duration_s < third_at, "decoding stopped early"


def test_options_and_models_are_checked(asr, speech):
    with pytest.raises(ValueError, match="not a Whisper language"):
        TranscribeOptions(language="klingon")
    with pytest.raises(ValueError, match="English-only"):
        asr.transcribe(speech[0], TranscribeOptions(language="fr"))
    with pytest.raises(ModelMissing, match="Models tab"):
        asr.transcribe(speech[0], TranscribeOptions(model_id="whisper-small"))
    with pytest.raises(KeyError):
        asr.transcribe(speech[0], TranscribeOptions(model_id="no-such-model"))
    listed = {mid: present for mid, _, present in asr.models()}
    assert listed["whisper-tiny.en"] and listed["whisper-base"] and not listed["whisper-large-v3"]


def test_cpu_loader_moves_are_no_ops(actx):
    loader = WhisperLoader(actx.catalog.get("whisper-tiny.en"), actx.catalog, actx.settings.cache_dir)
    model = loader.load("cpu")
    assert loader.to_device(model, "cpu") is model and loader.to_device(model, "cuda") is model
    assert model.model.model_is_loaded
    segments, _ = model.transcribe(synthesize(SENTENCES[4]), beam_size=1)
    assert wer(SENTENCES[4], " ".join(s.text for s in segments)) < 0.35
    loader.release(model)
    assert not model.model.model_is_loaded


def test_whisper_base_is_assembled_once_and_multilingual(asr, actx, tmp_path):
    from backends.audio.models import _base_parts, assemble_whisper_base

    folder = assemble_whisper_base(actx.settings.cache_dir)
    expected = sum(p.stat().st_size for p in _base_parts())
    assert (folder / "model.bin").stat().st_size == expected and (folder / ".complete").is_file()
    mtime = (folder / "model.bin").stat().st_mtime_ns
    assert assemble_whisper_base(actx.settings.cache_dir) == folder
    assert (folder / "model.bin").stat().st_mtime_ns == mtime, "reused, not rebuilt"
    french = write_wav(tmp_path / "fr.wav", synthesize("Bonjour à tous, la réunion commence demain matin.", "fr"))
    tr = asr.transcribe(french, TranscribeOptions(model_id="whisper-base"))
    assert tr.language == "fr" and "bonjour" in tr.text.lower()


def test_interrupted_assembly_is_redone(tmp_path):
    from backends.audio.models import _base_parts, assemble_whisper_base

    folder = assemble_whisper_base(tmp_path)
    with (folder / "model.bin").open("r+b") as f:
        f.truncate(1000)  # as if the disk filled up after the marker was written
    assemble_whisper_base(tmp_path)
    assert (folder / "model.bin").stat().st_size == sum(p.stat().st_size for p in _base_parts())

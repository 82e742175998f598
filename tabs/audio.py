"""Audio tab: transcribe a recording (upload or microphone), label speakers, post-edit with the chat model, export.

UI only: the work is in backends.audio (asr, diarize, postedit, subtitles). Segments stream in
as each speech window is transcribed; Stop ends the run at the next window and keeps what is done. A click on a
segment seeks the main player to its start and plays from there (also while the transcription runs).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import gradio as gr

from studio.context import StudioContext, Tab
from studio.safety import unguessable_stamp
from tabs._session import StopFlag, bind, waiting_note

log = logging.getLogger(__name__)

DIFF_COLOURS = {"case/punctuation": "green", "glossary": "blue", "rejected": "red"}


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _lines(segments) -> str:
    return "\n".join(
        f"[{_clock(s.start)} → {_clock(s.end)}]{' ' + s.speaker + ':' if s.speaker else ''} {s.text}" for s in segments
    )


def _status(update, started: float) -> str:
    done = update.position_s
    total = f" / {_clock(update.duration_s)}" if update.duration_s else ""
    bar = "▓" * int(update.fraction * 20) + "░" * (20 - int(update.fraction * 20))
    lang = f" · language: {update.language}" if update.language else ""
    return f"{bar} {update.fraction:.0%} · {_clock(done)}{total} of audio · {time.time() - started:.0f} s{lang}"


SEGMENT_HEADERS = ["#", "start", "end", "speaker", "text"]


def segment_rows(segments) -> list[list[Any]]:
    return [[i, _clock(s.start), _clock(s.end), s.speaker or "", s.text] for i, s in enumerate(segments)]


def speaker_rows(segments) -> list[list[str]]:
    labels = sorted({s.speaker for s in segments if s.speaker})
    return [[label, label] for label in labels]


def rename_speakers(tr, table: Any):
    """Apply the 'name' column of the speakers table to every segment (and the exports that follow)."""
    if tr is None or not tr.segments:
        raise gr.Error("Nothing to rename yet: transcribe with 'Label speakers' on first.")
    rows = table.values.tolist() if hasattr(table, "values") else (table or [])
    names = {str(old): " ".join(str(new or "").split()) for old, new, *_ in rows if old}
    if any(not n for n in names.values()):
        raise gr.Error("A speaker name is empty: type a name for every speaker (or keep the label).")
    tr.segments = [dataclasses.replace(s, speaker=names.get(s.speaker, s.speaker)) for s in tr.segments]
    tr.speakers = [dataclasses.replace(t, speaker=names.get(t.speaker, t.speaker)) for t in tr.speakers]
    return tr, _lines(tr.segments), segment_rows(tr.segments), speaker_rows(tr.segments)


# The browser side of a click on a segment (seek_segment, then these two): wait until the main player has decoded
# its audio (its duration shows; right after a load, a little longer: the player rewinds once when ready), then the
# seek (apply_seek), then press Play unless it is already playing (its icon is then the pause bars).
WAIT_FOR_PLAYER_JS = """async (t) => {
  if (typeof t !== "number" || t < 0) return [t];
  const decoded = () => {
    const d = document.querySelector("#audio-main #duration");
    return d && d.textContent.trim() !== "0:00";
  };
  if (decoded()) return [t];
  for (let i = 0; i < 100 && !decoded(); i++) await new Promise((r) => setTimeout(r, 100));
  await new Promise((r) => setTimeout(r, 300));
  return [t];
}"""
PLAY_FROM_SEEK_JS = """(t) => {
  if (typeof t !== "number" || t < 0) return;
  const b = document.querySelector("#audio-main button.play-pause-button");
  if (b && b.querySelector("polygon")) b.click();
}"""


# What the player may load for a click when the transcript came through the file box (the browser decodes these).
BROWSER_PLAYABLE = {".wav", ".mp3", ".ogg", ".oga", ".opus", ".flac", ".m4a", ".mp4", ".aac", ".webm"}


def _clicked_segment(tr, evt: gr.SelectData) -> int | None:
    """The segment a click on the table means: its '#' cell (right after a sort too), else the row index."""
    if tr is None or not tr.segments:
        return None
    value = getattr(evt, "row_value", None)
    try:
        row = int(value[0]) if value else int(evt.index[0] if isinstance(evt.index, list | tuple) else evt.index)
    except (TypeError, ValueError, IndexError):
        return None
    return row if 0 <= row < len(tr.segments) else None


def seek_segment(tr, source: str | None, audio_v: str | None, evt: gr.SelectData):
    """Click a row: the main player jumps to that segment's start and plays from there (PLAY_FROM_SEEK_JS).

    Returns (main player update, note, seek time or -1); apply_seek then moves the player once it is ready. The
    player must hold the transcribed recording: an empty player (the file came through the file box) gets it
    loaded; a different recording is left alone, with a note.
    """
    row = _clicked_segment(tr, evt)
    if row is None or not source:
        return gr.skip(), gr.skip(), -1.0
    seg = tr.segments[row]
    at = f"{int(seg.start // 60)}:{seg.start % 60:04.1f}"  # tenths: the test reads the player against it
    note = f"▶ segment {row} from {at}{' · ' + seg.speaker if seg.speaker else ''}: {seg.text[:80]}"
    if audio_v and str(audio_v) != str(source):
        return (
            gr.skip(),
            (
                f"The player holds another recording than this transcript ({Path(source).name}): press Transcribe "
                "for it, or clear the player to play the transcribed file."
            ),
            -1.0,
        )
    if not audio_v and Path(source).suffix.lower() not in BROWSER_PLAYABLE:
        return (
            gr.skip(),
            (
                f"{Path(source).name} does not play in the browser, so there is nothing to seek: put an audio copy "
                "(wav, mp3, ogg, m4a) in the player to play the segments."
            ),
            -1.0,
        )
    return (gr.skip() if audio_v else source), note, seg.start


def apply_seek(t: float | None):
    """Move the main player to `t` seconds (the Audio component's playback_position); -1: leave it."""
    return gr.skip() if t is None or t < 0 else gr.update(playback_position=float(t))


def _model_choices(asr) -> list[tuple[str, str]]:
    return [(title if present else f"{title} (not downloaded)", mid) for mid, title, present in asr.models()]


def transcribe(ctx, audio_v, video_v, model_v, lang_v, vad_v, words_v, batched_v, diar_v, n_v, engine_v, src_v,
               asr_engine_v, carry_v, stop_flag):  # fmt: skip
    from backends.audio import Transcript

    path = _input_path(ctx, audio_v, video_v)
    opts, dopts = _options(model_v, lang_v, vad_v, words_v, batched_v, diar_v, n_v, engine_v, src_v, asr_engine_v,
                           carry_v)  # fmt: skip
    stop_flag.clear()
    started, segments = time.time(), []
    yield "Loading the model…", "", None, str(path), [], []
    try:
        with ctx.queues.hold(ctx.queues.queue_id("Audio"), "transcription (Audio)"):
            for update in ctx.backends.asr.stream(path, opts, should_stop=stop_flag.is_set, diarize=dopts):
                segments.extend(update.new_segments)
                tr = update.transcript
                partial = tr or Transcript(list(segments), update.language, update.position_s, opts.model_id)
                head = _status(update, started) + (f" · {update.message}" if update.message else "")
                if tr is not None:
                    head = _final_status(tr, started)
                    rows, spk = segment_rows(tr.segments), speaker_rows(tr.segments)
                    yield head, _lines(partial.segments), partial, gr.skip(), rows, spk
                else:
                    rows = segment_rows(partial.segments) if update.new_segments else gr.skip()  # clickable already
                    yield head, _lines(partial.segments), partial, gr.skip(), rows, gr.skip()
    except Exception as e:
        raise gr.Error(_message(e)) from None


def request_stop(stop_flag):
    stop_flag.set()
    return "Stopping after the current window…"


def post_edit(ctx, tr, glossary_v, stop_flag, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
    from backends.audio import PostEditOptions, postedit

    if tr is None or not tr.segments:
        raise gr.Error("Nothing to edit yet: transcribe something first.")
    terms = tuple(t.strip() for t in (glossary_v or "").replace(",", "\n").splitlines() if t.strip())
    stop_flag.clear()
    try:
        report = postedit(
            ctx.backends.llm, tr.segments, PostEditOptions(glossary=terms), should_stop=stop_flag.is_set,
            on_chunk=lambda done, total: progress((done, total), desc="post-editing", unit="chunks"),
        )  # fmt: skip
    except Exception as e:
        raise gr.Error(f"Post-edit failed: {_message(e)}") from None
    tr.segments = report.segments
    tr.notes.append(f"post-edited: {report.accepted_changes} change(s) kept, {len(report.rejected)} rejected")
    return tr, _lines(tr.segments), report.spans


def export(ctx, tr, formats_v):
    from backends.audio import export_transcript as write

    if tr is None:
        raise gr.Error("Nothing to export yet: transcribe something first.")
    if not formats_v:
        raise gr.Error("Tick at least one export format (txt, srt, vtt or json).")
    out_dir = ctx.settings.outputs_dir / "audio"
    stem = f"transcript-{unguessable_stamp()}"
    return [str(p) for p in write(tr, out_dir, stem, tuple(formats_v)).values()]


def _build_inputs(ctx: StudioContext) -> dict[str, Any]:
    from backends.audio import whisper_languages

    asr = ctx.backends.asr
    audio = gr.Audio(
        sources=["upload", "microphone"], type="filepath", label="Audio (upload or record)", elem_id="audio-main"
    )  # PLAY_FROM_SEEK_JS finds its Play button by this id
    video = gr.File(label="…or any audio/video file (mp4, mkv, webm, m4a, …)", file_count="single")
    model = gr.Dropdown(_model_choices(asr), value="whisper-tiny.en", label="Whisper model")
    language = gr.Dropdown(["auto", *whisper_languages()], value="auto", label="Language")
    with gr.Row():
        vad = gr.Checkbox(True, label="Skip silence (VAD)")
        words = gr.Checkbox(False, label="Word timestamps")
        batched = gr.Checkbox(ctx.residency.device == "cuda", label="Batched decoding (GPU)")
    with gr.Accordion("Decoding", open=False):
        asr_engine = gr.Radio(
            [("faster-whisper (CTranslate2: word timestamps; CUDA 12 or the CPU)", "faster-whisper"),
             ("torch (transformers Whisper: any CUDA, fp16; one segment per speech window, no word times)", "torch")],
            value="faster-whisper", label="Whisper engine",
        )  # fmt: skip
        carry = gr.Checkbox(False, label="Carry each window's text into the next as its prompt (names and spelling "
                            "carry on; an unsure window is not carried)")  # fmt: skip
    with gr.Accordion("Speakers", open=False):
        diar = gr.Checkbox(False, label="Label speakers (diarization)")
        n_speakers = gr.Number(0, precision=0, minimum=0, maximum=20, label="Number of speakers (0 = auto)")
        engine = gr.Radio(["offline", "pyannote"], value="offline", label="Engine")
        pyannote_src = gr.Textbox(
            "", label="pyannote pipeline (catalog id, or a folder with config.yaml in the models folder or "
            "trusted_model_dirs: pyannote loads pickled checkpoints)", placeholder="pyannote-…"
        )  # fmt: skip
    with gr.Row():
        go = gr.Button("Transcribe", variant="primary")
        stop = gr.Button("Stop (keeps what is done)")
    return locals()


def _build_results() -> dict[str, Any]:
    status = gr.Markdown("Choose a file or record, then press Transcribe.")
    text = gr.Textbox(label="Transcript", lines=14, max_lines=30, autoscroll=True)
    with gr.Accordion("Segments: click a row to play the recording from there · rename speakers", open=True):
        seg_table = gr.Dataframe(headers=SEGMENT_HEADERS, interactive=False, wrap=True, max_height=260,
                                 column_widths=["6%", "10%", "10%", "14%", "60%"])  # fmt: skip
        playing = gr.Markdown("")
        seek_to = gr.Number(-1.0, visible=False)  # seconds the last click seeked to, -1: none
        with gr.Row():
            speakers = gr.Dataframe(headers=["speaker", "name"], interactive=True, column_count=(2, "fixed"),
                                    label="Speakers (type a name in the second column)", scale=3)  # fmt: skip
            rename_btn = gr.Button("Apply names", scale=1)
    with gr.Accordion("Post-edit with the chat model", open=False):
        gr.Markdown(
            "Fixes punctuation and casing and spells glossary terms as given. Any other word change the "
            "model proposes is rejected (shown in red), so the words stay what was said."
        )
        glossary = gr.Textbox(label="Glossary (one name or term per line)", lines=3)
        edit_btn = gr.Button("Post-edit")
        diff = gr.HighlightedText(label="Changes", color_map=DIFF_COLOURS, combine_adjacent=False)
    with gr.Row():
        formats = gr.CheckboxGroup(["txt", "srt", "vtt", "json"], value=["txt", "srt"], label="Export as")
        export_btn = gr.Button("Export")
    files = gr.File(label="Exported files", file_count="multiple", interactive=False)

    return locals()


def build(ctx: StudioContext) -> None:
    from tabs.audio_train import build_training

    gr.Markdown(
        "## Audio\nTranscribe meetings and lectures: any audio or video file, or the microphone. Long files are "
        "decoded and transcribed as a stream; segments appear as they are made. Offline models: Whisper tiny.en "
        "(English) and base (multilingual). Speaker labels come from an offline engine (Silero VAD + Resemblyzer "
        "voice embeddings) or a pyannote pipeline you have downloaded."
    )
    transcript_state, flag, source = gr.State(None), gr.State(StopFlag()), gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            i = _build_inputs(ctx)
        with gr.Column(scale=2):
            r = _build_results()
    keys = ("audio", "video", "model", "language", "vad", "words", "batched", "diar", "n_speakers", "engine",
            "pyannote_src", "asr_engine", "carry")  # fmt: skip
    inputs = [i[k] for k in keys] + [flag]
    queue = ctx.queues.event_kwargs("Audio")
    outputs = [r["status"], r["text"], transcript_state, source, r["seg_table"], r["speakers"]]
    i["go"].click(bind(waiting_note, ctx, "Audio"), None, r["status"], queue=False)  # says why, if it must wait
    i["go"].click(bind(transcribe, ctx), inputs, outputs, **queue)
    i["stop"].click(request_stop, flag, r["status"], queue=False)
    edit_out = [transcript_state, r["text"], r["diff"]]
    r["edit_btn"].click(bind(post_edit, ctx), [transcript_state, r["glossary"], flag], edit_out, **queue)
    seek_out = [i["audio"], r["playing"], r["seek_to"]]
    seek = r["seg_table"].select(seek_segment, [transcript_state, source, i["audio"]], seek_out, queue=False)
    seek = seek.then(apply_seek, r["seek_to"], i["audio"], js=WAIT_FOR_PLAYER_JS, queue=False)
    seek.then(None, r["seek_to"], None, js=PLAY_FROM_SEEK_JS, queue=False)
    rename_out = [transcript_state, r["text"], r["seg_table"], r["speakers"]]
    r["rename_btn"].click(rename_speakers, [transcript_state, r["speakers"]], rename_out)
    r["export_btn"].click(bind(export, ctx), [transcript_state, r["formats"]], r["files"])
    with gr.Accordion("Fine-tune Whisper", open=False):
        build_training(ctx, i["model"], lambda: _model_choices(ctx.backends.asr))


def _input_path(ctx: StudioContext, audio_v, video_v) -> Path:
    from studio.safety import check_upload_size

    chosen = video_v if video_v else audio_v
    if not chosen:
        raise gr.Error("No audio yet: upload a file or record with the microphone, then press Transcribe.")
    path = Path(chosen if isinstance(chosen, str) else getattr(chosen, "name", chosen))
    try:
        check_upload_size(path, ctx.settings.max_upload_mb * 2**20)
    except (ValueError, OSError) as e:
        raise gr.Error(str(e)) from None
    return path


def _options(model_v, lang_v, vad_v, words_v, batched_v, diar_v, n_v, engine_v, src_v, asr_engine_v="faster-whisper",
             carry_v=False):  # fmt: skip
    from backends.audio import DiarizeOptions, TranscribeOptions

    try:
        opts = TranscribeOptions(
            model_id=model_v, language=lang_v or "auto", vad=bool(vad_v), word_timestamps=bool(words_v),
            batch_size=8 if batched_v else 1, engine=asr_engine_v or "faster-whisper", carry_prompt=bool(carry_v),
        )  # fmt: skip
        dopts = None
        if diar_v:
            n = int(n_v or 0)
            dopts = DiarizeOptions(engine=engine_v, num_speakers=n or None, pyannote_source=(src_v or "").strip())
    except ValueError as e:
        raise gr.Error(str(e)) from None
    return opts, dopts


def _final_status(tr, started: float) -> str:
    took = time.time() - started
    rtf = f" · {took / tr.duration_s:.2f}× real time" if tr.duration_s else ""
    head = "**Stopped** — kept what was done" if tr.cancelled else "**Done**"
    if not tr.segments:
        head += " — no speech found" if not tr.cancelled else ""
    notes = f" · {'; '.join(tr.notes)}" if tr.notes else ""
    return f"{head} · {len(tr.segments)} segments · {_clock(tr.duration_s)} of audio in {took:.0f} s{rtf}{notes}"


def _message(e: Exception) -> str:
    """Backend errors carry their own fix; anything else is named so the log can be searched."""
    from backends.audio import AudioInputError, ModelMissing

    if isinstance(e, AudioInputError | ModelMissing | ValueError | PermissionError | FileNotFoundError):
        return str(e)
    log.exception("audio tab: unexpected error")
    return f"{type(e).__name__}: {e}"


TAB = Tab("Audio", build)

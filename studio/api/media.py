"""POST /v1/embeddings, /v1/audio/transcriptions and /v1/images/generations on the studio's own backends.

- embeddings: the RAG embedding model (all-MiniLM-L6-v2 offline, 384-d, L2-normalised); `encoding_format` float
  or base64 (little-endian float32 bytes, what the openai client decodes); usage counts words, not tokens.
- transcriptions: faster-whisper through the ASR backend; the upload is written under the cache folder with a
  name of our own and deleted afterwards; formats json, text, srt, vtt and verbose_json (segments, and words when
  `timestamp_granularities` asks for them). "whisper-1" names the default ASR model.
- images: the diffusion backend (the untrained tiny demo pipeline offline); only b64_json (no file URLs leave the
  studio); the PNGs also land in the Image tab's gallery, carrying their parameters.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio.api.jobs import ApiError

ASR_ALIAS = "whisper-1"
TRANSCRIPT_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MAX_EMBED_INPUTS = 2048
MAX_EMBED_CHARS = 32_768


# ---- embeddings ---------------------------------------------------------------------------------------------------
def parse_embeddings(body: Any, model_id: str) -> tuple[list[str], str]:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if body.get("model") != model_id:
        raise ApiError(404, f"model={body.get('model')!r}: the embedding model here is {model_id!r}.",
                       code="model_not_found", param="model")  # fmt: skip
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "input must be a string or a list of strings (token arrays are not accepted).",
                       param="input")  # fmt: skip
    if len(texts) > MAX_EMBED_INPUTS or any(len(t) > MAX_EMBED_CHARS or "\x00" in t for t in texts):
        raise ApiError(400, f"input: up to {MAX_EMBED_INPUTS} strings of up to {MAX_EMBED_CHARS} characters, "
                       "without null bytes.", param="input")  # fmt: skip
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"encoding_format={fmt!r}: use float or base64.", param="encoding_format")
    return texts, fmt


def embeddings_body(vectors: Any, texts: list[str], fmt: str, model_id: str) -> dict[str, Any]:
    import numpy as np

    data = []
    for i, v in enumerate(vectors):
        v = np.asarray(v, dtype="<f4")
        value = base64.b64encode(v.tobytes()).decode() if fmt == "base64" else [float(x) for x in v]
        data.append({"object": "embedding", "index": i, "embedding": value})
    words = sum(len(t.split()) for t in texts)
    return {"object": "list", "data": data, "model": model_id, "usage": {"prompt_tokens": words, "total_tokens": words}}


# ---- transcriptions -----------------------------------------------------------------------------------------------
async def read_upload(request: Any, folder: Path, max_bytes: int) -> tuple[Path, dict[str, str]]:
    """The multipart `file` saved under `folder` as <uuid><suffix>, and the text fields; the size cap first."""
    from studio.safety import safe_filename

    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise ApiError(413, f"The upload is {int(length) / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as e:  # malformed multipart
        raise ApiError(400, f"Send the audio as multipart/form-data with a 'file' field ({e}).") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "file is missing: send the audio as the multipart field 'file'.", param="file")
    suffix = Path(safe_filename(upload.filename or "audio", default="audio")).suffix[:10]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}{suffix}"
    size = 0
    with path.open("wb") as out:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                out.close()
                path.unlink(missing_ok=True)
                raise ApiError(413, f"The upload is over the {max_bytes / 2**20:.0f} MB limit.")
            out.write(chunk)
    fields: dict[str, str] = {}
    for k, v in form.multi_items():
        if isinstance(v, str):
            k = k.removesuffix("[]")
            fields[k] = f"{fields[k]},{v}" if k == "timestamp_granularities" and k in fields else v
    return path, fields


def transcribe_options(fields: dict[str, str], models: list[str], default: str) -> tuple[Any, str, bool]:
    from backends.audio import TranscribeOptions

    model = fields.get("model") or ASR_ALIAS
    model = default if model == ASR_ALIAS else model
    if model not in models:
        raise ApiError(404, f"model={model!r}: use one of {[ASR_ALIAS, *models]}.", code="model_not_found",
                       param="model")  # fmt: skip
    fmt = fields.get("response_format") or "json"
    if fmt not in TRANSCRIPT_FORMATS:
        raise ApiError(400, f"response_format={fmt!r}: use one of {TRANSCRIPT_FORMATS}.", param="response_format")
    words = "word" in fields.get("timestamp_granularities", "").split(",")
    try:
        opts = TranscribeOptions(model_id=model, language=fields.get("language") or "auto", word_timestamps=words)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return opts, fmt, words


def transcript_work(asr: Any, path: Path, opts: Any) -> Callable:
    def work(cancel: threading.Event, emit: Callable[[Any], None]) -> Any:
        return asr.transcribe(path, opts, should_stop=cancel.is_set)  # the route deletes the upload afterwards

    return work


def transcript_response(tr: Any, fmt: str, words: bool) -> Any:
    from starlette.responses import JSONResponse, PlainTextResponse

    from backends.audio import to_srt, to_vtt

    if fmt == "json":
        return JSONResponse({"text": tr.text})
    if fmt == "text":
        return PlainTextResponse(tr.text + "\n")
    if fmt in ("srt", "vtt"):
        return PlainTextResponse((to_srt if fmt == "srt" else to_vtt)(tr))
    segments = [
        {"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": [], "temperature": 0.0,
         "avg_logprob": s.avg_logprob, "compression_ratio": 0.0, "no_speech_prob": s.no_speech_prob}
        for i, s in enumerate(tr.segments)
    ]  # fmt: skip
    body = {"task": "transcribe", "language": tr.language or "", "duration": tr.duration_s, "text": tr.text,
            "segments": segments}  # fmt: skip
    if words:
        body["words"] = [{"word": w.text, "start": w.start, "end": w.end} for s in tr.segments for w in s.words]
    return JSONResponse(body)


# ---- images -------------------------------------------------------------------------------------------------------
def parse_image(body: Any, models: list[str], default: str) -> Any:
    from backends.image import GenerateRequest

    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model") or default
    if model not in models:
        raise ApiError(404, f"model={model!r}: use one of {models}.", code="model_not_found", param="model")
    if (body.get("response_format") or "b64_json") != "b64_json":
        raise ApiError(400, "response_format: only b64_json is served (no image URLs leave the studio).",
                       param="response_format")  # fmt: skip
    size = body.get("size") or "512x512"
    try:
        width, height = (int(x) for x in str(size).lower().split("x"))
    except ValueError:
        raise ApiError(400, f"size={size!r}: give WIDTHxHEIGHT, e.g. 512x512.", param="size") from None
    try:
        return GenerateRequest(
            prompt=body.get("prompt") if isinstance(body.get("prompt"), str) else "",
            negative_prompt=str(body.get("negative_prompt") or ""),
            model=model, width=width, height=height, batch=int(body.get("n") or 1),
            steps=int(body.get("steps") or 20), seed=body.get("seed"),
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e)) from None


def image_work(diffusion: Any, req: Any) -> Callable:
    def work(cancel: threading.Event, emit: Callable[[Any], None]) -> Any:
        return diffusion.generate(req, should_stop=cancel.is_set)

    return work


def images_body(result: Any) -> dict[str, Any]:
    data = [{"b64_json": base64.b64encode(Path(img.path).read_bytes()).decode(), "revised_prompt": None}
            for img in result.images]  # fmt: skip
    return {"created": int(time.time()), "data": data}

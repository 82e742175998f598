"""The /v1 routes on the studio's own FastAPI app (the one Gradio serves), with bearer-key auth and the queue.

Every route: check the key (when auth is required: a non-loopback host, a share link, or `api_keys_on_loopback`),
parse the body (unknown fields are ignored), take a place in its lane or answer 503 with Retry-After, run the work
on its own thread through the same backend objects the tabs use. Errors come back in the OpenAI shape. Keys are
never logged: a refused request logs only the client address.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from studio.api import chat, media
from studio.api.jobs import ApiError, ClientGone, Job, as_api_error
from studio.api.state import ApiState

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


def _guarded(state: ApiState, fn: Handler) -> Handler:
    """Auth first; ApiError and unexpected failures become OpenAI-shaped error responses."""

    async def handler(request: Request) -> Response:
        try:
            if not state.enabled:
                raise ApiError(404, "The /v1 API is turned off (api_enabled = false).")
            if state.closed_reason:
                raise ApiError(403, state.closed_reason, code="api_keys_required")
            if state.auth_required:
                scheme, _, key = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not state.keys.check(key.strip()):
                    host = request.client.host if request.client else "?"
                    log.warning("API request refused (missing or wrong API key) from %s", host)
                    raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                                   code="invalid_api_key")  # fmt: skip
            return await fn(request)
        except ClientGone:
            return Response(status_code=499)
        except Exception as e:
            return as_api_error(e).response()

    return handler


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "The request body is not valid JSON.") from None


class Routes:
    """The route handlers, bound to one studio context."""

    def __init__(self, ctx: Any, state: ApiState) -> None:
        self.ctx, self.state = ctx, state

    # ---- helpers ------------------------------------------------------------------------------------------------
    def present(self, capability: str) -> list[str]:
        cat = self.ctx.catalog
        return [s.id for s in cat.by_capability(capability) if cat.is_present(s)]

    def chat_models(self) -> list[str]:
        llm = self.ctx.backends.llm
        ids = self.present("chat")
        return ids if llm.config.model_id in ids else [llm.config.model_id, *ids]

    def _job(self, lane: str, route: str, model: str, work: Any) -> Job:
        return Job(self.state, self.state.enter(lane, route, model), work)

    # ---- routes -------------------------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        data = []
        for cap, ids in (("chat", self.chat_models()), ("embeddings", self.present("embeddings")),
                         ("asr", self.present("asr")), ("diffusion", self.present("diffusion"))):  # fmt: skip
            data += [{"id": i, "object": "model", "created": 0, "owned_by": "onecard", "capability": cap} for i in ids]
        return JSONResponse({"object": "list", "data": data})

    async def queue(self, request: Request) -> Response:
        """Queue lengths, recent requests and the residency leases held now (the GPU in use or not)."""
        leases = {m.key: m.leases for m in self.ctx.residency.snapshot().models if m.leases}
        return JSONResponse({**self.state.snapshot(), "leases": leases})

    async def chat_completions(self, request: Request, *, is_chat: bool = True) -> Response:
        req = chat.parse(await _json(request), chat=is_chat)
        if req.model not in self.chat_models():
            raise ApiError(404, f"model={req.model!r} is not a chat model here; GET /v1/models lists them.",
                           code="model_not_found", param="model")  # fmt: skip
        llm = self.ctx.backends.llm
        rec = self.state.enter("chat", "chat" if is_chat else "completions", req.model)
        job = Job(self.state, rec, chat.make_work(llm, req, rec))
        return await chat.respond(request, job, req)

    async def completions(self, request: Request) -> Response:
        return await self.chat_completions(request, is_chat=False)

    async def embeddings(self, request: Request) -> Response:
        rag = self.ctx.backends.rag
        model_id = rag.config.embedding_model
        texts, fmt = media.parse_embeddings(await _json(request), model_id)
        job = self._job("embeddings", "embeddings", model_id, lambda cancel, emit: rag.embed(texts))
        vectors = await job.start().result(request)
        job.rec.tokens = len(texts)
        return JSONResponse(media.embeddings_body(vectors, texts, fmt, model_id))

    async def transcriptions(self, request: Request) -> Response:
        s = self.ctx.settings
        folder = s.cache_dir / "api-uploads"
        path, fields = await media.read_upload(request, folder, s.max_upload_mb * 2**20)
        try:
            asr = self.ctx.backends.asr
            models = self.present("asr")
            opts, fmt, words = media.transcribe_options(fields, models, models[0] if models else "whisper-tiny.en")
            job = self._job("audio", "transcriptions", opts.model_id, media.transcript_work(asr, path, opts))
            transcript = await job.start().result(request)
        finally:
            with contextlib.suppress(OSError):  # also when the client left while waiting (the work never ran)
                path.unlink(missing_ok=True)
        job.rec.tokens = len(transcript.segments)
        return media.transcript_response(transcript, fmt, words)

    async def images(self, request: Request) -> Response:
        diffusion = self.ctx.backends.diffusion
        req = media.parse_image(await _json(request), self.present("diffusion"), diffusion.config.default_model)
        job = self._job("images", "images", req.model, media.image_work(diffusion, req))
        result = await job.start().result(request)
        job.rec.tokens = len(result.images)
        return JSONResponse(media.images_body(result))


def router(ctx: Any, state: ApiState) -> APIRouter:
    r = Routes(ctx, state)
    api = APIRouter(prefix="/v1")
    for path, method, fn in (
        ("/models", "GET", r.models),
        ("/queue", "GET", r.queue),
        ("/chat/completions", "POST", r.chat_completions),
        ("/completions", "POST", r.completions),
        ("/embeddings", "POST", r.embeddings),
        ("/audio/transcriptions", "POST", r.transcriptions),
        ("/images/generations", "POST", r.images),
    ):
        api.add_api_route(path, _guarded(state, fn), methods=[method], include_in_schema=False)
    return api

"""Image generation with Stable Diffusion 1.5 and SDXL (diffusers), through the residency manager.

One request runs in three stages, each holding residency leases only on what it uses:
1. text: lease the text encoder(s), encode prompt and negative prompt;
2. denoise: lease the UNet (and the VAE, for img2img/inpaint encoding), run the scheduler loop to latents, with
   one out-of-memory retry by the manager (`residency.run`);
3. decode: lease the VAE, decode (tiled when the memory plan says so, or after an out-of-memory error).
So when the GPU budget is short the manager can park the text encoders in pinned RAM while the UNet stays resident
(see backends/image/memory.py for the plan). Nothing here moves a model between devices.

Images are saved as PNGs carrying their parameters under `outputs_dir/images/<date>/`; the same seed and settings
give the same image. The offline default model is an untrained demo pipeline; results say so (`result.demo`).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.image.lora import LoraError, LoraFile, activate_loras, read_lora
from backends.image.memory import MemoryPlan, decode_latents, plan_memory
from backends.image.models import (
    TEXT_COMPONENTS,
    ComponentLoader,
    ModelNotAvailable,
    ModelSource,
    load_cpu_parts,
    resolve_source,
)
from backends.image.png import IMAGES_SUBDIR, GalleryItem, list_gallery, save_png
from backends.image.request import (
    SCHEDULERS,
    GeneratedImage,
    GenerateRequest,
    GenerationCancelled,
    GenerationResult,
    LoraChoice,
    RequestError,
    load_image,
)

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)

__all__ = [
    "SCHEDULERS",
    "DiffusionBackend",
    "DiffusionBusy",
    "DiffusionConfig",
    "GenerateRequest",
    "GenerationCancelled",
    "GenerationResult",
    "LoraChoice",
    "LoraError",
    "ModelNotAvailable",
    "RequestError",
    "create",
]
Progress = Callable[[float, str], None]
_PIPELINES = {
    ("sd15", "txt2img"): "StableDiffusionPipeline",
    ("sd15", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd15", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sdxl", "txt2img"): "StableDiffusionXLPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
}


class DiffusionBusy(RuntimeError):
    """The model is being trained (LoRA job); generation with it waits until the job ends."""


@dataclass(frozen=True)
class DiffusionConfig:
    default_model: str = "tiny-sd-demo"
    gpu_dtype: str = "float16"  # SD1.5 and SDXL UNets are published and run in fp16

    def __post_init__(self) -> None:
        if self.gpu_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"gpu_dtype {self.gpu_dtype!r}: use float16, bfloat16 or float32")


@dataclass
class LoadedModel:
    """A model whose components are registered with the residency manager (weights live there, not here)."""

    source: ModelSource
    dtype: Any
    vae_dtype: Any
    parts: dict[str, Any]  # tokenizers and configs (CPU, small)
    component_bytes: dict[str, int]
    loras: dict[str, LoraFile] = field(default_factory=dict)
    # Held by a generation for its whole run and by a training job for its whole run: the job never adds its
    # adapter to the shared UNet while an image is being made, and vice versa.
    gate: threading.Lock = field(default_factory=threading.Lock)

    @property
    def arch(self) -> str:
        return self.source.arch

    def key(self, component: str) -> str:
        return self.source.key(component)


class DiffusionBackend:
    def __init__(self, ctx: Services, config: DiffusionConfig | None = None) -> None:
        self._ctx = ctx
        self.config = config or DiffusionConfig()
        self._models: dict[str, LoadedModel] = {}
        self._training: set[str] = set()
        self._lock = threading.RLock()
        # (key, root, component, dtype) -> residency Loader; benchmarks swap in random-weight loaders here.
        self.loader_factory: Callable[..., Any] = ComponentLoader

    # ---- models --------------------------------------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        """(label, id) of the catalog's diffusion models; absent ones say how to get them."""
        out = []
        for spec in self._ctx.catalog.by_capability("diffusion"):
            present = self._ctx.catalog.is_present(spec)
            out.append((spec.title if present else f"{spec.title} (not downloaded)", spec.id))
        return out

    def prepare(self, model: str) -> LoadedModel:
        """Resolve a model and register its components with the residency manager (loads nothing yet)."""
        import torch

        with self._lock:
            source = resolve_source(model or self.config.default_model, self._ctx.catalog, self._ctx.settings.cache_dir)
            if source.id in self._models:
                return self._models[source.id]
            on_gpu = self._ctx.residency.device == "cuda"
            dtype = getattr(torch, self.config.gpu_dtype) if on_gpu else torch.float32
            parts = load_cpu_parts(source.root, source.arch)
            upcast_vae = source.arch == "sdxl" and parts["vae_config"].get("force_upcast", True)
            vae_dtype = torch.float32 if upcast_vae else dtype  # SDXL's VAE overflows in fp16
            sizes = {}
            for comp in source.components:
                comp_dtype = vae_dtype if comp == "vae" else dtype
                loader = self.loader_factory(source.key(comp), source.root, comp, comp_dtype)
                sizes[comp] = loader.estimate_bytes()
                if not self._ctx.residency.is_registered(loader.key):
                    self._ctx.residency.register(loader)
            rec = LoadedModel(source, dtype, vae_dtype, parts, sizes)
            self._models[source.id] = rec
            log.info(
                "registered %s (%s, %s): %s",
                source.id,
                source.arch,
                dtype,
                {k: f"{v / 2**20:.0f} MiB" for k, v in sizes.items()},
            )
            return rec

    def read_lora(self, rec: LoadedModel, path: str | Path) -> LoraFile:
        path = Path(path)
        if not path.is_file():
            raise LoraError(f"LoRA file not found: {path}")
        stat = path.stat()
        cache_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if cache_key not in rec.loras:
            rec.loras[cache_key] = read_lora(path, rec.arch, rec.parts["unet_config"])
        return rec.loras[cache_key]

    def gallery(self, limit: int = 60) -> list[GalleryItem]:
        return list_gallery(self._ctx.settings.outputs_dir, limit)

    @contextlib.contextmanager
    def training(self, rec: LoadedModel) -> Iterator[None]:
        """Mark a model as being trained: plain generation with it is refused meanwhile (DiffusionBusy)."""
        with self._lock:
            if rec.source.id in self._training:
                raise DiffusionBusy(f"{rec.source.title} is already being trained by another job.")
            self._training.add(rec.source.id)
        try:
            with rec.gate:  # waits for an image in progress to finish
                yield
        finally:
            with self._lock:
                self._training.discard(rec.source.id)

    def plan(self, rec: LoadedModel, req: GenerateRequest) -> MemoryPlan:
        residency = self._ctx.residency
        budget = residency.capacity_bytes() if residency.device == "cuda" else None  # None: RAM is the limit
        return plan_memory(
            rec.component_bytes,
            width=req.width,
            height=req.height,
            batch=req.batch,
            cfg=req.cfg,
            dtype_bytes=rec.dtype.itemsize,
            vae_dtype_bytes=rec.vae_dtype.itemsize,
            budget_bytes=budget,
        )

    # ---- generation ----------------------------------------------------------------------------------
    def generate(
        self, req: GenerateRequest, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None
    ) -> GenerationResult:
        rec = self.prepare(req.model)
        if rec.source.id in self._training:
            raise DiffusionBusy(
                f"{rec.source.title} is being trained by a LoRA job right now; wait for it or cancel it."
            )
        with rec.gate:
            return self.generate_with(rec, req, progress, should_stop)

    def generate_with(
        self,
        rec: LoadedModel,
        req: GenerateRequest,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        extra_adapters: tuple[tuple[str, float], ...] = (),
        save_dir: Path | None = None,
    ) -> GenerationResult:
        """Generate with a prepared model. `extra_adapters` activates adapters already in the UNet (training
        samples); `save_dir` replaces the gallery folder (samples and class images of a training run)."""
        t0 = time.perf_counter()
        report = progress or (lambda f, m: None)
        size = (req.width, req.height)
        init = load_image(req.init_image, "init image", size) if req.init_image is not None else None
        mask = load_image(req.mask_image, "mask", size, mode="L") if req.mask_image is not None else None
        loras = [(self.read_lora(rec, c.path), float(c.scale)) for c in req.loras]
        base_seed = req.seed if req.seed is not None and req.seed >= 0 else secrets.randbelow(2**31)
        seeds = [base_seed + i for i in range(req.batch)]
        plan = self.plan(rec, req)
        log.info(
            "generate %s %dx%d x%d, %d steps, memory: %s",
            req.mode,
            req.width,
            req.height,
            req.batch,
            req.steps,
            plan.describe(),
        )
        report(0.0, "encoding the prompt")
        embeds = self._encode_text(rec, req, loras)
        if plan.text_encoders_parked:
            self._park_text_encoders(rec)
        t_denoise = time.perf_counter()
        latents, steps_done = self._denoise(
            rec, req, embeds, init, mask, loras, extra_adapters, seeds, plan, report, should_stop
        )
        denoise_s = time.perf_counter() - t_denoise
        report(0.92, "decoding")
        images = self._decode(rec, latents, plan)
        saved = self._save(rec, req, images, seeds, plan, save_dir)
        seconds = time.perf_counter() - t0
        report(1.0, f"done in {seconds:.1f} s")
        return GenerationResult(
            tuple(saved),
            rec.source.id,
            rec.source.title,
            rec.source.demo,
            req.mode,
            plan.describe(),
            seconds,
            steps_done / max(denoise_s, 1e-9),
        )

    def _encode_text(self, rec: LoadedModel, req: GenerateRequest, loras: list) -> dict[str, Any]:
        with self._text_encoder(rec, loras) as encode:
            return encode(req.prompt, req.negative_prompt or None, req.batch, req.cfg)

    def _park_text_encoders(self, rec: LoadedModel) -> None:
        """Make the decode's room now, with the encoders (used once per image), before the manager makes it by
        evicting the UNet. A session still encoding keeps its lease: that encoder stays."""
        for comp in TEXT_COMPONENTS[rec.arch]:
            self._ctx.residency.offload(rec.key(comp), to="ram")

    def encode_texts(self, rec: LoadedModel, texts: list[str]) -> list[dict[str, Any]]:
        """Conditioning for each text (no negative), on the CPU: what LoRA training feeds the UNet."""
        with self._text_encoder(rec, []) as encode:
            return [{k: v.cpu() for k, v in encode(t, None, 1, False).items()} for t in texts]

    @contextlib.contextmanager
    def _text_encoder(self, rec: LoadedModel, loras: list) -> Iterator[Callable[..., dict[str, Any]]]:
        """Lease the text encoder(s) and yield `encode(prompt, negative, n, cfg) -> embeddings dict`."""
        import torch

        res = self._ctx.residency
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        with contextlib.ExitStack() as stack:
            modules = {c: stack.enter_context(res.use(rec.key(c))) for c in TEXT_COMPONENTS[rec.arch]}
            for comp, module in modules.items():
                activate_loras(module, comp, rec.arch, loras)
            pipe = self._assemble(rec, "txt2img", **modules)
            device = next(iter(modules.values())).device

            def encode(prompt: str, negative: str | None, n: int, cfg: bool) -> dict[str, Any]:
                with torch.no_grad():
                    out = pipe.encode_prompt(
                        prompt=prompt,
                        device=device,
                        num_images_per_prompt=n,
                        do_classifier_free_guidance=cfg,
                        negative_prompt=negative,
                    )
                return {k: v for k, v in zip(names, out, strict=False) if v is not None}

            yield encode

    def _denoise(self, rec, req, embeds, init, mask, loras, extra, seeds, plan, report, should_stop):
        import torch

        res = self._ctx.residency
        total = max(1, int(req.steps * (req.strength if init is not None else 1.0)))
        done = [0]

        def on_step(pipe, i, t, kwargs):
            done[0] = i + 1
            report(0.05 + 0.85 * done[0] / total, f"step {done[0]}/{total}")
            if should_stop is not None and should_stop():
                pipe._interrupt = True
            return kwargs

        def run(unet):
            # txt2img needs no VAE while denoising; img2img/inpaint encode the init image with it. Not leasing it
            # here matters: the manager sets aside the VAE's measured decode peak for every VAE lease.
            with contextlib.ExitStack() as stack:
                vae = stack.enter_context(res.use(rec.key("vae"))) if init is not None else None
                stack.enter_context(_attention_slicing(unet, plan.attention_slicing))
                if vae is not None:
                    stack.enter_context(_keep_dtype(vae))
                activate_loras(unet, "unet", rec.arch, loras, extra)
                pipe = self._assemble(rec, req.mode, unet=unet, vae=vae, scheduler=self._scheduler(rec, req))
                kwargs = dict(
                    embeds,
                    num_inference_steps=req.steps,
                    guidance_scale=req.guidance,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                    output_type="latent",
                    callback_on_step_end=on_step,
                )
                if init is None:
                    kwargs.update(width=req.width, height=req.height)
                else:
                    kwargs.update(image=init, strength=req.strength)
                if mask is not None:
                    kwargs.update(mask_image=mask, width=req.width, height=req.height)
                with torch.no_grad():
                    return pipe(**kwargs).images

        latents = res.run(rec.key("unet"), run, working_bytes=plan.unet_working_bytes)
        if should_stop is not None and should_stop():
            raise GenerationCancelled(f"Stopped after {done[0]} of {total} steps; nothing was saved.")
        return latents, done[0]

    def _decode(self, rec: LoadedModel, latents: Any, plan: MemoryPlan) -> list[Any]:
        from diffusers.image_processor import VaeImageProcessor

        with self._ctx.residency.use(rec.key("vae"), working_bytes=plan.decode_working_bytes) as vae:
            pixels = decode_latents(vae, latents, plan)
        scale = 2 ** (len(rec.parts["vae_config"]["block_out_channels"]) - 1)
        return VaeImageProcessor(vae_scale_factor=scale).postprocess(pixels.float().cpu(), output_type="pil")

    def _save(self, rec, req, images, seeds, plan, save_dir=None) -> list[GeneratedImage]:
        now = datetime.now()
        folder = save_dir or self._ctx.settings.outputs_dir / IMAGES_SUBDIR / now.strftime("%Y-%m-%d")
        params = {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "model": rec.source.id,
            "model_title": rec.source.title,
            "arch": rec.arch,
            "untrained_demo_model": rec.source.demo,
            "mode": req.mode,
            "width": req.width,
            "height": req.height,
            "steps": req.steps,
            "guidance": req.guidance,
            "scheduler": req.scheduler,
            "batch": req.batch,
            "strength": req.strength if req.mode != "txt2img" else None,
            "loras": [{"name": Path(c.path).stem, "path": str(c.path), "scale": c.scale} for c in req.loras],
            "memory": plan.describe(),
            "created": now.isoformat(timespec="seconds"),
        }
        out = []
        for i, (image, seed) in enumerate(zip(images, seeds, strict=True)):
            path = folder / f"{now:%H%M%S-%f}-{secrets.token_hex(4)}-{rec.source.id[:24]}-{seed}.png"  # unguessable
            save_png(image, path, {**params, "seed": seed, "batch_index": i})
            out.append(GeneratedImage(image, path, seed))
        return out

    # ---- helpers ---------------------------------------------------------------------------------------
    def _scheduler(self, rec: LoadedModel, req: GenerateRequest) -> Any:
        import diffusers

        name, extra = SCHEDULERS[req.scheduler]
        base = rec.parts["scheduler_config"]
        cls = getattr(diffusers, name or base["_class_name"])
        return cls.from_config({**base, **extra})

    def _assemble(self, rec: LoadedModel, mode: str, scheduler: Any = None, **modules: Any) -> Any:
        """A diffusers pipeline object around the leased modules (absent ones are None); no copies, no moves."""
        import diffusers

        cls = getattr(diffusers, _PIPELINES[(rec.arch, mode)])
        parts: dict[str, Any] = {
            "vae": None,
            "text_encoder": None,
            "unet": None,
            "tokenizer": rec.parts["tokenizer"],
            "scheduler": scheduler or self._scheduler(rec, GenerateRequest("x", scheduler="Default")),
        }
        if rec.arch == "sdxl":
            parts.update(text_encoder_2=None, tokenizer_2=rec.parts["tokenizer_2"], add_watermarker=False)
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        parts.update(modules)
        pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe


@contextlib.contextmanager
def _attention_slicing(unet: Any, on: bool) -> Iterator[None]:
    """Sliced attention for this request only; the UNet's own (SDPA) processors come back afterwards."""
    if not on:
        yield
        return
    before = unet.attn_processors
    unet.set_attention_slice("auto")
    try:
        yield
    finally:
        unet.set_attn_processor(before)


@contextlib.contextmanager
def _keep_dtype(vae: Any) -> Iterator[None]:
    """diffusers' SDXL img2img/inpaint casts a force_upcast VAE back to the UNet's dtype; undo that here."""
    dtype = vae.dtype
    try:
        yield
    finally:
        if vae.dtype != dtype:
            vae.to(dtype=dtype)


def create(ctx: Services) -> DiffusionBackend:
    return DiffusionBackend(ctx)

"""The rows of studio/bench/planner.py: each builds (or reuses) an architecture-true random model, runs the job the
studio runs, and returns the planner's prediction beside the measured peak (bytes). `r` is the benchmark's Run."""

from __future__ import annotations

import time
from typing import Any

import torch

from studio.planner import (
    Chat,
    DetectTrain,
    ImageGen,
    ImageLora,
    LoraTrain,
    ModelInfo,
    Transcribe,
    from_config,
    layer_bytes,
    offload_split,
    preset,
)

GiB = 2**30
RESERVE = int(0.8 * GiB)  # the studio's default reserve
TINY_13B = dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=344, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)  # fmt: skip
LLAMA_13B = dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                 intermediate_size=13824, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2)  # fmt: skip
TINY_WHISPER = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                    encoder_ffn_dim=128, decoder_ffn_dim=128)  # fmt: skip
WHISPER_SMALL = dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)  # fmt: skip


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset(device: str) -> int:
    """Reset the peak counter; returns what is allocated now (the baseline other models hold)."""
    if device != "cuda":
        return 0
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak(device: str, base: int = 0) -> int | None:
    if device != "cuda":
        return None
    _sync(device)
    return torch.cuda.max_memory_allocated() - base


def _prediction(r: Any, key: str, info: ModelInfo, task: Any) -> dict[str, Any]:
    raw = r.vram.plan(info, task, learn=False)
    learned = r.vram.plan(info, task)
    r.vram.declare(key, info, task)
    out = {"task": task.label(), "model": info.shape_label, "predicted_bytes": raw.total,
           "parts": {k: int(v) for k, v in raw.parts.items()}}  # fmt: skip
    if learned.correction:
        out["learned_bytes"] = learned.total
    return out


def _learn(r: Any, key: str, weights: int, peak: int | None) -> None:
    if peak:
        r.vram.observe(key, weights, peak - weights)


# ---- LLM: one 8B nf4 model for chat and QLoRA --------------------------------------------------------------
def build_llm(r: Any) -> tuple[Any, ModelInfo, int]:
    from studio.bench.llm_models import LLAMA_8B, TINY, build_fp32_llama, build_nf4_llama

    t0 = time.perf_counter()
    if r.device == "cuda":
        base = _reset("cuda")
        model = build_nf4_llama(LLAMA_8B, "cuda")
        weights = torch.cuda.memory_allocated() - base
        info = preset("llama-3.1-8b-instruct")
    else:
        model = build_fp32_llama(TINY)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        info = from_config(TINY, "tiny-llama")
    print(f"  LLM built in {time.perf_counter() - t0:.1f} s, weights {weights / GiB:.2f} GiB", flush=True)
    return model, info, weights


def _precision(r: Any) -> str:
    return "nf4" if r.device == "cuda" else "fp32"


def chat_row(r: Any, model: Any, info: ModelInfo, context: int) -> dict[str, Any]:
    """The studio's chat decoder (static cache, CUDA graph on the GPU) at `context`: prefill, then 16 steps."""
    from backends.llm.fastdecode import StaticDecoder

    task = Chat(context=context, precision=_precision(r))
    out = _prediction(r, "chat:bench", info, task)
    weights = r.extra["llm_weights_bytes"]
    base = _reset(r.device) - weights  # what else is allocated (nothing: the weights are part of the job)
    dec = StaticDecoder(model, context, use_graph=r.device == "cuda")
    ids = torch.randint(3, info.config["vocab_size"], (1, context - task.new_tokens), device=r.device)
    t0 = time.perf_counter()
    logits = dec.prefill(ids)
    for _ in range(16):
        logits = dec.step(logits.argmax().view(1, 1))
    _sync(r.device)
    out["decode_s"] = round(time.perf_counter() - t0, 3)
    out["measured_bytes"] = _peak(r.device, base)
    _learn(r, "chat:bench", weights, out["measured_bytes"])
    del dec, logits
    return out


def qlora_row(r: Any, model: Any, info: ModelInfo, seq: int) -> dict[str, Any]:
    """The studio's QLoRA recipe (studio.bench.finetune: LoRA r=16 on all linears, 8-bit AdamW, chunked loss)."""
    from backends.finetune.types import ALL_LINEAR
    from studio.bench.finetune import lora_model, measure

    task = LoraTrain(seq=seq, rank=16, quant="nf4" if r.device == "cuda" else "16bit")
    out = _prediction(r, "finetune:bench", info, task)
    peft_model = lora_model(model, tuple(ALL_LINEAR))
    row = measure(peft_model, "ours", seq, info.config["vocab_size"], r.device, steps=1)
    out["train_row"] = {k: row.get(k) for k in ("ok", "step_s", "tokens_per_s", "error", "notes")}
    if not row.get("ok"):
        out["status"] = f"not measured: {row.get('error')}"
    out["measured_bytes"] = int(row["peak_gb"] * 1e9) if row.get("peak_gb") and row.get("ok") else None
    return out


# ---- 13B with layers streamed from pinned RAM, beside the resident 8B ------------------------------------------
def build_streamed_llama(cfg: dict, resident: int, device: str, accel: Any) -> tuple[Any, Any]:
    """A random Llama built layer by layer: layers >= `resident` go to pinned pools as soon as they are built, so
    the whole model never has to fit on the card."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from studio.bench.llm_models import _materialise_rest, nf4_linears
    from studio.residency.stream import LayerStreamer

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
    streamer = LayerStreamer([], accel, 0)
    for i, layer in enumerate(model.model.layers):
        if device == "cuda":
            nf4_linears(layer, device)
        for module in layer.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.device.type == "meta":
                    norm = "norm" in type(module).__name__.lower()
                    data = torch.ones(p.shape, dtype=torch.bfloat16, device=device) if norm else (
                        torch.randn(p.shape, dtype=torch.bfloat16, device=device) * 0.02)  # fmt: skip
                    setattr(module, name, torch.nn.Parameter(data, requires_grad=False))
        if i >= resident:
            streamer.stream(layer)
    _materialise_rest(model, device, 0.2)
    streamer.resident = resident
    return model.eval(), streamer


def offload_row(r: Any) -> dict[str, Any]:
    from backends.llm.fastdecode import EagerDecoder

    cuda = r.device == "cuda"
    if cuda:
        from studio.residency.accel import CudaAccelerator

        accel, info, cfg = CudaAccelerator(), preset("llama-2-13b"), LLAMA_13B
        budget = int(12 * GiB) - RESERVE - torch.cuda.memory_allocated()  # the 8B stays resident beside it
    else:
        from studio.residency.simulated import FakeProbe, SimulatedAccelerator

        accel, info, cfg = SimulatedAccelerator(FakeProbe(2**30)), from_config(TINY_13B, "tiny-13b"), TINY_13B
        budget = None
    task = Chat(context=512, precision="nf4" if cuda else "fp32")  # a 448-token prompt, then 32 tokens
    need = r.vram.plan(info, task, learn=False)
    if budget is None:  # CPU: three layers short of fitting whole, so that most layers stream
        budget = need.total - 3 * layer_bytes(info.config, task.precision)
    split = offload_split(info, task, budget)
    if split is None:
        return {"status": f"not measured: not even the head fits in {budget / GiB:.2f} GiB"}
    base = _reset(r.device)
    t0 = time.perf_counter()
    model, streamer = build_streamed_llama(cfg, split.resident, r.device, accel)
    build_s = time.perf_counter() - t0
    ids = torch.randint(3, cfg["vocab_size"], (1, task.context - task.new_tokens), device=r.device)
    dec = EagerDecoder(model)
    with torch.no_grad():
        logits = dec.prefill(ids)
        streamer.reset()
        _sync(r.device)
        t0 = time.perf_counter()
        steps = 32 if cuda else 8
        for _ in range(steps):
            logits = dec.step(logits.argmax().view(1, 1))
        _sync(r.device)
    wall = time.perf_counter() - t0
    s = streamer.stats()
    out = {"task": task.label(), "model": info.shape_label, "budget_bytes": budget, "need_bytes": need.total,
           "layers": split.layers, "resident": split.resident, "streamed": split.streamed, "pinned": streamer.pinned,
           "predicted_bytes": split.gpu_bytes, "measured_bytes": _peak(r.device, base), "build_s": round(build_s, 1),
           "decode_tok_s": steps / wall, "share_moving": s.share_moving, "moved_gb_per_token": s.bytes_moved / steps / 1e9,
           "move_gbps": s.bytes_moved / s.moving_s / 1e9 if s.moving_s else 0.0,
           "predicted_s_moving_per_token": split.seconds_per_token_moving}  # fmt: skip
    streamer.close()
    del dec, model, streamer, logits
    return out


# ---- Whisper ---------------------------------------------------------------------------------------------------
def whisper_row(r: Any) -> dict[str, Any]:
    """Greedy generation of 100 tokens for a batch of 16 log-mel windows (fp16), as the torch Whisper engine does."""
    from transformers import GenerationMixin, WhisperConfig, WhisperForConditionalGeneration

    cuda = r.device == "cuda"
    arch, batch, tokens = (WHISPER_SMALL, 16, 100) if cuda else (TINY_WHISPER, 2, 8)
    cfg = WhisperConfig(vocab_size=51865, num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
                        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257,
                        **arch)  # fmt: skip
    dtype = torch.float16 if cuda else torch.float32
    with torch.device(r.device):
        model = WhisperForConditionalGeneration(cfg).to(dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    name = "Whisper-small (random)" if cuda else "tiny Whisper"
    info = ModelInfo("whisper", name, params, {**arch, "vocab_size": 51865})  # the built model's own count
    task = Transcribe(batch=batch, tokens=tokens)
    out = _prediction(r, "asr:bench", info, task) | {"params": params}
    feats = torch.randn(batch, 80, 3000, dtype=dtype, device=r.device)
    prompt = torch.tensor([[50258, 50259, 50359, 50363]] * batch, device=r.device)  # sot, en, transcribe, notimestamps
    base = _reset(r.device)
    with torch.inference_mode():
        GenerationMixin.generate(model, input_features=feats, decoder_input_ids=prompt, max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, num_beams=1)  # fmt: skip
    out["measured_bytes"] = _peak(r.device, base - params * dtype.itemsize)  # the weights are part of the job
    del model, feats
    return out


# ---- diffusion through the studio's image backend ------------------------------------------------------------
def _image_ctx(r: Any, name: str, configs: dict) -> tuple[Any, Any, Any]:
    from studio.bench.diffusion import make_ctx, prepare_model

    ctx = make_ctx(r.work / name, 12.0 if r.device == "cuda" else None)
    backend, rec = prepare_model(ctx, configs, r.work / name / "model")
    return ctx, backend, rec


def _image_info(rec: Any, family: str, name: str) -> ModelInfo:
    sizes = {
        k: v // (rec.vae_dtype.itemsize if k == "vae" else rec.dtype.itemsize) for k, v in rec.component_bytes.items()
    }
    return ModelInfo(family, name, sum(sizes.values()), components=sizes, source="built from config")


def _image_row(r: Any, family: str, task: Any, job: Any) -> dict[str, Any]:
    """A random SD/SDXL model registered with a fresh studio context; `job(ctx, backend, rec)` returns the
    diffusion bench's result with its `peak_vram_gib`; `task` may be `task(backend, rec)` (a mode read off the
    backend)."""
    from backends.image.tiny import SD15_CONFIGS, SDXL_CONFIGS, TINY_SD15_CONFIGS, TINY_SDXL_CONFIGS
    from studio.bench.diffusion import close_context

    cuda = r.device == "cuda"
    configs = {"sdxl": (SDXL_CONFIGS, TINY_SDXL_CONFIGS), "sd15": (SD15_CONFIGS, TINY_SD15_CONFIGS)}[family]
    base = _reset(r.device)  # what earlier rows left allocated: not this job's (the peak below is absolute)
    ctx, backend, rec = _image_ctx(r, family, configs[0] if cuda else configs[1])
    try:
        info = _image_info(rec, family, f"{family} ({'random' if cuda else 'tiny'})")
        task = task(backend, rec) if callable(task) else task
        out = _prediction(r, f"{family}:bench", info, task) | {"components": info.components}
        res = job(ctx, backend, rec)
        out["result"] = {k: v for k, v in res.items() if k != "runs"}
        out["measured_bytes"] = int(res["peak_vram_gib"] * GiB) - base if res.get("peak_vram_gib") else None
        out["left_allocated_by_earlier_rows"] = base
        return out
    finally:
        close_context(ctx)


def sdxl_row(r: Any) -> dict[str, Any]:
    from backends.image.diffusion import GenerateRequest
    from studio.bench.diffusion import bench_ours

    size = 1024 if r.device == "cuda" else 128

    def task(backend: Any, rec: Any) -> ImageGen:  # the memory mode the backend will pick for this request now
        mode = backend.plan(rec, GenerateRequest("x", model=str(rec.source.root), width=size, height=size))
        return ImageGen(size, size, parked=mode.text_encoders_parked, tiled=mode.vae_tiling)

    return _image_row(r, "sdxl", task, lambda ctx, backend, rec: bench_ours(backend, rec, size, 4, 1))


def sd_lora_row(r: Any) -> dict[str, Any]:
    from studio.bench.diffusion import bench_lora

    cuda = r.device == "cuda"
    size, steps = (512, 6) if cuda else (64, 2)

    def job(ctx: Any, backend: Any, rec: Any) -> dict[str, Any]:
        return bench_lora(ctx, rec.source.root, r.work / "sd15", size, steps, 16)

    return _image_row(r, "sd15", ImageLora(size, 1, 16), job)


# ---- YOLO training -------------------------------------------------------------------------------------------
def yolo_row(r: Any, imgsz: int = 640, batch: int = 16) -> dict[str, Any]:
    """One epoch of Ultralytics training with the studio's arguments (AMP on CUDA), synthetic data; other shapes
    than the table's check a refitted factor."""
    from backends.vision.data import validate_dataset
    from backends.vision.synth import make_synthetic_dataset
    from backends.vision.train import TrainOptions, _train_kwargs, write_training_yaml
    from backends.vision.yolo import prepare_ultralytics
    from studio.settings import Settings

    cuda = r.device == "cuda"
    imgsz, batch, n = (imgsz, batch, 2 * batch) if cuda else (min(imgsz, 64), min(batch, 2), 4)
    prepare_ultralytics(Settings(data_dir=r.work / "yolo", open_browser=False))
    from ultralytics import YOLO

    folder = make_synthetic_dataset(r.work / "yolo" / "data", n_train=n, n_val=4, imgsz=imgsz).parent
    data = write_training_yaml(validate_dataset(folder, compute_hash=False), r.work / "yolo" / "data.yaml")
    arch = "yolov8s" if cuda else "yolov8n"
    model = YOLO(f"{arch}.yaml", task="detect")
    params = sum(p.numel() for p in model.model.parameters())
    info = preset(arch)
    info = ModelInfo("yolo", info.name, params, info.config)
    out = _prediction(r, "train:yolo:bench", info, DetectTrain(imgsz, batch)) | {"params": params}
    opts = TrainOptions(base=f"{arch}-untrained", epochs=1, imgsz=imgsz, batch=batch)
    kwargs = _train_kwargs(opts, r.device, "detect", batch)
    base = _reset(r.device)
    model.train(data=str(data), project=str(r.work / "yolo" / "runs"), name="bench", **kwargs)
    out["measured_bytes"] = _peak(r.device, base)
    del model
    return out

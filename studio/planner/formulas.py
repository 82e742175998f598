"""GPU bytes of a job, by part, per model family (torch-free). What each formula counts, and what it was fitted to:

- LLM weights: linear parameters x bytes per parameter of the precision (nf4 with double quantisation 0.516: 4-bit
  codes + 8-bit block scales per 64 + fp32 scales of those; int4 group-128 0.531, lm_head quantised too), the
  embedding table and the head in 16 bits. Llama-3.1-8B nf4: 5.70 GB predicted, 5.70 GB built
  (studio/bench/results/llm-h200.json); int4 5.04 vs 5.10 GB.
- Chat: the static KV cache (2 x layers x kv heads x head dim x context x 2 bytes x batch) and the prefill's transient
  peak: the additive mask (prompt x context, 16-bit + bool) plus the larger of the 16-bit logits of every prompt
  position (transformers computes them all) and the MLP's three (prompt x intermediate) tensors.
- QLoRA/LoRA: the fine-tune backend's fitted formula (`qlora_parts`, used by backends/finetune/estimate.py too).
- Diffusion: component weights (the SDXL VAE in fp32: it overflows in fp16) plus the larger of the UNet's and the
  VAE decoder's activations; the per-pixel factors are the image backend's (`UNET_WORK_PER_LATENT_PX`,
  `DECODE_WORK_PER_PX`) scaled from its safety margin to the H200 measurements (the SDXL 1024 decode's 4.77 GiB;
  SD1.5 512: 2.65 GiB peak).
- SD LoRA training: the UNet in 16 bits, LoRA in fp32 with 8-bit AdamW, checkpointed activations per latent pixel
  (fitted: SD1.5 rank 16, 512 px, batch 1: 3.56 GiB on the H200).
- YOLO training (AMP): fp32 weights and the EMA copy, two AdamW moments (4 x 4 bytes per parameter; the gradients
  are freed by zero_grad before the forward that peaks) plus activations per image pixel scaled by the width
  multiple. Fitted on YOLOv8s 640 px batch 16 (3.43e9 bytes on the H200), checked at 640/8, 512/16 and 640/4
  (+3.5, +3.1, +7.7 %; planner-h200-yolo-shapes.md).
- Whisper: fp16 weights, the encoder's transient (batch x 1500 frames x the FFN), the cross-attention KV cache of every
  decoder layer (batch x beam x 1500 x d_model x 2 x 2 bytes) and the self-attention cache at the tokens decoded.
Every estimate adds framework overhead: 64 MiB of cuBLAS/cuDNN workspaces and 2% for allocator rounding.
"""

from __future__ import annotations

from typing import Any

from studio.planner.models import ModelInfo, llm_linear_shapes
from studio.planner.tasks import Chat, DetectTrain, ImageGen, ImageLora, LoraTrain, Task, Transcribe

MiB = 2**20
NF4_BYTES_PER_PARAM = 0.516
INT4_BYTES_PER_PARAM = 0.531
WORKSPACE_BYTES = 64 * MiB
ALLOCATOR_ROUNDING = 0.02
# QLoRA (backends/finetune/estimate.py docstring: fitted to studio/bench/results/finetune-h200.md)
LONG_FROM_TOKENS = 4096
MLP_TILE = 4096
LOSS_CHUNK_LOGITS = 1 << 26
QLORA_OVERHEAD = 0.03
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Diffusion (backends/image/memory.py keeps the margin-high versions it plans modes with)
UNET_WORK_PER_LATENT_PX = 30_000  # bytes per latent pixel, per sample, per byte of dtype (with margin)
DECODE_WORK_PER_PX = 1_300  # bytes per image pixel decoded at once, per byte of dtype (with margin)
# What the decoder is expected to take, as a share of that margin-high figure. Measured with torch's memory history
# (H200, 2026-12-01 19:17 UTC, results/sdxl-memory-1024-all-on-16gib-h200.txt; docs/planner.md): SDXL 1024 with every component on the GPU peaks in the
# fp32 VAE decode, 4.77 GiB live in it beside 6.6 GiB of weights (a 2.0 GiB cuDNN workspace, 1 GiB upsample
# output, 1 GiB conv output, ...): 1,220 bytes per pixel per byte. The earlier 340 was fitted to a "parked" run
# that decoded with the UNet evicted instead of the text encoders (the manager's cost-per-byte order; the image
# backend now parks the encoders itself in that mode), so its peak was the UNet's and the all-on mode looked 3.5 GB
# unexplained.
DECODE_EXPECTED = 1220 / DECODE_WORK_PER_PX
UNET_EXPECTED = {"sd15": 2.41, "sdxl": 1.6}  # SD1.5 512: 2.65 GiB peak less weights and overhead (SDXL: decode rules)
# checkpointed, fp16 autocast, per latent pixel per sample. Was 445,000, fitted to the diffusion bench's 3.56 GiB,
# an absolute peak taken after that bench's generation sections had loaded SD1.5 (their models were still on the
# card); the planner bench's own run of the same job in a fresh context peaked at 2.42 GiB (2026-12-01 13:04, H200),
# which this figure reproduces. Calibrated on that one run: an independent size or batch is not measured yet.
SD_LORA_ACT_PER_LATENT_PX = 155_000
# YOLO (AMP training, activations per image pixel at width multiple 1.0). Was 1,040 (half of the fp32 count of
# saved tensors, taken on the CPU with hooks): +10.0 % at 640/16 and +20 % at batch 4 on the H200, with the gradients
# counted too; 950 fits 640/16 without them (2026-12-01 19:39 UTC, planner-h200-yolo-shapes.md)
YOLO_ACT_PER_PX = 950
WHISPER_FRAMES = 1500
WHISPER_PROMPT_TOKENS = 4


def _bytes_per_param(precision: str) -> float:
    return {"nf4": NF4_BYTES_PER_PARAM, "int4": INT4_BYTES_PER_PARAM, "16bit": 2.0, "fp32": 4.0}[precision]


def llm_weights(c: dict[str, Any], precision: str) -> int:
    """Weight bytes of a causal LM in `precision` (see the module docstring)."""
    linear = c["num_hidden_layers"] * sum(i * o for i, o in llm_linear_shapes(c).values())
    table = c["vocab_size"] * c["hidden_size"]
    tied = bool(c.get("tie_word_embeddings"))
    if precision in ("16bit", "fp32"):
        return int((linear + table * (1 if tied else 2)) * _bytes_per_param(precision))
    if precision == "int4":  # the head is quantised too (untied)
        return int((linear + (0 if tied else table)) * INT4_BYTES_PER_PARAM + table * 2)
    return int(linear * NF4_BYTES_PER_PARAM + table * 2 * (1 if tied else 2))


def kv_bytes(c: dict[str, Any], tokens: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    kv_heads = c.get("num_key_value_heads") or heads
    return 2 * c["num_hidden_layers"] * kv_heads * head_dim * tokens * dtype_bytes * batch


def layer_bytes(c: dict[str, Any], precision: str) -> int:
    """Weight bytes of one decoder layer (what streaming moves per layer)."""
    per = sum(i * o for i, o in llm_linear_shapes(c).values())
    return int(per * _bytes_per_param(precision))


def chat_parts(m: ModelInfo, t: Chat) -> dict[str, int]:
    c = m.config
    dtype = 4 if t.precision == "fp32" else 2
    prompt = t.context - t.new_tokens
    mask = prompt * t.context * (dtype + 1)
    logits = t.batch * prompt * c["vocab_size"] * dtype + t.batch * c["vocab_size"] * 4
    mlp = t.batch * prompt * (c["intermediate_size"] * 3 + c["hidden_size"] * 3) * dtype
    hidden = t.batch * prompt * c["hidden_size"] * dtype * 2
    return {"weights": llm_weights(c, t.precision), "kv_cache": kv_bytes(c, t.context, t.batch, dtype),
            "activations": mask + max(logits + hidden, mlp)}  # fmt: skip


def qlora_parts(c: dict[str, Any], *, rank: int, targets: tuple[str, ...], batch: int, seq: int, checkpointing: bool,
                chunked_loss: bool, adamw8bit: bool, embeddings_in_ram: bool, cuda: bool) -> dict[str, int]:  # fmt: skip
    """The fine-tune backend's QLoRA formula (see backends/finetune/estimate.py), parts in bytes."""
    shapes = llm_linear_shapes(c)
    hidden, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    long = cuda and seq >= LONG_FROM_TOKENS
    linear = layers * sum(i * o for i, o in shapes.values())
    table = vocab * hidden
    tied = bool(c.get("tie_word_embeddings"))
    if cuda:
        weights = linear * NF4_BYTES_PER_PARAM + table * 2 * (0 if long and embeddings_in_ram else 1)
        weights += 0 if tied else table * 2
    else:
        weights = (linear + table * (1 if tied else 2)) * 4
    lora_params = layers * sum(rank * (i + o) for k, (i, o) in shapes.items() if k in targets)
    opt_bytes = 2 if cuda and adamw8bit else 8
    act = 2 if cuda else 4
    if long:
        activations = batch * seq * hidden * act * 20 + batch * min(seq, MLP_TILE) * inter * act * 4
    else:
        stored = layers * batch * seq * hidden * act if checkpointing else layers * batch * seq * (
            hidden * 10 + inter * 4) * act  # fmt: skip
        activations = stored + batch * seq * (hidden * 6 + inter * 3) * act
    chunk = max(128, LOSS_CHUNK_LOGITS // vocab)
    logits = min(chunk, batch * seq) * vocab * 4 * 2 if chunked_loss else batch * seq * vocab * (2 + 4 + 4)
    parts = {"weights": int(weights), "lora": lora_params * 8, "optimizer": lora_params * opt_bytes,
             "activations": int(activations), "logits": int(logits)}  # fmt: skip
    parts["overhead"] = int(sum(parts.values()) * QLORA_OVERHEAD)
    return parts


def lora_parts(m: ModelInfo, t: LoraTrain) -> dict[str, int]:
    parts = qlora_parts(m.config, rank=t.rank, targets=ALL_LINEAR, batch=t.micro_batch, seq=t.seq,
                        checkpointing=t.checkpointing, chunked_loss=t.chunked_loss, adamw8bit=True,
                        embeddings_in_ram=True, cuda=True)  # fmt: skip
    if t.quant == "16bit":
        parts["weights"] = llm_weights(m.config, "16bit")
    parts["optimizer"] += parts.pop("lora")
    parts["activations"] += parts.pop("logits")
    return parts


def unet_working_bytes(width: int, height: int, batch: int, cfg: bool, dtype_bytes: int) -> int:
    """UNet activations with the image backend's margin (backends/image/memory.py plans its modes with this)."""
    samples = batch * (2 if cfg else 1)
    return (width // 8) * (height // 8) * samples * UNET_WORK_PER_LATENT_PX * dtype_bytes // 2


def decode_working_bytes(width: int, height: int, images_at_once: int, dtype_bytes: int, tiled: bool,
                         tile_px: int = 512 * 512, tile_margin: float = 1.6) -> int:  # fmt: skip
    """VAE-decoder activations with the image backend's margin (tiled: one tile's worth)."""
    px = min(width * height, int(tile_px * tile_margin)) if tiled else width * height
    return px * images_at_once * DECODE_WORK_PER_PX * dtype_bytes


def image_modes(
    text: int, unet: int, vae: int, unet_work: int, decode_full: int, budget: int
) -> tuple[bool, bool, bool]:
    """(text encoders parked, VAE tiled, attention sliced): the image backend's choice for component weight bytes
    and margin-high working bytes against `budget` (backends/image/memory.plan_memory applies it; the planner
    predicts with it)."""
    parked = text + unet + vae + max(unet_work, decode_full) > budget
    return parked, unet + vae + decode_full > budget, unet + vae + unet_work > budget


def vae_dtype_bytes(m: ModelInfo) -> int:
    """The image backend runs the SDXL VAE in fp32 (it overflows in fp16), everything else in fp16."""
    return 4 if m.family == "sdxl" else 2


def image_component_bytes(m: ModelInfo) -> dict[str, int]:
    """Weight bytes per component as the image backend holds them."""
    return {k: n * (vae_dtype_bytes(m) if k == "vae" else 2) for k, n in m.components.items()}


def image_parts(m: ModelInfo, t: ImageGen) -> dict[str, int]:
    """Weights on the GPU at the peak (the text encoders not, when parked) and the larger of the UNet's and the
    decoder's working memory (VAE slicing: one image decodes at a time; tiled: one tile's worth)."""
    weights = sum(n for k, n in image_component_bytes(m).items() if not (t.parked and k.startswith("text_encoder")))
    unet = unet_working_bytes(t.width, t.height, t.batch, True, 2) * UNET_EXPECTED[m.family]
    decode = decode_working_bytes(t.width, t.height, 1, vae_dtype_bytes(m), t.tiled) * DECODE_EXPECTED
    return {"weights": int(weights), "activations": int(max(unet, decode))}


def image_lora_parts(m: ModelInfo, t: ImageLora) -> dict[str, int]:
    unet = m.components.get("unet", m.params)
    lora = t.rank * unet // 1000  # LoRA on the attention projections: ~rank x 0.1% of the UNet's parameters
    latent = (t.resolution // 8) ** 2 * t.batch
    scale = 1.0 if m.family == "sd15" else 1.6
    return {"weights": unet * 2, "optimizer": lora * (4 + 4 + 2),
            "activations": int(latent * SD_LORA_ACT_PER_LATENT_PX * scale)}  # fmt: skip


def yolo_parts(m: ModelInfo, t: DetectTrain) -> dict[str, int]:
    width = m.config.get("width", 0.5)
    return {"weights": m.params * 4 * 2, "optimizer": m.params * 4 * 2,  # weights + EMA; 2 AdamW moments
            "activations": int(t.batch * t.imgsz**2 * YOLO_ACT_PER_PX * width)}  # fmt: skip


def whisper_parts(m: ModelInfo, t: Transcribe) -> dict[str, int]:
    c = m.config
    d, rows = c["d_model"], t.batch * t.beam
    encoder = t.batch * WHISPER_FRAMES * (d * 6 + c["encoder_ffn_dim"] * 2) * 2
    cross = c["decoder_layers"] * 2 * rows * WHISPER_FRAMES * d * 2
    self_kv = c["decoder_layers"] * 2 * rows * (t.tokens + WHISPER_PROMPT_TOKENS) * d * 2
    enc_out = t.batch * WHISPER_FRAMES * d * 2
    return {"weights": m.params * 2, "kv_cache": cross + self_kv,
            "activations": max(encoder - cross - self_kv, 0) + enc_out + rows * c["vocab_size"] * 4 * 2}  # fmt: skip


FORMULAS = {"chat": chat_parts, "lora": lora_parts, "image": image_parts, "image_lora": image_lora_parts,
            "yolo_train": yolo_parts, "transcribe": whisper_parts}  # fmt: skip


def parts_for(m: ModelInfo, t: Task) -> dict[str, int]:
    """Bytes by part (weights, kv_cache, activations, optimizer, overhead) of task `t` on model `m`."""
    allowed = {"chat": ("llm",), "lora": ("llm",), "image": ("sd15", "sdxl"), "image_lora": ("sd15", "sdxl"),
               "yolo_train": ("yolo",), "transcribe": ("whisper",)}[t.kind]  # fmt: skip
    if m.family not in allowed:
        raise ValueError(f"{m.name} is a {m.family} model: it cannot run '{t.label()}'")
    parts = FORMULAS[t.kind](m, t)
    if "overhead" not in parts:
        parts["overhead"] = WORKSPACE_BYTES + int(sum(parts.values()) * ALLOCATOR_ROUNDING)
    return parts

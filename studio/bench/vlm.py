"""VLM benchmark: the studio's VLM path (per-image feature cache + Chat's CUDA-graph decoder) vs plain `generate`.

Full run (GPU, 12 GiB cap): a LLaVA-1.5-7B-architecture model (CLIP ViT-L/14-336 + Llama-2-7B) with random
weights, saved as a transformers folder and loaded by the studio's own loader (nf4 language model, vision tower and
projector in 16-bit through the skip list). One 336 px image = 576 image tokens. Measures: peak VRAM with one image;
decode tokens/s ours vs plain `generate` (greedy, 128 new tokens); time to first token with 1 and 4 images (first
turn: images encoded; next turn: features cached) vs `generate`; VLM -> Chat (nf4 Llama-3.1-8B architecture) -> SDXL
(fp16 UNet+VAE+text encoders) -> VLM through the residency manager with identical greedy tokens after the swaps;
QLoRA peak on 1,000-token image+text examples (LoRA r16 on the LM, projector trained, vision frozen, checkpointing).

    python -m studio.bench.vlm                  # GPU (needs bitsandbytes, diffusers)
    python -m studio.bench.vlm --quick          # tiny demo LLaVA on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from backends.vlm.decode import EmbedsPrefill
from studio.bench.common import RESULTS_DIR, Target, describe_machine, machine_info, targets_table, write_results

log = logging.getLogger(__name__)
GB, GiB = 1e9, 2**30
VISION_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip


def build_llava_7b(folder: Path, vision: dict = VISION_L14_336, text: dict = LLAMA2_7B, device: str = "cuda") -> Path:
    """Random-weight LLaVA-1.5-7B architecture in bf16, initialised on the GPU and saved (no download)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                      image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")  # fmt: skip
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            else:
                p.normal_(0, 0.2 if "lm_head" in name else 0.02)
        for m in model.modules():  # rotary / position buffers were created on meta: rebuild them
            if hasattr(m, "inv_freq") and hasattr(m, "rope_init_fn"):
                inv, m.attention_scaling = m.rope_init_fn(m.config, device)
                m.inv_freq, m.original_inv_freq = inv, inv
            if hasattr(m, "position_ids") and hasattr(m, "num_positions"):
                m.position_ids = torch.arange(m.num_positions, device=device).expand((1, -1))
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


class FolderLoader:
    """Residency Loader through the studio's own VLM loading code (backends/vlm/models.load_vlm)."""

    def __init__(self, key: str, folder: Path, nbytes: int) -> None:
        self.key, self.folder, self.nbytes = key, folder, nbytes

    def estimate_bytes(self) -> int:
        return self.nbytes

    def load(self, device: str) -> Any:
        from backends.vlm.models import load_vlm

        return load_vlm(self.folder, device, "nf4" if device.startswith("cuda") else "auto")

    def release(self, obj: Any) -> None:
        pass


def make_inputs(model: Any, n_images: int, text: int, seed: int = 0) -> tuple[dict, list[str]]:
    """input_ids with each image's placeholder tokens, random pixels per image, and a digest per image."""
    vc = model.config.vision_config
    per = (vc.image_size // vc.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    vocab = min(model.config.text_config.vocab_size, 32000)
    ids: list[int] = [1]
    for _ in range(n_images):
        ids += [model.config.image_token_id] * per + [13]
    ids += torch.randint(100, vocab, (text,), generator=g).tolist()
    pixels = torch.randn(n_images, 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels}, [f"img{seed}-{i}" for i in range(n_images)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(
    model: Any, cache: Any, inputs: dict, digests: list[str], new: int, holder: Any, *, reuse: bool = False
) -> tuple[list[int], dict]:
    """The VLM tab's path: cached features merged into embeddings, Chat's decoder, Chat's token loop."""
    from backends.vlm.decode import get_decoder, image_token_id, merged_embeddings, position_keys
    from backends.vlm.types import VLMStats
    from studio.bench.llm_models import run_ours

    device = model.get_input_embeddings().weight.device
    stats = VLMStats()
    _sync(device)
    t0 = time.perf_counter()
    embeds = merged_embeddings(model, inputs, digests, cache, ("bench", "", 0), stats)
    n = inputs["input_ids"].shape[1]
    decoder = get_decoder(holder, "bench", model, n + new, 4096, fast=True)
    _sync(device)
    encode_s = time.perf_counter() - t0
    keys = position_keys(inputs["input_ids"][0].tolist(), image_token_id(model), digests)

    timed = _TimedPrefill(decoder, embeds, keys)
    tokens, timing = run_ours(timed, inputs["input_ids"].to(device), new, reuse=reuse)
    timing.update(reused_tokens=timed.reused, encode_s=encode_s, prefill_s=timed.prefill_s,
                  ttft_s=timing["ttft_s"] + encode_s, images_encoded=stats.images_encoded)  # fmt: skip
    return tokens, timing


class _TimedPrefill(EmbedsPrefill):
    """EmbedsPrefill recording its prefill's own time (synchronised), for the TTFT breakdown."""

    prefill_s = 0.0

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        out = super().prefill(ids)
        _sync(self.device)
        self.prefill_s = time.perf_counter() - t
        return out


def plain(model: Any, inputs: dict, new: int) -> tuple[list[int], dict]:
    from studio.bench.llm_models import run_generate

    device = model.get_input_embeddings().weight.device
    dtype = next(model.model.vision_tower.parameters()).dtype
    if getattr(model.config, "eos_token_id", None) is None:  # run_generate pads with it; LlavaConfig has none
        model.config.eos_token_id = model.config.text_config.eos_token_id or 0
    return run_generate(
        model, inputs["input_ids"].to(device), new, pixel_values=inputs["pixel_values"].to(device, dtype)
    )


def next_turn(inputs: dict, reply: list[int], text: int, seed: int) -> dict:
    """The conversation's next prompt: this one, the model's reply, and `text` new random question tokens."""
    g = torch.Generator().manual_seed(seed)
    tail = inputs["input_ids"][:, -text:]  # text tokens of this prompt, shuffled: valid ids for any vocabulary
    question = tail[:, torch.randperm(tail.shape[1], generator=g)]
    ids = torch.cat([inputs["input_ids"], torch.tensor([reply]), question], dim=1)
    return {"input_ids": ids, "pixel_values": inputs["pixel_values"]}


class _Holder:  # what get_decoder keeps between turns (the backend's fields)
    adapters: dict = {}  # noqa: RUF012
    _decoder: Any = None
    _decoder_key: Any = None


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / GB if device.type == "cuda" else None


def inference_section(model: Any, new: int, text: int) -> dict[str, Any]:
    from backends.vlm.decode import FeatureCache

    device = model.get_input_embeddings().weight.device
    out: dict[str, Any] = {"weights_gb": (torch.cuda.memory_allocated() / GB) if device.type == "cuda" else None,
                           "precision": getattr(model, "studio_precision", "")}  # fmt: skip
    tower = list(model.model.vision_tower.modules()) + list(model.model.multi_modal_projector.modules())
    out["vision_and_projector_4bit_linears"] = sum(type(m).__name__ == "Linear4bit" for m in tower)  # must be 0
    out["lm_4bit_linears"] = sum(type(m).__name__ == "Linear4bit" for m in model.model.language_model.modules())
    cache, holder = FeatureCache(), _Holder()
    one, d1 = make_inputs(model, 1, text, seed=1)
    ours(model, cache, one, d1, 4, holder)  # warm-up: kernels, graph capture
    plain(model, one, 4)
    cache = FeatureCache()
    _peak_reset(device)
    t_ours, r = ours(model, cache, one, d1, new, holder)
    out["ours_1_image"], out["peak_1_image_gb"] = r, _peak(device)
    _peak_reset(device)
    t_plain, p = plain(model, one, new)
    out["plain_1_image"], out["plain_peak_1_image_gb"] = p, _peak(device)
    agree = next((i for i, (a, b) in enumerate(zip(t_ours, t_plain, strict=False)) if a != b), len(t_ours))
    out["greedy_tokens_equal_prefix"] = agree
    out["ours_1_image_cached"] = ours(model, cache, one, d1, 16, holder, reuse=True)[1]  # Regenerate
    four, d4 = make_inputs(model, 4, text, seed=4)
    warm, dw = make_inputs(model, 4, text, seed=5)  # other pixels: captures the larger cache's graph, caches nothing
    ours(model, cache, warm, dw, 2, holder)
    plain(model, warm, 2)
    reply, out["ours_4_images"] = ours(model, cache, four, d4, 16, holder)
    turn2 = next_turn(four, reply, text, seed=6)  # the history turn: same images, the reply, a new question
    out["ours_4_images_cached"] = ours(model, cache, turn2, d4, 16, holder, reuse=True)[1]
    out["plain_4_images"] = plain(model, turn2, 16)[1]
    holder._decoder = None
    return out


def qlora_section(model: Any, seq: int, steps: int) -> dict[str, Any]:
    """The trainer's own pieces (inject_lora, optimizer, train_step) on `seq`-token image+text examples."""
    from backends.vlm.adapters import projector_module
    from backends.vlm.train import inject_lora, optimizer, train_step
    from backends.vlm.types import VLMTrainConfig

    device = model.get_input_embeddings().weight.device
    dtype = next(model.model.vision_tower.parameters()).dtype
    vc = model.config.vision_config
    text = max(8, seq - (vc.image_size // vc.patch_size) ** 2 - 2)
    inputs, _ = make_inputs(model, 1, text, seed=7)
    labels = inputs["input_ids"].clone()
    labels[:, : labels.shape[1] - min(128, text)] = -100
    batch = {"input_ids": inputs["input_ids"].to(device), "labels": labels.to(device),
             "pixel_values": inputs["pixel_values"].to(device, dtype)}  # fmt: skip
    _, params = inject_lora(model, VLMTrainConfig(dataset=Path("bench.jsonl"), rank=16, alpha=32))
    proj = list(projector_module(model, "model.multi_modal_projector").parameters())
    for p in proj:
        p.requires_grad_(True)
    opt = optimizer([{"params": params, "lr": 1e-4}, {"params": proj, "lr": 1e-5}], device, log.info)
    model.train()
    if device.type == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.model.vision_tower.eval()
    _peak_reset(device)
    times, losses = [], []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, batch))
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"seq_tokens": int(batch["input_ids"].shape[1]), "peak_gb": _peak(device), "step_s": min(times),
            "losses": losses}  # fmt: skip


class _SDXL(torch.nn.Module):
    """UNet + VAE + both text encoders of an SDXL-architecture pipeline (what a txt2img request touches)."""

    def __init__(self, comps: dict[str, Any]) -> None:
        super().__init__()
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            setattr(self, name, comps[name])


def _sdxl(device: str, quick: bool) -> tuple[Any, Any]:
    from backends.image.tiny import SDXL_CONFIGS, TINY_SDXL_CONFIGS, build_components, build_tokenizer

    configs = TINY_SDXL_CONFIGS if quick else SDXL_CONFIGS
    dtype = torch.float32 if quick else torch.float16
    comps = build_components(configs, tokenizer=build_tokenizer() if quick else None, dtype=dtype, device=device)
    model = _SDXL(comps).eval()
    size = 32 if quick else 1024

    @torch.inference_mode()
    def image(m: _SDXL) -> None:  # one UNet step with both text encoders' conditioning, then a VAE decode
        dev = next(m.unet.parameters()).device
        ids = torch.randint(m.text_encoder.config.vocab_size, (1, 77), device=dev)
        e1 = m.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out2 = m.text_encoder_2(ids, output_hidden_states=True)
        cond = torch.cat([e1, out2.hidden_states[-2]], dim=-1)
        lat = torch.randn(1, 4, size // 8, size // 8, device=dev, dtype=dtype)
        add = {"text_embeds": out2.text_embeds, "time_ids": torch.tensor([[size, size, 0, 0, size, size]], device=dev,
               dtype=dtype)}  # fmt: skip
        lat = m.unet(lat, 999, encoder_hidden_states=cond, added_cond_kwargs=add).sample
        m.vae.decode(lat / 0.13025)

    return model, image


def swap_section(folder: Path, work: Path, quick: bool, cap_gb: float | None) -> dict[str, Any]:
    """VLM -> Chat -> SDXL -> VLM through one residency manager; the VLM's greedy tokens must not change."""
    from backends.vlm.decode import FeatureCache
    from studio.bench.diffusion import make_ctx
    from studio.bench.residency_families import SnapshotLoader, build_llm

    device = "cuda" if torch.cuda.is_available() and not quick else "cpu"
    ctx = make_ctx(work / "data", cap_gb)
    res = ctx.residency
    nbytes = sum(f.stat().st_size for f in folder.glob("*.safetensors")) // (1 if quick else 3)
    res.register(FolderLoader("vlm", folder, nbytes))
    chat, chat_request, _ = build_llm(device, quick)
    res.register(SnapshotLoader("chat", chat, work / "chat.safetensors"))
    sdxl, sdxl_request = _sdxl(device, quick)
    res.register(SnapshotLoader("sdxl", sdxl, work / "sdxl.safetensors"))
    del chat, sdxl
    inputs, digests = make_inputs_for(folder, res)
    answers, logits, times = [], [], []
    for key in ("vlm", "vlm", "chat", "sdxl", "vlm"):  # the VLM twice first: a control for run-to-run determinism
        t0, wall0 = time.perf_counter(), time.time()
        with res.use(key) as m:
            if key == "vlm":
                answers.append(ours(m, FeatureCache(), inputs, digests, 32, _Holder())[0])
                logits.append(_last_logits(m, inputs))
            else:
                (chat_request if key == "chat" else sdxl_request)(m)
        moves = [e.kind for e in res.snapshot().events if e.key == key and e.time >= wall0 and e.kind in MOVES]
        times.append({"model": key, "seconds": time.perf_counter() - t0, "came_by": moves})
    snap = res.snapshot()
    metrics = getattr(snap, "metrics", None)
    ctx.jobs.shutdown(timeout=5)
    first, repeat, after = answers
    return {"steps": times, "identical_repeat": first == repeat, "identical_after_swaps": first == after,
            "logits_max_diff_repeat": float((logits[1] - logits[0]).abs().max()),
            "logits_max_diff_after_swaps": float((logits[2] - logits[0]).abs().max()),
            "first_difference": next((i for i, (a, b) in enumerate(zip(first, after, strict=False)) if a != b), None),
            "tokens": len(first), "evictions": getattr(metrics, "evictions", None),
            "loads": getattr(metrics, "loads", None)}  # fmt: skip


MOVES = ("load", "swap_in", "evict", "release")


@torch.inference_mode()
def _last_logits(model: Any, inputs: dict) -> torch.Tensor:
    """One plain forward (no decoder, no cache): the next-token logits, to compare the weights before and after."""
    device = model.get_input_embeddings().weight.device
    dtype = next(model.model.vision_tower.parameters()).dtype
    out = model(input_ids=inputs["input_ids"].to(device), pixel_values=inputs["pixel_values"].to(device, dtype))
    return out.logits[0, -1].float().cpu()


def make_inputs_for(folder: Path, res: Any) -> tuple[dict, list[str]]:
    with res.use("vlm") as m:
        return make_inputs(m, 1, 32, seed=11)


def _swap_steps(sw: dict) -> list:
    return [
        (s["model"], round(s["seconds"], 2), "+".join(s.get("came_by", [])) or "resident") for s in sw.get("steps", [])
    ]


def _targets(r: dict) -> list[dict]:
    inf, q, sw = r.get("inference", {}), r.get("qlora", {}), r.get("swaps", {})
    o, p = inf.get("ours_1_image", {}), inf.get("plain_1_image", {})
    speed = o["decode_tok_s"] / p["decode_tok_s"] if o and p else None
    c4, p4 = inf.get("ours_4_images_cached", {}), inf.get("plain_4_images", {})
    ttft_ratio = c4["ttft_s"] / p4["ttft_s"] if c4 and p4 else None
    return [Target("peak VRAM, one 336 px image", inf.get("peak_1_image_gb"), 8.0, "GB", False).as_dict(),
            Target("decode speed ours / plain generate", speed, 1.0, "x").as_dict(),
            Target("TTFT 4 images, history turn: ours / plain generate", ttft_ratio, 1.0, "x", False).as_dict(),
            Target("VLM logits after VLM->Chat->SDXL->VLM: max |diff| vs before (goal: the run-to-run spread)",
                   sw.get("logits_max_diff_after_swaps"), sw.get("logits_max_diff_repeat", 0.0), "logit",
                   False).as_dict(),
            Target("QLoRA peak, 1,000-token image+text example", q.get("peak_gb"), 10.0, "GB", False).as_dict()]  # fmt: skip


def markdown(r: dict) -> str:
    inf = r.get("inference", {})
    rows = ["| case | ours | plain `generate` |", "|---|---|---|"]

    def f(d: dict, k: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(d[k]) if d and d.get(k) is not None else "-"

    o, p = inf.get("ours_1_image", {}), inf.get("plain_1_image", {})
    rows += [f"| decode tok/s, 1 image | {f(o, 'decode_tok_s', '{:.1f}')} ({o.get('decoder', '')}) | "
             f"{f(p, 'decode_tok_s', '{:.1f}')} |",
             f"| TTFT 1 image, first turn / regenerate (features cached, prompt reused) | {f(o, 'ttft_s')} s / {f(inf.get('ours_1_image_cached'), 'ttft_s')}"
             f" s | {f(p, 'ttft_s')} s |",
             f"| TTFT 4 images, first turn / next turn (features cached, "
             f"{inf.get('ours_4_images_cached', {}).get('reused_tokens', 0)} prompt tokens reused) | "
             f"{f(inf.get('ours_4_images'), 'ttft_s')} s / "
             f"{f(inf.get('ours_4_images_cached'), 'ttft_s')} s | {f(inf.get('plain_4_images'), 'ttft_s')} s |",
             f"| peak VRAM, 1 image | {f(inf, 'peak_1_image_gb', '{:.2f}')} GB | "
             f"{f(inf, 'plain_peak_1_image_gb', '{:.2f}')} GB |"]  # fmt: skip
    sw, q = r.get("swaps", {}), r.get("qlora", {})
    lines = [f"# VLM benchmark ({r['mode']})", "", describe_machine(r["machine"]), "", *rows, "",
             f"Greedy tokens ours vs plain generate: first {inf.get('greedy_tokens_equal_prefix')} equal. "
             f"Precision {inf.get('precision')}: 4-bit linears in the vision tower + projector "
             f"{inf.get('vision_and_projector_4bit_linears')}, in the language model {inf.get('lm_4bit_linears')}.", "",
             f"Swaps {_swap_steps(sw)}: plain-forward logits after the swaps differ from before by "
             f"{sw.get('logits_max_diff_after_swaps')} (two runs before the swaps: {sw.get('logits_max_diff_repeat')})"
             f"; greedy tokens through the CUDA-graph decoder identical after the swaps: "
             f"{sw.get('identical_after_swaps')} (first difference at token {sw.get('first_difference')}; two runs "
             f"before the swaps identical: {sw.get('identical_repeat')}).", "",
             f"QLoRA, {q.get('seq_tokens')} tokens (1 image): peak {q.get('peak_gb')} GB, step {q.get('step_s')} s.",
             "", targets_table(r["targets"])]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from backends.vlm.models import ensure_tiny_llava, load_vlm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny demo LLaVA on the CPU")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--cap-gb", type=float, default=12.0)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    work = Path(tempfile.mkdtemp(prefix="bench-vlm-"))
    folder = ensure_tiny_llava(work / "cache") if args.quick else build_llava_7b(work / "llava7b")
    if cuda:  # after the 14 GB bf16 build: from here on the card is a 12 GiB one
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * GiB / torch.cuda.mem_get_info()[1]))
    r: dict[str, Any] = {"mode": "quick (tiny demo LLaVA, CPU)" if args.quick else "LLaVA-1.5-7B architecture",
                         "machine": machine_info("torch", "transformers", "bitsandbytes", "peft", "diffusers")}  # fmt: skip
    for name, fn in (("inference", lambda m: inference_section(m, 16 if args.quick else args.new, 32)),
                     ("qlora", lambda m: qlora_section(m, 200 if args.quick else 1000, 2 if args.quick else 3))):  # fmt: skip
        try:
            model = load_vlm(folder, device, "nf4" if cuda else "auto")
            r[name] = fn(model)
        except Exception as e:  # report and go on
            log.exception("%s failed", name)
            r[name] = {"error": f"{type(e).__name__}: {e}"}
        model = None
        if cuda:
            torch.cuda.empty_cache()
    try:
        r["swaps"] = swap_section(folder, work, args.quick, args.cap_gb if cuda else None)
    except Exception as e:
        log.exception("swaps failed")
        r["swaps"] = {"error": f"{type(e).__name__}: {e}"}
    r["targets"] = _targets(r)
    md = markdown(r)
    print(md)
    write_results(args.out, "vlm", r, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The training loop behind backends/image/lora_train.py (data encoding, the step, samples, checkpoints).

Invariants: the UNet's base weights never change (only the adapter `onecard_train` has requires_grad); the
adapter is always removed from the shared UNet when the loop ends, however it ends; a checkpoint file is only ever
replaced atomically by one with finite weights.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.image.lora_train import (
    TRAIN_ADAPTER,
    LoraTrainConfig,
    LoraTrainResult,
    TrainItem,
    collect_items,
    load_pixels,
    lora_metadata,
    save_lora,
)
from backends.image.request import GenerateRequest

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


class LoraTrainer:
    def __init__(self, ctx: Services, diffusion: Any, rec: Any, cfg: LoraTrainConfig, job: Any, run: Any, out: Path):
        self.ctx, self.diffusion, self.rec, self.cfg, self.job, self.run_record, self.out = (
            ctx,
            diffusion,
            rec,
            cfg,
            job,
            run,
            out,
        )
        self.samples: list[Path] = []
        self.saved_step = 0

    # ---- data ----------------------------------------------------------------------------------------
    def run(self, items: list[TrainItem]) -> LoraTrainResult:
        cfg, job = self.cfg, self.job
        job.set_progress(0.01, "reading images")
        items, pixels = load_pixels(items, cfg.resolution, job.log)
        class_items, class_pixels = [], None
        if cfg.prior_preservation:
            class_items, class_pixels = load_pixels(self._class_items(), cfg.resolution, job.log)
        if job.should_stop():
            return LoraTrainResult(None, 0, None, self.run_record.id, "cancelled before training")
        job.set_progress(0.04, "encoding captions")
        captions = sorted({it.caption for it in items + class_items})
        embeds = dict(zip(captions, self.diffusion.encode_texts(self.rec, captions), strict=True))
        job.set_progress(0.05, "encoding images")
        data = {"items": items, "latents": self._encode_images(pixels), "embeds": embeds}
        if class_pixels is not None:
            data.update(class_items=class_items, class_latents=self._encode_images(class_pixels))
        with self.ctx.residency.use(self.rec.key("unet"), working_bytes=0) as unet:  # the training lease counts it
            return self._train(unet, data)

    def _class_items(self) -> list[TrainItem]:
        cfg = self.cfg
        given = collect_items(cfg.class_images, cfg.class_prompt, "class") if cfg.class_images else []
        need = cfg.num_class_images - len(given)
        if need <= 0:
            return given[: cfg.num_class_images]
        key = f"{self.rec.source.id}|{cfg.class_prompt}|{cfg.resolution}|{cfg.class_steps}|{cfg.seed}"
        folder = self.ctx.settings.cache_dir / "class_images" / hashlib.sha256(key.encode()).hexdigest()[:16]
        existing = sorted(folder.glob("*.png"))
        for i in range(len(existing), need):
            if self.job.should_stop():
                break
            self.job.set_progress(0.01 + 0.03 * i / need, f"generating class image {i + 1}/{need}")
            req = GenerateRequest(
                cfg.class_prompt,
                width=cfg.resolution,
                height=cfg.resolution,
                steps=cfg.class_steps,
                seed=cfg.seed + 10_000 + i,
                scheduler="Default",
            )
            self.diffusion.generate_with(self.rec, req, save_dir=folder)
        made = [TrainItem(p, cfg.class_prompt) for p in sorted(folder.glob("*.png"))[:need]]
        self.job.log(f"prior preservation: {len(given)} given + {len(made)} generated class images")
        return given + made

    def _encode_images(self, pixels: Any) -> tuple[Any, Any]:
        """Images -> the mean and std of the VAE's latent distribution (sampled afresh at every step)."""
        import torch

        means, stds = [], []
        with self.ctx.residency.use(self.rec.key("vae")) as vae, torch.no_grad():
            for chunk in pixels.split(4):
                dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
                means.append(dist.mean.float().cpu())
                stds.append(dist.std.float().cpu())
            factor = float(vae.config.scaling_factor)
        return torch.cat(means) * factor, torch.cat(stds) * factor

    # ---- training ------------------------------------------------------------------------------------
    def _train(self, unet: Any, data: dict[str, Any]) -> LoraTrainResult:
        from peft import LoraConfig

        cfg = self.cfg
        if TRAIN_ADAPTER in (getattr(unet, "peft_config", None) or {}):
            unet.delete_adapters(TRAIN_ADAPTER)  # left over from a crashed job
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES)
        unet.add_adapter(lora, adapter_name=TRAIN_ADAPTER)
        try:
            params = self._activate(unet)
            if cfg.gradient_checkpointing:
                unet.enable_gradient_checkpointing()
            unet.train()
            return self._loop(unet, params, data)
        finally:
            if cfg.gradient_checkpointing:
                unet.disable_gradient_checkpointing()
            unet.eval()
            unet.delete_adapters(TRAIN_ADAPTER)
            unet.requires_grad_(False)

    def _activate(self, unet: Any) -> list[Any]:
        """Only the training adapter active and trainable, its weights in fp32 (the base stays fp16/bf16)."""
        import torch

        unet.enable_lora()
        unet.set_adapters([TRAIN_ADAPTER], [1.0])
        params = [p for n, p in unet.named_parameters() if f".{TRAIN_ADAPTER}." in n]
        for p in params:
            if p.dtype != torch.float32:
                p.data = p.data.float()
            p.requires_grad_(True)
        return params

    def _optimizer(self, params: list[Any], device: Any) -> Any:
        import torch

        if device.type == "cuda":
            try:
                import bitsandbytes as bnb

                probe = torch.nn.Parameter(torch.zeros(8192, device=device))  # 8-bit state needs >= 4096 elements
                probe.grad = torch.ones_like(probe)
                bnb.optim.AdamW8bit([probe], lr=1e-3).step()  # fails here if its CUDA kernels do not load
                self.job.log("optimizer: 8-bit AdamW (bitsandbytes)")
                return bnb.optim.AdamW8bit(params, lr=self.cfg.learning_rate, weight_decay=1e-2)
            except Exception as e:  # bitsandbytes missing or without CUDA kernels for this card
                self.job.log(f"8-bit AdamW unavailable ({type(e).__name__}: {e}); using torch AdamW")
        return torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=1e-2)

    def _loop(self, unet: Any, params: list[Any], data: dict[str, Any]) -> LoraTrainResult:
        import torch
        from diffusers import DDPMScheduler

        cfg, job, rec = self.cfg, self.job, self.rec
        device = unet.device
        amp = rec.dtype if device.type == "cuda" and rec.dtype != torch.float32 else None
        scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        opt = self._optimizer(params, device)
        sched = DDPMScheduler.from_config(rec.parts["scheduler_config"])
        gen = torch.Generator().manual_seed(cfg.seed)
        ckpt_every = max(25, cfg.steps // 5)
        status, loss_value, step = "done", None, 0
        lease = self.ctx.residency.training(rec.key("unet"), modules=[unet], optimizers=[opt], label="SD LoRA")
        with lease:  # preemptible: gives the card to an interactive request at a step boundary, then resumes
            for step in range(1, cfg.steps + 1):
                if job.should_stop():
                    status, step = "cancelled", step - 1
                    break
                batch = self._batch(data, gen, sched)
                with lease.step():
                    loss = self._step(unet, batch, opt, scaler, params, amp)
                loss_value = float(loss)
                if not math.isfinite(loss_value):
                    job.log(
                        f"loss is {loss_value} at step {step}: stopping, keeping the checkpoint of step {self.saved_step}"
                    )
                    return self._finish(None, step - 1, None, f"stopped: NaN loss at step {step}")
                lease.report(step=step, loss=loss_value)
                self.run_record.log_metrics(step, loss=loss_value, lr=cfg.learning_rate)
                job.set_progress(0.05 + 0.93 * step / cfg.steps, f"step {step}/{cfg.steps} · loss {loss_value:.4f}")
                if step % ckpt_every == 0 and step < cfg.steps:
                    self._save(unet, step)
                if cfg.sample_every and step % cfg.sample_every == 0:
                    self._sample(unet, step, data)
        if lease.pauses:
            job.log(f"paused {lease.pauses}x for interactive requests, {lease.paused_s:.1f} s in all")
        path = self._save(unet, step) if step > 0 else None
        if status == "cancelled":
            job.log(f"cancelled at step {step}: saved what was learnt so far" if path else "cancelled before step 1")
        return self._finish(path, step, loss_value, status)

    def _step(self, unet: Any, batch: dict[str, Any], opt: Any, scaler: Any, params: list[Any], amp: Any) -> Any:
        """Forward, loss and (when the loss is finite) the optimizer step; returns the detached loss."""
        import torch

        rec, device = self.rec, unet.device
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = unet(
                batch["noisy"].to(device, rec.dtype),
                batch["t"].to(device),
                encoder_hidden_states=batch["enc"].to(device, rec.dtype),
                added_cond_kwargs=_to(batch.get("added"), device, rec.dtype),
            ).sample
        loss = self._loss(pred.float(), batch["target"].to(device), batch["n_instance"])
        if math.isfinite(float(loss.detach())):
            self._backward(loss, opt, scaler, params)
        return loss.detach()

    def _batch(self, data: dict[str, Any], gen: Any, sched: Any) -> dict[str, Any]:
        """One batch on the CPU: instance images (+ as many class images for prior preservation)."""
        import torch

        n = self.cfg.batch_size
        idx = torch.randint(0, len(data["items"]), (n,), generator=gen)
        mean, std = data["latents"]
        latents = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        conds = [data["embeds"][data["items"][i].caption] for i in idx.tolist()]
        if "class_items" in data:
            cidx = torch.randint(0, len(data["class_items"]), (n,), generator=gen)
            cmean, cstd = data["class_latents"]
            latents = torch.cat([latents, cmean[cidx] + cstd[cidx] * torch.randn(cmean[cidx].shape, generator=gen)])
            conds += [data["embeds"][data["class_items"][i].caption] for i in cidx.tolist()]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        v_pred = sched.config.prediction_type == "v_prediction"
        batch = {
            "noisy": noisy,
            "t": t,
            "target": sched.get_velocity(latents, noise, t) if v_pred else noise,
            "enc": torch.cat([c["prompt_embeds"] for c in conds]),
            "n_instance": n,
        }
        if self.rec.arch == "sdxl":
            r = self.cfg.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32).repeat(latents.shape[0], 1)
            batch["added"] = {
                "text_embeds": torch.cat([c["pooled_prompt_embeds"] for c in conds]),
                "time_ids": time_ids,
            }
        return batch

    def _loss(self, pred: Any, target: Any, n_instance: int) -> Any:
        import torch.nn.functional as F

        if not self.cfg.prior_preservation:
            return F.mse_loss(pred, target)
        inst = F.mse_loss(pred[:n_instance], target[:n_instance])
        prior = F.mse_loss(pred[n_instance:], target[n_instance:])
        return inst + self.cfg.prior_loss_weight * prior

    @staticmethod
    def _backward(loss: Any, opt: Any, scaler: Any, params: list[Any]) -> None:
        import torch

        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)

    # ---- outputs -------------------------------------------------------------------------------------
    def _save(self, unet: Any, step: int) -> Path:
        meta = lora_metadata(self.cfg, self.rec, step, len(self.cfg.dataset), self.run_record.id)
        path = save_lora(unet, self.out, alpha=float(self.cfg.rank), metadata=meta)
        self.saved_step = step
        self.job.log(f"checkpoint at step {step}: {path.name}")
        return path

    def _sample(self, unet: Any, step: int, data: dict[str, Any]) -> None:
        cfg = self.cfg
        prompt = cfg.sample_prompt.strip() or data["items"][0].caption
        req = GenerateRequest(
            prompt,
            width=cfg.resolution,
            height=cfg.resolution,
            steps=cfg.class_steps,
            seed=cfg.seed,
            scheduler="Default",
        )
        unet.eval()
        try:
            result = self.diffusion.generate_with(
                self.rec, req, extra_adapters=((TRAIN_ADAPTER, 1.0),), save_dir=self.run_record.dir / "samples"
            )
        finally:
            self._activate(unet)
            unet.train()
        path = result.images[0].path
        target = path.with_name(f"step-{step:06d}.png")
        path.replace(target)
        self.samples.append(target)
        self.job.log(f"sample at step {step}: {target.name}")

    def _finish(self, path: Path | None, steps: int, loss: float | None, status: str) -> LoraTrainResult:
        if path is None and self.saved_step:
            path = self.out
        if path is not None:
            self.run_record.add_artifact(path)
        return LoraTrainResult(path, steps, loss, self.run_record.id, status, list(self.samples))


def _to(added: dict[str, Any] | None, device: Any, dtype: Any) -> dict[str, Any] | None:
    if added is None:
        return None
    return {k: v.to(device, dtype) for k, v in added.items()}

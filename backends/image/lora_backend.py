"""The LoRA training backend: checks a training request, queues it as a job, runs the loop, records the run."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.image.lora_train import (
    LORA_SUBDIR,
    RECOMMENDED_MIN_IMAGES,
    LoraTrainConfig,
    LoraTrainResult,
    TrainItem,
    collect_items,
    dataset_hash,
)
from backends.image.lora_train_loop import LoraTrainer
from studio.safety import contained_path, safe_filename

if TYPE_CHECKING:
    from backends.image.diffusion import DiffusionBackend
    from studio.services import Services

log = logging.getLogger(__name__)


class SdLoraBackend:
    def __init__(self, ctx: Services, diffusion: DiffusionBackend) -> None:
        self._ctx = ctx
        self._diffusion = diffusion
        self._samples: dict[str, list[Path]] = {}  # job id -> sample images so far (live, for the UI)

    def samples(self, job_id: str) -> list[Path]:
        return list(self._samples.get(job_id, []))

    def output_path(self, name: str) -> Path:
        folder = self._ctx.settings.outputs_dir / LORA_SUBDIR
        return contained_path(folder, safe_filename(name, "lora") + ".safetensors")

    def list_loras(self) -> list[Path]:
        folder = self._ctx.settings.outputs_dir / LORA_SUBDIR
        return sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)

    def check(self, cfg: LoraTrainConfig) -> list[TrainItem]:
        """Everything that can be checked before the job starts (so the UI can answer at once)."""
        items = collect_items(cfg.dataset, cfg.instance_prompt)
        if cfg.prior_preservation and cfg.class_images:
            collect_items(cfg.class_images, cfg.class_prompt, "class")
        self._diffusion.prepare(cfg.model)
        self.output_path(cfg.output_name)
        return items

    def submit(self, cfg: LoraTrainConfig) -> Any:
        """Check, then queue the training as a GPU job; returns the Job."""
        self.check(cfg)
        unique = f"sd-lora:{cfg.output_name}"  # one training per output name: a double click makes one run
        return self._ctx.jobs.submit(
            f"LoRA {cfg.output_name}", lambda job: self.train(cfg, job), gpu=True, unique=unique
        )

    def train(self, cfg: LoraTrainConfig, job: Any) -> LoraTrainResult:
        """The job body: prepare data, train, save; `job` has set_progress, log and should_stop."""
        diffusion = self._diffusion
        rec = diffusion.prepare(cfg.model)
        items = collect_items(cfg.dataset, cfg.instance_prompt)
        if len(items) < RECOMMENDED_MIN_IMAGES:
            job.log(f"only {len(items)} images: 20-150 are recommended; expect a LoRA that overfits")
        run = self._ctx.runs.create("sd-lora", _run_config(cfg, rec), seed=cfg.seed, dataset_hash=dataset_hash(items))
        job.log(f"run {run.id}: {len(items)} images, rank {cfg.rank}, {cfg.steps} steps, model {rec.source.title}")
        trainer = LoraTrainer(self._ctx, diffusion, rec, cfg, job, run, self.output_path(cfg.output_name))
        self._samples[str(getattr(job, "id", run.id))] = trainer.samples
        t0 = time.time()
        try:
            with diffusion.training(rec):
                result = trainer.run(items)
        except BaseException as e:
            run.finish("failed", error=f"{type(e).__name__}: {e}")
            raise
        status = "done" if result.status == "done" else ("cancelled" if "cancel" in result.status else "failed")
        run.finish(
            status,
            steps=result.steps_done,
            final_loss=result.final_loss,
            seconds=round(time.time() - t0, 1),
            lora=str(result.path) if result.path else None,
        )
        return result


def _run_config(cfg: LoraTrainConfig, rec: Any) -> dict[str, Any]:
    out = asdict(cfg)
    out.update(
        model_title=rec.source.title,
        arch=rec.arch,
        untrained_demo_model=rec.source.demo,
        precision=str(rec.dtype).replace("torch.", ""),
    )
    return out


def create(ctx: Services, diffusion: DiffusionBackend) -> SdLoraBackend:
    return SdLoraBackend(ctx, diffusion)

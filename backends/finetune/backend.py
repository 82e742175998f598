"""FinetuneBackend: what the Fine-tune tab (and scripts) call. Runs are background GPU jobs with a run record.

- `check_dataset` reads and checks a dataset (and, given a model, counts tokens and over-length examples): the
  same checks the job repeats before any GPU work;
- `estimate` is the "will it fit" figure for the chosen model, length and batch against the live GPU budget;
- `submit` starts a run (a job; only one GPU job at a time) and returns the Job; `live(job_id)` gives its history
  (loss, LR, tokens/s, ETA, VRAM) and result; cancel goes through `services.jobs.cancel` and keeps the checkpoint;
- the adapter lands in `runs/<run id>/<name>/` under the data folder, where the Chat tab looks for adapters;
- `export` merges a run's adapter into the 16-bit base with an Ollama Modelfile (backends/finetune/export.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from backends.finetune.data import split_dataset
from backends.finetune.estimate import estimate_fit
from backends.finetune.types import DataOptions, DatasetReport, FinetuneConfig, FinetuneError, FitEstimate

log = logging.getLogger(__name__)
RUN_KIND = "finetune"


class FinetuneBackend:
    def __init__(self, services: Any, llm: Callable[[], Any]) -> None:
        self.s = services
        self._llm = llm
        self._live: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    # ---- models ------------------------------------------------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        """(label, id) of the chat models present on this machine."""
        return [(spec.title, spec.id) for spec, present in self._llm().chat_models() if present]

    def base_folder(self, model_id: str) -> Path:
        """The transformers folder of a chat model (catalog id or models-folder name); GGUF converted once."""
        from backends.llm import resolve_source

        return self._llm().model_folder(resolve_source(self.s, model_id))

    @property
    def cuda(self) -> bool:
        return str(getattr(self.s.residency, "device", "cpu")).startswith("cuda")

    # ---- before a run --------------------------------------------------------------------------------------------
    def check_dataset(self, data: DataOptions, model_id: str | None = None) -> DatasetReport:
        """Read and check the data; with a model, tokenize and count over-length examples. Raises DataError."""
        convs, dev, report = split_dataset(data)
        if model_id:
            from backends.finetune.format import build_examples
            from backends.llm import load_tokenizer

            tokenizer = load_tokenizer(self.base_folder(model_id))
            build_examples(tokenizer, convs + dev, data, report)
        return report

    def estimate(self, cfg: FinetuneConfig) -> FitEstimate:
        available = self.s.residency.capacity_bytes() if self.cuda else None
        return estimate_fit(self.base_folder(cfg.model), cfg.lora, cfg.train, cfg.data.max_length, cuda=self.cuda,
                            available=available or None)  # fmt: skip

    # ---- runs ---------------------------------------------------------------------------------------------------
    def submit(self, cfg: FinetuneConfig) -> Any:
        """Check the data now (errors raise here, before any GPU work), then queue the run as a GPU job."""
        from studio.runs import hash_dataset

        self._refuse_duplicate(cfg)
        split_dataset(cfg.data)
        folder = self.base_folder(cfg.model)
        if cfg.resume_from:
            self.s.runs.get(cfg.resume_from)  # KeyError for an unknown run id
        digest = hash_dataset(Path(cfg.data.path))
        run = self.s.runs.create(RUN_KIND, asdict(cfg), seed=cfg.train.seed, dataset_hash=digest)
        estimate = self.estimate(cfg)
        live: dict[str, Any] = {"run_id": run.id, "estimate": estimate, "history": [], "name": cfg.output_name}

        def work(job: Any) -> Any:
            from backends.finetune.job import FinetuneJob

            try:
                return FinetuneJob(self.s, cfg, folder, run, job, live).run()
            except BaseException as e:
                if run.status == "running":
                    run.finish("failed", error=f"{type(e).__name__}: {e}")
                raise

        job = self.s.jobs.submit(f"Fine-tune {cfg.output_name}", work, gpu=True)
        with self._lock:
            self._live[job.id] = live
        log.info("fine-tune %s queued as %s (run %s)", cfg.output_name, job.id, run.id)
        return job

    def _refuse_duplicate(self, cfg: FinetuneConfig) -> None:
        """A double click (or a second browser tab) must not queue the same run twice."""
        with self._lock:
            for job_id, live in self._live.items():
                job = self.s.jobs.get(job_id)
                if job is not None and not job.is_finished and live.get("name") == cfg.output_name:
                    raise FinetuneError(f"A fine-tune named {cfg.output_name!r} is already {job.status} ({job_id}): "
                                        "wait for it, cancel it, or choose another adapter name.")  # fmt: skip

    def live(self, job_id: str) -> dict[str, Any]:
        """The job's live state: run_id, estimate, history (StepRecord dicts), report, precision, result."""
        with self._lock:
            return self._live.get(job_id, {})

    def adapters(self) -> list[Path]:
        """Adapter folders written by fine-tune runs, newest first."""
        out = []
        for run in self.s.runs.list():
            if run.kind == RUN_KIND:
                out += [run.dir / a["path"] for a in run.artifacts if a["name"] == "adapter"]
        return [p for p in out if (p / "adapter_config.json").is_file()]

    def export(self, run_id: str, dtype: str = "bf16") -> Path:
        """Merge run `run_id`'s adapter into its 16-bit base: `runs/<id>/merged/` (safetensors + Modelfile)."""
        from backends.finetune.export import export_merged

        run = self.s.runs.get(run_id)
        adapters = [run.dir / a["path"] for a in run.artifacts if a["name"] == "adapter"]
        if not adapters:
            raise FinetuneError(f"Run {run_id} has no adapter to export (it stopped before its first checkpoint).")
        target = export_merged(self.base_folder(run.config["model"]), adapters[0], run.dir / "merged", dtype=dtype)
        run.add_artifact(target, "merged")
        return target


def create(services: Any, llm: Callable[[], Any]) -> FinetuneBackend:
    return FinetuneBackend(services, llm)

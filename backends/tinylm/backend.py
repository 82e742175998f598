"""TinyLMBackend: training jobs, checkpoints as runs, sampling and the extrapolation table (torch imported lazily).

A trained model is a run of kind "tinylm" holding `model.safetensors` (the weights, tied head left out) and
`tinylm.json` (config, tokenizer, data spec). The model is built by the residency manager's loader straight on
the compute device; training runs as a background job inside a preemptible training lease, saves a checkpoint at
every evaluation (the last good one survives a stop or a NaN loss) and logs train/val loss, perplexity, tokens/s
and the learning rate to the run's metrics, which the tab plots live and side by side.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.tinylm.data import build_tokenizer, corpus_text, load_meta, text_hash, tokenizer_from_json
from backends.tinylm.types import DataSpec, ExtrapolationPoint, SampleResult, TinyLMConfig, TrainOptions, TrainResult
from studio.safety import atomic_write_json, contained_path, load_safetensors

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)
VAL_FRACTION = 0.1  # the last 10% of the token stream, as nanoGPT
META = "tinylm.json"
EXTRAPOLATION = "extrapolation.json"


class _TinyLMLoader:
    """Builds the model directly on the device the residency manager picks; loads the checkpoint if present."""

    def __init__(self, key: str, cfg: TinyLMConfig, checkpoint: Path, seed: int) -> None:
        self.key, self.cfg, self.checkpoint, self.seed = key, cfg, checkpoint, seed

    def estimate_bytes(self) -> int:
        return 4 * self.cfg.n_params()

    def load(self, device: str):
        import torch

        from backends.tinylm.model import TinyGPT

        torch.manual_seed(self.seed)
        with torch.device(device):
            model = TinyGPT(self.cfg)
        if self.checkpoint.exists():
            missing, unexpected = model.load_state_dict(load_safetensors(self.checkpoint, device=device), strict=False)
            if unexpected or set(missing) - {"head.weight"}:
                raise ValueError(f"{self.checkpoint} does not match this model: {missing or unexpected}")
        return model

    def release(self, obj: Any) -> None:
        del obj


def split_tokens(ids: list[int]):
    import torch

    data = torch.tensor(ids, dtype=torch.long)
    cut = int((1 - VAL_FRACTION) * len(data))
    return data[:cut], data[cut:]


def run_label(run: Any) -> str:
    """`rope · bpe · 4x128 · 20261201-1130` for charts and lists."""
    model, data = run.config.get("model", {}), run.config.get("data", {})
    shape = f"{model.get('n_layer', '?')}x{model.get('n_embd', '?')}"
    return f"{model.get('pos', 'learned')} · {data.get('tokenizer', 'char')} · {shape} · {run.id[:13]}"


class TinyLMBackend:
    def __init__(self, ctx: Services) -> None:
        self.ctx = ctx

    def _register(self, run_id: str, cfg: TinyLMConfig, seed: int) -> str:
        key = f"tinylm:{run_id}"
        if not self.ctx.residency.is_registered(key):
            ckpt = contained_path(self.ctx.settings.runs_dir, f"{run_id}/model.safetensors")
            self.ctx.residency.register(_TinyLMLoader(key, cfg, ckpt, seed))
        return key

    # ---- training ----------------------------------------------------------------------------------------------
    @property
    def corpora_dir(self) -> Path:
        """Where uploaded training texts are kept, each under its content hash."""
        return self.ctx.settings.data_dir / "tinylm" / "corpora"

    def add_text(self, upload: str | Path) -> tuple[str, str]:
        """Keep an uploaded text file as a corpus: (text id for DataSpec(corpus="text"), a summary line)."""
        from backends.tinylm.data import store_text

        return store_text(Path(upload), self.corpora_dir)

    def start_training(self, cfg_overrides: dict[str, Any], opts: TrainOptions):
        """Validate everything up front (bad values raise here, not in the job), then queue the job."""
        spec = opts.dataset
        if spec.corpus == "shakespeare":
            from backends.tinylm.data import load_corpus

            load_corpus(list(spec.works))  # unknown works, or the corpus missing, fail now
        if spec.corpus == "text":
            from backends.tinylm.data import text_path

            text_path(spec, self.corpora_dir)  # an upload that is gone fails now (the job reads it)
        TinyLMConfig(vocab_size=1, **cfg_overrides)  # the shape is checked before anything is built
        unique = f"tinylm:{sorted(cfg_overrides.items())!r}:{opts!r}"  # the same settings twice make one run
        corpus = f"text {spec.text_id[:8]}" if spec.corpus == "text" else spec.corpus
        title = f"Tiny LM ({cfg_overrides.get('pos', 'learned')}): {corpus}, {spec.tokenizer}"
        return self.ctx.jobs.submit(title, lambda job: self.train(job, cfg_overrides, opts), unique=unique)

    def train(self, job, cfg_overrides: dict[str, Any], opts: TrainOptions) -> TrainResult:
        spec = opts.dataset
        job.log(f"corpus {spec.corpus}, {spec.tokenizer} tokens")
        text = corpus_text(spec, self.corpora_dir)
        tok = build_tokenizer(spec, text)
        train_data, val_data = split_tokens(tok.encode(text))
        cfg = TinyLMConfig(vocab_size=tok.vocab_size, **cfg_overrides)
        if len(val_data) <= cfg.block_size + 1:
            raise ValueError(f"Corpus too small ({len(train_data) + len(val_data)} tokens) for a context of "
                             f"{cfg.block_size}; choose more text or a smaller context.")  # fmt: skip
        job.log(f"{len(train_data):,} training and {len(val_data):,} held-out tokens; vocabulary {tok.vocab_size}; "
                f"{cfg.n_params() / 1e6:.2f} M parameters")  # fmt: skip
        config = {"model": asdict(cfg), "train": asdict(replace(opts, data=None)), "data": asdict(spec)}
        run = self.ctx.runs.create("tinylm", config, seed=opts.seed, dataset_hash=text_hash(text))
        atomic_write_json(run.dir / META, {"config": asdict(cfg), "tokenizer": tok.to_json(), "data": asdict(spec)})
        key = self._register(run.id, cfg, opts.seed)
        with self.ctx.residency.use(key, working_bytes=0) as model:  # the training lease sets working memory aside
            result = self._loop(job, model, opts, run, key, train_data, val_data)
        run.finish("done" if result.stopped == "finished" else result.stopped, best_val_loss=result.best_val_loss)
        return result

    def _loop(self, job, model, opts: TrainOptions, run, key: str, train_data, val_data) -> TrainResult:
        from backends.tinylm.train import LabLoop, make_optimizer

        cfg = model.cfg
        working = 4 * opts.batch_size * cfg.block_size * cfg.n_embd * cfg.n_layer * 24
        optim = make_optimizer(model, opts, next(model.parameters()).device)
        lease = self.ctx.residency.training(key, modules=[model], optimizers=[optim], working_bytes=working,
                                            label="Tiny LM")  # fmt: skip
        with lease:  # preemptible: an interactive request that needs the card gets it at the next step boundary
            result = LabLoop(job, model, opts, run, lease, optim, train_data, val_data).run_steps()
        if lease.pauses:
            job.log(f"paused {lease.pauses}x for interactive requests, {lease.paused_s:.1f} s in all")
        return result

    # ---- trained models ----------------------------------------------------------------------------------------
    def trained_models(self) -> list[str]:
        """Run ids of tinylm runs that have a checkpoint, newest first."""
        return [
            r.id
            for r in self.ctx.runs.list()
            if r.kind == "tinylm" and (self.ctx.settings.runs_dir / r.id / "model.safetensors").exists()
        ]

    def runs(self) -> list[tuple[str, str]]:
        """(label, run id) of every tinylm run with metrics, newest first: the choices of the comparison chart."""
        return [(run_label(r), r.id) for r in self.ctx.runs.list() if r.kind == "tinylm"]

    def _open(self, run_id: str):
        meta_path = contained_path(self.ctx.settings.runs_dir, f"{run_id}/{META}")
        if not meta_path.exists():
            raise FileNotFoundError(f"No trained tiny LM called {run_id!r}; train one first.")
        meta = load_meta(meta_path)
        tok = tokenizer_from_json(meta.get("tokenizer") or {"kind": "char", "chars": meta["chars"]})
        spec = DataSpec(**{k: tuple(v) if k == "works" else v for k, v in meta.get("data", {}).items()})
        return TinyLMConfig(**meta["config"]), tok, spec

    def sample(self, run_id: str, prompt: str, max_new_tokens: int = 300, temperature: float = 0.8,
               top_k: int | None = 40, seed: int | None = None, use_cache: bool = True) -> str:  # fmt: skip
        return self.sample_timed(run_id, prompt, max_new_tokens, temperature, top_k, seed, use_cache).text

    def sample_timed(self, run_id: str, prompt: str, max_new_tokens: int = 300, temperature: float = 0.8,
                     top_k: int | None = 40, seed: int | None = None, use_cache: bool = True) -> SampleResult:  # fmt: skip
        from backends.tinylm.generate import sample_text

        if not 1 <= max_new_tokens <= 5000:
            raise ValueError(f"max_new_tokens must be between 1 and 5000, got {max_new_tokens}")
        if not 0 < temperature <= 5:
            raise ValueError(f"temperature must be in (0, 5], got {temperature}")
        cfg, tok, _ = self._open(run_id)
        prompt = prompt.replace("\x00", "") or "\n"
        tok.encode(prompt)  # unknown characters are refused before the model is loaded
        with self.ctx.residency.use(self._register(run_id, cfg, 0)) as model:
            return sample_text(model, tok, prompt, max_new_tokens, temperature, top_k, use_cache, seed)

    def cache_speed(self, run_id: str, prompt: str, max_new_tokens: int = 200) -> tuple[SampleResult, SampleResult]:
        """The same greedy-ish sample with and without the KV cache: (cached, uncached), each timed."""
        cached = self.sample_timed(run_id, prompt, max_new_tokens, 0.8, 40, seed=0, use_cache=True)
        uncached = self.sample_timed(run_id, prompt, max_new_tokens, 0.8, 40, seed=0, use_cache=False)
        return cached, uncached

    def extrapolation(self, run_id: str, max_tokens: int = 32_768) -> list[ExtrapolationPoint]:
        """Held-out perplexity at 1x, 2x and 4x the training context (saved as the run's extrapolation.json)."""
        from backends.tinylm.generate import extrapolation

        cfg, tok, spec = self._open(run_id)
        _, val_data = split_tokens(tok.encode(corpus_text(spec, self.corpora_dir)))
        with self.ctx.residency.use(self._register(run_id, cfg, 0)) as model:
            points = extrapolation(model, val_data, max_tokens)
        out = [asdict(p) | {"perplexity": p.perplexity} for p in points]
        atomic_write_json(self.ctx.settings.runs_dir / run_id / EXTRAPOLATION, {"pos": cfg.pos, "points": out})
        return points

    def saved_extrapolation(self, run_id: str) -> list[dict[str, Any]]:
        path = contained_path(self.ctx.settings.runs_dir, f"{run_id}/{EXTRAPOLATION}")
        return load_meta(path)["points"] if path.exists() else []


def create(ctx: Services) -> TinyLMBackend:
    return TinyLMBackend(ctx)

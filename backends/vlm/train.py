"""QLoRA on image-text pairs: LoRA on the language model, the projector trained, the vision tower frozen.

The model is the one the VLM tab chats with, leased from the residency manager (no second copy on the GPU): the
training adapter is injected in place and always removed when the loop ends, and the base projector's weights are
restored from a CPU copy, however the loop ends. On CUDA the base is nf4 (4-bit QLoRA) with non-reentrant gradient
checkpointing and 8-bit AdamW where bitsandbytes loads; on the CPU the same loop trains LoRA on fp32 weights.
Loss is on the assistant's tokens only. Before and after training the dev-set loss and greedy answers on fixed
dev images are recorded. The loop is a plain step loop under the preemptible training lease when the residency
manager offers one (`ctx.residency.training`), so the GPU can be lent to an interactive request between steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from backends.vlm.adapters import PROJECTOR_FILE, load_projector, projector_module, projector_state
from backends.vlm.data import Example, load_examples, split_dev
from backends.vlm.prompt import to_processor_messages
from backends.vlm.types import ImageOptions, VLMError, VLMTrainConfig
from studio.safety import atomic_folder, atomic_write_json, save_safetensors

log = logging.getLogger(__name__)
TRAIN_ADAPTER = "onecard_vlm_train"
LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class VLMTrainResult:
    adapter: Path | None
    steps_done: int
    status: str
    dev_loss_before: float | None = None
    dev_loss_after: float | None = None
    answers: list[dict[str, str]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    run_id: str = ""
    paused_s: float = 0.0


class _NoLease:
    """Stand-in while the residency manager has no training lease (or on the CPU): every step runs at once."""

    paused_s, pauses = 0.0, 0

    def step(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def report(self, **kw: Any) -> None:
        pass


def encode(processor: Any, ex: Example, max_length: int) -> dict[str, torch.Tensor]:
    """Processor tensors for one example with `labels`: the assistant turns' tokens, -100 elsewhere."""
    first_user = next(i for i, m in enumerate(ex.messages) if m["role"] == "user")
    imgs = [list(ex.images) if i == first_user else [] for i in range(len(ex.messages))]

    def ids_of(k: int, gen: bool) -> dict:
        msgs = to_processor_messages(list(ex.messages[:k]), imgs[:k])
        return dict(processor.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True,
                                                  return_tensors="pt"))  # fmt: skip

    full = ids_of(len(ex.messages), False)
    ids = full["input_ids"]
    if ids.shape[1] > max_length:
        raise VLMError(f"{ex.where}: {ids.shape[1]} tokens (images included), over max_length {max_length}.")
    labels = torch.full_like(ids, -100)
    for k, m in enumerate(ex.messages):
        if m["role"] == "assistant":
            start = ids_of(k, True)["input_ids"].shape[1]
            end = ids_of(k + 1, False)["input_ids"].shape[1]
            labels[0, start:end] = ids[0, start:end]
    full["labels"] = labels
    return full


def _to(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        out[k] = v.to(device, dtype) if k == "pixel_values" else v.to(device)
    return out


@torch.no_grad()
def dev_loss(model: Any, batches: list[dict], device: torch.device, dtype: torch.dtype) -> float | None:
    if not batches:
        return None
    losses = [float(model(**_to(b, device, dtype)).loss) for b in batches]
    return sum(losses) / len(losses)


@torch.no_grad()
def answer(model: Any, processor: Any, ex: Example, n: int, device: torch.device, dtype: torch.dtype) -> str:
    """Greedy answer to the example's first user turn and its images."""
    k = next(i for i, m in enumerate(ex.messages) if m["role"] == "user") + 1
    imgs = [list(ex.images) if i == k - 1 else [] for i in range(k)]
    msgs = to_processor_messages(list(ex.messages[:k]), imgs)
    inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    inputs = _to(dict(inputs), device, dtype)
    tok = processor.tokenizer
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def inject_lora(model: Any, cfg: VLMTrainConfig) -> tuple[Any, list[torch.nn.Parameter]]:
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=LM_LINEARS, bias="none")
    inject_adapter_in_model(lora, model, adapter_name=TRAIN_ADAPTER)
    from backends.llm import activate

    activate(model, TRAIN_ADAPTER)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(f".{TRAIN_ADAPTER}." in name)
        if p.requires_grad:
            if p.dtype != torch.float32:
                p.data = p.data.float()
            params.append(p)
    return lora, params


def train_step(model: Any, opt: Any, batch: dict) -> float:
    """One optimisation step on one example; returns the loss (the benchmark times this very function)."""
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().item()


def optimizer(groups: list[dict], device: torch.device, log_fn: Any) -> Any:
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(groups, weight_decay=0.0)
            log_fn("optimizer: 8-bit AdamW (bitsandbytes)")
            return opt
        except Exception as e:  # bitsandbytes missing or without kernels for this card
            log_fn(f"8-bit AdamW unavailable ({type(e).__name__}); using torch AdamW")
    return torch.optim.AdamW(groups, weight_decay=0.0)


def _lease(ctx: Any, key: str, model: Any, opt: Any) -> Any:
    training = getattr(ctx.residency, "training", None)
    if training is None:
        return contextlib.nullcontext(_NoLease())
    return training(key, modules=[model], optimizers=[opt], label="VLM QLoRA")


class VLMTrainer:
    """One training run (the job body); `job` has set_progress, log and should_stop."""

    def __init__(self, backend: Any, cfg: VLMTrainConfig, job: Any) -> None:
        self.backend, self.cfg, self.job = backend, cfg, job
        self.ctx = backend.ctx

    def output_dir(self) -> Path:
        return Path(self.ctx.settings.data_dir) / "vlm_adapters" / self.cfg.output_name

    def run(self) -> VLMTrainResult:
        cfg, job, b = self.cfg, self.job, self.backend
        src, key = b.source()
        _, fam = b.family(src)
        processor = b.processor(src)
        job.set_progress(0.01, "checking the dataset")
        examples = load_examples(cfg.dataset, ImageOptions(max_side=cfg.image_max_side), max_images=fam.max_images)
        train, dev = split_dev(examples, cfg.dev_fraction, cfg.seed)
        train_b = [encode(processor, ex, cfg.max_length) for ex in train]
        dev_b = [encode(processor, ex, cfg.max_length) for ex in dev]
        run = self.ctx.runs.create("vlm-qlora", {**asdict(cfg), "model": src.id, "untrained_demo_model": src.demo,
                                                 "train": len(train), "dev": len(dev)}, seed=cfg.seed)  # fmt: skip
        job.log(f"run {run.id}: {len(train)} train / {len(dev)} dev examples, model {src.title}")
        try:
            with b._slot(), self._model(key, src) as model:
                b.training_key = key
                try:
                    result = self._train(key, model, fam.projector, processor, train_b, dev_b, dev, run)
                finally:
                    b.training_key = None
        except BaseException as e:
            run.finish("failed", error=f"{type(e).__name__}: {e}")
            raise
        result.run_id = run.id
        run.finish(result.status, steps=result.steps_done, dev_loss_before=result.dev_loss_before,
                   dev_loss_after=result.dev_loss_after, adapter=str(result.adapter) if result.adapter else None)  # fmt: skip
        return result

    @contextlib.contextmanager
    def _model(self, key: str, src: Any) -> Any:
        """The chat's own model, leased for the whole run (no second copy on the GPU): the training lease under the
        same key counts its weights with the training state and parks them together when it gives way (the SD LoRA
        pattern); working memory is the lease's, so the model lease asks for none."""
        with self.ctx.residency.use(key, working_bytes=0) as model:
            self.backend.apply_adapters(key, src, model)
            yield model

    def _train(self, key, model, projector_name, processor, train_b, dev_b, dev, run) -> VLMTrainResult:
        from backends.llm import activate, delete_from, loaded_adapters

        cfg, job = self.cfg, self.job
        device = model.get_input_embeddings().weight.device
        pix_dtype = next(model.get_submodule(_tower(model)).parameters()).dtype
        projector = projector_module(model, projector_name)
        if loaded_adapters(model):
            activate(model, None)  # train on the base model, whatever adapter the chat had active
        state = self.backend.adapters.get(key)
        if state is not None and state.base_projector is not None and projector is not None:
            load_projector(projector, state.base_projector)
        base_proj = projector_state(projector) if projector is not None else None
        fixed = dev[:3]
        result = VLMTrainResult(None, 0, "done")
        result.dev_loss_before = dev_loss(model, dev_b, device, pix_dtype)
        before = [answer(model, processor, ex, cfg.answer_tokens, device, pix_dtype) for ex in fixed]
        lora = None
        try:
            lora, params = inject_lora(model, cfg)
            groups = [{"params": params, "lr": cfg.learning_rate}]
            if projector is not None and cfg.projector_lr > 0:
                proj_params = list(projector.parameters())
                for p in proj_params:
                    p.requires_grad_(True)
                groups.append({"params": proj_params, "lr": cfg.projector_lr})
            opt = optimizer(groups, device, job.log)
            self._loop(key, model, opt, train_b, device, pix_dtype, run, result)
            model.eval()
            result.dev_loss_after = dev_loss(model, dev_b, device, pix_dtype)
            after = [answer(model, processor, ex, cfg.answer_tokens, device, pix_dtype) for ex in fixed]
            result.answers = [{"example": ex.where, "question": next(m["content"] for m in ex.messages
                               if m["role"] == "user"), "before": a, "after": z}
                              for ex, a, z in zip(fixed, before, after, strict=True)]  # fmt: skip
            if result.steps_done > 0:
                result.adapter = self._save(model, lora, projector, result)
        finally:
            _cleanup(model, projector, base_proj, delete_from)
            self.backend._applied.pop(key, None)  # the chat's adapter state is applied again on the next message
            self.backend.features.drop_model(key)
        return result

    def _loop(self, key, model, opt, train_b, device, pix_dtype, run, result) -> None:
        cfg, job = self.cfg, self.job
        gen = torch.Generator().manual_seed(cfg.seed)
        order: list[int] = []
        model.train()
        if device.type == "cuda":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.get_submodule(_tower(model)).eval()
        t0 = time.perf_counter()
        with _lease(self.ctx, key, model, opt) as lease:
            for step in range(1, cfg.steps + 1):
                if job.should_stop():
                    result.status = "cancelled"
                    break
                if not order:
                    order = torch.randperm(len(train_b), generator=gen).tolist()
                batch = _to(train_b[order.pop()], device, pix_dtype)
                with lease.step():
                    value = train_step(model, opt, batch)
                if not math.isfinite(value):
                    result.status = f"stopped: loss is {value} at step {step}"
                    job.log(result.status)
                    break
                result.steps_done, result.losses = step, [*result.losses, value]
                lease.report(step=step, loss=value)
                run.log_metrics(step, loss=value)
                job.set_progress(0.05 + 0.9 * step / cfg.steps, f"step {step}/{cfg.steps} · loss {value:.4f}")
            result.paused_s = lease.paused_s
        if device.type == "cuda":
            model.gradient_checkpointing_disable()
        job.log(f"{result.steps_done} steps in {time.perf_counter() - t0:.1f} s")

    def _save(self, model: Any, lora: Any, projector: Any, result: VLMTrainResult) -> Path:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=TRAIN_ADAPTER)
        state = {f"base_model.model.{k}": v for k, v in state.items()}  # PEFT's on-disk layout (PeftModel)
        target = self.output_dir()
        with atomic_folder(target) as tmp:
            lora.inference_mode = True
            lora.save_pretrained(str(tmp))
            save_safetensors(state, tmp / "adapter_model.safetensors")
            if projector is not None:
                save_safetensors(projector_state(projector), tmp / PROJECTOR_FILE)
            atomic_write_json(tmp / "training.json", {"steps": result.steps_done, "answers": result.answers,
                              "dev_loss_before": result.dev_loss_before, "dev_loss_after": result.dev_loss_after})  # fmt: skip
        self.job.log(f"saved the adapter to {target}")
        return target


def _tower(model: Any) -> str:
    for name in ("model.vision_tower", "model.visual", "model.vision_model"):
        with contextlib.suppress(AttributeError):
            model.get_submodule(name)
            return name
    raise VLMError("This model has no vision tower the trainer knows (vision_tower, visual, vision_model).")


def _cleanup(model: Any, projector: Any, base_proj: dict | None, delete_from: Any) -> None:
    """Remove the training adapter and put the projector back, so the shared model is as before."""
    model.eval()
    delete_from(model, TRAIN_ADAPTER)
    for p in model.parameters():
        p.requires_grad_(False)
    if projector is not None and base_proj is not None:
        load_projector(projector, base_proj)

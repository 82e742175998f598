"""The same fine-tune as the tab, as a script for one or several GPUs (or CPU processes) through `accelerate`.

    accelerate launch --multi_gpu --num_processes 2 -m backends.finetune.launch --config run.json \
        --model-folder DIR --out DIR
    (two CPU processes with gloo: the same with ACCELERATE_USE_CPU=true; `--cpu` alone starts only one process)

`run.json` is a FinetuneConfig as the run record stores it (`record.json` -> "config"). Each process takes every
world-size-th micro-batch (data parallel, gradients averaged by DDP); rank 0 writes the checkpoints, the adapter
(`<out>/adapter`) and `<out>/history.json`. Multi-GPU nf4 QLoRA loads one 4-bit copy of the base per GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from backends.finetune.data import split_dataset
from backends.finetune.format import build_examples, collate, pad_id_of
from backends.finetune.loss import lm_loss
from backends.finetune.model import (
    apply_memory_savers,
    attach_lora,
    load_base,
    make_optimizer,
    make_scheduler,
    save_adapter,
)
from backends.finetune.model import precision as precision_policy
from backends.finetune.trainer import LoopConfig, LoopHooks, ShuffledBatches, StepLoop
from backends.finetune.types import config_from_dict

log = logging.getLogger(__name__)


class LossModule(torch.nn.Module):
    """model + loss in one forward, so DistributedDataParallel sees the whole step (its gradient hooks fire)."""

    def __init__(self, model: Any, chunked: bool) -> None:
        super().__init__()
        self.model, self.chunked = model, chunked

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return lm_loss(self.model, batch, chunked=self.chunked)


class ShardedBatches:
    """Rank `rank` of `world` takes micro-batches rank, rank + world, ... of the single-process order."""

    def __init__(self, source: Any, rank: int, world: int) -> None:
        self.source, self.rank, self.world = source, rank, world

    def __len__(self) -> int:
        return max(1, len(self.source) // self.world)

    def batch(self, index: int) -> dict[str, Any]:
        return self.source.batch(index * self.world + self.rank)


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator

    from backends.llm import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--model-folder", type=Path, required=True, help="a transformers folder (config + safetensors)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    cfg = config_from_dict(json.loads(args.config.read_text(encoding="utf-8")))
    acc = Accelerator()
    device = str(acc.device)
    tokenizer = load_tokenizer(args.model_folder)
    train, _, report = split_dataset(cfg.data)
    examples = build_examples(tokenizer, train, cfg.data, report)
    torch.manual_seed(cfg.train.seed)
    model = attach_lora(load_base(args.model_folder, device, cfg.train), cfg.lora)
    notes = apply_memory_savers(model, cfg.train, device, cfg.data.max_length)
    amp, how = precision_policy(device, cfg.train, cfg.data.max_length)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer, _ = make_optimizer(params, cfg.train, device)
    scheduler = make_scheduler(optimizer, cfg.train)
    wrapped, optimizer = acc.prepare(LossModule(model, cfg.train.chunked_loss), optimizer)
    source = ShuffledBatches(
        examples, cfg.train.batch_size, lambda xs: collate(xs, pad_id_of(tokenizer)), cfg.train.seed
    )
    batches = ShardedBatches(source, acc.process_index, acc.num_processes)
    loop_cfg = LoopConfig(max_steps=cfg.train.max_steps, grad_accum=cfg.train.grad_accum, amp_dtype=amp,
                          save_every=cfg.train.save_every if acc.is_main_process else 0)  # fmt: skip
    out = args.out if acc.is_main_process else args.out / f"rank{acc.process_index}"
    hooks = LoopHooks(
        export=(lambda folder, step: save_adapter(model, folder / "adapter")) if acc.is_main_process else None
    )
    loop = StepLoop(wrapped, lambda m, b: m(b), optimizer, scheduler, batches, loop_cfg, out, hooks)
    result = loop.run()
    if acc.is_main_process:
        save_adapter(model, args.out / "adapter")
        (args.out / "history.json").write_text(json.dumps({
            "world_size": acc.num_processes, "precision": how, "notes": notes, "status": result.status,
            "history": [asdict(r) for r in result.history], "dataset": report.summary()}, indent=2))  # fmt: skip
    acc.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

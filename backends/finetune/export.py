"""Export: the base model merged with the adapter in 16-bit, as safetensors, with an Ollama Modelfile.

Merging never touches 4-bit weights: the base is loaded again from its original (unquantised) files in bf16 (fp16
where the dtype is asked for), the adapter is merged with PEFT's `merge_and_unload`, and the result is saved.
The Modelfile's TEMPLATE is chosen by chat-template family (ChatML, Llama 3) and CHECKED: it is rendered for a
system + user turn and must equal the tokenizer's own chat template output character for character, else the
export refuses (a mismatched template is the classic "garbage in Ollama" after fine-tuning).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from backends.finetune.types import FinetuneError
from studio.safety import atomic_folder

log = logging.getLogger(__name__)

CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)
LLAMA3 = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)
FAMILIES = {"chatml": (CHATML, "<|im_end|>", "<|im_start|>"), "llama3": (LLAMA3, "<|eot_id|>", "<|start_header_id|>")}


def render_go_template(template: str, **values: str) -> str:
    """The subset of Go templates the Modelfiles above use: {{ if .X }}...{{ end }} and {{ .X }}."""

    def cond(m: re.Match) -> str:
        return m.group(2) if values.get(m.group(1)) else ""

    out = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", cond, template, flags=re.S)
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values.get(m.group(1), ""), out)


def template_family(tokenizer: Any) -> str:
    tpl = getattr(tokenizer, "chat_template", None) or ""
    for name, (_, _, marker) in FAMILIES.items():
        if marker in tpl:
            return name
    raise FinetuneError("No Ollama TEMPLATE is known for this model's chat template (only ChatML and Llama 3): "
                        "the merged model is fine for transformers; write the Modelfile's TEMPLATE by hand.")  # fmt: skip


def default_system(tokenizer: Any) -> str:
    """The system prompt the template inserts when a conversation has none (SmolLM2 has one), else ''."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    probe = tokenizer.apply_chat_template([{"role": "system", "content": "\x01"}, {"role": "user", "content": "x"}],
                                          tokenize=False)  # fmt: skip
    head, _, tail = probe.partition("\x01")
    if rendered.startswith(head) and rendered.endswith(tail):
        return rendered[len(head) : len(rendered) - len(tail)]
    return ""


def prompt_part(template: str, system: str, prompt: str) -> str:
    """What Ollama sends before the answer: the template rendered up to {{ .Response }}."""
    return render_go_template(template.split("{{ .Response }}")[0], System=system, Prompt=prompt)


def check_template(tokenizer: Any) -> str:
    """The family, after checking that Ollama's prompt equals the tokenizer's for the same turns."""
    family = template_family(tokenizer)
    template = FAMILIES[family][0]
    system = default_system(tokenizer)
    for sys_text in ("You are terse.", system):
        msgs = ([{"role": "system", "content": sys_text}] if sys_text else []) + [{"role": "user", "content": "Hi?"}]
        want = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        got = prompt_part(template, sys_text or system, "Hi?")
        bos = getattr(tokenizer, "bos_token", None) or ""
        if got != want and bos + got != want:
            raise FinetuneError(f"The Ollama TEMPLATE does not reproduce the training chat template: {want!r} vs "
                                f"{got!r}. Write the Modelfile's TEMPLATE by hand.")  # fmt: skip
    return family


def export_merged(base_folder: Path, adapter_folder: Path, target: Path, *, dtype: str = "bf16") -> Path:
    """Merge in 16-bit and save `target` (model safetensors, tokenizer, Modelfile, export.json), atomically."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from backends.llm import load_tokenizer

    tokenizer = load_tokenizer(base_folder)
    family = check_template(tokenizer)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch_dtype, device_map={"": "cpu"})
    merged = PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload()
    with atomic_folder(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "Modelfile").write_text(_modelfile_text(tokenizer, family), encoding="utf-8")
        (tmp / "export.json").write_text(json.dumps({"base": str(base_folder), "adapter": str(adapter_folder),
                                                     "dtype": dtype, "template": family}, indent=2))  # fmt: skip
    log.info("exported merged %s model to %s", dtype, target)
    return target


def _modelfile_text(tokenizer: Any, family: str) -> str:
    template, stop, _ = FAMILIES[family]
    lines = ["FROM .", f'TEMPLATE """{template}"""']
    system = default_system(tokenizer)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"

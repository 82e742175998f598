"""LoRA adapters on a tiny random Llama: attach, switch and detach without reloading the base model."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.llm.backend import AdapterError, LLMBackend, LLMConfig
from tests import _llm_support

llm_ctx, llm, smol_folder = _llm_support.llm_ctx, _llm_support.llm, _llm_support.smol_folder  # session fixtures
MSG = [{"role": "user", "content": "Say something."}]


def _make_adapter(base_folder: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(llm_ctx, smol_folder):
    models, data = llm_ctx.settings.models_dir, llm_ctx.settings.data_dir
    base = _llm_support.make_tiny_llama(models / "tiny-llama", smol_folder)
    other = _llm_support.make_tiny_llama(models / "tiny-llama-wide", smol_folder, hidden=96)
    return {
        "a1": _make_adapter(base, data / "adapters" / "a1", seed=1),
        "a2": _make_adapter(base, data / "adapters" / "a2", seed=2),
        "wrong": _make_adapter(other, data / "adapters" / "for-another-model", seed=3),
    }


def test_attach_switch_detach_without_reloading(llm_ctx, tiny):
    backend = LLMBackend(llm_ctx, LLMConfig(model_id="tiny-llama"))
    say = lambda: backend.complete(MSG, max_new_tokens=8)  # noqa: E731
    base = say()
    with llm_ctx.residency.use("chat:tiny-llama") as model:
        base_model_id = id(model)

    assert backend.attach_adapter(tiny["a1"]) == "a1"
    with_a1 = say()
    assert with_a1 != base
    backend.attach_adapter(str(tiny["a2"].relative_to(llm_ctx.settings.data_dir.parent)).split("/", 1)[1])
    with_a2 = say()
    assert with_a2 not in (base, with_a1)
    assert backend.adapter_status() == (["a1", "a2"], "a2")

    backend.switch_adapter("a1")
    assert say() == with_a1
    backend.detach_adapter()
    assert say() == base
    assert backend.adapter_status() == (["a1", "a2"], None)
    with llm_ctx.residency.use("chat:tiny-llama") as model:
        assert id(model) == base_model_id  # the base was never reloaded


def test_wrong_adapters_are_refused_and_leave_the_model_working(llm_ctx, tiny, tmp_path):
    backend = LLMBackend(llm_ctx, LLMConfig(model_id="tiny-llama"))
    base = backend.complete(MSG, max_new_tokens=6)
    with pytest.raises(AdapterError, match="does not fit"):
        backend.attach_adapter(tiny["wrong"])
    assert backend.complete(MSG, max_new_tokens=6) == base
    with pytest.raises(AdapterError, match="not found"):
        backend.attach_adapter(llm_ctx.settings.data_dir / "adapters" / "missing")
    with pytest.raises(AdapterError, match="must be inside"):
        backend.attach_adapter(tmp_path)
    with pytest.raises(AdapterError, match="No adapter named"):
        backend.switch_adapter("nope")
    broken = llm_ctx.settings.data_dir / "adapters" / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        backend.attach_adapter(broken)


def test_available_adapters_are_listed(llm_ctx, tiny):
    found = llm_ctx.backends.llm.available_adapters()
    assert {p.name for p in found} >= {"a1", "a2", "for-another-model"}

"""LoRA training on the tiny SD pipeline: it changes the output, and its file loads in diffusers as we meant it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from backends.image.tiny import ensure_tiny_pipeline

GEN = {"width": 64, "height": 64, "steps": 3, "seed": 5}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    for i in range(4):
        a = np.full((64, 64, 3), 40, np.uint8)
        a[8 + 4 * i : 40 + 4 * i, 16:48, i % 3] = 250
        Image.fromarray(a).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("a red square on grey", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained(diffusion_ctx, images):
    """A rank-4 LoRA trained for a few steps through the real job runner."""
    from backends.image.lora_train import LoraTrainConfig

    cfg = LoraTrainConfig(dataset=(str(images),), instance_prompt="a photo of sks square", output_name="squares",
                          rank=4, steps=6, learning_rate=1e-2, resolution=64)  # fmt: skip
    job = diffusion_ctx.backends.sd_lora.submit(cfg)
    assert job.wait(timeout=240), "training did not finish"
    assert job.status == "done", (job.status, job.error, job.logs[-5:])
    return job.result


class StopAfter:
    """Stand-in job that asks to stop once `n` training steps were reported."""

    def __init__(self, n: int) -> None:
        self.n, self.id, self.logs = n, "stand-in", []

    def set_progress(self, fraction: float, message: str = "") -> None:
        self.last = message

    def log(self, msg: str) -> None:
        self.logs.append(msg)

    def should_stop(self) -> bool:
        return getattr(self, "last", "").startswith(f"step {self.n}/")


def test_lora_changes_the_output_and_is_recorded(diffusion_ctx, trained):
    from backends.image.diffusion import GenerateRequest, LoraChoice

    diffusion = diffusion_ctx.backends.diffusion
    plain = diffusion.generate(GenerateRequest("a photo of sks square", **GEN))
    with_lora = diffusion.generate(
        GenerateRequest("a photo of sks square", loras=(LoraChoice(str(trained.path)),), **GEN)
    )
    plain_again = diffusion.generate(GenerateRequest("a photo of sks square", **GEN))
    a, b, c = (np.asarray(r.images[0].image, dtype=np.int16) for r in (plain, with_lora, plain_again))
    assert np.abs(a - b).mean() > 1.0  # the LoRA changes the picture
    assert np.array_equal(a, c)  # and switching it off gives the original back
    run = diffusion_ctx.runs.get(trained.run_id)
    assert run.status == "done" and run.kind == "sd-lora"
    assert [m["step"] for m in run.metrics()] == [1, 2, 3, 4, 5, 6]
    assert any(art["name"].endswith(".safetensors") for art in run.artifacts)


def test_several_loras_with_scales_add_up(diffusion_ctx, trained, tmp_path):
    """Two copies of one LoRA at 0.5 each must give the same image as the LoRA once at 1.0 (LoRAs are additive)."""

    from backends.image.diffusion import GenerateRequest, LoraChoice

    copy = tmp_path / "squares-copy.safetensors"
    shutil.copyfile(trained.path, copy)
    diffusion = diffusion_ctx.backends.diffusion
    once = diffusion.generate(
        GenerateRequest("a photo of sks square", loras=(LoraChoice(str(trained.path), 1.0),), **GEN)
    )
    halves = (LoraChoice(str(trained.path), 0.5), LoraChoice(str(copy), 0.5))
    twice = diffusion.generate(GenerateRequest("a photo of sks square", loras=halves, **GEN))
    a, b = (np.asarray(r.images[0].image, dtype=np.int16) for r in (once, twice))
    assert np.abs(a - b).max() <= 1


def test_lora_file_uses_kohya_keys_and_loads_in_diffusers_as_trained(diffusion_ctx, trained):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    with safe_open(str(trained.path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in keys} == {
        "lora_down",
        "lora_up",
        "alpha",
    }
    assert meta["ss_network_dim"] == "4" and meta["ss_network_module"] == "networks.lora"

    pipe = StableDiffusionPipeline.from_pretrained(
        ensure_tiny_pipeline(diffusion_ctx.settings.cache_dir), safety_checker=None
    )
    unet = pipe.unet
    x, t, text = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]), None
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=text).sample
        # expected: W + alpha/rank * up @ down, applied by hand to a copy of the base UNet
        manual = type(unet).from_pretrained(ensure_tiny_pipeline(diffusion_ctx.settings.cache_dir), subfolder="unet")
        modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in manual.named_modules()}
        for key in keys:
            if key.endswith(".lora_down.weight"):
                name = key.split(".")[0]
                up, down = tensors[f"{name}.lora_up.weight"], tensors[key]
                modules[name].weight += float(tensors[f"{name}.alpha"]) / down.shape[0] * (up @ down)
        expected = manual(x, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(str(trained.path))  # what AUTOMATIC1111/ComfyUI/diffusers users will do
        loaded = pipe.unet(x, t, encoder_hidden_states=text).sample
    assert not torch.allclose(before, expected, atol=1e-4)
    torch.testing.assert_close(loaded, expected, atol=1e-4, rtol=1e-4)


def test_lora_for_another_architecture_is_refused(diffusion_ctx, trained, tmp_path):
    import torch

    from backends.image.diffusion import GenerateRequest, LoraChoice, LoraError
    from studio.safety import save_safetensors

    diffusion = diffusion_ctx.backends.diffusion
    with pytest.raises(LoraError, match=r"text width 32.*text width 64"):
        diffusion.generate(
            GenerateRequest("a cat", model="tiny-sdxl-demo", loras=(LoraChoice(str(trained.path)),), **GEN)
        )
    sdxl_like = tmp_path / "sdxl-style.safetensors"
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_safetensors({f"{name}.lora_down.weight": torch.zeros(4, 2048), f"{name}.lora_up.weight": torch.zeros(640, 4),
                      f"{name}.alpha": torch.tensor(4.0)}, sdxl_like)  # fmt: skip
    with pytest.raises(LoraError, match="trained for SDXL"):
        diffusion.generate(GenerateRequest("a cat", loras=(LoraChoice(str(sdxl_like)),), **GEN))
    not_lora = tmp_path / "weights.safetensors"
    save_safetensors({"conv.weight": torch.zeros(2, 2)}, not_lora)
    with pytest.raises(LoraError, match="not a LoRA file"):
        diffusion.generate(GenerateRequest("a cat", loras=(LoraChoice(str(not_lora)),), **GEN))


def test_cancel_saves_what_was_learnt(diffusion_ctx, images):
    from safetensors import safe_open

    from backends.image.lora_train import LoraTrainConfig

    cfg = LoraTrainConfig(dataset=(str(images),), instance_prompt="a photo of sks square", output_name="cancelled",
                          rank=4, steps=50, resolution=64)  # fmt: skip
    result = diffusion_ctx.backends.sd_lora.train(cfg, StopAfter(2))
    assert result.status == "cancelled" and result.steps_done == 2
    with safe_open(str(result.path), "pt") as f:
        assert f.metadata()["ss_steps"] == "2"
    assert diffusion_ctx.runs.get(result.run_id).status == "cancelled"
    rec = diffusion_ctx.backends.diffusion.prepare("tiny-sd-demo")
    with diffusion_ctx.residency.use(rec.key("unet")) as unet:  # the shared UNet is left without the training adapter
        assert "onecard_train" not in (getattr(unet, "peft_config", None) or {})
        assert not any(p.requires_grad for p in unet.parameters())


def test_training_data_and_settings_are_checked_before_the_job(diffusion_ctx, images, tmp_path):
    from backends.image.lora_train import LoraTrainConfig, TrainingDataError, collect_items, load_pixels

    lora = diffusion_ctx.backends.sd_lora
    with pytest.raises(TrainingDataError, match=r"No caption for img1.png, img2.png, img3.png"):
        lora.check(LoraTrainConfig(dataset=(str(images),)))
    with pytest.raises(ValueError, match="rank 32"):
        LoraTrainConfig(dataset=(str(images),), rank=32)
    with pytest.raises(TrainingDataError, match="No training images"):
        lora.check(LoraTrainConfig(dataset=(str(tmp_path),)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    items = collect_items((str(images), str(broken)), "a photo")
    logged: list[str] = []
    kept, pixels = load_pixels(items, 64, logged.append)
    assert len(kept) == 4 and pixels.shape == (4, 3, 64, 64)
    assert len(logged) == 1 and logged[0].startswith("skipped broken.png: not a readable image")
    with pytest.raises(ValueError, match="class prompt"):
        LoraTrainConfig(dataset=(str(images),), prior_preservation=True)

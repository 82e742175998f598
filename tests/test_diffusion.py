"""Image generation on the CPU with the tiny untrained demo pipelines (SD1.5 and SDXL architectures)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

FAST = {"steps": 3, "width": 64, "height": 96}


def _pixels(result, i: int = 0) -> np.ndarray:
    return np.asarray(result.images[i].image, dtype=np.int16)


def test_same_seed_same_image_of_requested_size(diffusion_ctx):
    from backends.image.diffusion import GenerateRequest
    from backends.image.png import read_png_params

    diffusion = diffusion_ctx.backends.diffusion
    a = diffusion.generate(GenerateRequest("a red lighthouse", seed=7, **FAST))
    b = diffusion.generate(GenerateRequest("a red lighthouse", seed=7, **FAST))
    c = diffusion.generate(GenerateRequest("a red lighthouse", seed=8, **FAST))
    assert a.images[0].image.size == (64, 96)
    assert np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(a), _pixels(c))
    assert a.demo and "untrained demo model" in a.label
    params = read_png_params(a.images[0].path)
    assert params["seed"] == 7 and params["prompt"] == "a red lighthouse" and params["untrained_demo_model"] is True
    assert "Steps: 3" in Image.open(a.images[0].path).text["parameters"]  # AUTOMATIC1111-style chunk
    assert a.images[0].path.parent.parent == diffusion_ctx.settings.outputs_dir / "images"


def test_sdxl_architecture_txt2img_img2img_inpaint_and_gallery(diffusion_ctx):
    from backends.image.diffusion import GenerateRequest

    diffusion = diffusion_ctx.backends.diffusion
    base = diffusion.generate(GenerateRequest("a boat", model="tiny-sdxl-demo", seed=1, batch=2, **FAST))
    assert [im.seed for im in base.images] == [1, 2] and base.mode == "txt2img"
    init = base.images[0].path
    mask = Image.new("L", (64, 96))
    mask.paste(255, (0, 0, 32, 48))
    i2i = diffusion.generate(
        GenerateRequest("a boat", model="tiny-sdxl-demo", seed=1, init_image=init, strength=0.6, **FAST)
    )
    inp = diffusion.generate(
        GenerateRequest(
            "a boat", model="tiny-sdxl-demo", seed=1, init_image=init, mask_image=mask, strength=0.9, **FAST
        )
    )
    assert (i2i.mode, inp.mode) == ("img2img", "inpaint")
    assert i2i.images[0].image.size == inp.images[0].image.size == (64, 96)
    assert not np.array_equal(_pixels(i2i), _pixels(base))
    gallery = diffusion.gallery()
    assert gallery[0].path == inp.images[0].path  # newest first
    assert gallery[0].params["mode"] == "inpaint" and gallery[0].params["model"] == "tiny-sdxl-demo"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"prompt": "a cat", "width": 100}, "multiple of 8"),
        ({"prompt": "a cat", "height": 30}, "multiple of 8"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "\x00"}, "prompt is empty"),
        ({"prompt": "a cat", "scheduler": "Euler z"}, "Unknown scheduler"),
        ({"prompt": "a cat", "mask_image": "m.png"}, "without an init image"),
        ({"prompt": "a cat", "batch": 0}, "batch"),
        ({"prompt": "a cat", "steps": 0}, "steps"),
    ],
)
def test_bad_requests_are_refused_with_the_fix(kwargs, expected):
    from backends.image.diffusion import GenerateRequest, RequestError

    with pytest.raises(RequestError, match=expected):
        GenerateRequest(**kwargs)


def test_corrupt_init_image_and_unknown_models_give_clear_messages(diffusion_ctx, tmp_path):
    from backends.image.diffusion import GenerateRequest, ModelNotAvailable, RequestError

    diffusion = diffusion_ctx.backends.diffusion
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)  # PNG signature, truncated body
    with pytest.raises(RequestError, match=r"init image \(photo.png\) is not a readable image"):
        diffusion.generate(GenerateRequest("a cat", init_image=bad, seed=1, **FAST))
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 96), "red").save(good)
    zip_as_png = tmp_path / "mask.png"
    zip_as_png.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(RequestError, match=r"mask \(mask.png\) is not a readable image"):
        diffusion.generate(GenerateRequest("a cat", init_image=good, mask_image=zip_as_png, seed=1, **FAST))
    with pytest.raises(ModelNotAvailable, match="not downloaded"):
        diffusion.generate(GenerateRequest("a cat", model="sd-1.5", **FAST))
    with pytest.raises(ModelNotAvailable, match="not in the local Hugging Face cache"):
        diffusion.generate(GenerateRequest("a cat", model="someone/not-downloaded-sd", **FAST))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x" * 2048)
    with pytest.raises(ModelNotAvailable, match=r"only \.safetensors"):
        diffusion.generate(GenerateRequest("a cat", model=str(ckpt), **FAST))
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(2048))
    with pytest.raises(ModelNotAvailable, match="not a readable checkpoint"):
        diffusion.generate(GenerateRequest("a cat", model=str(broken), **FAST))


def test_cancel_stops_generation_and_saves_nothing(diffusion_ctx):
    from backends.image.diffusion import GenerateRequest, GenerationCancelled

    diffusion = diffusion_ctx.backends.diffusion
    before = len(diffusion.gallery(1000))
    seen: list[str] = []
    with pytest.raises(GenerationCancelled, match="nothing was saved"):
        diffusion.generate(
            GenerateRequest("a cat", seed=1, **{**FAST, "steps": 6}),
            progress=lambda f, m: seen.append(m),
            should_stop=lambda: any(m.startswith("step 2/") for m in seen),
        )
    assert len(diffusion.gallery(1000)) == before


def test_memory_plan_degrades_in_order():
    from backends.image.memory import plan_memory

    sdxl = {"text_encoder": 246_000_000, "text_encoder_2": 1_390_000_000, "unet": 5_140_000_000, "vae": 335_000_000}
    common = {"width": 1024, "height": 1024, "batch": 1, "cfg": True, "dtype_bytes": 2, "vae_dtype_bytes": 4}
    roomy = plan_memory(sdxl, budget_bytes=40 * 2**30, **common)
    assert roomy.mode == "all on GPU" and not (roomy.vae_tiling or roomy.attention_slicing)
    parked = plan_memory(sdxl, budget_bytes=int(10.5 * 2**30), **common)  # the untiled decode takes 5.45 GB
    assert parked.mode == "text encoders parked in RAM" and not (parked.vae_tiling or parked.attention_slicing)
    card = plan_memory(sdxl, budget_bytes=8 * 2**30, **common)
    assert card.vae_tiling and not card.attention_slicing and card.decode_working_bytes < parked.decode_working_bytes
    tight = plan_memory(sdxl, budget_bytes=6 * 2**30, **common)
    assert tight.attention_slicing and tight.vae_tiling and tight.unet_working_bytes < card.unet_working_bytes
    assert plan_memory(sdxl, budget_bytes=None, **common).mode == "CPU"
    assert plan_memory(sdxl, budget_bytes=40 * 2**30, **{**common, "batch": 4}).vae_slicing


def test_parked_mode_moves_the_text_encoders_off_before_the_unet_runs(diffusion_ctx, monkeypatch):
    """Left to the manager, SDXL's decode room at 12 GiB came from evicting the UNet (4.8 GiB, moved twice per
    image); in the parked mode the backend moves the encoders down itself, once the prompt is encoded."""
    import dataclasses

    from backends.image.diffusion import GenerateRequest

    diffusion, res = diffusion_ctx.backends.diffusion, diffusion_ctx.residency
    calls: list[tuple[str, str]] = []
    real_offload, real_run = res.offload, res.run
    monkeypatch.setattr(
        res, "offload", lambda key=None, **kw: calls.append(("offload", key)) or real_offload(key, **kw)
    )
    monkeypatch.setattr(res, "run", lambda key, fn, **kw: calls.append(("run", key)) or real_run(key, fn, **kw))
    real_plan = diffusion.plan
    req = GenerateRequest("a boat", model="tiny-sdxl-demo", seed=3, **FAST)

    plain = diffusion.generate(req)
    assert not any(kind == "offload" for kind, _ in calls)  # the CPU plan parks nothing
    calls.clear()
    monkeypatch.setattr(
        diffusion, "plan", lambda rec, r: dataclasses.replace(real_plan(rec, r), text_encoders_parked=True)
    )
    parked = diffusion.generate(req)
    keys = [k for _, k in calls]
    assert [k.rsplit("/", 1)[1] for kind, k in calls if kind == "offload"] == ["text_encoder", "text_encoder_2"]
    assert calls[-1][0] == "run" and keys[-1].endswith("/unet")  # parked first, then the UNet's stage
    assert np.array_equal(_pixels(parked), _pixels(plain))


def test_out_of_memory_in_decode_falls_back_to_tiles():
    import torch

    from backends.image.memory import MemoryPlan, decode_latents

    class FakeVae:
        """Decodes by 8x upsampling; runs out of memory on anything bigger than a tile unless tiling is on."""

        config = type("C", (), {"scaling_factor": 0.5, "shift_factor": None})()
        dtype, device, tiling, calls = torch.float32, torch.device("cpu"), False, []

        def enable_tiling(self):
            self.tiling = True

        def disable_tiling(self):
            self.tiling = False

        def decode(self, z, return_dict=False):
            self.calls.append((tuple(z.shape), self.tiling))
            if not self.tiling:
                raise torch.OutOfMemoryError("CUDA out of memory (fake)")
            return (z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2),)

    vae = FakeVae()
    out = decode_latents(vae, torch.ones(2, 4, 8, 8), MemoryPlan("all on GPU"))
    assert out.shape == (2, 3, 64, 64) and float(out.mean()) == 2.0  # latents / scaling factor
    assert vae.calls[0] == ((2, 4, 8, 8), False) and vae.calls[-1] == ((1, 4, 8, 8), True)
    assert vae.tiling is False  # the shared VAE is left as it was


def test_generation_is_refused_while_the_model_is_being_trained(diffusion_ctx):
    from backends.image.diffusion import DiffusionBusy, GenerateRequest

    diffusion = diffusion_ctx.backends.diffusion
    rec = diffusion.prepare("tiny-sd-demo")
    with diffusion.training(rec), pytest.raises(DiffusionBusy, match="being trained"):
        diffusion.generate(GenerateRequest("a cat", **FAST))
    with pytest.raises(DiffusionBusy, match="already being trained"), diffusion.training(rec), diffusion.training(rec):
        pass


def test_an_init_image_over_89_megapixels_is_refused_from_its_header(tmp_path):
    import struct
    import zlib

    from backends.image.request import RequestError, load_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    huge = tmp_path / "huge.png"  # 12000 x 12000 = 144 MP: PIL only warns below 178 MP
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0))
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IEND", b""))
    with pytest.raises(RequestError, match="over 89 megapixels"):
        load_image(huge, "init image", (64, 64))

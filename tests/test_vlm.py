"""VLM chat on the CPU with the tiny demo LLaVA: streaming, feature cache, limits, bad images, stop, two sessions."""

from __future__ import annotations

import threading
import zipfile

import pytest

from backends.llm import GenerationOptions
from backends.vlm import ImageOptions, VLMError, check_messages
from tests import _vlm_support
from tests._vlm_support import png_header_only, solid

tiny_llava_folder, vlm_ctx, vlm = _vlm_support.tiny_llava_folder, _vlm_support.vlm_ctx, _vlm_support.vlm
llm_ctx, llm, smol_folder = _vlm_support.llm_ctx, _vlm_support.llm, _vlm_support.smol_folder
GREEDY = GenerationOptions(temperature=0.0, max_new_tokens=16)


def ask(text: str, *images) -> list[dict]:
    return [{"role": "user", "content": text, "images": [str(p) for p in images]}]


def test_demo_model_is_labelled_and_streams(vlm, tmp_path):
    info = vlm.describe()
    assert info["demo"] and info["model_type"] == "llava" and info["feature_cache"]
    updates = list(vlm.chat(ask("What is in the picture?", solid(tmp_path / "r.png", "red")), GREEDY))
    deltas = [u for u in updates if u.delta]
    assert len(deltas) >= 3 and updates[-1].done and updates[-1].text == "".join(u.delta for u in deltas)
    s = updates[-1].stats
    assert s.images == 1 and s.image_tokens == 4 and s.images_encoded == 1 and s.decoder == "eager"


def test_history_images_are_not_encoded_again_and_match_plain_generate(vlm, tmp_path):
    red, blue = solid(tmp_path / "r.png", "red"), solid(tmp_path / "b.png", (0, 0, 250))
    msgs = ask("First?", red)
    first = vlm.complete(msgs, max_new_tokens=8)
    msgs += [{"role": "assistant", "content": first}, *ask("And these two?", blue, red)]
    *_, last = vlm.chat(msgs, GREEDY)
    assert last.stats.images == 3 and last.stats.images_encoded == 1  # only the blue one is new
    vlm.configure(feature_cache=False)
    try:
        *_, plain = vlm.chat(msgs, GREEDY)
    finally:
        vlm.configure(feature_cache=True)
    assert plain.stats.decoder == "plain generate" and plain.stats.images_encoded == 3
    assert plain.text == last.text  # the cached-feature path gives plain generate's greedy tokens exactly


def test_same_pixels_under_two_names_share_features(vlm, tmp_path):
    a, b = solid(tmp_path / "a.png", (1, 2, 3)), solid(tmp_path / "b.png", (1, 2, 3))
    list(vlm.chat(ask("x", a), GREEDY))
    *_, u = vlm.chat(ask("y", b), GREEDY)
    assert u.stats.images_encoded == 0


def test_resolution_setting_downscales_big_images_with_a_note(vlm, tmp_path):
    big = solid(tmp_path / "big.png", "white", (3000, 1500))
    updates = list(vlm.chat(ask("read it", big), GREEDY, images=ImageOptions(max_side=500)))
    assert "downscaled from 3000x1500 to 500x250" in updates[0].note


def test_image_limits(vlm, tmp_path):
    img = solid(tmp_path / "i.png", "red")
    with pytest.raises(VLMError, match="at most 8 per message"):
        list(vlm.chat(ask("many", *[img] * 9), GREEDY))
    with pytest.raises(VLMError, match="takes at most 4"):
        list(vlm.chat(ask("five", *[img] * 5), GREEDY))
    msgs = [*ask("a", img, img), {"role": "assistant", "content": "ok"}, *ask("b", img, img, img)]
    updates = list(vlm.chat(msgs, GREEDY))
    assert "Dropped the 2 oldest message(s)" in updates[0].note and updates[-1].stats.images == 3


def test_context_budget_refuses_with_the_numbers(vlm, tmp_path):
    vlm.configure(max_context_tokens=256)
    try:
        with pytest.raises(VLMError, match=r"needs \d+ tokens \(1 image\(s\) included\)"):
            list(vlm.chat(ask("word " * 400, solid(tmp_path / "i.png", "red")), GREEDY))
    finally:
        vlm.configure(max_context_tokens=4096)


@pytest.mark.parametrize(
    "case,match",
    [
        ("truncated", "not a readable image"),
        ("zip", "not a readable image"),
        ("bomb", "too large to open safely|MP limit"),
        ("text", "not a readable image"),
    ],
)
def test_bad_images_are_refused_before_the_model(vlm, tmp_path, case, match):
    path = tmp_path / "upload.png"
    if case == "truncated":
        solid(path, "red", (200, 200))
        path.write_bytes(path.read_bytes()[:120])
    elif case == "zip":
        with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
            z.writestr("x.txt", "hello" * 100)
        path.write_bytes((tmp_path / "a.zip").read_bytes())
    elif case == "bomb":
        png_header_only(path, 20000, 20000)
    else:
        path.write_text("just text")
    with pytest.raises(VLMError, match=match):
        list(vlm.chat(ask("what?", path), GREEDY))
    assert vlm.complete(ask("still works?", solid(tmp_path / "ok.png", "red")), max_new_tokens=2) is not None


def test_animated_gif_uses_its_first_frame(vlm, tmp_path):
    from PIL import Image

    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100)
    updates = list(vlm.chat(ask("what?", tmp_path / "a.gif"), GREEDY))
    assert "animated (3 frames)" in updates[0].note and updates[-1].done


def test_empty_prompt_null_bytes_and_roles_are_refused():
    with pytest.raises(VLMError, match="empty"):
        check_messages([{"role": "user", "content": "  ", "images": ["x.png"]}], 8)
    with pytest.raises(VLMError, match="null byte"):
        check_messages([{"role": "user", "content": "a\x00b"}], 8)
    with pytest.raises(VLMError, match="last message must be from the user"):
        check_messages([{"role": "assistant", "content": "hi"}], 8)


def test_stop_ends_within_a_token(vlm, tmp_path):
    cancel = threading.Event()
    n = 0
    for u in vlm.chat(ask("talk", solid(tmp_path / "i.png", "red")), GenerationOptions(temperature=0.0,
                      max_new_tokens=200), cancel=cancel):  # fmt: skip
        n += 1
        if u.delta:
            cancel.set()
        if u.done:
            assert u.stats.finish_reason == "cancelled" and u.stats.new_tokens <= 3
    assert n < 10


def test_two_sessions_at_once_both_finish(vlm, tmp_path):
    imgs = [solid(tmp_path / f"{i}.png", c) for i, c in enumerate(("red", "blue"))]
    out: dict[int, str] = {}
    errors: list[BaseException] = []

    def session(i: int) -> None:
        try:
            out[i] = vlm.complete(ask(f"session {i}", imgs[i]), max_new_tokens=12)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(out) == [0, 1]
    assert out[0] == vlm.complete(ask("session 0", imgs[0]), max_new_tokens=12)  # no cross-talk


def test_closing_the_stream_early_releases_the_slot(vlm, tmp_path):
    gen = vlm.chat(ask("hi", solid(tmp_path / "i.png", "red")), GREEDY)
    next(gen)
    gen.close()  # a closed browser tab
    assert vlm._lock.acquire(timeout=1)
    vlm._lock.release()
    snap = vlm.ctx.residency.snapshot()
    assert all(m.leases == 0 for m in snap.models)


@pytest.mark.slow  # imports bitsandbytes (~8 s here)
def test_nf4_keeps_vision_tower_and_projector_in_16bit(tiny_llava_folder):
    import torch
    from bitsandbytes.nn import Linear4bit

    from backends.vlm.models import load_vlm

    model = load_vlm(tiny_llava_folder, "cpu", precision="nf4")
    vision = [m for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.Linear)]
    assert vision and not any(isinstance(m, Linear4bit) for m in vision)
    assert not isinstance(model.model.multi_modal_projector.linear_1, Linear4bit)
    assert not isinstance(model.lm_head, Linear4bit)
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, Linear4bit)


def test_llava_next_tiles_go_through_the_feature_path_too(vlm_ctx, tiny_llava_folder, tmp_path):
    """Any-resolution LLaVA-NeXT (a wide and a tall image: different tile counts) through the cached-feature path
    gives plain generate's greedy tokens, with the model loaded from a folder in models_dir."""
    from backends.vlm import VLMBackend
    from tests._vlm_support import make_tiny_llava_next

    make_tiny_llava_next(vlm_ctx.settings.models_dir / "tiny-next", tiny_llava_folder)
    backend = VLMBackend(vlm_ctx)
    backend.configure(model_id="tiny-next")
    assert backend.describe()["model_type"] == "llava_next"
    msgs = ask("what?", solid(tmp_path / "w.png", "red", (64, 30)), solid(tmp_path / "t.png", "blue", (30, 64)))
    *_, cached = backend.chat(msgs, GREEDY)
    backend.configure(feature_cache=False)
    *_, plain = backend.chat(msgs, GREEDY)
    assert cached.stats.image_tokens == plain.stats.image_tokens > 8 and cached.text == plain.text


def test_qwen25_vl_uses_plain_generate_and_the_token_budget(vlm_ctx, tiny_llava_folder, tmp_path):
    """Qwen2.5-VL (M-RoPE): the tab says it decodes with plain generate, and the image token budget caps the
    visual tokens of one image (max_pixels = tokens x 28 x 28)."""
    from backends.vlm import VLMBackend
    from tests._vlm_support import make_tiny_qwen25_vl

    make_tiny_qwen25_vl(vlm_ctx.settings.models_dir / "tiny-qwen", tiny_llava_folder)
    backend = VLMBackend(vlm_ctx)
    backend.configure(model_id="tiny-qwen")
    info = backend.describe()
    assert info["model_type"] == "qwen2_5_vl" and "M-RoPE" in info["decoder"] and not info["feature_cache"]
    msgs = ask("what?", solid(tmp_path / "w.png", "red", (200, 100)))
    *_, full = backend.chat(msgs, GREEDY)
    *_, capped = backend.chat(msgs, GREEDY, images=ImageOptions(max_tokens=16))
    assert full.stats.decoder == "plain generate" and full.stats.new_tokens == 16
    assert capped.stats.image_tokens <= 16 < full.stats.image_tokens


def test_a_session_config_applies_to_one_call_only(vlm, tmp_path):
    img = solid(tmp_path / "i.png", "red")
    one = vlm.session_config(max_images_per_message=1)
    with pytest.raises(VLMError, match="at most 1 per message"):
        list(vlm.chat(ask("two", img, img), GREEDY, config=one))
    assert vlm.config.max_images_per_message == 8 and list(vlm.chat(ask("two", img, img), GREEDY))[-1].done


def test_next_turn_reuses_the_cached_prompt_only_where_the_same_images_sit(tiny_llava_folder):
    """Prompt reuse in the static decoder: the history turn prefills only its new tokens, with a full prefill's
    logits; a different picture at the second image's place invalidates the cache from that placeholder on."""
    import torch

    from backends.llm.fastdecode import StaticDecoder
    from backends.vlm.decode import EmbedsPrefill, FeatureCache, image_token_id, merged_embeddings, position_keys
    from backends.vlm.models import load_vlm
    from backends.vlm.types import VLMStats
    from studio.bench.vlm import make_inputs, next_turn

    model = load_vlm(tiny_llava_folder, "cpu", "auto")
    inputs, digests = make_inputs(model, 2, 8, seed=3)

    def prefill(decoder, inp, dig):
        embeds = merged_embeddings(model, inp, dig, FeatureCache(), ("t", "", 0), VLMStats())
        keys = position_keys(inp["input_ids"][0].tolist(), image_token_id(model), dig)
        return EmbedsPrefill(decoder, embeds, keys).prefill(inp["input_ids"])

    dec = StaticDecoder(model, 256, use_graph=False)
    prefill(dec, inputs, digests)
    turn2 = next_turn(inputs, [5, 6, 7], 8, seed=4)
    got = prefill(dec, turn2, digests)
    assert dec.reused == inputs["input_ids"].shape[1]
    assert torch.allclose(got, prefill(StaticDecoder(model, 256, use_graph=False), turn2, digests), atol=1e-4)

    changed = dict(turn2, pixel_values=turn2["pixel_values"].clone())
    changed["pixel_values"][1] = -changed["pixel_values"][1]
    second_image_at = [i for i, t in enumerate(turn2["input_ids"][0].tolist()) if t == image_token_id(model)]
    second_image_at = second_image_at[len(second_image_at) // 2]
    got = prefill(dec, changed, [digests[0], "another picture"])
    assert dec.reused == second_image_at
    full = prefill(StaticDecoder(model, 256, use_graph=False), changed, [digests[0], "another picture"])
    assert torch.allclose(got, full, atol=1e-4)

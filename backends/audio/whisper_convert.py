"""CTranslate2 Whisper <-> transformers `WhisperForConditionalGeneration`, offline, both ways.

No tool converts CTranslate2 back; this is the inverse of CTranslate2's own Whisper loader
(`ctranslate2/converters/transformers.py::WhisperLoader`) over its binary format (`specs/model_spec.py::_serialize`):
- model.bin: u32 version (6), string spec name ("WhisperSpec"), u32 revision, u32 count, then per variable:
  string name, u8 rank, u32 dims, u8 dtype id (float32, int8, int16, int32, float16, bfloat16), u32 bytes, data;
  then u32 alias count and (alias, target) string pairs (`decoder/projection/weight` -> the token embeddings).
  Strings are u16 length (with the NUL) + bytes + NUL.
- self-attention `linear_0` is q, k, v fused along rows (k has no bias in Whisper: CTranslate2 stores zeros);
  cross-attention `linear_0` is q and `linear_1` is k, v fused; the last linear is the output projection;
  `layer_norm` gamma/beta are weight/bias; conv1/conv2 and the position tables are copied as they are.
- int8 weights come with a per-row `weight_scale` (q = round(w * scale)): they are dequantised to float32.
The tokenizer (tokenizer.json), suppress lists, language ids and alignment heads come from the CT2 folder's
config.json, so the transformers copy generates the same tokens and keeps word-timestamp heads.

`export_to_ct2` is the forward direction (CTranslate2's TransformersConverter) for fine-tuned models.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
SOT, EOT, NO_TIMESTAMPS = "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>"


class ConversionError(ValueError):
    """The CTranslate2 folder is not a Whisper model this converter understands; the message says why."""


def read_ct2(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Variables of a CTranslate2 model.bin (name -> array; bfloat16 as float32) and its aliases."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ConversionError(f"{path}: truncated at byte {pos} (file has {len(data)} bytes)")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    def string() -> str:
        nonlocal pos
        (n,) = take("<H")
        text = data[pos : pos + n - 1].decode("utf-8")
        pos += n
        return text

    version, name, revision = take("<I")[0], string(), take("<I")[0]
    if name != "WhisperSpec" or version < 5:
        raise ConversionError(f"{path}: a {name!r} model (binary version {version}), not a CTranslate2 Whisper")
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("<I")[0]):
        key = string()
        rank = take("<B")[0]
        shape = take(f"<{rank}I") if rank else ()
        dtype, nbytes = DTYPES[take("<B")[0]], take("<I")[0]
        if pos + nbytes > len(data):
            raise ConversionError(f"{path}: truncated inside {key!r} (file has {len(data)} bytes)")
        raw = data[pos : pos + nbytes]
        pos += nbytes
        if dtype == "bfloat16":  # numpy has no bfloat16: the high half of a float32
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype)
        variables[key] = arr.reshape(shape)
    aliases = {string(): string() for _ in range(take("<I")[0])}
    log.debug("read %s: %d variables, revision %d", path, len(variables), revision)
    return variables, aliases


def _weight(v: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    w = v[f"{prefix}/weight"]
    if f"{prefix}/weight_scale" in v:  # int8: q = round(w * scale) per output row
        scale = v[f"{prefix}/weight_scale"].astype(np.float32)
        return w.astype(np.float32) / scale.reshape(-1, *([1] * (w.ndim - 1)))
    return w.astype(np.float32)


def _linear(v, prefix: str, hf: str, out: dict, *, bias: bool = True) -> None:
    out[f"{hf}.weight"] = _weight(v, prefix)
    if bias and f"{prefix}/bias" in v:
        out[f"{hf}.bias"] = v[f"{prefix}/bias"].astype(np.float32)


def _split_linear(v, prefix: str, names: list[str], out: dict) -> None:
    """A fused CT2 linear back into its parts; Whisper's k_proj has no bias (its fused slice must be zero)."""
    w = _weight(v, prefix)
    b = v.get(f"{prefix}/bias")
    n = w.shape[0] // len(names)
    for i, hf in enumerate(names):
        out[f"{hf}.weight"] = w[i * n : (i + 1) * n]
        part = None if b is None else b[i * n : (i + 1) * n].astype(np.float32)
        if hf.endswith("k_proj"):
            if part is not None and np.abs(part).max() > 0:
                raise ConversionError(f"{prefix}: k bias is not zero; not a Whisper attention")
            continue
        if part is not None:
            out[f"{hf}.bias"] = part


def _norm(v, prefix: str, hf: str, out: dict) -> None:
    out[f"{hf}.weight"] = v[f"{prefix}/gamma"].astype(np.float32)
    out[f"{hf}.bias"] = v[f"{prefix}/beta"].astype(np.float32)


def state_dict_from_ct2(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' Whisper state dict (float32 numpy) from CTranslate2 variables."""
    out: dict[str, np.ndarray] = {}
    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        out[f"{hf}.embed_positions.weight"] = v[f"{side}/position_encodings/encodings"].astype(np.float32)
        _norm(v, f"{side}/layer_norm", f"{hf}.layer_norm", out)
        for i in range(_count_layers(v, side)):
            ct, layer = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            attn = f"{layer}.self_attn"
            _split_linear(v, f"{ct}/self_attention/linear_0", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"],
                          out)  # fmt: skip
            _linear(v, f"{ct}/self_attention/linear_1", f"{attn}.out_proj", out)
            _norm(v, f"{ct}/self_attention/layer_norm", f"{layer}.self_attn_layer_norm", out)
            if side == "decoder":
                cross = f"{layer}.encoder_attn"
                _linear(v, f"{ct}/attention/linear_0", f"{cross}.q_proj", out)
                _split_linear(v, f"{ct}/attention/linear_1", [f"{cross}.k_proj", f"{cross}.v_proj"], out)
                _linear(v, f"{ct}/attention/linear_2", f"{cross}.out_proj", out)
                _norm(v, f"{ct}/attention/layer_norm", f"{layer}.encoder_attn_layer_norm", out)
            _linear(v, f"{ct}/ffn/linear_0", f"{layer}.fc1", out)
            _linear(v, f"{ct}/ffn/linear_1", f"{layer}.fc2", out)
            _norm(v, f"{ct}/ffn/layer_norm", f"{layer}.final_layer_norm", out)
    for conv in ("conv1", "conv2"):
        out[f"model.encoder.{conv}.weight"] = _weight(v, f"encoder/{conv}")
        out[f"model.encoder.{conv}.bias"] = v[f"encoder/{conv}/bias"].astype(np.float32)
    out["model.decoder.embed_tokens.weight"] = _weight(v, "decoder/embeddings")
    return out


def _count_layers(v: dict[str, np.ndarray], side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in v:
        n += 1
    if n == 0:
        raise ConversionError(f"no {side} layers found in model.bin")
    return n


def whisper_config(v: dict[str, np.ndarray], ct2_config: dict, vocab: dict[str, int]) -> Any:
    """A transformers WhisperConfig with the shapes of these variables and the CT2 folder's token settings."""
    from transformers import WhisperConfig

    d_model = v["encoder/conv1/weight"].shape[0]
    eot = vocab[EOT]
    return WhisperConfig(
        vocab_size=v["decoder/embeddings/weight"].shape[0], num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model, encoder_layers=_count_layers(v, "encoder"), decoder_layers=_count_layers(v, "decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]), decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        decoder_start_token_id=vocab[SOT], eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),
        tie_word_embeddings=True,
    )  # fmt: skip


def generation_config(config: Any, ct2_config: dict, vocab: dict[str, int]) -> Any:
    """transformers' Whisper generation settings (what openai/whisper-* ship), from the CT2 folder."""
    from transformers import GenerationConfig

    multilingual = config.vocab_size >= 51865  # CTranslate2's own test (models/whisper.cc)
    ids = {t: i for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>")}
    gen = GenerationConfig(
        decoder_start_token_id=vocab[SOT], bos_token_id=vocab[EOT], eos_token_id=vocab[EOT],
        pad_token_id=vocab[EOT], no_timestamps_token_id=vocab[NO_TIMESTAMPS],
        prev_sot_token_id=ids.get("<|startofprev|>"), max_length=config.max_target_positions,
        suppress_tokens=list(config.suppress_tokens), begin_suppress_tokens=list(config.begin_suppress_tokens),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads") or []], is_multilingual=multilingual,
        max_initial_timestamp_index=50, return_timestamps=False,
    )  # fmt: skip
    by_id = {i: t for t, i in ids.items()}
    if ct2_config.get("lang_ids"):  # tiny.en's CT2 folder lists them too: kept so a round trip is exact
        gen.lang_to_id = {by_id[i]: i for i in ct2_config["lang_ids"] if i in by_id}
    if multilingual:
        gen.task_to_id = {"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]}
    return gen


def _vocab(folder: Path) -> dict[str, int]:
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(tok["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    return vocab


def ct2_to_transformers(ct2_dir: Path, out_dir: Path) -> Path:
    """Write a transformers Whisper folder (safetensors, processor, generation config) from a CT2 Whisper folder."""
    import torch
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    from studio.safety import atomic_folder

    ct2_dir = Path(ct2_dir)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (ct2_dir / name).is_file():
            raise ConversionError(f"{ct2_dir} has no {name}: not a faster-whisper model folder")
    variables, _ = read_ct2(ct2_dir / "model.bin")
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    vocab = _vocab(ct2_dir)
    config = whisper_config(variables, ct2_config, vocab)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in state_dict_from_ct2(variables).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the token embeddings
    if missing or unexpected:
        raise ConversionError(f"weights do not fit WhisperForConditionalGeneration: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")  # fmt: skip
    model.tie_weights()
    model.generation_config = generation_config(config, ct2_config, vocab)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"), pad_token=EOT)
    processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=config.num_mel_bins), tokenizer)
    with atomic_folder(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        processor.feature_extractor.save_pretrained(tmp)  # preprocessor_config.json: faster-whisper reads n_mels
    log.info("converted %s -> %s (%d tensors, %.1f M parameters)", ct2_dir, out_dir, len(state),
             sum(p.numel() for p in model.parameters()) / 1e6)  # fmt: skip
    return Path(out_dir)


def export_to_ct2(hf_dir: Path, out_dir: Path, quantization: str = "float16") -> Path:
    """A transformers Whisper folder -> a faster-whisper folder (CTranslate2), alignment heads carried over from
    its generation config, tokenizer and preprocessor copied so faster-whisper finds them."""
    from ctranslate2.converters import TransformersConverter

    from studio.safety import atomic_folder

    hf_dir = Path(hf_dir)
    copy = [n for n in ("tokenizer.json", "preprocessor_config.json") if (hf_dir / n).is_file()]
    with atomic_folder(Path(out_dir)) as tmp:
        TransformersConverter(str(hf_dir), copy_files=copy).convert(str(tmp), quantization=quantization, force=True)
        heads = json.loads((hf_dir / "generation_config.json").read_text(encoding="utf-8")).get("alignment_heads")
        written = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        if heads and written.get("alignment_heads") != heads:
            raise ConversionError(f"alignment heads were not carried over: {written.get('alignment_heads')}")
    return Path(out_dir)


def compare_ct2(a: Path, b: Path) -> dict[str, float]:
    """Largest absolute difference per variable between two CT2 model.bin files (dequantised). A tensor missing
    on one side or of another shape is inf; option scalars only one CTranslate2 version writes are skipped."""
    va, _ = read_ct2(Path(a))
    vb, _ = read_ct2(Path(b))
    diffs = {}
    for key in sorted(set(va) | set(vb)):
        if key.endswith("weight_scale"):
            continue
        one_side_flag = (key not in va and vb[key].ndim == 0) or (key not in vb and va[key].ndim == 0)
        if one_side_flag:  # a newer CTranslate2 writes extra option scalars (e.g. decoder/scale_alibi)
            continue
        if key not in va or key not in vb or va[key].shape != vb[key].shape:
            diffs[key] = float("inf")
            continue
        x = _weight(va, key[:-7]) if key.endswith("/weight") else va[key].astype(np.float64)
        y = _weight(vb, key[:-7]) if key.endswith("/weight") else vb[key].astype(np.float64)
        diffs[key] = float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) if x.size else 0.0
    return diffs

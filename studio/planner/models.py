"""What the planner knows about a model without loading it: its family and architecture numbers.

Sources, cheapest first: a built-in preset (the published config.json numbers of the catalog's models, so a model
can be planned before it is downloaded), a transformers folder (config.json + the safetensors headers for the
parameter count), a diffusers folder (model_index.json + each component's safetensors headers), or a GGUF file
(its header: architecture, block count, widths, vocabulary, and the tensor table). No weights are read: safetensors
headers go through `studio.safety.safetensors_header`; a GGUF header is parsed here from a memory map (metadata and
the tensor table; only the header pages are touched, the vocabulary array is skipped, not decoded).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("llm", "sd15", "sdxl", "whisper", "yolo")


class ModelInfoError(ValueError):
    """The folder or file is not a model the planner can read; the message says what is missing."""


@dataclass(frozen=True)
class ModelInfo:
    """`config`: for an LLM the text config keys (hidden_size, num_hidden_layers, ...); for Whisper d_model and
    layer counts; for YOLO the width multiple; for diffusion the component parameter counts (`components`)."""

    family: str
    name: str
    params: int
    config: dict[str, Any] = field(default_factory=dict)
    components: dict[str, int] = field(default_factory=dict)  # diffusion: component -> parameters
    source: str = "preset"  # "preset", "config.json", "gguf", "diffusers folder"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelInfoError(f"family {self.family!r}: the planner knows {', '.join(FAMILIES)}")
        if self.params <= 0:
            raise ModelInfoError(f"{self.name}: parameter count must be positive, got {self.params}")

    @property
    def shape_label(self) -> str:
        """A short description of the architecture for tables and the footprint store ("llama 32x4096, 8.0B")."""
        c = self.config
        if self.family == "llm":
            return f"{c.get('model_type', 'llm')} {c['num_hidden_layers']}x{c['hidden_size']}, {self.params / 1e9:.1f}B"
        return f"{self.family} {self.params / 1e6:.0f}M"


def llm_linear_shapes(c: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear kind of one decoder layer."""
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    q, kv, inter = heads * head_dim, (c.get("num_key_value_heads") or heads) * head_dim, c["intermediate_size"]
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}  # fmt: skip


def llm_params(c: dict[str, Any]) -> int:
    layer = sum(i * o for i, o in llm_linear_shapes(c).values())
    table = c["vocab_size"] * c["hidden_size"]
    return c["num_hidden_layers"] * layer + table * (1 if c.get("tie_word_embeddings") else 2)


def _llm(name: str, **c: Any) -> ModelInfo:
    c.setdefault("model_type", "llama")
    return ModelInfo("llm", name, llm_params(c), c)


PRESETS: dict[str, ModelInfo] = {
    "llama-3.1-8b-instruct": _llm("Llama-3.1-8B", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                  num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                  tie_word_embeddings=False),
    "llama-2-13b": _llm("Llama-2-13B", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, intermediate_size=13824, vocab_size=32000, tie_word_embeddings=False),
    "qwen2.5-7b-instruct": _llm("Qwen2.5-7B", model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                                vocab_size=152064, tie_word_embeddings=False),
    "phi-3-mini": _llm("Phi-3-mini", model_type="phi3", hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=8192, vocab_size=32064, tie_word_embeddings=False),
    "smollm2-1.7b-instruct": _llm("SmolLM2-1.7B", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                                  num_key_value_heads=32, intermediate_size=8192, vocab_size=49152,
                                  tie_word_embeddings=True),
    "smollm2-135m": _llm("SmolLM2-135M", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "sd-1.5": ModelInfo("sd15", "Stable Diffusion 1.5", 1_066_235_307,
                        components={"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}),
    "sdxl-base-1.0": ModelInfo("sdxl", "Stable Diffusion XL base", 3_468_846_151,
                               components={"unet": 2_567_463_684, "text_encoder": 123_060_480,
                                           "text_encoder_2": 694_659_840, "vae": 83_653_863}),
    "whisper-tiny.en": ModelInfo("whisper", "Whisper tiny.en", 37_760_640, {"d_model": 384, "decoder_layers": 4,
                                 "encoder_layers": 4, "encoder_ffn_dim": 1536, "vocab_size": 51864}),
    "whisper-base": ModelInfo("whisper", "Whisper base", 72_593_920, {"d_model": 512, "decoder_layers": 6,
                              "encoder_layers": 6, "encoder_ffn_dim": 2048, "vocab_size": 51865}),
    "whisper-small": ModelInfo("whisper", "Whisper small", 241_734_912, {"d_model": 768, "decoder_layers": 12,
                               "encoder_layers": 12, "encoder_ffn_dim": 3072, "vocab_size": 51865}),
    "whisper-medium": ModelInfo("whisper", "Whisper medium", 763_857_920, {"d_model": 1024, "decoder_layers": 24,
                                "encoder_layers": 24, "encoder_ffn_dim": 4096, "vocab_size": 51865}),
    "whisper-large-v3": ModelInfo("whisper", "Whisper large-v3", 1_543_490_560, {"d_model": 1280, "decoder_layers": 32,
                                  "encoder_layers": 32, "encoder_ffn_dim": 5120, "vocab_size": 51866}),
    "yolov8n": ModelInfo("yolo", "YOLOv8n", 3_157_200, {"width": 0.25}),
    "yolov8s": ModelInfo("yolo", "YOLOv8s", 11_166_560, {"width": 0.50}),
    "yolov8m": ModelInfo("yolo", "YOLOv8m", 25_902_640, {"width": 0.75}),
    "yolo11n": ModelInfo("yolo", "YOLO11n", 2_624_080, {"width": 0.25}),
}  # fmt: skip
ALIASES = {"stable-diffusion-1.5": "sd-1.5", "sd15": "sd-1.5", "sdxl": "sdxl-base-1.0", "llama-3.1-8b": "llama-3.1-8b-instruct",
           "yolov8s-fall": "yolov8s", "yolov8s-coco": "yolov8s", "yolov8s-yaml": "yolov8s", "yolov8n-yaml": "yolov8n",
           "yolo11n-yaml": "yolo11n"}  # fmt: skip


def preset(model_id: str) -> ModelInfo | None:
    """The built-in architecture for a catalog id (or a close name), None when there is none."""
    key = model_id.split(":", 1)[-1].lower()
    return PRESETS.get(ALIASES.get(key, key))


# ---- folders and files -----------------------------------------------------------------------------------------
LLM_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def read_model(path: Path | str) -> ModelInfo:
    """ModelInfo from a transformers folder, a diffusers folder or a .gguf file (headers only)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return read_gguf(path)
    if not path.is_dir():
        raise ModelInfoError(f"{path} is neither a model folder nor a .gguf file")
    if (path / "model_index.json").is_file():
        return _read_diffusers(path)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return read_gguf(ggufs[0])
        raise ModelInfoError(f"{path} has no config.json, model_index.json or .gguf file")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return from_config(config, path.name, _safetensors_params(path))


def from_config(config: dict[str, Any], name: str, params: int | None = None) -> ModelInfo:
    """ModelInfo from a config.json dict; `params` from the weights' headers when known (else computed)."""
    text = config.get("text_config", config)
    if config.get("model_type") == "whisper" or "encoder_layers" in config:
        keys = ("d_model", "decoder_layers", "encoder_layers", "encoder_ffn_dim", "vocab_size")
        c = {k: config[k] for k in keys if k in config}
        if len(c) < len(keys):
            raise ModelInfoError(f"{name}: a Whisper config.json needs {', '.join(keys)}")
        return ModelInfo("whisper", name, params or _whisper_params(c), c, source="config.json")
    missing = [k for k in LLM_KEYS if k not in text]
    if missing:
        raise ModelInfoError(f"{name}: config.json lacks {', '.join(missing)}; not a causal LM the planner knows")
    c = {k: text[k] for k in (*LLM_KEYS, "num_key_value_heads", "head_dim", "model_type") if text.get(k) is not None}
    c["tie_word_embeddings"] = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    return ModelInfo("llm", name, params or llm_params(c), c, source="config.json")


def _whisper_params(c: dict[str, Any]) -> int:
    d, f = c["d_model"], c["encoder_ffn_dim"]
    layer = 4 * d * d + 2 * d * f
    return c["encoder_layers"] * layer + c["decoder_layers"] * (layer + 4 * d * d) + c["vocab_size"] * d


def _safetensors_params(folder: Path) -> int | None:
    from studio.safety import safetensors_numel

    files = sorted(folder.glob("*.safetensors"))
    return sum(safetensors_numel(f) for f in files) if files else None


def _read_diffusers(folder: Path) -> ModelInfo:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    components = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        if name in index and (folder / name).is_dir():
            components[name] = _safetensors_params(folder / name) or 0
    family = "sdxl" if "text_encoder_2" in index else "sd15"
    total = sum(components.values())
    if not total:
        raise ModelInfoError(f"{folder}: no safetensors weights in its unet/text_encoder/vae folders")
    return ModelInfo(family, folder.name, total, components=components, source="diffusers folder")


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _GGUFCursor:
    """Reads a GGUF header from a memory map: scalars and strings are decoded, arrays are skipped (their length is
    kept), so a 49,152-token vocabulary costs a loop over lengths, not 49,152 Python objects."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        import struct

        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if n > 1 << 24:
            raise ValueError(f"string of {n} bytes at offset {self.pos}")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, kind: int) -> Any:
        import struct

        if kind in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.take("<I"), self.take("<Q")
            if item in _GGUF_SCALARS:
                self.pos += n * struct.calcsize(_GGUF_SCALARS[item])
            else:
                for _ in range(n):
                    self.value(item)
            return ("array", n)
        raise ValueError(f"unknown GGUF value type {kind} at offset {self.pos}")


def _gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(metadata, tensor name -> shape) of a GGUF file (version 2 or 3)."""
    import mmap

    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _GGUFCursor(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        cur.pos = 4
        version, n_tensors, n_kv = cur.take("<I"), cur.take("<Q"), cur.take("<Q")
        if version not in (2, 3) or n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ValueError(f"version {version}, {n_tensors} tensors, {n_kv} keys")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.take("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
            cur.take("<I")  # ggml type
            cur.take("<Q")  # data offset
            tensors[name] = dims
    return meta, tensors


def read_gguf(path: Path) -> ModelInfo:
    """Architecture and parameter count from a GGUF header and tensor table (no tensor data is read)."""
    from studio.safety import check_weights_file

    check_weights_file(path)
    try:
        meta, tensors = _gguf_header(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ModelInfoError(f"{path.name} is not a readable GGUF file ({e})") from None
    arch = meta.get("general.architecture") or "llama"
    tokens = meta.get("tokenizer.ggml.tokens")
    c: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": meta.get(f"{arch}.embedding_length"),
        "num_hidden_layers": meta.get(f"{arch}.block_count"),
        "num_attention_heads": meta.get(f"{arch}.attention.head_count"),
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv"),
        "intermediate_size": meta.get(f"{arch}.feed_forward_length"),
        "vocab_size": tokens[1] if isinstance(tokens, tuple) else meta.get(f"{arch}.vocab_size"),
    }
    if any(c[k] is None for k in LLM_KEYS):
        raise ModelInfoError(f"{path.name}: the GGUF header lacks {[k for k in LLM_KEYS if c[k] is None]}")
    c = {k: v for k, v in c.items() if v is not None}
    c["tie_word_embeddings"] = "output.weight" not in tensors
    params = sum(math.prod(dims) for dims in tensors.values())
    return ModelInfo("llm", path.stem, int(params), c, source="gguf")

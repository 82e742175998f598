"""pyannote.audio 4 diarization pipelines, for users who have the (gated) models on disk.

The pipeline folder comes from the Models tab (a Hub download into `<models_dir>/hub/...`, for which the user needs
a token with the model's terms accepted) or from a folder the user names. pyannote loads its checkpoints with
`torch.load(weights_only=False)`, i.e. as pickles that can run code, so the folder must lie in one the owner's
settings trust (`Settings.model_dirs()`: the models folder and `trusted_model_dirs`); a request cannot widen that.
The audio is handed over as a waveform tensor (`{"waveform", "sample_rate"}`), so torchcodec/FFmpeg libraries are
not needed; note that pyannote needs the whole waveform in memory (about 230 MB per hour at 16 kHz float32).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backends.audio.pcm import SAMPLE_RATE, load_pcm
from backends.audio.types import DiarizeOptions, SpeakerTurn
from studio.safety import UnsafePathError, allowed_path

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)


class PyannoteLoader:
    """Residency Loader for one pyannote pipeline (not an nn.Module: it moves with its own `.to(device)`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = f"speaker:pyannote:{folder.resolve()}"

    def estimate_bytes(self) -> int:
        return 600 * 2**20

    def load(self, device: str) -> Any:
        from pyannote.audio import Pipeline

        pipeline = Pipeline.from_pretrained(str(self.folder))
        if pipeline is None:
            raise ValueError(f"{self.folder} is not a pyannote pipeline folder (no usable config.yaml)")
        log.info("loaded pyannote pipeline from %s on %s", self.folder, device)
        return self.to_device(pipeline, device)

    def to_device(self, obj: Any, device: str) -> Any:
        import torch

        return obj.to(torch.device(device))

    def release(self, obj: Any) -> None:
        """Dropped by the manager; nothing else to free."""


def pipeline_folder(ctx: Services, source: str) -> Path:
    """A catalog id ("pyannote-diarization-3.1") that was downloaded, or a folder holding config.yaml."""
    try:
        spec = ctx.catalog.get(source)
    except KeyError:
        spec = None
    if spec is not None:
        path = ctx.catalog.local_path(spec)
        if path is None:
            raise FileNotFoundError(
                f"{spec.title} is not downloaded. It is gated: accept its terms on the Hugging Face Hub, set HF_TOKEN "
                "and download it in the Models tab; or use the offline engine."
            )
        return path
    folder = Path(source).expanduser()
    if not (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"{source!r} is neither a downloaded pyannote model nor a folder with config.yaml")
    try:
        return allowed_path(folder, ctx.settings.model_dirs(), what="pyannote pipeline folder")
    except UnsafePathError as e:
        raise PermissionError(
            f"{e} pyannote loads its checkpoints as pickles, which can run code: only folders the owner trusts are "
            "used. Otherwise use the offline engine."
        ) from None


def run_pipeline(pipeline: Any, pcm: np.ndarray, num_speakers: int | None = None) -> list[SpeakerTurn]:
    """Apply a pyannote pipeline to 16 kHz mono samples; return its speaker turns sorted by start."""
    import torch

    if pcm.size == 0:
        return []
    kwargs = {"num_speakers": num_speakers} if num_speakers else {}
    out = pipeline(
        {"waveform": torch.from_numpy(np.ascontiguousarray(pcm))[None], "sample_rate": SAMPLE_RATE}, **kwargs
    )
    annotation = getattr(out, "speaker_diarization", out)  # pyannote 4 returns DiarizeOutput; 3.x an Annotation
    turns = [
        SpeakerTurn(round(seg.start, 3), round(seg.end, 3), str(label))
        for seg, _, label in annotation.itertracks(yield_label=True)
    ]
    return sorted(turns, key=lambda t: (t.start, t.end))


def diarize_with_pyannote(ctx: Services, path: str | Path, opts: DiarizeOptions) -> list[SpeakerTurn]:
    folder = pipeline_folder(ctx, opts.pyannote_source)
    loader = PyannoteLoader(folder)
    if not ctx.residency.is_registered(loader.key):
        ctx.residency.register(loader)
    pcm = load_pcm(path)
    return ctx.residency.run(loader.key, lambda pipe: run_pipeline(pipe, pcm, opts.num_speakers))

"""Who spoke when: an offline engine (Silero VAD + Resemblyzer GE2E embeddings + clustering) and pyannote.audio 4.

Offline engine policy:
- speech regions come from the streaming VAD (backends.audio.vad); each region is cut into 1.6 s sub-windows (the length
  the GE2E encoder was trained on) every 0.8 s, and each sub-window gets one 256-d embedding. Only embeddings and
  times are kept, so a 3-hour file costs a few MB here.
- with the speaker count given, clustering is spectral: cosine affinities, each row pruned to its strongest 30 %,
  normalised Laplacian, k-means on the first k eigenvectors.
- with the count automatic, it is average-linkage agglomerative clustering cut at cosine distance `AUTO_THRESHOLD`,
  then clusters of fewer than `MIN_CLUSTER` windows (< ~2.4 s of speech: a cough, a laugh, one odd window) join the
  nearest real cluster. The eigengap of a Laplacian over a few dozen windows is unstable: a 3-turn A-B-A dialogue
  came out as 3-5 speakers. Within-speaker merges of GE2E windows end near 0.25, cross-speaker merges start
  near 0.31 on espeak-ng voices and on pyannote's real sample (studio/bench/asr.py measures both).
- above `MAX_CLUSTER_POINTS` embeddings a spread-out subset is clustered and the rest join the nearest centroid
  (bounded memory).
- each sub-window speaks for the 0.8 s around its centre; a 3-tap majority filter removes one-window flicker;
  speakers are then numbered SPEAKER_1, SPEAKER_2, ... in the order they first speak.

pyannote.audio pipelines load pickled checkpoints (`weights_only=False` inside pyannote), so a pipeline folder is
used only inside the folders the owner's settings trust (the models folder and `trusted_model_dirs`); no request can
mark one trusted, and the studio never downloads one at run time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backends.audio.types import DiarizeOptions, Segment, SpeakerTurn
from backends.audio.vad import SR, SpeechWindow, SpeechWindows, VadConfig

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)

WIN_FRAMES, HOP_FRAMES = 160, 80  # mel frames (10 ms): 1.6 s windows every 0.8 s
MAX_CLUSTER_POINTS = 2000  # ~30 min of speech; a partial eigensolve of 2000x2000 takes ~2 s on 2 cores
PRUNE = 0.3  # fraction of each affinity row kept for spectral clustering
AUTO_THRESHOLD = 0.3  # cosine distance at which the automatic count stops merging clusters
MIN_CLUSTER = 3  # an automatic cluster of fewer windows is not a speaker of its own


# Resemblyzer's hyper-parameters (resemblyzer/hparams.py), restated so that embedding needs neither librosa nor
# webrtcvad at run time (importing Resemblyzer costs ~3 s and its first mel ~2 s of JIT); a test checks they match.
MEL_BANDS, MEL_WINDOW, MEL_HOP = 40, 400, 160  # 25 ms window, 10 ms hop at 16 kHz
HIDDEN, LAYERS, EMBEDDING = 256, 3, 256
NORM_DBFS = -30


def _ge2e_module():
    """The GE2E speaker encoder of Resemblyzer (3-layer LSTM + linear), built here so that its weights load
    through `load_torch_weights` (weights_only=True) instead of Resemblyzer's own plain torch.load."""
    from torch import nn

    class GE2E(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(MEL_BANDS, HIDDEN, LAYERS, batch_first=True)
            self.linear = nn.Linear(HIDDEN, EMBEDDING)

        def forward(self, mels):  # (B, T, 40) -> (B, 256), L2-normalised
            _, (hidden, _) = self.lstm(mels)
            emb = self.linear(hidden[-1]).clamp_min(0)
            return emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-8)

    return GE2E()


@functools.cache
def _mel_filterbank(sr: int = SR, n_fft: int = MEL_WINDOW, n_mels: int = MEL_BANDS) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels) with its defaults (Slaney mel scale and area normalisation), (n_mels, F)."""
    from torchaudio.functional import melscale_fbanks

    fb = melscale_fbanks(1 + n_fft // 2, 0.0, sr / 2, n_mels, sr, norm="slaney", mel_scale="slaney")  # (F, n_mels)
    return fb.T.double().numpy()


def _mels(audio: np.ndarray) -> np.ndarray:
    """Resemblyzer's front end: volume raised to -30 dBFS (never lowered), 40-band mel power spectrogram, (T, 40).

    Same numbers as resemblyzer.audio.wav_to_mel_spectrogram (librosa: periodic Hann, centred, zero-padded STFT)."""
    audio = np.asarray(audio, np.float32)
    rms = float(np.sqrt(np.mean(np.square(audio * 32767.0)))) if audio.size else 0.0
    if rms < 3.0:  # below -80 dBFS: silence, nothing to embed
        return np.zeros((0, MEL_BANDS), np.float32)
    gain = 10 ** ((NORM_DBFS - 20 * np.log10(rms / 32767.0)) / 20)
    audio = audio * max(1.0, gain)
    padded = np.pad(audio, MEL_WINDOW // 2)
    n = 1 + (padded.size - MEL_WINDOW) // MEL_HOP
    frames = np.lib.stride_tricks.as_strided(
        padded, (n, MEL_WINDOW), (padded.strides[0] * MEL_HOP, padded.strides[0]), writeable=False
    )
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(MEL_WINDOW) / MEL_WINDOW)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (T, 201)
    return (power @ _mel_filterbank().T).astype(np.float32)


class SpeakerEncoderLoader:
    key = "speaker:resemblyzer-ge2e"

    def estimate_bytes(self) -> int:
        return 6 * 2**20

    def load(self, device: str) -> Any:
        from studio.catalog import package_dir
        from studio.safety import load_torch_weights

        root = package_dir("resemblyzer")
        if root is None:
            raise FileNotFoundError("Resemblyzer is not installed: pip install Resemblyzer==0.1.4")
        state = load_torch_weights(root / "pretrained.pt")["model_state"]
        model = _ge2e_module()
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
        log.info("loaded %s (GE2E, %d parameters)", self.key, sum(p.numel() for p in model.parameters()))
        return model.eval().to(device)

    def release(self, obj: Any) -> None:
        """The manager drops its reference; nothing else holds the module."""


class SpeakerTracker:
    """Collects (time span, embedding) pairs window by window; `finish` clusters them into speaker turns."""

    def __init__(self, backend: DiarizeBackend) -> None:
        self._backend = backend
        self._spans: list[tuple[float, float, float, float]] = []  # (own_start, own_end, region_start, region_end)
        self._embs: list[np.ndarray] = []

    def add(self, window: SpeechWindow) -> None:
        items: list[tuple[np.ndarray, tuple[float, float, float, float]]] = []
        for a, b in window.regions:
            mel = _mels(window.audio[max(0, a - window.start) : b - window.start])
            items.extend(_sub_windows(mel, a / SR, b / SR))
        if items:
            self._embs.append(self._backend.embed([m for m, _ in items]))
            self._spans.extend(span for _, span in items)

    def finish(self, num_speakers: int | None = None, max_speakers: int = 8) -> list[SpeakerTurn]:
        if not self._spans:
            return []
        labels = cluster(np.concatenate(self._embs), num_speakers, max_speakers)
        return _turns(self._spans, labels)


def _sub_windows(mel: np.ndarray, start_s: float, end_s: float) -> Iterator[tuple[np.ndarray, tuple]]:
    """1.6 s mel windows every 0.8 s over one region; a short region is one window of what there is."""
    n = mel.shape[0]
    if n < 20:  # < 0.2 s of speech: too little to say who it is
        return
    starts = [0] if n <= WIN_FRAMES else list(range(0, n - WIN_FRAMES + 1, HOP_FRAMES))
    if n > WIN_FRAMES and starts[-1] + WIN_FRAMES < n:
        starts.append(n - WIN_FRAMES)
    for k, i in enumerate(starts):
        centre = start_s + (i + min(WIN_FRAMES, n) / 2) / 100
        own_a = start_s if k == 0 else centre - HOP_FRAMES / 200
        own_b = end_s if k == len(starts) - 1 else centre + HOP_FRAMES / 200
        yield mel[i : i + WIN_FRAMES], (max(start_s, own_a), min(end_s, own_b), start_s, end_s)


def cluster(embs: np.ndarray, num_speakers: int | None = None, max_speakers: int = 8) -> np.ndarray:
    """Speaker index per embedding (0 = first to speak).

    A given count: spectral clustering; each row of the affinity matrix keeps its top `PRUNE` fraction (the rest is
    zeroed), which removes the weak cross-speaker links GE2E gives real voices (~0.68 across vs ~0.76 within on
    pyannote's sample). An automatic count: `_automatic` (linkage cut at a distance, tiny clusters absorbed). Above `MAX_CLUSTER_POINTS` embeddings a spread-out subset is clustered and every embedding joins its nearest
    centroid, so memory stays bounded for hours of audio.
    """
    n = embs.shape[0]
    if n == 1 or num_speakers == 1:
        return np.zeros(n, int)
    idx = np.linspace(0, n - 1, min(n, MAX_CLUSTER_POINTS)).astype(int)
    sub = embs[idx]
    if num_speakers is None:
        labels = _automatic(sub, max_speakers)
    elif sub.shape[0] < 4:  # too few points for a spectrum: plain linkage
        labels = _agglomerative(sub, min(num_speakers, sub.shape[0]), AUTO_THRESHOLD)
    else:
        labels = _spectral(sub, num_speakers, max_speakers)
    if idx.size < n:
        centroids = _normed(np.stack([sub[labels == c].mean(0) for c in range(labels.max() + 1)]))
        labels = (embs @ centroids.T).argmax(1)
    order = {lab: i for i, lab in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[x] for x in labels.tolist()])


def _spectral(x: np.ndarray, k: int | None, max_k: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    n = x.shape[0]
    aff = np.clip(x @ x.T, 0.0, 1.0)
    keep = max(2, round(PRUNE * n))
    aff[aff < np.sort(aff, axis=1)[:, -keep][:, None]] = 0.0
    aff = (aff + aff.T) / 2
    np.fill_diagonal(aff, 0.0)
    d = 1.0 / np.sqrt(aff.sum(1).clip(1e-9))
    lap = np.eye(n) - aff * d[:, None] * d[None, :]
    from scipy.linalg import eigh

    top = min(max(max_k, k or 1), n - 1)
    values, vectors = eigh(lap, subset_by_index=[0, top], driver="evr")  # the smallest top+1 eigenpairs, ascending
    if k is None:
        k = int(np.argmax(np.diff(values))) + 1
    k = min(k, n)
    if k == 1:
        return np.zeros(n, int)
    feats = _normed(vectors[:, :k])
    return KMeans(k, n_init=10, random_state=0).fit_predict(feats)


def _automatic(x: np.ndarray, max_k: int) -> np.ndarray:
    """Linkage cut at `AUTO_THRESHOLD`; clusters under `MIN_CLUSTER` windows join the nearest larger centroid."""
    labels = _agglomerative(x, None, AUTO_THRESHOLD)
    ids, counts = np.unique(labels, return_counts=True)
    big = ids[counts >= MIN_CLUSTER]
    if 0 < big.size < ids.size:
        centroids = _normed(np.stack([x[labels == b].mean(0) for b in big]))
        small = ~np.isin(labels, big)
        labels[small] = big[(x[small] @ centroids.T).argmax(1)]
    if np.unique(labels).size > max_k:
        labels = _agglomerative(x, max_k, AUTO_THRESHOLD)
    return np.unique(labels, return_inverse=True)[1]


def _agglomerative(x: np.ndarray, k: int | None, threshold: float) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    if x.shape[0] < 2:
        return np.zeros(x.shape[0], int)
    algo = AgglomerativeClustering(
        n_clusters=k, distance_threshold=None if k else threshold, metric="cosine", linkage="average"
    )
    return algo.fit_predict(x)


def _normed(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-8)


def _turns(spans: list[tuple[float, float, float, float]], labels: np.ndarray) -> list[SpeakerTurn]:
    """Merge consecutive sub-windows of one speaker within a region; a lone window between two of the same
    other speaker in the same region takes their label."""
    labels = labels.copy()
    for i in range(1, len(labels) - 1):
        same_region = spans[i - 1][2:] == spans[i][2:] == spans[i + 1][2:]
        if same_region and labels[i - 1] == labels[i + 1] != labels[i]:
            labels[i] = labels[i - 1]
    number = {lab: i + 1 for i, lab in enumerate(dict.fromkeys(labels.tolist()))}  # after smoothing: in order again
    turns: list[SpeakerTurn] = []
    for (a, b, _, _), lab in zip(spans, labels, strict=True):
        name = f"SPEAKER_{number[lab]}"
        prev = turns[-1] if turns else None
        if prev is not None and prev.speaker == name and a - prev.end < 0.5:
            turns[-1] = replace(prev, end=round(b, 3))
        else:
            turns.append(SpeakerTurn(round(a, 3), round(b, 3), name))
    return turns


def assign_speakers(segments: list[Segment], turns: list[SpeakerTurn]) -> list[Segment]:
    """Label every word and segment with the speaker who overlaps it most (nearest turn if none overlaps);
    a segment whose words change speaker is split there."""
    if not turns:
        return segments
    out: list[Segment] = []
    for seg in segments:
        if not seg.words:
            out.append(replace(seg, speaker=_speaker_at(turns, seg.start, seg.end)))
            continue
        words = [replace(w, speaker=_speaker_at(turns, w.start, w.end)) for w in seg.words]
        run: list = [words[0]]
        for w in words[1:]:
            if w.speaker != run[-1].speaker:
                out.append(_sub_segment(seg, run))
                run = []
            run.append(w)
        out.append(_sub_segment(seg, run))
    return out


def number_speakers(segments: list[Segment], turns: list[SpeakerTurn]) -> tuple[list[Segment], list[SpeakerTurn]]:
    """Rename speakers SPEAKER_1, SPEAKER_2, ... in the order they first speak in the transcript (then in the
    turns, for a speaker no segment kept), whatever the engine called them (pyannote says SPEAKER_00, ...)."""
    first = [s.speaker for s in sorted(segments, key=lambda s: s.start)] + [
        w.speaker for s in segments for w in s.words
    ]
    first += [t.speaker for t in sorted(turns, key=lambda t: t.start)]
    names = {old: f"SPEAKER_{i + 1}" for i, old in enumerate(dict.fromkeys(x for x in first if x is not None))}
    new_segments = [
        replace(s, speaker=names.get(s.speaker), words=tuple(replace(w, speaker=names.get(w.speaker)) for w in s.words))
        if s.speaker is not None else s
        for s in segments
    ]  # fmt: skip
    return new_segments, [replace(t, speaker=names[t.speaker]) for t in turns]


def _sub_segment(seg: Segment, words: list) -> Segment:
    text = "".join(w.text for w in words).strip()
    return replace(
        seg, start=words[0].start, end=words[-1].end, text=text, words=tuple(words), speaker=words[0].speaker
    )


def _speaker_at(turns: list[SpeakerTurn], start: float, end: float) -> str:
    best, best_overlap, best_dist = turns[0].speaker, 0.0, float("inf")
    for t in turns:
        overlap = min(end, t.end) - max(start, t.start)
        dist = max(t.start - end, start - t.end, 0.0)
        if overlap > best_overlap or (best_overlap == 0.0 and overlap <= 0 and dist < best_dist):
            best, best_overlap, best_dist = t.speaker, max(overlap, 0.0), dist
    return best


class DiarizeBackend:
    def __init__(self, ctx: Services) -> None:
        self.ctx = ctx

    def _encoder_key(self) -> str:
        if not self.ctx.residency.is_registered(SpeakerEncoderLoader.key):
            self.ctx.residency.register(SpeakerEncoderLoader())
        return SpeakerEncoderLoader.key

    def embed(self, mels: list[np.ndarray]) -> np.ndarray:
        """GE2E embeddings (N, 256) of mel windows, batched by length, under a residency lease."""
        import torch

        def _run(model: Any) -> np.ndarray:
            device = next(model.parameters()).device
            out = np.zeros((len(mels), 256), np.float32)
            by_len: dict[int, list[int]] = {}
            for i, m in enumerate(mels):
                by_len.setdefault(m.shape[0], []).append(i)
            with torch.inference_mode():
                for ids in by_len.values():
                    batch = torch.from_numpy(np.stack([mels[i] for i in ids])).to(device)
                    out[ids] = model(batch).float().cpu().numpy()
            return out

        return self.ctx.residency.run(self._encoder_key(), _run)

    def tracker(self) -> SpeakerTracker:
        return SpeakerTracker(self)

    def diarize(self, path: str | Path, opts: DiarizeOptions | None = None) -> list[SpeakerTurn]:
        """Speaker turns of a whole file (streamed, bounded memory for the offline engine)."""
        opts = opts or DiarizeOptions()
        if opts.engine == "pyannote":
            from backends.audio.diarize_pyannote import diarize_with_pyannote

            return diarize_with_pyannote(self.ctx, path, opts)
        from backends.audio.models import register_vad
        from backends.audio.pcm import iter_pcm, mark_last

        tracker = self.tracker()
        windows = SpeechWindows(VadConfig())
        with self.ctx.residency.use(register_vad(self.ctx.residency)) as session:
            windows.set_session(session)
            for chunk, final in mark_last(iter_pcm(path, chunk_s=10.0)):
                for window in windows.feed(chunk, final=final):
                    tracker.add(window)
        return tracker.finish(opts.num_speakers, opts.max_speakers)


def read_rttm(path: Path) -> list[SpeakerTurn]:
    """Reference speaker turns from an RTTM file (all its recordings), via pyannote.database's reader."""
    from pyannote.database.util import load_rttm

    return [
        SpeakerTurn(seg.start, seg.end, str(label))
        for annotation in load_rttm(str(path)).values()
        for seg, _, label in annotation.itertracks(yield_label=True)
    ]


def diarization_error_rate(reference: list[SpeakerTurn], hypothesis: list[SpeakerTurn], collar: float = 0.0) -> float:
    """DER with pyannote.metrics (optimal speaker mapping; overlap counted; `collar` seconds forgiven)."""
    from pyannote.core import Annotation, Segment, Timeline

    def _ann(turns: list[SpeakerTurn]) -> Annotation:
        ann = Annotation()
        for i, t in enumerate(turns):
            ann[Segment(t.start, t.end), i] = t.speaker
        return ann

    from pyannote.metrics.diarization import DiarizationErrorRate

    spans = [t for t in (*reference, *hypothesis)]
    uem = Timeline([Segment(min(t.start for t in spans), max(t.end for t in spans))]) if spans else Timeline()
    metric = DiarizationErrorRate(collar=collar, skip_overlap=False)
    return float(metric(_ann(reference), _ann(hypothesis), uem=uem))  # uem: the span of both, said explicitly

"""Speech: transcription (faster-whisper with VAD windows), speaker labels (offline or pyannote), subtitles and an
LLM post-editor.

Modules: asr (AsrBackend: the transcription stream), whisper_run (decoding its speech windows), types (Segment,
Word, Transcript, SpeakerTurn, DiarizeOptions, AsrUpdate), pcm (decoding any audio to 16 kHz PCM), vad (speech
windows), diarize / diarize_pyannote (who spoke when), models (Whisper and VAD weights), subtitles (SRT/VTT/JSON/TXT),
postedit (punctuation and names by the LLM), whisper_convert (CTranslate2 <-> transformers Whisper), whisper_torch (a
torch Whisper engine, any CUDA), tune_data (fine-tuning folders and manifests, checked), tune / tune_loop (the Whisper
fine-tuning job), wer.
"""

from backends.audio.asr import AsrBackend, AsrUpdate, TranscribeOptions, create, whisper_languages
from backends.audio.diarize import diarization_error_rate, read_rttm
from backends.audio.models import ModelMissing
from backends.audio.pcm import SAMPLE_RATE, AudioInputError, load_pcm, write_wav
from backends.audio.postedit import PostEditOptions, postedit
from backends.audio.subtitles import export as export_transcript
from backends.audio.subtitles import to_srt, to_vtt
from backends.audio.tune import TuneConfig, TuneResult
from backends.audio.tune_data import DatasetError, extract_zip
from backends.audio.tune_loop import WhisperTuner
from backends.audio.types import DiarizeOptions, Segment, SpeakerTurn, Transcript, Word

__all__ = [
    "SAMPLE_RATE",
    "AsrBackend",
    "AsrUpdate",
    "AudioInputError",
    "DatasetError",
    "DiarizeOptions",
    "ModelMissing",
    "PostEditOptions",
    "Segment",
    "SpeakerTurn",
    "TranscribeOptions",
    "Transcript",
    "TuneConfig",
    "TuneResult",
    "WhisperTuner",
    "Word",
    "create",
    "create_whisper_tuner",
    "diarization_error_rate",
    "export_transcript",
    "extract_zip",
    "load_pcm",
    "postedit",
    "read_rttm",
    "to_srt",
    "to_vtt",
    "whisper_languages",
    "write_wav",
]  # fmt: skip


def create_whisper_tuner(services) -> WhisperTuner:
    return WhisperTuner(services)

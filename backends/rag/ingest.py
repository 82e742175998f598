"""Reading notes and code for the RAG index: folder discovery, robust text decoding, PDF text extraction.

Policy: never crash on one bad file. Every file that is not indexed gets a `SkipFile` reason that the ingest
report shows ("binary file", "encrypted PDF: needs its password", "12 MB is over the 10 MB limit", ...).
Decoding order: a BOM (UTF-8, UTF-32, UTF-16) wins; then BOM-less UTF-16 when every other byte is zero; then
strict UTF-8; then cp1252 and finally latin-1, which never fails. Content with null bytes or many control
characters is binary. Hidden files and folders (`.git`, `.env`, ...) and tool caches are not read: they hold
history, secrets or generated data, not notes.
"""

from __future__ import annotations

import codecs
import logging
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARKDOWN_EXT = {".md", ".markdown", ".mdx", ".rst", ".org", ".adoc"}
PYTHON_EXT = {".py", ".pyi", ".pyx"}
CODE_EXT = {
    ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cs", ".java", ".kt", ".scala", ".go", ".rs", ".swift", ".m",
    ".js", ".jsx", ".ts", ".tsx", ".mjs", ".vue", ".svelte", ".rb", ".php", ".pl", ".lua", ".r", ".jl", ".dart",
    ".sh", ".bash", ".zsh", ".fish", ".ps1", ".bat", ".sql", ".html", ".htm", ".css", ".scss", ".xml",
    ".toml", ".yaml", ".yml", ".json", ".jsonl", ".ini", ".cfg", ".conf", ".tex", ".bib",
    ".cmake", ".gradle", ".proto", ".graphql", ".ipynb",
}  # fmt: skip
TEXT_EXT = {".txt", ".text", ".log", ".csv", ".tsv", ".srt", ".vtt"}
PDF_EXT = {".pdf"}
# Formats that are never text: skipped without reading them.
BINARY_EXT = {
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ico", ".heic", ".psd",
    ".mp3", ".wav", ".flac", ".ogg", ".m4a", ".mp4", ".mkv", ".mov", ".avi", ".webm",
    ".zip", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".tar", ".whl", ".jar",
    ".exe", ".dll", ".so", ".dylib", ".o", ".a", ".pyc", ".class", ".bin", ".dat", ".db", ".sqlite",
    ".safetensors", ".pt", ".pth", ".ckpt", ".onnx", ".gguf", ".npy", ".npz", ".pkl", ".parquet",
    ".docx", ".xlsx", ".pptx", ".odt", ".ods", ".doc", ".xls", ".ppt", ".epub", ".ttf", ".otf", ".woff", ".woff2",
}  # fmt: skip
SKIP_DIRS = {"__pycache__", "node_modules", "venv", "env", "site-packages", "dist", "build", "target"}
_CONTROL_OK = {"\t", "\n", "\r", "\f", "\v", "\x1b"}


class SkipFile(Exception):
    """This file is not indexed; the message says why (shown to the user)."""


@dataclass(frozen=True)
class Document:
    """The text of one file. PDFs keep one entry per page so citations can name the page."""

    kind: str  # "markdown" | "python" | "code" | "text" | "pdf"
    pages: tuple[tuple[int, str], ...]  # (page number, text); page 0 for files without pages
    encoding: str = ""


@dataclass(frozen=True)
class FoundFile:
    path: Path
    size: int
    mtime_ns: int


def kind_of(path: Path) -> str | None:
    """The chunking kind for a file name, "pdf", None for known binary formats, or "" when it must be sniffed."""
    ext = path.suffix.lower()
    if ext in MARKDOWN_EXT:
        return "markdown"
    if ext in PYTHON_EXT:
        return "python"
    if ext in CODE_EXT:
        return "code"
    if ext in TEXT_EXT:
        return "text"
    if ext in PDF_EXT:
        return "pdf"
    if ext in BINARY_EXT:
        return None
    return ""


def resolve_folder(text: str) -> Path:
    """A folder path the user typed: quotes and `~` allowed; it must exist and be a folder."""
    raw = (text or "").strip().strip("'\"").strip()
    if not raw:
        raise ValueError("No folder given: type the path of a folder with your notes or code.")
    if "\x00" in raw:
        raise ValueError("The folder path contains a null byte (\\x00); type the path again.")
    path = Path(os.path.expanduser(raw)).resolve()
    if not path.exists():
        raise ValueError(f"Folder {raw!r} does not exist (resolved to {path}); check the path.")
    if not path.is_dir():
        raise ValueError(f"{raw!r} is a file, not a folder: give its folder, or upload the file instead.")
    return path


def discover(root: Path, max_files: int) -> tuple[list[FoundFile], list[str]]:
    """Files under `root` in a stable order, skipping hidden entries, tool caches and links that leave `root`.

    Returns the files and notes (e.g. the count cut off by `max_files`). Memory: one small record per file.
    """
    root = root.resolve()
    found: list[FoundFile] = []
    notes: list[str] = []
    hidden = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        hidden += sum(d.startswith(".") for d in dirnames) + sum(f.startswith(".") for f in filenames)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            try:
                if path.is_symlink() and root not in path.resolve().parents:
                    notes.append(f"{path.relative_to(root)}: a link that points outside the folder; skipped.")
                    continue
                st = path.stat()
            except OSError as e:
                notes.append(f"{path.relative_to(root)}: cannot be read ({e.strerror or e}).")
                continue
            if not path.is_file():
                continue
            if len(found) >= max_files:
                notes.append(f"Stopped at {max_files} files (the limit); ingest sub-folders separately.")
                return found, notes
            found.append(FoundFile(path, st.st_size, st.st_mtime_ns))
    if hidden:
        notes.append(f"{hidden} hidden files/folders (names starting with '.') were not read.")
    return found, notes


# ---- decoding ---------------------------------------------------------------------------------------------------
def _bomless_utf16(sample: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when the zeros sit on one side of mostly-ASCII text, else None."""
    if len(sample) < 4:
        return None
    even, odd = sample[0::2], sample[1::2]
    z_even, z_odd = even.count(0) / len(even), odd.count(0) / len(odd)
    if z_odd > 0.4 and z_even < 0.05:
        return "utf-16-le"
    if z_even > 0.4 and z_odd < 0.05:
        return "utf-16-be"
    return None


def decode_text(data: bytes) -> tuple[str, str]:
    """(text with '\\n' newlines, encoding used). Raises SkipFile for binary content."""
    boms = (
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    )
    encoding = next((enc for bom, enc in boms if data.startswith(bom)), None)
    if encoding is None and b"\x00" in data[:8192]:
        encoding = _bomless_utf16(data[:8192])
        if encoding is None:
            raise SkipFile("binary file (contains null bytes)")
    if encoding is not None:
        text = data.decode(encoding, errors="replace")
    else:
        text, encoding = _decode_8bit(data)
    if _looks_binary(text):
        raise SkipFile("binary file (mostly control characters)")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text, encoding


def _decode_8bit(data: bytes) -> tuple[str, str]:
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1"


def _looks_binary(text: str) -> bool:
    sample = text[:4096]
    if not sample:
        return False
    bad = sum(1 for ch in sample if ch not in _CONTROL_OK and unicodedata.category(ch) == "Cc")
    return bad / len(sample) > 0.05


# ---- PDF --------------------------------------------------------------------------------------------------------
def read_pdf(path: Path) -> tuple[tuple[int, str], ...]:
    """Text per page with pypdf. Encrypted, damaged and image-only PDFs raise SkipFile with the reason."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError
    except ImportError:
        raise SkipFile("PDF support is not installed (pip package `pypdf`)") from None
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise SkipFile("encrypted PDF: it needs a password; save an unprotected copy to index it")
        pages = []
        for number, page in enumerate(reader.pages, start=1):
            text = (page.extract_text() or "").replace("\x00", "")
            pages.append((number, text.replace("\r\n", "\n").replace("\r", "\n")))
    except SkipFile:
        raise
    except (FileNotDecryptedError, DependencyError) as e:
        raise SkipFile(f"encrypted PDF that cannot be opened here ({e}); save an unprotected copy") from None
    except (PdfReadError, ValueError, KeyError, TypeError, OSError, RecursionError) as e:
        raise SkipFile(f"damaged or unreadable PDF ({type(e).__name__}: {str(e)[:120]})") from None
    if not any(text.strip() for _, text in pages):
        raise SkipFile(f"PDF without a text layer ({len(pages)} pages, scanned images?): run OCR on it first")
    return tuple(pages)


def read_document(path: Path, data: bytes) -> Document:
    """The text of one file whose bytes are `data`; SkipFile when it is not something we can index."""
    kind = kind_of(path)
    if kind is None:
        raise SkipFile(f"unsupported file type {path.suffix.lower()!r} (not text)")
    if kind == "pdf":
        if not data.startswith(b"%PDF"):
            raise SkipFile("named .pdf but is not a PDF file")
        return Document("pdf", read_pdf(path))
    if data.startswith(b"%PDF"):
        return Document("pdf", read_pdf(path))
    text, encoding = decode_text(data)
    return Document(kind or "text", ((0, text),), encoding)

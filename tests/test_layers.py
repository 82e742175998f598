"""The import layers hold (tests/layering.py), the check catches planted violations, no tab or package API imports
torch, and under CI a skipped test fails the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.layering import find_cycles, import_graph, layer_violations

ROOT = Path(__file__).resolve().parents[1]
TAB_MODULES = sorted(f"tabs.{p.stem}" for p in (ROOT / "tabs").glob("*.py") if p.stem != "__init__")
PACKAGE_APIS = sorted(f"backends.{p.parent.name}" for p in (ROOT / "backends").glob("*/__init__.py"))
HEAVY = ("torch", "transformers", "diffusers", "ultralytics", "faster_whisper", "chromadb", "sentence_transformers")


def test_no_import_cycles() -> None:
    assert find_cycles(import_graph(ROOT)) == []


def test_layers_hold() -> None:
    assert layer_violations(import_graph(ROOT)) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_the_check_fails_on_planted_violations(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "studio/__init__.py": "",
            "studio/jobs.py": "def run():\n    from backends.llm import create\n",  # core -> backends (lazy)
            "studio/context.py": "from backends.llm import create\n",  # composition: allowed
            "backends/__init__.py": "",
            "backends/llm/__init__.py": "from backends.llm.backend import create\n",
            "backends/llm/backend.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from backends.audio.asr import X\ndef create(): ...\n",
            "backends/audio/__init__.py": "",
            "backends/audio/asr.py": "from backends.llm import create\nX = 1\n",
            "tabs/__init__.py": "",
            "tabs/chat.py": "def build():\n    from backends.llm.backend import create\n",  # tab -> internals
        },
    )
    edges = import_graph(root)
    problems = "\n".join(layer_violations(edges))
    assert "studio.jobs:2 imports backends.llm: studio core must not import backends" in problems
    assert "tabs.chat:2 imports backends.llm.backend: use the package's public API `backends.llm`" in problems
    assert "backends.llm.backend:3 imports backends.audio.asr: use the package's public API" in problems
    assert "studio.context" not in problems
    cycles = find_cycles(edges)  # hidden behind TYPE_CHECKING: llm.backend -> audio.asr -> llm -> llm.backend
    assert cycles == [["backends.audio.asr", "backends.llm", "backends.llm.backend"]]


@pytest.fixture(scope="module")
def heavy_imports() -> dict[str, list[str]]:
    """One fresh interpreter imports every tab and package API in turn; what each newly pulled in of HEAVY."""
    code = textwrap.dedent(
        f"""
        import importlib, json, sys
        out = {{}}
        for name in {TAB_MODULES + PACKAGE_APIS!r}:
            before = {{k for k in {HEAVY!r} if k in sys.modules}}
            importlib.import_module(name)
            out[name] = sorted(k for k in {HEAVY!r} if k in sys.modules and k not in before)
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", TAB_MODULES + PACKAGE_APIS)
def test_module_imports_no_torch(module: str, heavy_imports: dict[str, list[str]]) -> None:
    assert heavy_imports[module] == [], f"importing {module} pulled in {heavy_imports[module]}"


def test_a_skipped_test_fails_the_run_under_ci(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text("import pytest\n\ndef test_a():\n    pytest.skip('espeak-ng missing')\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.ci_skips", "-p", "no:cacheprovider", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outside_ci = subprocess.run(cmd, cwd=tmp_path, env={**env, "CI": ""}, capture_output=True, text=True)
    in_ci = subprocess.run(cmd, cwd=tmp_path, env={**env, "CI": "true"}, capture_output=True, text=True)
    assert outside_ci.returncode == 0, outside_ci.stdout
    assert in_ci.returncode == 1, in_ci.stdout
    assert "espeak-ng missing" in in_ci.stdout

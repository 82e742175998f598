"""Logs: user mistakes are one line without a traceback; third-party noise is filtered; --help probes nothing."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bitsandbytes_kernels_warning_becomes_one_info_line(caplog):
    from studio.logs import setup_logging

    setup_logging()
    caplog.set_level(logging.INFO)
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    noisy.addFilter(logging.getLogger("bitsandbytes").filters[-1])  # caplog's handler came after setup_logging
    for _ in range(3):
        noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
    texts = [r.getMessage() for r in caplog.records]
    assert not any("kernels-community" in t for t in texts)
    assert sum("optional 'kernels' package" in t for t in texts) <= 1
    logging.getLogger("bitsandbytes").warning("a real warning")  # other messages pass
    assert "a real warning" in [r.getMessage() for r in caplog.records]


def test_user_errors_are_logged_as_one_line_without_traceback(caplog):
    import gradio as gr

    from studio.app import quiet_user_errors

    quiet_user_errors()
    quiet_user_errors()  # idempotent
    caplog.set_level(logging.INFO)
    err = gr.Error("Choose a knowledge base first\n(or create one).")
    assert err.print_exception is False  # Gradio prints no traceback for it
    assert gr.Error("kept", print_exception=True).print_exception is True
    lines = [r.getMessage() for r in caplog.records if r.name == "studio.user"]
    assert lines == ["refused: Choose a knowledge base first (or create one)."]


def test_launch_help_prints_usage_without_probing_the_network():
    code = (  # launch.py's own main(), with the network probe and the venv check replaced by tripwires
        "import runpy, sys\n"
        f"g = runpy.run_path({str(ROOT / 'launch.py')!r}, run_name='launch')\n"
        "def boom(*a, **k): raise SystemExit('network probed')\n"
        "g['main'].__globals__.update(hub_reachable=boom, ensure_venv=boom,\n"
        "                             venv_python=lambda: sys.executable)\n"
        "sys.exit(g['main'](['--help']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "network probed" not in out.stderr
    assert "usage: launch.py" in out.stdout and "--vram-cap-gb" in out.stdout and "launch.py test" in out.stdout


def test_launch_help_without_a_venv_prints_usage_without_setting_one_up(tmp_path):
    code = (  # no .venv yet: the usage at once, no venv creation or pip run (both reach the network)
        "import runpy, sys\n"
        f"g = runpy.run_path({str(ROOT / 'launch.py')!r}, run_name='launch')\n"
        "def boom(*a, **k): raise SystemExit('set up a venv')\n"
        f"g['main'].__globals__.update(ensure_venv=boom, hub_reachable=boom, venv_python=lambda: g['Path']({str(tmp_path / 'none')!r}))\n"
        "sys.exit(g['main'](['--help']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "set up a venv" not in out.stderr, out.stderr
    assert "python launch.py test" in out.stdout and "first run without --help sets up .venv" in out.stderr

#!/usr/bin/env python3
"""One-click entry point for OneCard Studio (standard library only).

    python launch.py [--no-browser] [--offline] [--port N] ...   set up .venv if needed, then start the studio
    python launch.py test [pytest args]                          set up .venv if needed, then run the tests

The virtual environment is created on first use; the pinned requirements are (re)installed only when
requirements.txt changed, keyed by its SHA-256 stored inside .venv.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
REQUIREMENTS = ROOT / "requirements.txt"
STAMP = VENV / ".requirements.sha256"
NO_DEPS_MARKER = "# [no-deps]"

sys.path.insert(0, str(ROOT))
from studio.offline import OFFLINE_ENV, QUIET_ENV, hub_reachable  # noqa: E402  (stdlib-only module)


def say(msg: str) -> None:
    sys.stderr.write(f"[launch] {msg}\n")
    sys.stderr.flush()


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def split_requirements(text: str) -> tuple[str, str]:
    """Lines before the line that starts with the no-deps marker install normally; lines after it with --no-deps."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(NO_DEPS_MARKER):
            return "".join(lines[:i]), "".join(lines[i + 1 :])
    return text, ""


def pip_install(requirements: str, *extra: str) -> None:
    if not any(line.strip() and not line.lstrip().startswith("#") for line in requirements.splitlines()):
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(requirements)
    try:
        cmd = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check", "-r", f.name, *extra]
        subprocess.run(cmd, check=True)
    finally:
        os.unlink(f.name)


def ensure_venv() -> None:
    if not venv_python().exists():
        say(f"creating {VENV} (first run; the install takes a few minutes and about 8 GB)")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    text = REQUIREMENTS.read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == digest:
        return
    say("installing pinned requirements (requirements.txt changed or first run)")
    normal, no_deps = split_requirements(text)
    pip_install(normal)
    pip_install(no_deps, "--no-deps")
    STAMP.write_text(digest + "\n")


def child_env(offline: bool) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in {**QUIET_ENV, **(OFFLINE_ENV if offline else {})}.items():
        env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def main(argv: list[str]) -> int:
    wants_help = argv[:1] != ["test"] and bool({"-h", "--help"} & set(argv))
    if wants_help and not Path(venv_python()).exists():  # usage now; the setup (minutes, network) waits for a real run
        print(__doc__)
        say("the first run without --help sets up .venv; after that --help lists every option")
        return 0
    try:
        if not wants_help:  # --help with a venv: its usage, without reinstalling (pip reaches the network)
            ensure_venv()
    except subprocess.CalledProcessError as e:
        say(f"setting up the environment failed ({e}); fix the error above and run launch.py again")
        return 1
    if argv[:1] == ["test"]:
        cmd = [str(venv_python()), "-m", "pytest", *argv[1:]]
        return subprocess.call(cmd, cwd=ROOT, env=child_env(offline=True))
    # --help prints usage at once: no network probe (and nothing else) before it
    offline = "--offline" in argv or os.environ.get("HF_HUB_OFFLINE") == "1" or bool({"-h", "--help"} & set(argv))
    if not offline and not hub_reachable():
        say("the Hugging Face Hub is unreachable: starting offline with the models already on this machine")
        offline = True
    cmd = [str(venv_python()), "-m", "studio.app", *argv]
    return run_forwarding_signals(cmd, cwd=ROOT, env=child_env(offline))


def run_forwarding_signals(cmd: list[str], **popen: object) -> int:
    """Run the studio as a child and pass Ctrl+C / SIGTERM / SIGHUP on to it exactly once each, then wait for it
    to save and exit: the child has its own session, so a terminal's Ctrl+C reaches it only through us."""
    if os.name != "nt":
        popen["start_new_session"] = True
    proc = subprocess.Popen(cmd, **popen)  # type: ignore[call-overload]
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    wanted = [getattr(signal, n) for n in names if hasattr(signal, n)]

    def forward(signum: int, frame: object) -> None:
        if proc.poll() is None:
            say(f"passing {signal.Signals(signum).name} to the studio; waiting for it to save and exit")
            proc.send_signal(signal.SIGINT if signum == getattr(signal, "SIGHUP", None) else signum)

    previous = {sig: signal.signal(sig, forward) for sig in wanted}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # Windows: the console's Ctrl+C reached the child as well
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

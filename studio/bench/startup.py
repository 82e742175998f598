"""Start-up benchmark: wall time from `python launch.py --no-browser` (venv already set up) to HTTP 200 on `/`.

    python -m studio.bench.startup [--runs 3] [--target-s 15] [--out studio/bench/results] [--name startup-cpu]

Each run uses a fresh data folder and a free port, with no network: `--offline` mode sets HF_HUB_OFFLINE=1 and
passes --offline; `auto` mode passes nothing, so launch.py probes the Hub itself (unreachable here) and falls back to
offline. The floor is a bare `python -c "import gradio"` in the same venv: the studio cannot start faster than that.
Prints a markdown table and writes <name>.json and <name>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = ROOT / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_")}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "GRADIO_TEMP_DIR", "YOLO_CONFIG_DIR"):
        env.pop(key, None)
    if offline:
        env.update(OFFLINE)
    return env


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def time_to_serve(launcher: str, mode: str, timeout: float = 120.0) -> float:
    """Seconds from spawning `launcher launch.py --no-browser ...` to the first HTTP 200 on `/`."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="studio-startup-") as tmp:
        cmd = [launcher, str(ROOT / "launch.py"), "--no-browser", "--port", str(port), "--data-dir", tmp + "/data"]
        if mode == "offline":
            cmd.append("--offline")
        log_path = Path(tmp) / "log.txt"
        with log_path.open("wb") as log_file:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=_env(mode == "offline"), stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            while time.perf_counter() - t0 < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"launch.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                        if r.status == 200:
                            return time.perf_counter() - t0
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.05)
            raise TimeoutError(f"not serving after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
        finally:
            _stop(proc)


def time_import(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(VENV_PY), "-c", code], check=True, env=_env(True), cwd=ROOT)
    return time.perf_counter() - t0


def _stats(values: list[float]) -> dict[str, float | list[float]]:
    return {
        "runs_s": [round(v, 2) for v in values],
        "median_s": round(statistics.median(values), 2),
        "min_s": round(min(values), 2),
        "max_s": round(max(values), 2),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _markdown(result: dict) -> str:
    rows = [
        "| what | runs (s) | median (s) | min (s) | max (s) |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["measurements"].items():
        runs = ", ".join(f"{v:.2f}" for v in r["runs_s"])
        rows.append(f"| {name} | {runs} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} |")
    m = result["machine"]
    verdict = "PASS" if result["pass"] else "FAIL"
    return "\n".join(
        [
            f"# Start-up time ({result['date']})",
            "",
            f"Machine: {m['cpus']} CPU cores ({m['cpu']}), {m['os']}, Python {m['python']}, "
            f"gradio {m['gradio']}, torch {m['torch']}; no GPU used, no network; "
            f"1-min load average at the end {m['load_avg_1m_at_end']} (other work on the machine slows every row).",
            f"Command: `{result['command']}`",
            "",
            *rows,
            "",
            f"Target: serving within {result['target_s']:.0f} s -> **{verdict}** "
            f"(slowest launch run {result['slowest_launch_s']:.2f} s; "
            f"`import gradio` floor {result['measurements']['floor: import gradio']['median_s']:.2f} s).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--target-s", type=float, default=15.0)
    p.add_argument("--launcher", default=shutil.which("python3") or sys.executable, help="python that runs launch.py")
    p.add_argument("--modes", default="offline,auto", help="comma list of: offline, auto")
    p.add_argument("--out", type=Path, default=ROOT / "studio" / "bench" / "results")
    p.add_argument("--name", default="startup-cpu")
    args = p.parse_args(argv)
    if not VENV_PY.exists():
        sys.stderr.write(f"{VENV_PY} is missing: run `python launch.py --no-browser` once to create the venv.\n")
        return 2

    measurements: dict[str, dict] = {}
    for label, code in [("floor: python -c pass", "pass"), ("floor: import gradio", "import gradio")]:
        measurements[label] = _stats([time_import(code) for _ in range(args.runs)])
    measurements["import gradio + torch"] = _stats([time_import("import gradio, torch") for _ in range(args.runs)])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    per_mode: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.runs):  # interleaved, so a burst of load elsewhere hits every mode alike
        for mode in modes:
            per_mode[mode].append(time_to_serve(args.launcher, mode))
    launch_runs = [v for runs in per_mode.values() for v in runs]
    for mode, runs in per_mode.items():
        flag = " --offline" if mode == "offline" else " (Hub probe, unreachable)"
        measurements[f"launch.py --no-browser{flag} -> HTTP 200"] = _stats(runs)

    result = {
        "benchmark": "startup",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m studio.bench.startup " + " ".join(argv if argv is not None else sys.argv[1:]),
        "launcher": args.launcher,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_name(),
            "os": platform.platform(),
            "python": platform.python_version(),
            "gradio": metadata.version("gradio"),
            "torch": metadata.version("torch"),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "target_s": args.target_s,
        "slowest_launch_s": round(max(launch_runs), 2),
        "pass": max(launch_runs) <= args.target_s,
        "measurements": measurements,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = _markdown(result)
    (args.out / f"{args.name}.md").write_text(md)
    print(md)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

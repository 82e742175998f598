"""`python -m studio.bench NAME [args]` runs `studio/bench/NAME.py` (same as `python -m studio.bench.NAME`)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import studio.bench


def names() -> list[str]:
    """Benchmarks are the modules of this package with a `main`; helpers (common, *_data, ...) are not."""
    found = []
    for info in pkgutil.iter_modules(studio.bench.__path__):
        if info.name.startswith("_"):
            continue
        source = importlib.util.find_spec(f"studio.bench.{info.name}").origin or ""
        with open(source, encoding="utf-8") as f:
            if "\ndef main(" in f.read():
                found.append(info.name)
    return sorted(found)


def main(argv: list[str]) -> int:
    available = names()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in available:
        print(f"usage: python -m studio.bench NAME [args]   NAME: {', '.join(available)}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(f"studio.bench.{argv[0]}")
    sys.argv = [f"studio/bench/{argv[0]}.py", *argv[1:]]
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

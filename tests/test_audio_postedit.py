"""LLM post-edit guard: only casing, punctuation and glossary spellings get through; segments keep their times."""

from __future__ import annotations

import pytest

from backends.audio.asr import Segment
from backends.audio.postedit import CASE_PUNCT, GLOSSARY, REJECTED, PostEditOptions, guard, postedit

GLOSSARY_TERMS = ("Kubernetes", "Dr. Okafor")


class ScriptedLLM:
    """Stands in for the chat backend: returns prepared replies and records what it was asked."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = list(replies)
        self.calls: list[list[dict[str, str]]] = []

    def complete(self, messages, *, max_new_tokens=256, temperature=0.0):
        assert temperature == 0.0 and max_new_tokens > 0
        self.calls.append(messages)
        return self.replies.pop(0)


def test_casing_punctuation_and_glossary_are_kept():
    opts = PostEditOptions(glossary=GLOSSARY_TERMS)
    res = guard("so doctor okay for deployed it on cooper netties", "So, Dr. Okafor deployed it on Kubernetes.", opts)
    assert res.text == "So, Dr. Okafor deployed it on Kubernetes."
    assert res.rejected == []
    tags = dict(res.spans)
    assert tags["So,"] == CASE_PUNCT and tags["Dr. Okafor"] == GLOSSARY and tags["Kubernetes."] == GLOSSARY


def test_word_changes_additions_and_deletions_are_rejected():
    opts = PostEditOptions(glossary=GLOSSARY_TERMS)
    original = "please end the report before friday"
    proposed = "Sure! Please send the full report before Friday."
    res = guard(original, proposed, opts)
    assert [t.lower().strip(".,!") for t in res.tokens] == original.split(), "the words stay what was said"
    assert res.text == "Please end the report before Friday."
    assert ("", "Sure!") in res.rejected and ("end", "send") in res.rejected and ("", "full") in res.rejected
    assert ("Sure!", REJECTED) in res.spans
    dropped = guard("we met on monday morning", "We met on Monday.", opts)
    assert dropped.text.lower().split()[-1] == "morning" and ("morning", "") in dropped.rejected


def test_glossary_term_must_resemble_what_was_heard():
    res = guard("we ate the cake", "We ate Kubernetes.", PostEditOptions(glossary=GLOSSARY_TERMS))
    assert "Kubernetes" not in res.text and res.rejected


def test_word_merges_that_only_differ_in_punctuation_are_kept():
    res = guard("at nine o clock", "At nine o'clock.", PostEditOptions())
    assert res.text == "At nine o'clock." and not res.rejected


def test_postedit_maps_edits_back_to_segments_and_chunks():
    segs = [Segment(0.0, 2.0, "hello doctor okay for", speaker="SPEAKER_1"), Segment(2.5, 4.0, "how are you")]
    llm = ScriptedLLM(["```Hello Dr. Okafor, how are you today?```"])
    report = postedit(llm, segs, PostEditOptions(glossary=GLOSSARY_TERMS))
    assert [s.text for s in report.segments] == ["Hello Dr. Okafor,", "how are you"]  # "today?" refused whole
    assert [(s.start, s.end, s.speaker) for s in report.segments] == [(0.0, 2.0, "SPEAKER_1"), (2.5, 4.0, None)]
    assert ("", "today?") in report.rejected and report.accepted_changes >= 2
    system = llm.calls[0][0]["content"]
    assert (
        "Kubernetes" in system
        and "Dr. Okafor" in system
        and llm.calls[0][1]["content"] == "hello doctor okay for how are you"
    )
    many = [Segment(float(i), i + 0.5, f"word{i}") for i in range(25)]
    llm2 = ScriptedLLM(
        [" ".join(f"Word{i}" for i in range(10)), "garbage", " ".join(f"word{i}" for i in range(20, 25))]
    )
    out = postedit(llm2, many, PostEditOptions(chunk_words=10))
    assert len(llm2.calls) == 3 and [s.text for s in out.segments][:2] == ["Word0", "Word1"]
    assert [s.text for s in out.segments][10:20] == [f"word{i}" for i in range(10, 20)], (
        "a garbage reply changes nothing"
    )


def test_options_validation():
    with pytest.raises(ValueError, match="glossary"):
        PostEditOptions(glossary=("...",))


@pytest.mark.slow
def test_real_chat_backend_post_edit(ctx):
    """The offline chat model (SmolLM2-135M) through the studio's llm backend; the guard keeps the words."""
    segs = [
        Segment(0.0, 3.0, "the meeting will start at nine on monday morning"),
        Segment(3.0, 5.0, "ask doctor okafor"),
    ]
    report = postedit(ctx.backends.llm, segs, PostEditOptions(glossary=("Dr. Okafor",)))
    original = [w for s in segs for w in s.text.split()]
    edited = [w.lower().strip(".,!?;:") for s in report.segments for w in s.text.split()]
    assert edited == original or "dr" in edited, (edited, report.rejected)

"""Generation pieces without a model: stop-string streaming, sampling, options, the CPU bench script."""

from __future__ import annotations

import pytest

from backends.llm.generate import GenerationOptions, StopTextTracker, pick_token


class CharTokenizer:
    """Token id = a character's code point."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def _feed(text: str, stop: tuple[str, ...]) -> tuple[list[str], StopTextTracker]:
    tracker = StopTextTracker(CharTokenizer(), stop)
    deltas = []
    for ch in text:
        deltas.append(tracker.add(ord(ch)))
        if tracker.stopped:
            break
    deltas.append(tracker.flush())
    return [d for d in deltas if d], tracker


def test_stop_string_is_cut_and_never_streamed():
    deltas, tracker = _feed("Hello User: more", ("User:",))
    assert tracker.stopped and "".join(deltas) == "Hello " and tracker.text == "Hello "
    assert all("U" not in d for d in deltas)  # the prefix of the stop string was held back, not shown then retracted


def test_held_back_prefix_is_released_when_it_is_not_a_stop():
    deltas, tracker = _feed("a Us b", ("User:",))
    assert not tracker.stopped and "".join(deltas) == "a Us b"


def test_incomplete_utf8_waits_for_the_next_token():
    class BytesTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    tracker = StopTextTracker(BytesTokenizer(), ())
    e_acute = "é".encode()
    assert tracker.add(e_acute[0]) == ""
    assert tracker.add(e_acute[1]) == "é"


def test_pick_token_greedy_top_p_seed_and_penalty():
    import torch

    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    history = torch.tensor([[0, 1]])
    assert pick_token(logits, history, GenerationOptions(temperature=0.0), None).item() == 1
    tiny_p = GenerationOptions(temperature=1.0, top_p=0.01)
    assert {pick_token(logits, history, tiny_p, torch.Generator().manual_seed(s)).item() for s in range(20)} == {1}
    opts = GenerationOptions(temperature=1.0, top_p=1.0)
    a = [pick_token(logits, history, opts, torch.Generator().manual_seed(7)).item() for _ in range(3)]
    b = [pick_token(logits, history, opts, torch.Generator().manual_seed(7)).item() for _ in range(3)]
    assert a == b
    penalised = GenerationOptions(temperature=0.0, repetition_penalty=2.0)  # token 1: 3 -> 1.5 < token 2's 2.0
    assert pick_token(logits, history, penalised, None).item() == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"top_p": 0.0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"repetition_penalty": 9}, "repetition"),
     ({"system_prompt": "a\x00"}, "null byte")],
)  # fmt: skip
def test_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationOptions(**kwargs)


@pytest.mark.slow
def test_bench_quick_runs_on_cpu(tmp_path):
    import json

    from studio.bench import llm as bench

    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "llm-cpu-quick.json").read_text())
    assert [r["method"] for r in result["rows"]][:3] == [
        "plain generate", "generate, static cache", "ours, static cache, no graph"
    ]  # fmt: skip
    assert result["greedy_agreement"]["ours_nograph_vs_plain"] == result["new_tokens"]  # fp32: exact
    assert result["checks"]["fp32_exactness"]["static_vs_plain_leading_equal"] == 128

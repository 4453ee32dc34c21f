"""Trimming history to the model's window."""

import pytest

from chat.llm import ProviderError
from chat.llm.context import fit_prompt


class WordCounter:
    """A provider whose tokens are words (plus one per message)."""

    def __init__(self, context_tokens: int, max_tokens: int) -> None:
        self.context_tokens, self.max_tokens = context_tokens, max_tokens

    def count_tokens(self, messages):
        return sum(len(m["content"].split()) + 1 for m in messages)


def history(turns: int) -> list[dict]:
    out = []
    for i in range(turns):
        out += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    return out


def test_everything_fits():
    prompt = fit_prompt(WordCounter(1000, 100), history(3), "now?", "sys")
    assert len(prompt) == 1 + 6 + 1
    assert prompt[0] == {"role": "system", "content": "sys"} and prompt[-1] == {"role": "user", "content": "now?"}


def test_oldest_whole_turns_are_dropped_first():
    # each turn costs 2 * (10 + 1) = 22 tokens; system + question = 2 + 2 = 4; budget 60 - 10 = 50 -> 2 turns
    prompt = fit_prompt(WordCounter(60, 10), history(5), "now?", "sys")
    contents = [m["content"] for m in prompt[1:-1]]
    assert contents == ["question 3 " * 5, "answer 3 " * 5, "question 4 " * 5, "answer 4 " * 5]


def test_question_too_long_is_an_error_not_a_truncation():
    with pytest.raises(ProviderError) as caught:
        fit_prompt(WordCounter(60, 10), history(1), "word " * 100, "sys")
    assert caught.value.code == "context_too_long"
    assert "too long" in caught.value.message

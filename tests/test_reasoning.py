"""The reasoning splitter on the real Qwen3 tokenizer's ids, with deltas cut at every boundary."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from qwen_magic.chatml import THINK_END, THINK_START, ChatTokenizer, TemplateProfile
from qwen_magic.reasoning import ReasoningSplitter, SplitReply, split_reasoning_text

THINK, END_THINK, IM_END_ID = 151667, 151668, 151645


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.load(qwen3_tokenizer_dir)


def reply_ids(tokenizer: ChatTokenizer, *pieces: str | int) -> list[int]:
    """Ids as a model emits them: strings as ordinary tokens, ints as the tokens themselves."""
    ids: list[int] = []
    for piece in pieces:
        ids += [piece] if isinstance(piece, int) else tokenizer.encode_text(piece)
    return ids


class Detokenizer:
    """The text each delta carries, as vLLM's incremental detokenizer emits it: a character
    split over tokens comes out whole with the token that completes it; stop tokens add none."""

    def __init__(self, tokenizer: ChatTokenizer, ids: Sequence[int]) -> None:
        shown = [token for token in ids if token not in tokenizer.stop_token_ids]
        self.ids = list(ids)
        self.emitted = []  # text out after each prefix of ``ids``
        for end in range(len(ids) + 1):
            count = sum(token not in tokenizer.stop_token_ids for token in ids[:end])
            text = tokenizer.decode(shown[:count])
            self.emitted.append(text if end == len(ids) else text.rstrip("\ufffd"))

    def deltas(self, cuts: Sequence[int]) -> Iterator[tuple[list[int], str]]:
        bounds = [0, *cuts, len(self.ids)]
        for start, end in itertools.pairwise(bounds):
            yield self.ids[start:end], self.emitted[end][len(self.emitted[start]) :]


def every_cutting(length: int, *, most_cuts: int | None = None) -> Iterator[tuple[int, ...]]:
    """Every way to cut ``length`` ids into deltas (with at most ``most_cuts`` cuts)."""
    limit = length - 1 if most_cuts is None else min(most_cuts, length - 1)
    for count in range(limit + 1):
        yield from itertools.combinations(range(1, length), count)


def run(splitter: ReasoningSplitter, deltas: Iterator[tuple[list[int], str]]) -> SplitReply:
    """Feed every delta; check that the streamed pieces add up to the final texts."""
    streamed_reasoning, streamed_answer = "", ""
    for ids, text in deltas:
        piece = splitter.feed(ids, text)
        streamed_reasoning += piece.reasoning
        streamed_answer += piece.answer
    result = splitter.result()
    assert streamed_reasoning == (result.reasoning or "")
    assert streamed_answer == result.answer
    return result


def splitter_for(tokenizer: ChatTokenizer, **kwargs) -> ReasoningSplitter:
    defaults = {
        "think_start_id": tokenizer.think_start_id,
        "think_end_id": tokenizer.think_end_id,
        "decode": tokenizer.decode,
        "stop_token_ids": tokenizer.stop_token_ids,
    }
    return ReasoningSplitter(**{**defaults, **kwargs})


# (pieces of the reply, prompt_block, reasoning, answer, closed)
CASES = {
    "hybrid": (
        (THINK, "\nLet me add: 2+2.\n", END_THINK, "\n\nIt is 4.", IM_END_ID),
        "none",
        "Let me add: 2+2.",
        "It is 4.",
        True,
    ),
    "newlines inside the reasoning": (
        (THINK, "\nA\n\nB\n\n\n", END_THINK, "\n\nC\n\n"),
        "none",
        "A\n\nB",
        "C\n\n",
        True,
    ),
    "empty block (/no_think)": ((THINK, "\n\n", END_THINK, "\n\nHi!"), "none", "", "Hi!", True),
    "forced open (Thinking-2507, Qwen3.5)": (
        ("Sum: 你好 😀 ok\n", END_THINK, "\n\n4", IM_END_ID),
        "open",
        "Sum: 你好 😀 ok",
        "4",
        True,
    ),
    "forced open, the model repeats <think>": (
        (THINK, "\nhm\n", END_THINK, "\n\n4"),
        "open",
        "hm",
        "4",
        True,
    ),
    "never closed (max_tokens)": (
        (THINK, "\nStill thinking 😀\n\n"),
        "none",
        "Still thinking 😀",
        "",
        False,
    ),
    "interrupted, forced open": (("half a th",), "open", "half a th", "", False),
    "second </think> is answer text": (
        (THINK, "\nr\n", END_THINK, "\n\nUse ", END_THINK, " to end."),
        "none",
        "r",
        f"Use {THINK_END} to end.",
        True,
    ),
    "typed </think> inside the reasoning": (
        (THINK, "\nI write </think> here\n", END_THINK, "\n\nDone </think>."),
        "none",
        f"I write {THINK_END} here",
        f"Done {THINK_END}.",
        True,
    ),
    "typed <think> first is no block": (
        ("<think> is a tag\n\n", END_THINK),
        "none",
        None,
        "<think> is a tag\n\n</think>",
        True,
    ),
    "<think> later is answer text": (("Say ", THINK), "none", None, f"Say {THINK_START}", True),
    "thinking off (Qwen3's closed block)": (
        ("\n\nHi", END_THINK),
        "closed",
        "",
        "\n\nHi</think>",
        True,
    ),
    "no thinking at all": (("Hello\n",), "none", None, "Hello\n", True),
}


@pytest.mark.parametrize("case", CASES)
def test_every_cutting_of_the_deltas_gives_the_same_split(
    tokenizer: ChatTokenizer, case: str
) -> None:
    pieces, prompt_block, reasoning, answer, closed = CASES[case]
    ids = reply_ids(tokenizer, *pieces)
    detokenizer = Detokenizer(tokenizer, ids)
    assert detokenizer.emitted[-1] == tokenizer.decode([t for t in ids if t != IM_END_ID])
    most_cuts = None if len(ids) <= 15 else 3  # every cutting up to 2**14; else up to 3 cuts
    cuttings = 0
    for cuts in every_cutting(len(ids), most_cuts=most_cuts):
        splitter = splitter_for(tokenizer, prompt_block=prompt_block)
        result = run(splitter, detokenizer.deltas(cuts))
        assert (result.reasoning, result.answer, result.closed) == (reasoning, answer, closed), cuts
        cuttings += 1
    assert cuttings >= len(ids)  # every single boundary at least


def test_one_delta_holding_a_typed_and_the_real_end_tag_needs_decode(
    tokenizer: ChatTokenizer,
) -> None:
    """The text alone cannot tell them apart; the ids (decoded) can."""
    ids = reply_ids(tokenizer, THINK, "\nabout </think> tags\n", END_THINK, "\n\nA")
    text = tokenizer.decode(ids)
    assert text.count(THINK_END) == 2
    with_decode = splitter_for(tokenizer)
    with_decode.feed(ids, text)
    assert (with_decode.reasoning, with_decode.answer) == (f"about {THINK_END} tags", "A")
    without = splitter_for(tokenizer, decode=None)
    without.feed(ids, text)
    assert without.reasoning == "about "  # the first tag text taken for the token


def test_thinking_tokens_and_time_with_an_injected_clock(tokenizer: ChatTokenizer) -> None:
    now = [100.0]
    splitter = splitter_for(tokenizer, clock=lambda: now[0])
    assert splitter.result() == SplitReply(reasoning=None, answer="")
    body = tokenizer.encode_text("\nOne two three.\n")
    splitter.feed([THINK, body[0]], "<think>\n")
    assert splitter.in_reasoning and splitter.thinking_seconds == 0.0
    now[0] = 101.5
    splitter.feed(body[1:], tokenizer.decode(body[1:]))
    now[0] = 103.0
    assert splitter.thinking_seconds == 3.0  # still thinking: counts up to now
    splitter.feed([END_THINK, 271], "</think>\n\n")
    now[0] = 104.0
    answer_ids = tokenizer.encode_text("Yes.")
    assert splitter.feed([*answer_ids, IM_END_ID], "Yes.").answer == "Yes."
    now[0] = 200.0
    result = splitter.result()
    assert result.thinking_seconds == 3.0  # from the <think> delta to the </think> delta
    assert result.thinking_tokens == len(body)  # not <think>, </think> or what follows
    assert (result.reasoning, result.answer, result.stopped_while_thinking) == (
        "One two three.",
        "Yes.",
        False,
    )


def test_a_reply_stopped_while_thinking_is_timed_to_its_last_delta(
    tokenizer: ChatTokenizer,
) -> None:
    now = [10.0]
    splitter = splitter_for(tokenizer, prompt_block="open", clock=lambda: now[0])
    assert splitter.result().thinking_seconds == 0.0  # open before any token
    ids = tokenizer.encode_text("step one, step two")
    splitter.feed(ids[:2], tokenizer.decode(ids[:2]))
    now[0] = 12.0
    splitter.feed(ids[2:], tokenizer.decode(ids[2:]))
    result = splitter.result()
    assert result.stopped_while_thinking and not result.closed and result.answer == ""
    assert result.thinking_tokens == len(ids)
    assert result.thinking_seconds == 2.0


def test_a_model_without_think_tokens_streams_everything_as_answer(
    qwen25_tokenizer: ChatTokenizer,
) -> None:
    splitter = ReasoningSplitter.for_tokenizer(qwen25_tokenizer, enable_thinking=True)
    ids = qwen25_tokenizer.encode_text("<think>x</think>y")
    assert splitter.feed(ids, "<think>x</think>y").answer == "<think>x</think>y"
    assert splitter.result() == SplitReply(reasoning=None, answer="<think>x</think>y")


@pytest.fixture(scope="module")
def qwen25_tokenizer(demo_model: Path) -> ChatTokenizer:
    return ChatTokenizer.load(demo_model)


@pytest.fixture(scope="module")
def profiled_tokenizer(qwen3_tokenizer_dir: Path) -> ChatTokenizer:
    """A Qwen3 tokenizer of its own, whose profile each test sets."""
    return ChatTokenizer.load(qwen3_tokenizer_dir)


@pytest.mark.parametrize(
    ("profile", "enable_thinking", "starts_in_reasoning", "reasoning"),
    [
        (TemplateProfile(thinking_off_suffix="<think>\n\n</think>\n\n"), None, False, None),
        (TemplateProfile(thinking_off_suffix="<think>\n\n</think>\n\n"), False, False, ""),
        (TemplateProfile(generation_suffix="<think>\n"), None, True, ""),
        (TemplateProfile(thinking_on_suffix="<think>\n"), True, True, ""),
    ],
)
def test_for_tokenizer_follows_the_generation_prompt(
    profiled_tokenizer: ChatTokenizer,
    profile: TemplateProfile,
    enable_thinking: bool | None,
    starts_in_reasoning: bool,
    reasoning: str | None,
) -> None:
    tokenizer = profiled_tokenizer
    tokenizer.profile = profile  # as a server's renders set it
    splitter = ReasoningSplitter.for_tokenizer(tokenizer, enable_thinking=enable_thinking)
    assert splitter.in_reasoning is starts_in_reasoning
    assert splitter.reasoning == reasoning


@pytest.mark.parametrize(
    ("text", "opened", "expected"),
    [
        ("<think>\nR\n</think>\n\nA", False, ("R", "A")),
        ("<think>\n\n</think>\n\nA", False, ("", "A")),
        ("<think>\nhalf a thought", False, ("half a thought", "")),
        ("R</think>\n\nA</think>", True, ("R", "A</think>")),
        ("plain answer </think> quoted", False, (None, "plain answer </think> quoted")),
        (" <think>late", False, (None, " <think>late")),
        ("", False, (None, "")),
    ],
)
def test_split_reasoning_text(text: str, opened: bool, expected: tuple[str | None, str]) -> None:
    assert split_reasoning_text(text, opened=opened) == expected


def test_the_text_split_agrees_with_the_id_splitter(tokenizer: ChatTokenizer) -> None:
    """Where tags are tokens, splitting the decoded text gives the splitter's answer."""
    for case, (pieces, prompt_block, *_) in CASES.items():
        if "typed" in case or prompt_block == "closed":
            continue  # text cannot tell typed tags from tokens; "closed" has no tag at all
        ids = reply_ids(tokenizer, *pieces)
        splitter = splitter_for(tokenizer, prompt_block=prompt_block)
        splitter.feed(ids, tokenizer.decode([t for t in ids if t != IM_END_ID]))
        text = tokenizer.decode([t for t in ids if t != IM_END_ID])
        opened = prompt_block == "open"
        expected = split_reasoning_text(text, opened=opened)
        if opened and text.startswith(THINK_START):  # the model repeated the prompt's tag
            expected = split_reasoning_text(text[len(THINK_START) :], opened=True)
        assert (splitter.reasoning, splitter.answer) == expected, case

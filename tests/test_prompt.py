"""Fitting a conversation into the token budget, on the real Qwen3 tokenizer."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

import qwen_magic.chatml
from qwen_magic import prompt
from qwen_magic.chatml import ChatFormatter, ChatTokenizer
from qwen_magic.conversation import Conversation, Turn
from qwen_magic.prompt import (
    BudgetError,
    MessageTooLongError,
    PromptPlan,
    PromptTruncatedWarning,
    fit_prompt,
)


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir) -> ChatTokenizer:
    return ChatTokenizer.load(qwen3_tokenizer_dir)


@pytest.fixture
def formatter(tokenizer: ChatTokenizer) -> ChatFormatter:
    return ChatFormatter(tokenizer)


def conversation_with(turns: int, system: str | None = "Be brief.") -> Conversation:
    conversation = Conversation(system=system)
    for i in range(turns):
        conversation.record(f"question number {i}", f"answer number {i}")
    return conversation


def plan_for(
    formatter: ChatFormatter, conversation: Conversation, message: str, **kwargs
) -> PromptPlan:
    return fit_prompt(formatter, conversation.system, conversation.turns, message, **kwargs)


def turn_cost(formatter: ChatFormatter, i: int) -> int:
    return len(formatter.segment("user", f"question number {i}")) + len(
        formatter.segment("assistant", f"answer number {i}")
    )


def test_everything_fits(formatter: ChatFormatter) -> None:
    plan = plan_for(formatter, conversation_with(3), "next", budget=10_000)
    assert (plan.kept_turns, plan.dropped_turns, plan.truncated) == (3, 0, False)
    assert plan.num_tokens == plan.system_tokens + sum(plan.turn_tokens) + plan.message_tokens + 3
    assert formatter.tokenizer.decode(plan.token_ids) == plan.text
    assert plan.text.endswith("<|im_start|>user\nnext<|im_end|>\n<|im_start|>assistant\n")
    assert (plan.budget, plan.message, plan.system) == (10_000, "next", "Be brief.")


@pytest.mark.parametrize(
    ("turns", "room_for", "kept"),
    [(5, 5, 5), (5, 4, 4), (5, 1, 1), (5, 0, 0), (1, 0, 0), (0, 0, 0)],
)
def test_oldest_whole_turns_go_first(
    formatter: ChatFormatter, turns: int, room_for: int, kept: int
) -> None:
    conversation = conversation_with(turns)
    bare = fit_prompt(formatter, "Be brief.", [], "next", budget=10_000).num_tokens
    budget = bare + sum(turn_cost(formatter, i) for i in range(turns - room_for, turns))
    plan = plan_for(formatter, conversation, "next", budget=budget)
    assert plan.kept_turns == kept
    assert plan.dropped_turns == turns - kept
    assert [t.user for t in plan.turns] == [
        f"question number {i}" for i in range(turns - kept, turns)
    ]
    assert plan.num_tokens <= budget
    assert plan.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>user\nnext<|im_end|>" in plan.text
    if kept:  # the budget was exact: one token less and the oldest kept turn goes too
        assert plan_for(formatter, conversation, "next", budget=budget - 1).kept_turns == kept - 1


def test_budget_is_recomputed_not_shrinking(formatter: ChatFormatter) -> None:
    """The tutorial decremented one shared counter per call until it went negative."""
    conversation = conversation_with(2)
    plans = [plan_for(formatter, conversation, "same", budget=500) for _ in range(50)]
    assert {tuple(plan.token_ids) for plan in plans} == {tuple(plans[0].token_ids)}
    assert plans[-1].kept_turns == 2


def test_long_message_is_cut_with_warning(formatter: ChatFormatter) -> None:
    message = "word " * 400
    with pytest.warns(PromptTruncatedWarning, match="only its first"):
        plan = plan_for(
            formatter, conversation_with(3), message, budget=120, on_overflow="truncate"
        )
    assert plan.truncated
    assert plan.num_tokens <= 120
    assert plan.kept_turns == 0
    assert message.startswith(plan.message) and len(plan.message) < len(message)
    assert plan.text.startswith("<|im_start|>system\nBe brief.")
    assert formatter.tokenizer.decode(plan.token_ids) == plan.text


def test_cutting_never_leaves_half_a_character(formatter: ChatFormatter) -> None:
    message = "你好😀" * 300
    with pytest.warns(PromptTruncatedWarning):
        plan = fit_prompt(formatter, None, [], message, budget=60, on_overflow="truncate")
    assert "\ufffd" not in plan.message and message.startswith(plan.message)
    assert plan.num_tokens <= 60


def test_long_message_is_refused_by_default(formatter: ChatFormatter) -> None:
    message = "word " * 400
    tokens = len(formatter.tokenizer.encode_text(message))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refusing must not also warn
        with pytest.raises(MessageTooLongError, match=rf"the message is {tokens} tokens and only"):
            plan_for(formatter, conversation_with(3), message, budget=120)
    assert issubclass(MessageTooLongError, BudgetError)  # front-ends catch one kind


def test_system_prompt_larger_than_budget_is_a_clear_error(formatter: ChatFormatter) -> None:
    for on_overflow in ("error", "truncate"):
        with pytest.raises(BudgetError, match="shorten the system prompt"):
            fit_prompt(formatter, "long " * 200, [], "hi", budget=50, on_overflow=on_overflow)


def test_unknown_overflow_policy_is_refused(formatter: ChatFormatter) -> None:
    with pytest.raises(ValueError, match="on_overflow must be 'error' or 'truncate'"):
        fit_prompt(formatter, None, [], "hi", budget=1_000, on_overflow="drop")  # type: ignore[arg-type]


def test_no_history_sends_only_system_and_message(formatter: ChatFormatter) -> None:
    plan = fit_prompt(formatter, "Be brief.", [], "fresh", budget=10_000)
    assert plan.kept_turns == 0 and plan.dropped_turns == 0
    assert "question number" not in plan.text


def test_rerun_sees_only_the_turns_before_its_key(formatter: ChatFormatter) -> None:
    conversation = Conversation()
    for key in ("cell-a", "cell-b", "cell-c"):
        conversation.record(f"from {key}", f"reply {key}", key=key)
    turns = conversation.context_turns("cell-b")
    plan = fit_prompt(formatter, None, turns, "from cell-b again", budget=10_000)
    assert [t.key for t in plan.turns] == ["cell-a"]
    assert "reply cell-c" not in plan.text


def test_new_turn_encodes_only_new_text(tokenizer: ChatTokenizer) -> None:
    """Formatting turn 201 encodes the new message, not the 200 turns before it."""
    encoded: list[str] = []
    original = tokenizer.encode_text

    def spy(text: str) -> list[int]:
        encoded.append(text)
        return original(text)

    formatter = ChatFormatter(tokenizer)
    conversation = conversation_with(200)
    plan_for(formatter, conversation, "warm-up", budget=100_000)
    tokenizer.encode_text = spy  # type: ignore[method-assign]
    try:
        plan = plan_for(formatter, conversation, "the new message", budget=100_000)
    finally:
        del tokenizer.encode_text
    assert plan.kept_turns == 200
    assert "the new message" in encoded
    assert not any("question number" in text or "answer number" in text for text in encoded)


def test_qwen3_past_thinking_is_not_resent(formatter: ChatFormatter) -> None:
    turns = [Turn("q", "<think>\nsecret reasoning\n</think>\n\nvisible answer")]
    plan = fit_prompt(formatter, None, turns, "next", budget=10_000)
    assert "secret reasoning" not in plan.text and "visible answer" in plan.text
    assert "secret reasoning" in turns[0].assistant  # the history keeps it


def test_enable_thinking_false_appends_qwen3s_empty_think_block(formatter: ChatFormatter) -> None:
    off = fit_prompt(formatter, None, [], "hi", budget=1_000, enable_thinking=False)
    on = fit_prompt(formatter, None, [], "hi", budget=1_000, enable_thinking=True)
    assert off.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.text.endswith("<|im_start|>assistant\n")
    assert formatter.tokenizer.decode(off.token_ids) == off.text
    assert off.num_tokens > on.num_tokens


def test_no_system_prompt_uses_the_templates_default(formatter: ChatFormatter) -> None:
    plan = fit_prompt(formatter, None, [], "hi", budget=1_000)
    assert plan.system is None and plan.system_tokens == 0  # Qwen3's template has none
    assert plan.text.startswith("<|im_start|>user\nhi")
    empty = fit_prompt(formatter, "", [], "hi", budget=1_000)
    assert empty.text.startswith("<|im_start|>system\n<|im_end|>")  # "" is a system prompt


def test_interrupted_turns_are_sent_like_any_other(formatter: ChatFormatter) -> None:
    turns = [Turn("q", "partial repl", interrupted=True)]
    plan = fit_prompt(formatter, None, turns, "go on", budget=1_000)
    assert "<|im_start|>assistant\npartial repl<|im_end|>" in plan.text


def test_format_prompt_is_reachable_from_chatml(tokenizer: ChatTokenizer) -> None:
    assert qwen_magic.chatml.format_prompt is prompt.format_prompt
    text, ids = qwen_magic.chatml.format_prompt(tokenizer, "hi", [("q", "a")], system="s")
    assert text == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\na<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.decode(ids) == text
    with pytest.raises(AttributeError, match="no attribute 'fit_prompt'"):
        qwen_magic.chatml.fit_prompt  # noqa: B018 - only format_prompt is forwarded


# ---------------------------------------------------------------------- reasoning in the history

THINK_ID, END_THINK_ID = 151667, 151668
TURNS_WITH_REASONING = [
    Turn("What is 2+2?", "4.", reasoning="Two and two.\nFour."),
    Turn("And 3+3?", "6", reasoning=""),
    Turn("Now 5+5?", "", reasoning="ten? or", interrupted=True),  # stopped while thinking
    Turn("Go on.", "Ten.", reasoning=None),
]


def preserving_tokenizer(qwen3_tokenizer_dir: Path, folder: Path) -> tuple[ChatTokenizer, str]:
    """The Qwen3 tokenizer with its template changed to keep every past turn's reasoning."""
    config = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text("utf-8"))
    condition = "{%- if loop.index0 > ns.last_query_index %}"
    assert config["chat_template"].count(condition) == 1
    template = config["chat_template"].replace(condition, "{%- if true %}")
    (folder / "tokenizer.json").symlink_to(qwen3_tokenizer_dir / "tokenizer.json")
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return ChatTokenizer.load(folder), template


def template_ids(hf, system: str | None, turns: list[Turn], message: str, **kwargs) -> list[int]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    for turn in turns:
        messages.append({"role": "user", "content": turn.user})
        reply = {"role": "assistant", "content": turn.assistant}
        if turn.reasoning is not None:
            reply["reasoning_content"] = turn.reasoning
        messages.append(reply)
    messages.append({"role": "user", "content": message})
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    return list(hf(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def hf(qwen3_tokenizer_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_history_with_reasoning_matches_apply_chat_template(
    formatter: ChatFormatter, hf, enable_thinking: bool | None, system: str | None
) -> None:
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = template_ids(hf, system, TURNS_WITH_REASONING, "Thanks!", **kwargs)
    plan = fit_prompt(
        formatter,
        system,
        TURNS_WITH_REASONING,
        "Thanks!",
        budget=10_000,
        enable_thinking=enable_thinking,
    )
    assert plan.token_ids == expected
    assert "Two and two" not in plan.text and "ten?" not in plan.text  # Qwen3 drops it
    assert THINK_ID not in plan.token_ids[:-4]  # no think token but the prompt's own block
    assert formatter.tokenizer.decode(plan.token_ids) == plan.text


def test_a_reply_stopped_while_thinking_resends_nothing_of_it(formatter: ChatFormatter) -> None:
    turns = [Turn("q", "", reasoning="<think> half a thought", interrupted=True)]
    plan = fit_prompt(formatter, None, turns, "again", budget=1_000)
    assert "half a thought" not in plan.text
    assert "<|im_start|>assistant\n<|im_end|>" in plan.text
    assert not set(plan.token_ids) & {THINK_ID, END_THINK_ID}


def test_an_answer_quoting_the_tag_is_resent_whole_when_its_reasoning_is_apart(
    formatter: ChatFormatter,
) -> None:
    answer = "Qwen ends reasoning with </think> then answers."
    apart = fit_prompt(formatter, None, [Turn("q", answer, reasoning="")], "n", budget=1_000)
    assert answer in apart.text and END_THINK_ID not in apart.token_ids  # as plain text
    whole = fit_prompt(formatter, None, [Turn("q", answer)], "n", budget=1_000)
    assert "<|im_start|>assistant\n then answers.<|im_end|>" in whole.text  # as the template


@pytest.mark.parametrize("enable_thinking", [None, False])
def test_a_preserving_template_gets_its_reasoning_back_with_real_tags(
    qwen3_tokenizer_dir: Path, tmp_path: Path, hf, enable_thinking: bool | None
) -> None:
    tokenizer, template = preserving_tokenizer(qwen3_tokenizer_dir, tmp_path)
    assert tokenizer.profile.keeps_reasoning
    formatter = ChatFormatter(tokenizer)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = template_ids(
        hf, "s", TURNS_WITH_REASONING, "Thanks!", chat_template=template, **kwargs
    )
    plan = fit_prompt(formatter, "s", TURNS_WITH_REASONING, "Thanks!", budget=10_000, **kwargs)
    assert plan.token_ids == expected
    assert "<think>\nTwo and two.\nFour.\n</think>\n\n4." in plan.text
    assert "<think>\nten? or\n</think>\n\n<|im_end|>" in plan.text
    blocks = 2 + (enable_thinking is False)  # two turns with reasoning, and the prompt's own
    assert plan.token_ids.count(THINK_ID) == plan.token_ids.count(END_THINK_ID) == blocks


def test_resent_reasoning_counts_against_the_budget_and_is_encoded_once(
    qwen3_tokenizer_dir: Path, tmp_path: Path
) -> None:
    tokenizer, _ = preserving_tokenizer(qwen3_tokenizer_dir, tmp_path)
    formatter = ChatFormatter(tokenizer)
    turns = [Turn(f"q{i}", f"a{i}", reasoning=f"long reasoning number {i} " * 20) for i in range(3)]
    full = fit_prompt(formatter, None, turns, "next", budget=100_000)
    assert full.kept_turns == 3 and all(cost > 100 for cost in full.turn_tokens)
    tight = fit_prompt(formatter, None, turns, "next", budget=full.num_tokens - 1)
    assert tight.kept_turns == 2 and "long reasoning number 0" not in tight.text

    encoded: list[str] = []
    original = tokenizer.encode_text

    def spy(text: str) -> list[int]:
        encoded.append(text)
        return original(text)

    tokenizer.encode_text = spy  # type: ignore[method-assign]
    try:
        again = fit_prompt(formatter, None, turns, "another", budget=100_000)
    finally:
        del tokenizer.encode_text
    history = sum(full.turn_tokens)
    assert again.token_ids[:history] == full.token_ids[:history]
    assert not any("long reasoning" in text for text in encoded)

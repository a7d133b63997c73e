"""Reply text made from token ids (``backends/_detokenize.py``) must be exactly the text vLLM's
own detokenizer makes: both are fed the same token streams with the real Qwen2.5 tokenizer, and
vLLM's ``FastIncrementalDetokenizer`` (what ``LLM`` uses with its tokenizer) is the reference.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qwen_magic.backends._detokenize import (
    SampleText,
    end_of_sequence_id,
    load_tokenizer,
    tokenizer_file,
)

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def vllm_tokenizer(tiny_model: Path) -> Any:
    registry = pytest.importorskip("vllm.tokenizers.registry")
    return registry.get_tokenizer(str(tiny_model))


def _vllm_text(
    vllm_tokenizer: Any, prompt: list[int], steps: list[list[int]], stop: list[str], last: str
) -> tuple[list[str], str | None]:
    """What vLLM streams for these steps: its deltas and the stop string it matched."""
    from vllm import SamplingParams
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

    params = SamplingParams(stop=stop or None, skip_special_tokens=True, max_tokens=10_000)
    request = SimpleNamespace(request_id="r", prompt_token_ids=prompt, sampling_params=params)
    detokenizer = FastIncrementalDetokenizer(vllm_tokenizer, request)
    deltas = []
    for number, step in enumerate(steps):
        final = number == len(steps) - 1
        matched = detokenizer.update(step, stop_terminated=final and last == "stop-token")
        finished = final or matched is not None
        deltas.append(detokenizer.get_next_output_text(finished, delta=True))
        if matched is not None:
            return deltas, matched
    return deltas, None


def _our_text(
    tokenizer: Any, prompt: list[int], steps: list[list[int]], stop: list[str], last: str
) -> tuple[list[str], str | None]:
    text = SampleText(tokenizer, prompt, stop)
    deltas = []
    for number, step in enumerate(steps):
        final = number == len(steps) - 1
        text.feed(step, ends_on_stop_token=final and last == "stop-token")
        deltas.append(text.take(finished=final or text.stop_string is not None))
        if text.stop_string is not None:
            return deltas, text.stop_string
    return deltas, None


def _random_steps(rng: random.Random, ids: list[int]) -> list[list[int]]:
    """Split ``ids`` into steps of one to three tokens, as an engine step delivers them."""
    steps, at = [], 0
    while at < len(ids):
        size = rng.choice((1, 1, 1, 2, 3))
        steps.append(ids[at : at + size])
        at += size
    return steps


TEXTS = (
    "Hello, world! The quick brown fox.\n\n```python\nprint('hi')\n```",
    "你好，世界！今天天气很好。🎉🚀 Ça va? naïve café",
    "  leading spaces, tabs\tand\nnew lines  ",
    "<think>typed markup</think> and <tool_call> stay text",
)


@pytest.mark.parametrize("case", range(24))
def test_streamed_text_is_what_vllm_makes(tokenizer: Any, vllm_tokenizer: Any, case: int) -> None:
    rng = random.Random(case)
    text = TEXTS[case % len(TEXTS)]
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if case % 3 == 0:  # special tokens inside the reply are skipped, as vLLM skips them
        ids.insert(rng.randrange(len(ids)), ENDOFTEXT)
    if case % 4 == 1:  # random tokens from the whole vocabulary, byte pieces included
        ids = [rng.randrange(151_643) for _ in range(30)]
    last = "stop-token" if case % 2 else "length"
    if last == "stop-token":
        ids.append(IM_END)
    prompt = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n").ids
    full = tokenizer.decode(ids, skip_special_tokens=True)
    stop = [full[len(full) // 2 : len(full) // 2 + rng.randint(1, 4)]] if case % 6 < 3 else []
    if stop and not stop[0].strip():
        stop = []
    steps = _random_steps(rng, ids)
    ours = _our_text(tokenizer, prompt, steps, stop, last)
    theirs = _vllm_text(vllm_tokenizer, prompt, steps, stop, last)
    assert ours == theirs
    if stop:
        assert ours[1] == stop[0] and stop[0] not in "".join(ours[0])


def test_a_possible_stop_string_is_held_back_until_it_is_clear(tokenizer: Any) -> None:
    text = SampleText(tokenizer, [], ["STOP"])
    text.feed(tokenizer.encode("Hello ST").ids)
    shown = text.take(finished=False)
    assert "ST" not in shown and shown.startswith("Hello")
    text.feed(tokenizer.encode("ART").ids)  # "START": not the stop string after all
    assert text.stop_string is None
    assert shown + text.take(finished=True) == "Hello START"


def test_the_earliest_finishing_stop_string_wins(tokenizer: Any) -> None:
    text = SampleText(tokenizer, [], ["cd", "abcdef", "b"])
    text.feed(tokenizer.encode("xx abcdef yy").ids)
    assert text.stop_string == "b" and text.take(finished=True) == "xx a"


def test_a_character_split_over_tokens_comes_out_whole(tokenizer: Any) -> None:
    ids = tokenizer.encode(" 🎉").ids
    assert len(ids) > 1  # after a space, the emoji is three byte-level tokens
    text = SampleText(tokenizer, [], [])
    pieces = []
    for token_id in ids:
        text.feed([token_id])
        pieces.append(text.take(finished=False))
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == " 🎉"


def test_only_a_folder_with_tokenizer_json_has_a_tokenizer_file(
    tiny_model: Path, tmp_path: Path
) -> None:
    assert tokenizer_file(str(tiny_model)) == tiny_model / "tokenizer.json"
    assert tokenizer_file(str(tmp_path)) is None
    assert tokenizer_file("Qwen/Qwen2.5-0.5B-Instruct") is None
    assert tokenizer_file(str(tmp_path / "model.gguf")) is None


def test_tokens_after_the_one_completing_a_stop_string_are_dropped(tokenizer: Any) -> None:
    ids = tokenizer.encode("one two three four").ids  # one token per word
    text = SampleText(tokenizer, [], [" two"])
    assert text.feed(ids) == 2  # "one", " two": the rest came in the same step, past the stop
    assert text.stop_string == " two" and text.take(finished=True) == "one"


def test_the_end_of_sequence_token_is_read_as_transformers_reads_it(
    tokenizer: Any, tiny_model: Path, tmp_path: Path
) -> None:
    assert end_of_sequence_id(str(tiny_model), tokenizer) == IM_END  # tokenizer_config.json
    (tmp_path / "special_tokens_map.json").write_text('{"eos_token": {"content": "<|endoftext|>"}}')
    assert end_of_sequence_id(str(tmp_path), tokenizer) == ENDOFTEXT
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    assert end_of_sequence_id(str(tmp_path), tokenizer) == ENDOFTEXT
    assert end_of_sequence_id(str(tmp_path / "missing"), tokenizer) is None

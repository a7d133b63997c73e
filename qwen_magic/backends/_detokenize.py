"""Token ids to reply text, made as vLLM's own detokenizer makes it, for an engine without one.

``vllm.LLM()`` loads the model's tokenizer and deep-copies it twice for its renderer's thread
pool (``vllm/renderers/hf.py``): 4.4 s of a 21 s start on an H100 and about 5 s on a 2-core CPU
(docs/benchmarks.md, section g). qwen-magic makes the prompt's token ids with its own tokenizer
and only needs text back, so when the model folder has a ``tokenizer.json`` the engine starts
with ``skip_tokenizer_init=True`` and the text comes from here instead:

- the ``tokenizers`` library's :class:`~tokenizers.decoders.DecodeStream`, primed with the
  prompt, as vLLM's fast detokenizer uses it (so a token's leading space and a character split
  over two tokens come out the same), special tokens skipped;
- stop strings checked on the new text, the text that might begin one held back until it is
  clear, the reply cut before the stop string and the tokens after it dropped: the rules of
  vLLM 0.32's ``vllm/v1/engine/detokenizer.py`` (``check_stop_strings``: the stop string that
  completes first wins; vLLM 0.26-0.31 took the first one listed), which vLLM cannot apply
  without its tokenizer.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_magic.backends.base import Delta

# The message tokenizers raises when a byte-fallback sequence left its stream unusable.
_INVALID_PREFIX = "Invalid prefix encountered"


def tokenizer_file(model: str) -> Path | None:
    """A model folder's ``tokenizer.json``; None for a hub id, a GGUF file or a folder without
    one (vLLM then loads its own tokenizer and makes the text)."""
    path = Path(model).expanduser() / "tokenizer.json"
    return path if path.is_file() else None


def load_tokenizer(model: str) -> Any:
    """The ``tokenizers.Tokenizer`` of a model folder with a ``tokenizer.json``."""
    from tokenizers import Tokenizer

    path = tokenizer_file(model)
    if path is None:
        raise FileNotFoundError(f"{model} has no tokenizer.json")
    return Tokenizer.from_file(str(path))


def end_of_sequence_id(model: str, tokenizer: Any) -> int | None:
    """The id of the model's end-of-sequence token, named by ``tokenizer_config.json`` (or
    ``special_tokens_map.json``) as transformers reads it: vLLM stops on it when it has loaded
    the tokenizer, so without that the engine asks for it."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            config = json.loads((Path(model).expanduser() / name).read_text("utf-8"))
        except (OSError, ValueError):
            continue
        token = config.get("eos_token") if isinstance(config, dict) else None
        if isinstance(token, dict):  # {"content": "<|im_end|>", ...}
            token = token.get("content")
        if isinstance(token, str) and (token_id := tokenizer.token_to_id(token)) is not None:
            return token_id
    return None


class SampleText:
    """The text of one sample, fed its token ids as they arrive.

    Args:
        tokenizer: The model's ``tokenizers.Tokenizer``.
        prompt_token_ids: The prompt, to decode the first tokens as they read after it.
        stop: Stop strings; the text ends before the first one that appears.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], stop: Sequence[str] = ()):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        # primed with the prompt, as vLLM does (the tokenizers that vLLM needs can do that)
        self._stream = DecodeStream(ids=list(prompt_token_ids), skip_special_tokens=True)
        self._stop = list(stop)
        self._hold_back = max((len(text) for text in self._stop), default=1) - 1
        self.text = ""
        self._shown = 0
        self.stop_string: str | None = None  # the stop string that ended the text, if any

    def feed(self, token_ids: Sequence[int], *, ends_on_stop_token: bool = False) -> int:
        """Decode new token ids; ``ends_on_stop_token``: the last one is the stop token (or end
        of sequence) that finished the sample, which is never shown.

        Returns:
            How many of ``token_ids`` belong to the sample: all of them, unless a stop string
            ended it before the last (several tokens come in one step with speculative decoding).
        """
        if self.stop_string is not None:
            return 0
        decoded = token_ids[:-1] if ends_on_stop_token else token_ids
        offsets = [len(self.text)]  # the text's length before and after each new token
        for token_id in decoded:
            self.text += self._step(token_id)
            offsets.append(len(self.text))
        if not self._stop or len(self.text) == offsets[0]:
            return len(token_ids)
        stop_end = self._cut_at_stop_string(new_chars=len(self.text) - offsets[0])
        if stop_end is None:
            return len(token_ids)
        return bisect.bisect_left(offsets, stop_end, lo=1)

    def take(self, *, finished: bool) -> str:
        """The text not yet taken; while unfinished, minus what could still begin a stop
        string."""
        end = len(self.text) if finished or self.stop_string else len(self.text) - self._hold_back
        if end <= self._shown:
            return ""
        new, self._shown = self.text[self._shown : end], end
        return new

    def _step(self, token_id: int) -> str:
        try:
            return self._stream.step(self._tokenizer, token_id) or ""
        except Exception as error:
            if not str(error).startswith(_INVALID_PREFIX):
                raise
            # Bytes that never form valid UTF-8 break the stream's state: start a new one,
            # as vLLM does (vllm-project/vllm#17448).
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)
            return self._stream.step(self._tokenizer, token_id) or ""

    def _cut_at_stop_string(self, *, new_chars: int) -> int | None:
        """End the text before the stop string that completes first in the new text (ties: the
        one listed first); returns where that stop string ended, None if none appeared."""
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self._stop:
            start = self.text.find(stop, max(0, len(self.text) - new_chars - len(stop) + 1))
            if start != -1 and (best is None or start + len(stop) < best[0]):
                best = (start + len(stop), start, stop)
        if best is None:
            return None
        end, start, self.stop_string = best
        self.text = self.text[:start]
        return end


class ReplyTexts:
    """The deltas of one engine run: vLLM's own text, or (given a tokenizer) text made here.

    Args:
        tokenizer: The model's ``tokenizers.Tokenizer``; None when vLLM makes the text.
        jobs: The run's requests, each with ``prompt_token_ids``, ``stop`` (stop strings to
            apply here), ``final_only`` (one delta per sample, when complete) and ``params.n``.
    """

    def __init__(self, tokenizer: Any | None, jobs: Sequence[Any]) -> None:
        self._tokenizer = tokenizer
        self._jobs = jobs
        self._texts: dict[tuple[int, int], SampleText] = {}
        self._token_ids: dict[tuple[int, int], list[int]] = {}  # final-only samples so far
        self._ended: set[tuple[int, int]] = set()

    def delta(self, index: int, sample: Any, cached: int | None) -> Delta | None:
        """The delta for a vLLM ``CompletionOutput`` of request ``index``; None if nothing new."""
        finished = sample.finish_reason is not None
        token_ids = tuple(sample.token_ids)
        if self._tokenizer is None:
            if sample.text or token_ids or finished:
                return Delta(sample.index, sample.text, token_ids, finished, sample.finish_reason,
                             cached)  # fmt: skip
            return None
        key = (index, sample.index)
        if key in self._ended:  # it hit a stop string; vLLM runs on for its siblings
            return None
        job = self._jobs[index]
        text = self._texts.get(key)
        if text is None:
            text = self._texts[key] = SampleText(self._tokenizer, job.prompt_token_ids, job.stop)
        kept = text.feed(token_ids, ends_on_stop_token=sample.finish_reason == "stop")
        reason = sample.finish_reason
        if text.stop_string is not None:
            finished, reason, token_ids = True, "stop", token_ids[:kept]
        if finished:
            self._ended.add(key)
        if job.final_only:
            so_far = self._token_ids.setdefault(key, [])
            so_far.extend(token_ids)
            if not finished:
                return None
            token_ids = tuple(so_far)
        new = text.take(finished=finished)
        if new or token_ids or finished:
            return Delta(sample.index, new, token_ids, finished, reason, cached)
        return None

    def stopped(self, index: int) -> bool:
        """Whether every sample of request ``index`` has ended here, on stop strings or not."""
        return all((index, sample) in self._ended for sample in range(self._jobs[index].params.n))

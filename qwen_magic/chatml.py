"""ChatML formatting: a system prompt, past turns and a new message -> the exact token ids.

Qwen chat models were trained on ChatML::

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Hello<|im_end|>
    <|im_start|>assistant

The prompt is built segment by segment, as Qwen's own ``make_context`` does: the control tokens
``<|im_start|>`` / ``<|im_end|>`` are inserted by id, and every piece of text (role, content) is
encoded as *plain text*. Text a user types that looks like a control or markup token
(``<|im_end|>``, ``<|endoftext|>``, and Qwen3's ``<think>``, ``</think>``, ``<tool_call>``,
``<tool_response>``, which are added tokens *not* marked special) therefore stays ordinary text and
can never end a turn, open a new one, or open or close a think block. Only what the chat template
itself writes (its empty think block, re-sent reasoning) uses those tokens.

For ordinary inputs the ids equal the model's own ``apply_chat_template``. Deliberate differences:

- content that *starts* with a line break is encoded on its own, so the ``\\n`` after the role is
  never merged with it into one token (the template's whole-text encoding would merge them).
  Keeping the boundary is what Qwen's ``make_context`` does and keeps every segment's ids cacheable;
- markup typed in content (above) is text here, real tokens there;
- every user message counts as a query (Qwen3's template does not count a user message that is
  one ``<tool_response>`` block; typed tool tags are text here, so it is no tool result).

This module imports neither vLLM nor IPython, and of this package only ``qwen_magic.template``
(how a chat template differs from bare ChatML; a leaf); it needs ``tokenizers``, ``jinja2`` to
read a model's chat template, and ``tiktoken`` only for Qwen(1)'s ``qwen.tiktoken``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qwen_magic.template import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    THINK_END,
    THINK_START,
    PromptBlock,
    TemplateProfile,
)

__all__ = [
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "SEED_SYSTEM",
    "THINK_END",
    "THINK_START",
    "ChatFormatter",
    "ChatMLError",
    "ChatTokenizer",
    "PromptBlock",
    "TemplateProfile",
]

SEED_SYSTEM = "You are a helpful assistant."

# (role, content) or (role, content, reasoning): an assistant message may carry its reasoning
# apart from the answer, as ``reasoning_content`` does for Hugging Face chat templates.
Message = tuple[str, str] | tuple[str, str, str | None]

# Qwen(1)'s tiktoken pre-tokenizer and special tokens (Qwen-7B-Chat tokenization_qwen.py).
_QWEN1_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+(?!\S)|\s+"""
)
_QWEN1_SPECIALS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))

# An added token that reads like markup (<think>, </tool_call>, <|fim_prefix|>): typed, it is text.
_MARKUP = re.compile(r"<[^<>\s]+>")


class ChatMLError(ValueError):
    """A tokenizer or template that cannot express ChatML."""


class ChatTokenizer:
    """A real tokenizer seen through ChatML: plain-text encoding plus the control-token ids.

    Use :meth:`load`. ``encode_text`` never produces a control or markup token (``<|im_end|>``,
    ``<think>``), whatever the text says; ``encode_template_text`` is for what the chat template
    itself writes.
    """

    def __init__(
        self,
        *,
        encode_plain: Any,
        encode_template: Any,
        decode: Any,
        token_ids: dict[str, int],
        chat_template: str | None,
        name: str,
    ) -> None:
        self._encode_plain = encode_plain
        self._encode_template = encode_template
        self._decode = decode
        self.name = name
        self.chat_template = chat_template
        self.profile = TemplateProfile.from_template(chat_template)
        self.im_start_id: int | None = token_ids.get(IM_START)
        self.im_end_id: int | None = token_ids.get(IM_END)
        self.endoftext_id = token_ids.get(ENDOFTEXT)
        self.think_start_id: int | None = token_ids.get(THINK_START)
        self.think_end_id: int | None = token_ids.get(THINK_END)
        self.stop_token_ids = [
            token_id
            for token_id in (self.im_end_id, self.endoftext_id, self.im_start_id)
            if token_id is not None
        ]
        self.newline_ids: list[int] = self.encode_text("\n")

    @property
    def default_system(self) -> str | None:
        """The system prompt the model's template uses when the user gives none."""
        return self.profile.default_system

    @property
    def is_chatml(self) -> bool:
        """Whether the tokenizer has ChatML's ``<|im_start|>`` and ``<|im_end|>`` tokens."""
        return self.im_start_id is not None and self.im_end_id is not None

    def require_chatml(self) -> None:
        """Raise :class:`ChatMLError`, saying what to do, unless this is a ChatML tokenizer."""
        if not self.is_chatml:
            missing = [t for t, i in ((IM_START, self.im_start_id), (IM_END, self.im_end_id))
                       if i is None]  # fmt: skip
            raise ChatMLError(
                f"this model's tokenizer has no {' / '.join(missing)} token, so it is not a "
                "ChatML (Qwen-style) chat model: use %%qwen --raw (QwenChat.complete) to "
                "continue plain text"
            )

    @classmethod
    def load(cls, source: Any) -> ChatTokenizer:
        """Wrap a tokenizer: a Hugging Face folder or tokenizer object, or a ``.tiktoken`` file.

        Args:
            source: A folder with ``tokenizer.json``; a ``transformers`` fast tokenizer; a
                ``tokenizers.Tokenizer``; a path to Qwen(1)'s ``qwen.tiktoken``; or a
                ChatTokenizer (returned as is).
        """
        if isinstance(source, ChatTokenizer):
            return source
        if isinstance(source, (str, Path)):
            path = Path(source).expanduser()
            if path.is_file() and path.suffix == ".tiktoken":
                return cls._from_tiktoken(path)
            if path.is_dir():
                return cls._from_folder(path)
            raise ChatMLError(
                f"no tokenizer at {path}: pass a model folder (with tokenizer.json) "
                "or a qwen.tiktoken file"
            )
        backend = getattr(source, "backend_tokenizer", None)
        if backend is not None:  # a transformers fast tokenizer
            template = getattr(source, "chat_template", None)
            return cls._from_backend(backend.to_str(), template, type(source).__name__)
        if hasattr(source, "to_str") and hasattr(source, "encode_special_tokens"):
            return cls._from_backend(source.to_str(), None, "tokenizers.Tokenizer")
        raise ChatMLError(
            f"cannot use a {type(source).__name__} as a tokenizer: pass a model folder, "
            "a transformers fast tokenizer or a qwen.tiktoken file"
        )

    @classmethod
    def _from_folder(cls, folder: Path) -> ChatTokenizer:
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            tiktoken_files = sorted(folder.glob("*.tiktoken"))
            if tiktoken_files:
                return cls._from_tiktoken(tiktoken_files[0])
            raise ChatMLError(f"{folder} has no tokenizer.json: is it a Hugging Face model folder?")
        template = None
        jinja_file = folder / "chat_template.jinja"
        config_file = folder / "tokenizer_config.json"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        elif config_file.is_file():
            template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            named = {entry["name"]: entry["template"] for entry in template}
            template = named.get("default")
        return cls._from_backend(tokenizer_file.read_text(encoding="utf-8"), template, str(folder))

    @classmethod
    def _from_backend(cls, serialized: str, template: str | None, name: str) -> ChatTokenizer:
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(serialized)
        plain.encode_special_tokens = True  # "<|im_end|>" typed as text stays text
        _treat_markup_as_special(plain)  # ... and so do "<think>", "<tool_call>" (not special)
        trusted: list[Tokenizer] = []  # built on first use: only Qwen3's think block needs it

        def encode_template(text: str) -> list[int]:
            if not trusted:
                trusted.append(Tokenizer.from_str(serialized))
            return trusted[0].encode(text, add_special_tokens=False).ids

        token_ids = {
            token: token_id
            for token in (IM_START, IM_END, ENDOFTEXT, THINK_START, THINK_END)
            if (token_id := plain.token_to_id(token)) is not None
        }
        return cls(
            encode_plain=lambda text: plain.encode(text, add_special_tokens=False).ids,
            encode_template=encode_template,
            decode=lambda ids: plain.decode(list(ids), skip_special_tokens=False),
            token_ids=token_ids,
            chat_template=template,
            name=name,
        )

    @classmethod
    def _from_tiktoken(cls, path: Path) -> ChatTokenizer:
        import base64

        import tiktoken

        ranks = {
            base64.b64decode(token): int(rank)
            for token, rank in (
                line.split() for line in path.read_text(encoding="utf-8").splitlines() if line
            )
        }
        specials = {token: len(ranks) + index for index, token in enumerate(_QWEN1_SPECIALS)}
        encoding = tiktoken.Encoding(
            name=path.stem, pat_str=_QWEN1_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )

        def encode_plain(text: str) -> list[int]:
            text = unicodedata.normalize("NFC", text)  # as Qwen's QWenTokenizer does
            return encoding.encode(text, allowed_special=set(), disallowed_special=())

        def encode_template(text: str) -> list[int]:
            return encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")

        return cls(
            encode_plain=encode_plain,
            encode_template=encode_template,
            decode=lambda ids: encoding.decode(list(ids)),
            token_ids=specials,
            chat_template=None,
            name=str(path),
        )

    def encode_text(self, text: str) -> list[int]:
        """Encode ``text`` as plain text: control and markup look-alikes become ordinary tokens."""
        return list(self._encode_plain(text))

    def encode_template_text(self, text: str) -> list[int]:
        """Encode trusted template text (a thinking block), where added tokens are parsed."""
        return list(self._encode_template(text))

    def encode_around_template(self, pieces: Sequence[tuple[str, bool]]) -> list[int]:
        """Encode ``(text, from_template)`` pieces as the template's whole rendered text is
        encoded, except that only the added tokens *the template wrote* are tokens.

        The text between two template-written tokens is encoded in one piece, as a tokenizer
        does between added tokens, so ``<think>\\n`` + reasoning gives the ids of the whole.
        """
        ids: list[int] = []
        text: list[str] = []
        for piece, from_template in pieces:
            if not from_template:
                text.append(piece)
                continue
            start = 0
            for match in _MARKUP.finditer(piece):
                token_ids = self.encode_template_text(match.group())
                if len(token_ids) != 1 or token_ids == self.encode_text(match.group()):
                    continue  # markup-like text, but not an added token: stays in the text
                text.append(piece[start : match.start()])
                ids += self.encode_text("".join(text)) + token_ids
                text, start = [], match.end()
            text.append(piece[start:])
        return ids + self.encode_text("".join(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, control tokens included (for showing what the model saw)."""
        return self._decode(ids)

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.name!r})"


def _treat_markup_as_special(tokenizer: Any) -> None:
    """Mark the added tokens that read like markup special, so that ``encode_special_tokens``
    keeps them as text too. Added tokens that are ordinary words keep their ids."""
    from tokenizers import AddedToken

    tokenizer.add_special_tokens(
        [
            AddedToken(
                token.content,
                single_word=token.single_word,
                lstrip=token.lstrip,
                rstrip=token.rstrip,
                normalized=token.normalized,
                special=True,
            )
            for token in tokenizer.get_added_tokens_decoder().values()
            if not token.special and _MARKUP.fullmatch(token.content)
        ]
    )


class ChatFormatter:
    """Turns (role, content) messages into ChatML ids, caching each segment's ids.

    A conversation re-sends its whole history on every turn; with the cache only the new message
    is encoded, so formatting a turn costs O(new text) tokenizer work instead of O(history).
    """

    def __init__(self, tokenizer: ChatTokenizer | Any, *, cache_size: int = 4096) -> None:
        self.tokenizer = ChatTokenizer.load(tokenizer)
        self.tokenizer.require_chatml()
        # (role, content, None) for a plain segment; ("assistant", answer, reasoning) for a
        # reply whose reasoning the template writes again.
        self._cache: OrderedDict[tuple[str, str, str | None], tuple[int, ...]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def default_system(self) -> str | None:
        return self.tokenizer.default_system

    @property
    def profile(self) -> TemplateProfile:
        return self.tokenizer.profile

    def segment(self, role: str, content: str) -> tuple[int, ...]:
        """Ids of ``<|im_start|>role\\ncontent<|im_end|>\\n``, from the cache when possible."""
        return self._cached((role, content, None), lambda: self._encode_segment(role, content))

    def _cached(
        self, key: tuple[str, str, str | None], encode: Callable[[], Sequence[int]]
    ) -> tuple[int, ...]:
        ids = self._cache.get(key)
        if ids is None:
            ids = tuple(encode())
            self._store(key, ids)
        else:
            self._cache.move_to_end(key)
        return ids

    def _store(self, key: tuple[str, str, str | None], ids: Sequence[int]) -> None:
        self._cache[key] = tuple(ids)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def encode_uncached(self, role: str, content: str) -> list[int]:
        """Like :meth:`segment`, but a new segment is not cached (text that may be refused)."""
        cached = self._cache.get((role, content, None))
        return list(cached if cached is not None else self._encode_segment(role, content))

    def remember(self, role: str, content: str, ids: Sequence[int]) -> None:
        """Cache the ids of a segment encoded with :meth:`encode_uncached`."""
        self._store((role, content, None), ids)

    def _encode_segment(self, role: str, content: str) -> tuple[int, ...]:
        return self._wrap(role, self.tokenizer.encode_text(content))

    def _wrap(self, role: str, content_ids: Sequence[int]) -> tuple[int, ...]:
        tokenizer = self.tokenizer
        return (
            tokenizer.im_start_id,
            *tokenizer.encode_text(role),
            *tokenizer.newline_ids,
            *content_ids,
            tokenizer.im_end_id,
            *tokenizer.newline_ids,
        )

    def segment_text(self, role: str, content: str) -> str:
        return f"{IM_START}{role}\n{content}{IM_END}\n"

    def generation_prompt(self, *, enable_thinking: bool | None = None) -> tuple[str, list[int]]:
        """``<|im_start|>assistant\\n`` plus what the template adds for ``enable_thinking``:
        Qwen3's empty think block when False, an opened ``<think>`` for templates that open it."""
        suffix = self.profile.suffix(enable_thinking)
        tokenizer = self.tokenizer
        ids = [
            tokenizer.im_start_id,
            *tokenizer.encode_text("assistant"),
            *tokenizer.newline_ids,
            *(tokenizer.encode_template_text(suffix) if suffix else ()),
        ]
        return f"{IM_START}assistant\n{suffix}", ids

    def past_reply(self, content: str) -> str:
        """A past reply's *text* as the template shows it before the last user message (Qwen3
        drops a ``<think>`` block in it); for replies stored without their reasoning apart."""
        if self.profile.strips_past_thinking and THINK_END in content:
            return content.split(THINK_END)[-1].lstrip("\n")
        return content

    def past_turn(
        self,
        answer: str,
        reasoning: str | None = None,
        *,
        after_last_user: bool = False,
        last: bool = False,
    ) -> tuple[str, tuple[int, ...]]:
        """A past assistant turn as the template shows it again: text and ids.

        Args:
            answer: The reply without its reasoning (or, with ``reasoning`` None, a reply
                whose text may hold its ``<think>`` block, split as the template splits it).
            reasoning: The reply's reasoning, kept apart (``reasoning_content``).
            after_last_user: The turn comes after the last user message (a trailing assistant
                message); Qwen3 shows reasoning only there.
            last: It is the last message; Qwen3 then writes a think block even when empty.
        """
        profile = self.profile
        if reasoning is None and profile.strips_past_thinking and THINK_END in answer:
            parts = answer.split(THINK_END)  # exactly as Qwen3's template splits it
            reasoning = parts[0].rstrip("\n").split(THINK_START)[-1].lstrip("\n")
            answer = parts[-1].lstrip("\n")
        keep = (
            profile.keeps_reasoning_after_last_user if after_last_user else profile.keeps_reasoning
        )
        if not keep or not (reasoning or last):
            return self.segment_text("assistant", answer), self.segment("assistant", answer)
        reasoning, answer = (reasoning or "").strip("\n"), answer.lstrip("\n")
        opening, closing = profile.reasoning_open, profile.reasoning_close
        pieces = [(opening, True), (reasoning, False), (closing, True), (answer, False)]
        ids = self._cached(
            ("assistant", answer, reasoning),
            lambda: self._wrap("assistant", self.tokenizer.encode_around_template(pieces)),
        )
        return self.segment_text("assistant", "".join(text for text, _ in pieces)), ids

    def format(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> tuple[str, list[int]]:
        """Format messages as ChatML.

        Args:
            messages: (role, content) pairs in order, or (role, content, reasoning) for an
                assistant reply whose reasoning is kept apart; assistant replies are shown as
                the model's template shows a past reply (see :meth:`past_turn`).
            add_generation_prompt: End with ``<|im_start|>assistant\\n`` so the model replies.
            enable_thinking: Qwen3's switch; False appends its empty think block.

        Returns:
            The ChatML text and its token ids.
        """
        last_user = max((i for i, message in enumerate(messages) if message[0] == "user"),
                        default=-1)  # fmt: skip
        texts: list[str] = []
        ids: list[int] = []
        for index, (role, content, *reasoning) in enumerate(messages):
            if role == "assistant":
                text, segment_ids = self.past_turn(
                    content,
                    reasoning[0] if reasoning else None,
                    after_last_user=index > last_user,
                    last=index == len(messages) - 1,
                )
            else:
                text, segment_ids = self.segment_text(role, content), self.segment(role, content)
            texts.append(text)
            ids.extend(segment_ids)
        if add_generation_prompt:
            text, prompt_ids = self.generation_prompt(enable_thinking=enable_thinking)
            texts.append(text)
            ids.extend(prompt_ids)
        return "".join(texts), ids


def __getattr__(name: str) -> Any:
    # ``qwen_magic.chatml.format_prompt`` stays where the tutorial's users import it from; it
    # lives in ``qwen_magic.prompt`` (budget fitting), so this module stays a leaf.
    if name == "format_prompt":
        from qwen_magic.prompt import format_prompt

        return format_prompt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

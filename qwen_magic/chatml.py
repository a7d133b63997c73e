"""ChatML formatting: a system prompt, past turns and a new message -> the exact token ids.

Qwen chat models were trained on ChatML::

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Hello<|im_end|>
    <|im_start|>assistant

The prompt is built segment by segment, as Qwen's own ``make_context`` does: the control tokens
``<|im_start|>`` / ``<|im_end|>`` are inserted by id, and every piece of text (role, content) is
encoded as *plain text*. Text a user types that looks like a control token (``<|im_end|>``,
``<|endoftext|>``) therefore stays ordinary text and can never end a turn or open a new one.

For ordinary inputs the ids equal the model's own ``apply_chat_template``. One deliberate
difference: content that *starts* with a line break is encoded on its own, so the ``\\n`` after the
role is never merged with it into one token (the template's whole-text encoding would merge them).
Keeping the boundary is what Qwen's ``make_context`` does and keeps every segment's ids cacheable.

This module imports neither vLLM nor IPython, nor any other module of this package (a leaf); it
needs ``tokenizers``, ``jinja2`` to read a model's chat template, and ``tiktoken`` only for
Qwen(1)'s ``qwen.tiktoken``.
"""

from __future__ import annotations

import json
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SEED_SYSTEM = "You are a helpful assistant."

# Qwen(1)'s tiktoken pre-tokenizer and special tokens (Qwen-7B-Chat tokenization_qwen.py).
_QWEN1_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+(?!\S)|\s+"""
)
_QWEN1_SPECIALS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))

_PROBE = "\x00probe\x00"


class ChatMLError(ValueError):
    """A tokenizer or template that cannot express ChatML."""


@dataclass(frozen=True)
class TemplateProfile:
    """How a model's chat template differs from bare ChatML, found by rendering it.

    Attributes:
        default_system: System prompt the template inserts when none is given (Qwen2.5's
            "You are Qwen, ..."); None when it inserts none (Qwen3).
        thinking_suffix: Text after ``<|im_start|>assistant\\n`` with enable_thinking=False
            (Qwen3: an empty think block); "" when the template has no thinking switch.
        strips_past_thinking: Whether past assistant turns lose their ``<think>`` block.
    """

    default_system: str | None = None
    thinking_suffix: str = ""
    strips_past_thinking: bool = False

    @classmethod
    def from_template(cls, template: str | None) -> TemplateProfile:
        """Render ``template`` on probe conversations and read off its ChatML conventions."""
        if not template or IM_START not in template:
            return cls()
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = json.dumps
        try:
            compiled = env.from_string(template)
        except Exception:  # a template that does not even compile loses only these refinements
            return cls()

        def render(messages: list[dict[str, str]], **kwargs: Any) -> str:
            return compiled.render(messages=messages, bos_token="", eos_token="", **kwargs)

        return cls.from_render(render)

    @classmethod
    def from_render(cls, render: Any) -> TemplateProfile:
        """Read the conventions off a function that renders the chat template (here or on a
        server): ``render(messages, add_generation_prompt=..., [enable_thinking=...])``."""
        user = [{"role": "user", "content": _PROBE}]
        try:
            bare = render(user, add_generation_prompt=False)
            thinking_off = render(user, add_generation_prompt=True, enable_thinking=False)
            past = render(
                [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"},
                    {"role": "user", "content": "b"},
                ],
                add_generation_prompt=False,
            )
        except Exception:  # best effort: an odd template only loses these refinements
            return cls()
        system_head = f"{IM_START}system\n"
        default_system = None
        if bare.startswith(system_head) and IM_END in bare:
            default_system = bare[len(system_head) : bare.index(IM_END)]
        # What add_generation_prompt appends, past "<|im_start|>assistant\n" (a template
        # without a generation-prompt branch appends nothing).
        assistant_head = f"{IM_START}assistant\n"
        generation = thinking_off[len(bare) :] if thinking_off.startswith(bare) else ""
        suffix = generation[len(assistant_head) :] if generation.startswith(assistant_head) else ""
        return cls(
            default_system=default_system,
            thinking_suffix=suffix,
            strips_past_thinking=f"{IM_START}assistant\nA{IM_END}" in past,
        )


class ChatTokenizer:
    """A real tokenizer seen through ChatML: plain-text encoding plus the control-token ids.

    Use :meth:`load`. ``encode_text`` never produces a special token, whatever the text says.
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
        trusted: list[Tokenizer] = []  # built on first use: only Qwen3's think block needs it

        def encode_template(text: str) -> list[int]:
            if not trusted:
                trusted.append(Tokenizer.from_str(serialized))
            return trusted[0].encode(text, add_special_tokens=False).ids

        token_ids = {
            token: token_id
            for token in (IM_START, IM_END, ENDOFTEXT)
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
        """Encode ``text`` as plain text: special-token look-alikes become ordinary tokens."""
        return list(self._encode_plain(text))

    def encode_template_text(self, text: str) -> list[int]:
        """Encode trusted template text (a thinking block), where added tokens are parsed."""
        return list(self._encode_template(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, control tokens included (for showing what the model saw)."""
        return self._decode(ids)

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.name!r})"


class ChatFormatter:
    """Turns (role, content) messages into ChatML ids, caching each segment's ids.

    A conversation re-sends its whole history on every turn; with the cache only the new message
    is encoded, so formatting a turn costs O(new text) tokenizer work instead of O(history).
    """

    def __init__(self, tokenizer: ChatTokenizer | Any, *, cache_size: int = 4096) -> None:
        self.tokenizer = ChatTokenizer.load(tokenizer)
        self.tokenizer.require_chatml()
        self._cache: OrderedDict[tuple[str, str], tuple[int, ...]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def default_system(self) -> str | None:
        return self.tokenizer.default_system

    def segment(self, role: str, content: str) -> tuple[int, ...]:
        """Ids of ``<|im_start|>role\\ncontent<|im_end|>\\n``, from the cache when possible."""
        key = (role, content)
        ids = self._cache.get(key)
        if ids is None:
            ids = self._encode_segment(role, content)
            self.remember(role, content, ids)
        else:
            self._cache.move_to_end(key)
        return ids

    def encode_uncached(self, role: str, content: str) -> list[int]:
        """Like :meth:`segment`, but a new segment is not cached (text that may be refused)."""
        cached = self._cache.get((role, content))
        return list(cached if cached is not None else self._encode_segment(role, content))

    def remember(self, role: str, content: str, ids: Sequence[int]) -> None:
        """Cache the ids of a segment encoded with :meth:`encode_uncached`."""
        self._cache[(role, content)] = tuple(ids)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _encode_segment(self, role: str, content: str) -> tuple[int, ...]:
        tokenizer = self.tokenizer
        return (
            tokenizer.im_start_id,
            *tokenizer.encode_text(role),
            *tokenizer.newline_ids,
            *tokenizer.encode_text(content),
            tokenizer.im_end_id,
            *tokenizer.newline_ids,
        )

    def segment_text(self, role: str, content: str) -> str:
        return f"{IM_START}{role}\n{content}{IM_END}\n"

    def generation_prompt(self, *, enable_thinking: bool | None = None) -> tuple[str, list[int]]:
        """``<|im_start|>assistant\\n`` plus, with enable_thinking=False, the template's empty
        think block (Qwen3)."""
        suffix = self.tokenizer.profile.thinking_suffix if enable_thinking is False else ""
        tokenizer = self.tokenizer
        ids = [
            tokenizer.im_start_id,
            *tokenizer.encode_text("assistant"),
            *tokenizer.newline_ids,
            *(tokenizer.encode_template_text(suffix) if suffix else ()),
        ]
        return f"{IM_START}assistant\n{suffix}", ids

    def past_reply(self, content: str) -> str:
        """A past assistant reply as the template shows it again (Qwen3 drops its thinking)."""
        if self.tokenizer.profile.strips_past_thinking and "</think>" in content:
            return content.split("</think>")[-1].lstrip("\n")
        return content

    def format(
        self,
        messages: Sequence[tuple[str, str]],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> tuple[str, list[int]]:
        """Format (role, content) messages as ChatML.

        Args:
            messages: (role, content) pairs in order; assistant replies are shown as the model's
                template would show a past reply.
            add_generation_prompt: End with ``<|im_start|>assistant\\n`` so the model replies.
            enable_thinking: Qwen3's switch; False appends its empty think block.

        Returns:
            The ChatML text and its token ids.
        """
        texts: list[str] = []
        ids: list[int] = []
        for role, content in messages:
            shown = self.past_reply(content) if role == "assistant" else content
            texts.append(self.segment_text(role, shown))
            ids.extend(self.segment(role, shown))
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

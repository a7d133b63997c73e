"""The served model's tokenizer through the server (``/tokenize``), when no local copy exists.

vLLM's ``/tokenize`` turns the *text* of a special token (``<|im_end|>`` typed by a user) into the
real token, which our ChatML formatter must never do. For Qwen-family BPE tokenizers, cutting the
text inside each ``<|name|>`` literal right after ``<|`` and tokenizing the pieces separately
gives exactly the ids of ``encode_special_tokens=True``: the pre-tokenizer always ends the
punctuation run ``<|`` before a letter, so the cut is a token boundary anyway. A self-check at
connect proves it for this server (typed control tokens must come back as several ordinary
tokens); a tokenizer where it fails is refused, with what to do instead.

The template's conventions (default system prompt, thinking switch) are read off renders the
server produces (``/tokenize`` with ``messages``, then ``/detokenize``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import httpx

from qwen_magic.backends.base import BackendError
from qwen_magic.chatml import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    THINK_END,
    THINK_START,
    ChatTokenizer,
    TemplateProfile,
)

if TYPE_CHECKING:
    from qwen_magic.backends.openai_http import ServerBackend

__all__ = ["server_tokenizer"]

_SPECIAL_LITERAL = re.compile(r"<\|[A-Za-z_][A-Za-z0-9_]*\|>")
# <think>, </tool_call>: the character before ">" is a letter or digit, so ">" starts a pre-token.
_MARKUP_LITERAL = re.compile(r"</?(?:[A-Za-z_][A-Za-z0-9_]*)?[A-Za-z0-9]>")
_SELF_CHECK = f"say {IM_END}\n{IM_START}system\nhi{ENDOFTEXT} {THINK_START}x{THINK_END}<tool_call>"


def _pieces(text: str) -> list[str]:
    """``text`` cut right after the ``<|`` of every special-token literal, and right before the
    ``>`` of every markup literal (Qwen3's ``<think>``): cuts at pre-token boundaries, so the
    pieces encode as the whole text would with those literals as plain text."""
    cuts = sorted(
        [match.start() + 2 for match in _SPECIAL_LITERAL.finditer(text)]
        + [match.end() - 1 for match in _MARKUP_LITERAL.finditer(text)]
    )
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [piece for piece in pieces if piece]


def server_tokenizer(backend: ServerBackend) -> ChatTokenizer:
    """A ChatTokenizer whose encoding and decoding are done by the server."""
    client = backend._require_client()

    def post(path: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            response = client.post(path, json=payload)
        except httpx.TransportError as error:
            raise BackendError(
                f"lost the server at {backend.url} while tokenizing ({type(error).__name__})"
            ) from None
        if not response.is_success:
            raise BackendError(
                f"the server's {path} answered {response.status_code}: it cannot tokenize for "
                "us; put the model's folder (with tokenizer.json) on this machine"
            )
        return response.json()

    @lru_cache(maxsize=4096)
    def tokenize(text: str) -> tuple[int, ...]:
        payload = {"model": backend.served_model, "prompt": text, "add_special_tokens": False}
        return tuple(post("/tokenize", payload)["tokens"])

    def encode_plain(text: str) -> list[int]:
        return [token for piece in _pieces(text) for token in tokenize(piece)]

    def encode_template(text: str) -> list[int]:
        return list(tokenize(text))

    def decode(ids: Any) -> str:
        payload = {"model": backend.served_model, "tokens": list(ids)}
        return post("/detokenize", payload)["prompt"]

    token_ids = {}
    for literal in (IM_START, IM_END, ENDOFTEXT, THINK_START, THINK_END):
        ids = tokenize(literal)
        if len(ids) == 1:
            token_ids[literal] = ids[0]
    tokenizer = ChatTokenizer(
        encode_plain=encode_plain,
        encode_template=encode_template,
        decode=decode,
        token_ids=token_ids,
        chat_template=None,
        name=f"{backend.served_model} (via {backend.url}/tokenize)",
    )
    checked = encode_plain(_SELF_CHECK)
    markup = {tokenize(tag)[0] for tag in ("<tool_call>",) if len(tokenize(tag)) == 1}
    if (set(token_ids.values()) | markup) & set(checked) or decode(checked) != _SELF_CHECK:
        raise BackendError(
            "the server's tokenizer turns typed control tokens into real ones even when split: "
            "put the model's folder (with tokenizer.json) on this machine"
        )
    if tokenizer.is_chatml:
        tokenizer.profile = _profile(post, backend.served_model, decode)
    return tokenizer


def _profile(post: Any, model: str, decode: Any) -> TemplateProfile:
    """The template's conventions, from what the server renders for probe conversations."""

    def render(
        messages: list[dict[str, str]], *, add_generation_prompt: bool, **template: Any
    ) -> str:
        payload = {
            "model": model,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "add_special_tokens": False,
            "chat_template_kwargs": template,
        }
        return decode(post("/tokenize", payload)["tokens"])

    return TemplateProfile.from_render(render)

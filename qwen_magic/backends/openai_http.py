"""A backend that talks to a running vLLM OpenAI-compatible server (``vllm serve``).

The prompt goes to ``/v1/completions`` as the exact ChatML token ids our formatter built (vLLM
takes a list of ids as ``prompt``), so the model sees what it would see in-process: typed control
tokens stay text, and the server's prefix cache still serves a conversation's history. Every
sampling value is sent explicitly, ``max_tokens`` included: a server left to its defaults would
answer with 16 tokens and the model's generation_config.

- At connect: ``/health``, ``/version`` and ``/v1/models`` (the served model and its context
  length); each failure is one line saying what to do.
- Streaming is Server-Sent Events; closing the stream (an interrupt, a consumer that stops)
  closes the HTTP response and the server aborts the request.
- A generation request is never retried (it could run twice); the read timeout is long, since a
  busy server may take a while before its first token.
- The API key goes into the ``Authorization`` header only: it is never part of a repr, a
  message, the status or a log line.

Only this module (and the managed server) speaks HTTP.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from qwen_magic.backends.base import BackendError, BackendInfo, BatchRequest, Delta
from qwen_magic.sampling import GENERATION_DEFAULT_KEYS, resolve, validate

__all__ = ["ServerBackend", "normalise_url"]

DEFAULT_READ_TIMEOUT = 600.0
DEFAULT_CONCURRENCY = 32  # requests a batch keeps in flight at once


def normalise_url(url: str) -> str:
    """The server's root URL: ``host:8000``, ``http://host:8000/v1/`` -> ``http://host:8000``."""
    text = url.strip()
    if not text:
        raise BackendError("no server URL given: pass one like http://localhost:8000")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:  # a port that is not a number
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise BackendError(f"{url!r} is not a server URL: pass one like http://localhost:8000")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def _server_message(response: httpx.Response) -> str:
    """The error message in a vLLM error body (JSON), else the body's first line."""
    try:
        body = response.json()
    except ValueError:
        return _first_line(response.text)
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return _first_line(str(error.get("message", error)))
    return _first_line(str(error))


class ServerBackend:
    """A model served by ``vllm serve`` at ``url``.

    Args:
        url: The server, with or without ``/v1``.
        api_key: Sent as a bearer token (never shown).
        api_key_env: The environment variable the key came from, named in a 401 message.
        model: Which served model to use when the server serves several.
        read_timeout: Seconds to wait for the next piece of a reply.
        on_close: Called by :meth:`close` (a managed server stops itself there).

    Raises:
        BackendError: The server cannot be reached, refuses the key, or serves no such model.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        api_key_env: str = "VLLM_API_KEY",
        model: str | None = None,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        on_close: Any = None,
    ) -> None:
        self.url = normalise_url(url)
        self._api_key_env = api_key_env
        self._has_key = bool(api_key)
        self._on_close = on_close
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(read_timeout, connect=10.0)
        self._client: httpx.Client | None = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, trust_env=False
        )
        try:
            self._connect(model)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ connecting

    def _get(self, path: str) -> httpx.Response:
        try:
            return self._require_client().get(path)
        except httpx.TransportError as error:
            raise BackendError(
                f"cannot reach a vLLM server at {self.url} ({type(error).__name__}): is it "
                "running, and is the URL right?"
            ) from None

    def _connect(self, model: str | None) -> None:
        health = self._get("/health")
        if health.status_code == 503:
            raise BackendError(
                f"the vLLM server at {self.url} is up but its engine is not ready (503): "
                "wait until it has started, then load again"
            )
        if health.status_code != 200:
            raise BackendError(
                f"{self.url} answered {health.status_code} on /health: is it a vLLM server?"
            )
        version = self._get("/version")
        self.version = version.json().get("version", "unknown") if version.is_success else "?"
        models = self._get("/v1/models")
        if models.status_code == 401 and not self._has_key:
            raise BackendError(
                f"the vLLM server at {self.url} needs an API key (401 Unauthorized): "
                f"${self._api_key_env} is not set (or name another variable with --api-key-env)"
            )
        if models.status_code == 401:
            raise BackendError(
                f"the vLLM server at {self.url} refused the API key (401 Unauthorized): put "
                f"the right key in ${self._api_key_env} (or name another variable with "
                "--api-key-env)"
            )
        if not models.is_success:
            raise BackendError(
                f"{self.url} answered {models.status_code} on /v1/models "
                f"({_server_message(models)}): is it a vLLM OpenAI-compatible server?"
            )
        cards = [card for card in models.json().get("data", []) if card.get("max_model_len")]
        names = [card["id"] for card in cards]
        if model is not None:
            cards = [card for card in cards if model in (card["id"], card.get("root"))]
        if len(cards) != 1:
            wanted = f"no model {model!r}" if model is not None else "several models"
            raise BackendError(
                f"the server at {self.url} serves {wanted} (it serves {', '.join(names) or 'none'})"
                ": name one after the URL (%qwen_load --server URL MODEL)"
            )
        card = cards[0]
        self.served_model: str = card["id"]
        self.root: str = card.get("root") or card["id"]
        self.max_model_len = int(card["max_model_len"])
        self.generation_defaults = self._local_generation_defaults()

    def _local_generation_defaults(self) -> dict[str, Any]:
        """The model's generation_config.json values, when its folder is on this machine.

        The server applies them to unset fields; we send them explicitly instead, so a reply
        gets exactly the values ``Reply.sampling`` reports.
        """
        config = Path(self.root) / "generation_config.json"
        if not config.is_file():
            return {}
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {key: data[key] for key in GENERATION_DEFAULT_KEYS if key in data}

    def _require_client(self) -> httpx.Client:
        if self._client is None:
            raise BackendError("the connection to the server was closed: load again")
        return self._client

    # ------------------------------------------------------------------ facts

    def __repr__(self) -> str:
        state = "closed" if self._client is None else f"{self.max_model_len} tokens"
        return f"ServerBackend({self.url!r}, model={self.served_model!r}, {state})"

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            model=self.served_model,
            max_model_len=self.max_model_len,
            generation_defaults=dict(self.generation_defaults),
            where=self.url,
            version=f"vLLM {self.version} (server)",
        )

    @property
    def closed(self) -> bool:
        return self._client is None

    def status(self) -> dict[str, str]:
        """Server facts for ``%qwen_status`` (never the key)."""
        return {"server": self.url, "served model": self.served_model}

    def tokenizer(self) -> Any:
        """The model's tokenizer: a local copy when the model's folder is on this machine."""
        if Path(self.root).is_dir():
            return Path(self.root)
        from qwen_magic.backends.server_tokenizer import server_tokenizer

        return server_tokenizer(self)

    # ------------------------------------------------------------------ generating

    def resolve_sampling(self, num_prompt_tokens: int, **sampling: Any) -> dict[str, Any]:
        """Every sampling value a request sends: the user's, the model's, then vLLM's neutral."""
        given = validate(sampling)
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise BackendError(
                f"the prompt is {num_prompt_tokens} tokens, the server's context holds "
                f"{self.max_model_len}: shorten the prompt or history"
            )
        return resolve(
            given,
            model_defaults=self.generation_defaults,
            max_model_len=self.max_model_len,
            room=room,
            explicit=True,
        )

    def request_body(
        self, prompt_token_ids: list[int], *, n: int, stop_token_ids: list[int], **sampling: Any
    ) -> dict[str, Any]:
        """The JSON a stream sends (exact ids, every value explicit)."""
        values = self.resolve_sampling(len(prompt_token_ids), **sampling)
        if n > 1 and values.get("temperature") == 0:
            raise BackendError(
                f"{n} samples need a temperature above 0 (greedy decoding makes them identical):"
                " raise the temperature (-t) or ask for one sample"
            )
        return {
            "model": self.served_model,
            "prompt": list(prompt_token_ids),
            "n": n,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            "stop_token_ids": list(stop_token_ids),
            "skip_special_tokens": True,
            **values,
        }

    def stream(
        self,
        prompt_token_ids: list[int],
        *,
        n: int = 1,
        stop_token_ids: list[int],
        **sampling: Any,
    ) -> Iterator[Delta]:
        """Stream a completion; closing the iterator closes the response (the server aborts)."""
        body = self.request_body(prompt_token_ids, n=n, stop_token_ids=stop_token_ids, **sampling)
        yield from self._post(body)

    def _post(self, body: dict[str, Any]) -> Iterator[Delta]:
        client = self._require_client()
        try:
            with client.stream("POST", "/v1/completions", json=body) as response:
                if not response.is_success:
                    response.read()
                    raise BackendError(self._refusal(response))
                yield from self._deltas(response)
        except httpx.TransportError as error:
            raise BackendError(
                f"the connection to the server at {self.url} broke mid-reply "
                f"({type(error).__name__}): is the server still running?"
            ) from None

    def generate_many(
        self,
        requests: Sequence[BatchRequest],
        *,
        stop_token_ids: list[int],
        concurrency: int | None = None,
    ) -> Iterator[tuple[int, Delta]]:
        """Send the requests concurrently, at most ``concurrency`` (default 32) in flight.

        Each request streams in a worker thread of a bounded pool; the server batches what is
        in flight. Yields ``(request index, delta)`` per sample once its request is complete.
        Closing the generator (or an interrupt) stops the workers at their next chunk, which
        closes their responses, so the server aborts those requests; requests not yet sent are
        never sent.
        """
        limit = concurrency or DEFAULT_CONCURRENCY
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"concurrency must be a whole number >= 1, got {concurrency!r}")
        bodies = [  # every request checked before any is sent
            self.request_body(
                request.prompt_token_ids,
                n=request.n,
                stop_token_ids=stop_token_ids,
                **request.sampling,
            )
            for request in requests
        ]
        if not bodies:
            return
        cancelled = threading.Event()
        pool = ThreadPoolExecutor(
            max_workers=min(limit, len(bodies)), thread_name_prefix="qwen-magic-batch"
        )
        try:
            futures: dict[Future[list[Delta] | None], int] = {
                pool.submit(self._collect, body, cancelled): index
                for index, body in enumerate(bodies)
            }
            for future in as_completed(futures):
                for delta in future.result() or ():
                    yield futures[future], delta
        finally:
            cancelled.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _collect(self, body: dict[str, Any], cancelled: threading.Event) -> list[Delta] | None:
        """One request's samples, whole (None when the batch was stopped first)."""
        if cancelled.is_set():
            return None
        count = body["n"]
        texts: list[list[str]] = [[] for _ in range(count)]
        token_ids: list[list[int]] = [[] for _ in range(count)]
        reasons: list[str | None] = [None] * count
        stream = self._post(body)
        try:
            for delta in stream:
                if cancelled.is_set():
                    return None
                texts[delta.index].append(delta.text)
                token_ids[delta.index].extend(delta.token_ids)
                if delta.finished:
                    reasons[delta.index] = delta.finish_reason
        finally:
            stream.close()  # closes the response: the server aborts an unfinished request
        return [
            Delta(index, "".join(texts[index]), tuple(token_ids[index]), True, reasons[index])
            for index in range(count)
        ]

    def _refusal(self, response: httpx.Response) -> str:
        message = _server_message(response)
        if response.status_code == 401:
            return f"the server refused the API key (401): check ${self._api_key_env}"
        return f"the server refused the request ({response.status_code}): {message}"

    @staticmethod
    def _deltas(response: httpx.Response) -> Iterator[Delta]:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # blank separators and ": keep-alive" comments
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            if not data.startswith("{"):
                raise BackendError(f"the server sent something unexpected: {data[:100]!r}")
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"]
                message = error.get("message", error) if isinstance(error, dict) else error
                raise BackendError(f"the server failed mid-reply: {_first_line(str(message))}")
            for choice in chunk.get("choices") or ():
                reason = choice.get("finish_reason")
                text = choice.get("text") or ""
                token_ids = tuple(choice.get("token_ids") or ())
                if text or token_ids or reason is not None:
                    yield Delta(choice["index"], text, token_ids, reason is not None, reason)
        # A stream that ends without [DONE] was cut (a proxy or the server closing it).
        raise BackendError("the server ended the reply early, without finishing it: try again")

    def close(self) -> None:
        """Close the connection (and stop a managed server); safe to call twice."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    shutdown = close

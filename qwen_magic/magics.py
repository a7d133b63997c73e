"""IPython magics to chat with a local Qwen model served by vLLM.

Load the extension (instant: vLLM is imported by ``%qwen_load``) and a model::

    %load_ext qwen_magic
    %qwen_load                      # the demo model (QwenMagics.model); or a folder / hub id
    %qwen_load tiny --max-model-len 2048 --enforce-eager
    %qwen_status                    # model, device, context length, memory, conversations
    %qwen_unload                    # free the engine (so does %unload_ext qwen_magic)

Chat; the reply streams as Markdown updated in place::

    %%qwen -t 0.2 --max-tokens 200
    Write a haiku about pandas.

Options override the ``%config`` defaults for one cell (``%config QwenMagics.temperature = 0.3``;
an unset default means the model's own generation_config value):

- ``-s TEXT`` sets the conversation's system prompt (it stays); ``--new`` starts it afresh.
- ``--chat NAME`` picks a named conversation, each with its own history and system prompt.
- ``--no-history`` sends only the system prompt and the cell (the turn is still recorded).
- ``-n N`` draws N samples shown side by side; sample 1 joins the history.
- ``-o VAR`` stores the reply text in ``VAR`` and makes the cell's result a reply object (like
  ``%timeit -o``); the streamed output then shrinks to a note, so the reply is shown once.
- ``--show-prompt`` shows exactly what the model saw: ChatML with control tokens highlighted,
  tokens per part, what the budget dropped, and the effective sampling parameters.
- ``--raw`` continues the cell as plain text (for base models): no ChatML, no history.

Re-running a notebook cell replaces that cell's turn (keyed by the cell id) instead of adding
one. Interrupting the kernel stops the reply within a second; the partial reply stays, marked
"⏹ interrupted", and is recorded in the history with ``interrupted=True``; the interrupt is then
re-raised so "Run All" stops there.

History: ``%qwen history``, ``%qwen clear``, ``%qwen undo``, ``%qwen export PATH`` (.json or
.md), ``%qwen import PATH`` (.json); each takes ``--chat NAME``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Dict, Enum, Float, Int, TraitError, Unicode, observe, validate

from qwen_magic import display
from qwen_magic.engine import SAMPLING_SETTINGS, EngineError, EngineOptions, validate_sampling
from qwen_magic.history import BudgetError, Conversation, PromptTruncatedWarning

if TYPE_CHECKING:
    from qwen_magic.chat import QwenChat

DEFAULT_CHAT = "default"
COMMANDS = ("history", "clear", "undo", "export", "import")

# The sampling settings with a config trait and a flag (the engine takes a few more).
SAMPLING_NAMES = SAMPLING_SETTINGS


def check_sampling(name: str, value: float | None) -> None:
    """Raise ValueError with a readable message if ``value`` is not allowed for ``name``.

    The engine's own rule, so %config, the flags and the engine can never disagree.
    """
    validate_sampling({name: value})


def _is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return "outofmemory" in text or "out of memory" in text or "insufficient memory" in text


def _parse(magic: Callable[..., Any], line: str) -> Namespace:
    """parse_argstring, then drop the quotes it keeps around values (``-s "Be brief."``)."""
    args = parse_argstring(magic, line)
    for name, value in vars(args).items():
        if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] in "'\"":
            setattr(args, name, value[1:-1])
    return args


@magics_class
class QwenMagics(Magics):
    """``%qwen_load``, ``%%qwen`` and friends; holds this kernel's one engine and its chats."""

    model = Unicode(
        "demo",
        help='Model %qwen_load loads without an argument: "demo", "tiny", a folder or a hub id.',
    ).tag(config=True)
    engine_options = Dict(
        help="Default engine keyword arguments for %qwen_load, e.g. {'max_model_len': 4096}."
    ).tag(config=True)
    system = Unicode(
        None,
        allow_none=True,
        help="System prompt of conversations not given their own with -s; None: the model's.",
    ).tag(config=True)
    temperature = Float(None, allow_none=True, help="Sampling temperature.").tag(config=True)
    top_p = Float(None, allow_none=True, help="Nucleus sampling mass, in (0, 1].").tag(config=True)
    top_k = Int(None, allow_none=True, help="Sample from the k likeliest tokens.").tag(config=True)
    min_p = Float(None, allow_none=True, help="Minimum probability, relative.").tag(config=True)
    max_tokens = Int(None, allow_none=True, help="Most tokens per reply.").tag(config=True)
    repetition_penalty = Float(None, allow_none=True, help="1 is off.").tag(config=True)
    presence_penalty = Float(None, allow_none=True, help="0 is off.").tag(config=True)
    frequency_penalty = Float(None, allow_none=True, help="0 is off.").tag(config=True)
    seed = Int(None, allow_none=True, help="Random seed, for reproducible replies.").tag(
        config=True
    )
    display_mode = Enum(
        ["auto", "notebook", "terminal"],
        "auto",
        help="How replies stream: updating Markdown (notebook), plain text (terminal) or auto.",
    ).tag(config=True)
    revision = Int(0, help="Bumped on every change of a conversation or the engine; observe it.")

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        self.chat: QwenChat | None = None
        self.conversations: dict[str, Conversation] = {}
        self.on_reply: list[Callable[[str, Any], None]] = []
        self._own_system: set[str] = set()  # conversations given a system prompt with -s
        self._starting = True  # before the config loads: its values may set traits
        super().__init__(shell=shell, **kwargs)
        self._starting = False
        self._loaded_request: tuple[str, tuple[tuple[str, Any], ...]] | None = None
        self._cell_id: str | None = None
        if shell is not None:
            shell.events.register("pre_run_cell", self._on_pre_run_cell)
            shell.events.register("post_run_cell", self._on_post_run_cell)

    # ------------------------------------------------------------------ config

    @validate(*SAMPLING_NAMES)
    def _validate_sampling(self, proposal: Any) -> Any:
        try:
            check_sampling(proposal["trait"].name, proposal["value"])
        except ValueError as error:
            raise TraitError(f"QwenMagics.{error}") from None
        return proposal["value"]

    def _load_config(self, cfg: Any, section_names: Any = None, traits: Any = None) -> None:
        """At start-up, skip a config value that fails validation instead of failing.

        ``%config`` keeps even a refused value in the shell's config, where a later
        ``%reload_ext`` would find it; a live ``%config`` is still refused with the message.
        """
        if self._starting and type(self).__name__ in cfg:
            cfg = copy.deepcopy(cfg)
            section = cfg[type(self).__name__]
            for name in [name for name in section if name in SAMPLING_NAMES]:
                try:
                    check_sampling(name, section[name])
                except (TypeError, ValueError) as error:
                    warnings.warn(f"QwenMagics.{error}: ignored", stacklevel=2)
                    del section[name]
        super()._load_config(cfg, section_names=section_names, traits=traits)

    @observe("system")
    def _on_system_change(self, change: Any) -> None:
        for name, conversation in self.conversations.items():
            if name not in self._own_system:
                conversation.system = change["new"]
        self.revision += 1

    @property
    def notebook(self) -> bool:
        """Whether replies stream as updating displays (a Jupyter kernel) or plain text."""
        if self.display_mode != "auto":
            return self.display_mode == "notebook"
        return getattr(self.shell, "kernel", None) is not None

    # ------------------------------------------------------------------ API for the panel

    def conversation(self, name: str | None = None) -> Conversation:
        """Return the conversation ``name`` (default: "default"), creating it empty."""
        name = name or DEFAULT_CHAT
        if name not in self.conversations:
            self.conversations[name] = Conversation(system=self.system)
        return self.conversations[name]

    def close(self) -> None:
        """Free the engine (the conversations stay)."""
        chat, self.chat, self._loaded_request = self.chat, None, None
        if chat is not None:
            chat.close()
            self.revision += 1

    def detach(self) -> None:
        """Free the engine and stop listening to the shell (``%unload_ext``)."""
        self.close()
        if self.shell is not None:
            for event, callback in (
                ("pre_run_cell", self._on_pre_run_cell),
                ("post_run_cell", self._on_post_run_cell),
            ):
                with contextlib.suppress(ValueError):  # already unregistered
                    self.shell.events.unregister(event, callback)

    # ------------------------------------------------------------------ cell ids

    def _on_pre_run_cell(self, info: Any) -> None:
        self._cell_id = getattr(info, "cell_id", None)

    def _on_post_run_cell(self, result: Any) -> None:
        self._cell_id = None

    def _cell_key(self) -> str | None:
        """The running notebook cell's id: re-running the cell replaces its turn."""
        if self._cell_id:
            return self._cell_id
        kernel = getattr(self.shell, "kernel", None)
        if kernel is None:
            return None
        try:
            return kernel.get_parent().get("metadata", {}).get("cellId")
        except Exception:  # an older kernel without get_parent: fall back to appending
            return None

    # ------------------------------------------------------------------ loading

    @magic_arguments()
    @argument("model_name", nargs="?", metavar="MODEL", help='"demo", "tiny", a folder or hub id')
    @argument("--dtype", help="weights dtype, e.g. bfloat16, float16, float32, auto")
    @argument("--max-model-len", type=int, help="context length in tokens")
    @argument("--gpu-memory-utilization", type=float, help="fraction of GPU memory to use")
    @argument("--tensor-parallel-size", type=int, help="number of GPUs to split the model over")
    @argument("--quantization", help="e.g. awq, gptq, fp8")
    @argument("--enforce-eager", action="store_const", const=True, help="no CUDA graphs")
    @argument("--trust-remote-code", action="store_const", const=True, help="run model code")
    @argument("--seed", type=int, help="engine random seed")
    @argument("--kv-cache-gib", type=float, help="KV cache size (CPU default: up to 4 GiB)")
    @argument("--reload", action="store_true", help="load again even if already loaded")
    @argument("--verbose", action="store_true", help="show the engine's own logs")
    @line_magic
    def qwen_load(self, line: str) -> None:
        """Load a Qwen model into this kernel's engine (replacing any other model)."""
        args = _parse(self.qwen_load, line)
        model_name = args.model_name or self.model
        options = dict(self.engine_options)
        for name in EngineOptions.__dataclass_fields__:  # the flags carry the same names
            if getattr(args, name, None) is not None:
                options[name] = getattr(args, name)
        path = self._resolve(model_name, options)
        request = (path, tuple(sorted(options.items())))
        if self.chat is not None and request == self._loaded_request and not args.reload:
            display.notice(
                f"{Path(path).name} is already loaded (use --reload to load it again)",
                notebook=self.notebook,
            )
            return
        self.close()  # free the old engine before the new one takes memory
        self._load(model_name, path, options, verbose=args.verbose)
        self._loaded_request = request

    def _resolve(self, model_name: str, options: dict[str, Any]) -> str:
        """The model path, with the options checked before the loaded engine is freed."""
        from qwen_magic.models import ModelFetchError, resolve_model

        try:
            path = resolve_model(model_name)
            EngineOptions(model=path, **options)
        except (ModelFetchError, EngineError) as error:
            raise UsageError(str(error)) from None
        except TypeError as error:  # an unknown key in QwenMagics.engine_options
            raise UsageError(f"QwenMagics.engine_options: {error}") from None
        return path

    def _load(self, model_name: str, path: str, options: dict[str, Any], *, verbose: bool) -> None:
        progress = display.LoadProgress(model_name, notebook=self.notebook)
        from qwen_magic.chat import QwenChat

        try:
            self.chat = QwenChat(path, progress=progress, verbose=verbose, **options)
        except Exception as error:
            progress.failed()
            if isinstance(error, EngineError):  # already one line that says what to do
                raise UsageError(str(error)) from None
            if _is_out_of_memory(error):
                raise UsageError(display.OUT_OF_MEMORY.format(action="loading")) from None
            if verbose:
                raise
            raise UsageError(display.load_failed(model_name, error)) from None
        engine = self.chat.engine
        progress.done(f"loaded {model_name} on {engine.device}, {engine.max_model_len} tokens")
        self.revision += 1

    @line_magic
    def qwen_unload(self, line: str) -> None:
        """Free the engine and its memory; conversations are kept."""
        if self.chat is None:
            display.notice("no model is loaded", notebook=self.notebook)
            return
        model = self.chat.engine.model
        self.close()
        display.notice(f"unloaded {Path(model).name}", notebook=self.notebook)

    @line_magic
    def qwen_status(self, line: str) -> None:
        """Show the model, device, context length, memory and conversations."""
        facts = None
        if self.chat is not None:
            engine = self.chat.engine
            facts = {
                "model": engine.model,
                "device": engine.device,
                "context length": engine.max_model_len,
                "memory": display.format_memory(engine.memory()),
                "vLLM": engine.vllm_version,
                "model sampling defaults": engine.generation_defaults or "none",
                "%config overrides": self.sampling_config() or "none",
            }
        display.show(display.mime_bundle(display.status_markdown(facts, self.conversations)))

    # ------------------------------------------------------------------ chatting

    def sampling_config(self) -> dict[str, Any]:
        """The sampling settings set through %config (or the panel)."""
        return {
            name: getattr(self, name) for name in SAMPLING_NAMES if getattr(self, name) is not None
        }

    @magic_arguments()
    @argument("command", nargs="?", choices=COMMANDS, help="line mode: what to do")
    @argument("path", nargs="?", help="the file for export / import")
    @argument("-s", "--system", help="set the conversation's system prompt")
    @argument("-t", "--temperature", type=float, help="sampling temperature, >= 0")
    @argument("--top-p", type=float, help="nucleus sampling mass, in (0, 1]")
    @argument("--top-k", type=int, help="sample from the k likeliest tokens")
    @argument("--min-p", type=float, help="minimum relative probability, in [0, 1]")
    @argument("--max-tokens", type=int, help="most tokens in the reply")
    @argument("--repetition-penalty", type=float, help="> 0; 1 is off")
    @argument("--presence-penalty", type=float, help="in [-2, 2]; 0 is off")
    @argument("--frequency-penalty", type=float, help="in [-2, 2]; 0 is off")
    @argument("--seed", type=int, help="random seed for this reply")
    @argument("-n", type=int, default=1, help="number of samples, shown side by side")
    @argument("--no-history", action="store_true", help="send no past turns")
    @argument("--new", action="store_true", help="start the conversation afresh")
    @argument("-o", "--output", metavar="VAR", help="store the reply text in VAR")
    @argument("--show-prompt", action="store_true", help="show exactly what the model saw")
    @argument("--raw", action="store_true", help="plain continuation: no ChatML, no history")
    @argument("--chat", default=DEFAULT_CHAT, metavar="NAME", help="named conversation")
    @line_cell_magic
    def qwen(self, line: str, cell: str | None = None) -> Any:
        """Chat with the loaded model (%%qwen), or manage a conversation (%qwen COMMAND)."""
        args = _parse(self.qwen, line)
        if cell is None:
            if args.command is None:
                raise UsageError(display.LINE_NEEDS_COMMAND)
            getattr(self, f"_handle_{args.command}")(args)
            return None
        if args.command is not None:
            raise UsageError(display.CELL_NEEDS_NO_COMMAND.format(command=args.command))
        return self._chat_cell(args, cell)

    def _sampling(self, args: Namespace) -> dict[str, Any]:
        sampling = self.sampling_config()
        for name in SAMPLING_NAMES:
            value = getattr(args, name)
            if value is not None:
                try:
                    check_sampling(name, value)
                except ValueError as error:
                    raise UsageError(str(error)) from None
                sampling[name] = value
        if args.n < 1:
            raise UsageError(f"-n must be at least 1, got {args.n}")
        return sampling

    def _chat_cell(self, args: Namespace, cell: str) -> display.ReplyResult | None:
        message = cell.strip("\n")
        if not message.strip():
            raise UsageError(display.EMPTY_CELL)
        sampling = self._sampling(args)
        chat = self.chat
        if chat is None:
            raise UsageError(display.NO_MODEL)
        conversation = self.conversation(args.chat)
        saved = (conversation.system, list(conversation.turns))
        if args.new and not args.raw:
            conversation.clear()
        if args.system is not None and not args.raw:
            conversation.system = args.system
            self._own_system.add(args.chat)
        stream = display.ReplyStream(args.n, notebook=self.notebook)
        prompt_view = display.LiveOutput(notebook=self.notebook) if args.show_prompt else None
        if prompt_view is not None and self.notebook:
            prompt_view.set(display.mime_bundle("*preparing the prompt…*"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PromptTruncatedWarning)
                reply = self._generate(chat, conversation, message, args, sampling, stream)
        except KeyboardInterrupt as interrupt:
            partial = getattr(interrupt, "reply", None)
            stream.finish(partial.texts if partial is not None else None, interrupted=True)
            self._after_reply(args, partial, prompt_view)
            stopped = KeyboardInterrupt(display.INTERRUPTED_NOTE)
            stopped.reply = partial  # type: ignore[attr-defined]
            raise stopped from None
        except Exception as error:
            conversation.system, conversation.turns[:] = saved
            raise self._usage_error(error) from None
        stream.finish(
            reply.texts, interrupted=reply.interrupted, finish_reasons=reply.finish_reasons
        )
        self._after_reply(args, reply, prompt_view)
        if args.output:
            stream.output.set(display.mime_bundle(display.stored_note(args.output)))
            return display.ReplyResult(reply)
        return None

    def _generate(
        self,
        chat: QwenChat,
        conversation: Conversation,
        message: str,
        args: Namespace,
        sampling: dict[str, Any],
        stream: display.ReplyStream,
    ) -> Any:
        if args.raw:
            return chat.complete(message, n=args.n, on_delta=stream.on_delta, **sampling)
        return chat.reply(
            conversation,
            message,
            key=self._cell_key(),
            use_history=not args.no_history,
            n=args.n,
            on_delta=stream.on_delta,
            **sampling,
        )

    def _after_reply(
        self, args: Namespace, reply: Any, prompt_view: display.LiveOutput | None
    ) -> None:
        if reply is None:
            return
        if prompt_view is not None:
            plan = getattr(reply, "plan", None)
            text = plan.text if plan is not None else reply.prompt_text
            ids = plan.token_ids if plan is not None else reply.prompt_token_ids
            tokenizer = self.chat.formatter.tokenizer
            bundle = display.render_prompt(text, ids, tokenizer, sampling=reply.sampling, plan=plan)
            prompt_view.set(bundle)
        if args.output:
            self.shell.user_ns[args.output] = reply.text
        self.revision += 1
        for callback in list(self.on_reply):
            callback(args.chat, reply)

    def _usage_error(self, error: Exception) -> Exception:
        """Turn what a user can cause into one readable line; anything else stays as it is."""
        if isinstance(error, UsageError):
            return error
        if isinstance(error, PromptTruncatedWarning):
            return UsageError(display.too_long(str(error)))
        if isinstance(error, (BudgetError, EngineError)):
            return UsageError(str(error))
        if _is_out_of_memory(error):
            return UsageError(display.OUT_OF_MEMORY.format(action="generating"))
        return error

    # ------------------------------------------------------------------ %qwen COMMAND

    def _handle_history(self, args: Namespace) -> None:
        markdown = display.history_markdown(self.conversation(args.chat), name=args.chat)
        display.show(display.mime_bundle(markdown))

    def _handle_clear(self, args: Namespace) -> None:
        removed = self.conversation(args.chat).clear()
        self.revision += 1
        display.notice(f"cleared {removed} turn(s) from `{args.chat}`", notebook=self.notebook)

    def _handle_undo(self, args: Namespace) -> None:
        turn = self.conversation(args.chat).undo()
        self.revision += 1
        text = "removed the last turn" if turn is not None else "there is no turn to undo"
        display.notice(f"{text} (`{args.chat}`)", notebook=self.notebook)

    def _handle_export(self, args: Namespace) -> None:
        if not args.path:
            raise UsageError("say where to export: %qwen export PATH (.json or .md)")
        try:
            path = self.conversation(args.chat).save(args.path)
        except (ValueError, OSError) as error:
            raise UsageError(str(error)) from None
        display.notice(f"exported `{args.chat}` to {path}", notebook=self.notebook)

    def _handle_import(self, args: Namespace) -> None:
        if not args.path:
            raise UsageError("say what to import: %qwen import PATH (a .json export)")
        try:
            conversation = Conversation.load(args.path)
        except FileNotFoundError:
            raise UsageError(f"no file {args.path}: check the path") from None
        except (ValueError, OSError) as error:
            raise UsageError(str(error)) from None
        self.conversations[args.chat] = conversation
        self._own_system.add(args.chat)
        self.revision += 1
        display.notice(
            f"imported {len(conversation)} turn(s) into `{args.chat}`", notebook=self.notebook
        )

"""IPython magics to chat with a Qwen model served by vLLM.

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
an unset default means the model's own generation_config value; ``max_tokens`` defaults to 512,
at most a quarter of the context):

- ``-s TEXT`` sets the conversation's system prompt (it stays); ``--new`` starts it afresh.
- ``--chat NAME`` picks a named conversation, each with its own history and system prompt.
- ``--no-history`` sends only the system prompt and the cell (the turn is still recorded).
- ``-n N`` draws N samples shown side by side; sample 1 joins the history.
- ``-o VAR`` stores the reply text in ``VAR`` and makes the cell's result a reply object (like
  ``%timeit -o``); the streamed output then shrinks to a note, so the reply is shown once.
- ``--show-prompt`` shows exactly what the model saw: ChatML with control tokens highlighted,
  tokens per part, what the budget dropped, and the effective sampling parameters.
- ``--raw`` continues the cell as plain text (for base models): no ChatML, no conversation, so
  it takes none of ``-s``, ``--new``, ``--no-history``, ``--chat`` and the thinking flags.

Thinking models (Qwen3 and later) reason in a ``<think>`` block before they answer. The reasoning
streams into a collapsed block above the answer ("💭 Thought for 4.1 s, 312 tokens"; a click opens
it), stays out of the answer and of the history's re-sent prompt, and is kept apart in the turn
(``%qwen history`` shows it collapsed; ``-o VAR`` stores the answer, the result's ``.reasoning``
the reasoning):

- ``--think`` / ``--no-think`` flip the template's switch for one cell (default:
  ``QwenMagics.thinking``, None = the model's own default); models without a switch refuse them.
- ``--thinking-budget N`` stops the reasoning after N tokens, closes the block with Qwen's
  sentence and lets the model answer (default: ``QwenMagics.thinking_budget``).
- ``--show-thinking collapsed|open|hidden`` (default ``QwenMagics.show_thinking``).
- With thinking on, ``max_tokens`` defaults to 8192, at most half the context; a reply cut off
  while thinking says so, with the flag that fixes it.

Many replies at once, shown as one table (``qwen_magic.jupyter.batch_cell``)::

    %%qwen --each reviews --sweep temperature=0,0.7
    Classify the sentiment of this review: {text}

- ``--each VAR`` fills ``{name}`` fields from each row of VAR (a DataFrame, a list of dicts or
  of strings); any other brace is literal text.
- ``--sweep KEY=V1,V2`` (repeatable) runs every combination of sampling values.
- ``-o NAME`` stores the table as a DataFrame; ``--record`` adds the replies to the conversation.

Re-running a notebook cell replaces that cell's turn; the turns recorded after it are set aside
(a notice says how many) and ``%qwen undo`` brings them back. Several ``%%qwen`` calls in one
cell execution each add their own turn. Interrupting the kernel stops the reply; the partial
reply stays, marked "⏹ interrupted", and is recorded in the history with ``interrupted=True``;
the interrupt is then re-raised so "Run All" stops there.

History, on a line of its own; each takes ``--chat NAME``::

    %qwen history
    %qwen clear                     # undoable
    %qwen undo                      # undoes the last change: a turn, a clear, an import, a re-run
    %qwen export PATH [--force]     # .json (lossless) or .md; --force overwrites
    %qwen import PATH [--replace]   # a .json export; --replace replaces existing turns
"""

from __future__ import annotations

import contextlib
import copy
import os
import types
import warnings
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.utils.process import arg_split
from traitlets import Bool, Dict, Enum, Int, TraitError, Unicode, link, validate

from qwen_magic import render
from qwen_magic.backends.base import BackendError, forget_exception
from qwen_magic.backends.vllm_options import is_out_of_memory
from qwen_magic.jupyter import batch_cell, commands, loading, output
from qwen_magic.prompt import BudgetError, MessageTooLongError
from qwen_magic.sampling import SAMPLING_SETTINGS, SETTINGS, config_traits
from qwen_magic.sampling import validate as validate_sampling
from qwen_magic.session import DEFAULT_CONVERSATION, ChatSession

_RAW_EXCLUDES = (("system", "-s"), ("new", "--new"), ("no_history", "--no-history"),
                 ("chat", "--chat"), ("think", "--think"), ("no_think", "--no-think"),
                 ("thinking_budget", "--thinking-budget"))  # fmt: skip
SHOW_THINKING = ("collapsed", "open", "hidden")


def parse(parser: Any, line: str) -> Namespace:
    """Parse a magic's line with shell quoting (``-s "Be brief."``, ``--chat 'my chat'``)."""
    try:
        return parser.parse_args(arg_split(line, posix=True))
    except ValueError as error:  # shlex: "No closing quotation"
        raise UsageError(f"cannot read the options ({error}): check the quotes") from None


def _sampling_flags(function: Callable[..., Any]) -> Callable[..., Any]:
    """The ``%%qwen`` flags of the sampling table, in table order."""
    for item in reversed(SETTINGS):
        names = [item.short_flag, item.flag] if item.short_flag else [item.flag]
        function = argument(*names, type=item.python_type, help=f"{item.allowed}. {item.help}")(
            function
        )
    return function


# The config traits of the sampling table, on a Magics class.
_SamplingConfig = types.new_class(
    "_SamplingConfig", (Magics,), exec_body=lambda namespace: namespace.update(config_traits())
)


@magics_class
class QwenMagics(_SamplingConfig):  # type: ignore[misc, valid-type]
    """``%qwen_load``, ``%%qwen`` and friends: parse, call the kernel's session, show."""

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
    server = Unicode(
        os.environ.get("QWEN_MAGIC_SERVER") or None,
        allow_none=True,
        help="URL of a vLLM server (vllm serve) that %qwen_load connects to instead of loading "
        "a model here; default: $QWEN_MAGIC_SERVER. Set it once for a class in ipython_config.py.",
    ).tag(config=True)
    api_key_env = Unicode(
        "VLLM_API_KEY",
        help="Environment variable holding the server's API key (the key itself is never shown).",
    ).tag(config=True)
    thinking = Bool(
        None,
        allow_none=True,
        help="Thinking switch for models that have one (Qwen3): True, False, or None for the "
        "model's default; --think / --no-think override it for one cell.",
    ).tag(config=True)
    thinking_budget = Int(
        None,
        allow_none=True,
        help="Most reasoning tokens before a thinking model must answer; None: no limit.",
    ).tag(config=True)
    show_thinking = Enum(
        SHOW_THINKING,
        "collapsed",
        help="How a thinking model's reasoning shows: a collapsed block, an open one, or only "
        "its summary line.",
    ).tag(config=True)
    preload = Enum(
        ["auto", "always", "never"],
        "auto",
        help="Start importing vLLM (10-20 s) in the background at %load_ext, so %qwen_load waits "
        "less: auto does it on a machine with an NVIDIA GPU and no QwenMagics.server.",
    ).tag(config=True)
    display_mode = Enum(
        ["auto", "notebook", "terminal"],
        "auto",
        help="How replies stream: updating Markdown (notebook), plain text (terminal) or auto.",
    ).tag(config=True)

    def __init__(self, shell: Any = None, *, session: ChatSession | None = None, **kwargs: Any):
        self._starting = True  # before the config loads: its values may set traits
        super().__init__(shell=shell, **kwargs)
        self._starting = False
        self.session = session if session is not None else ChatSession()
        self._links: list[link] = []
        for name in (*SAMPLING_SETTINGS, "system", "thinking", "thinking_budget"):
            if getattr(self, name) is None:  # nothing configured: keep the session's value
                setattr(self, name, getattr(self.session, name))
            self._links.append(link((self, name), (self.session, name)))
        self._commands = commands.parser()
        self._cell_id: str | None = None
        self._calls_in_cell = 0
        if shell is not None:
            shell.events.register("pre_run_cell", self._on_pre_run_cell)

    # ------------------------------------------------------------------ config

    @validate(*SAMPLING_SETTINGS)
    def _validate_sampling(self, proposal: Any) -> Any:
        try:
            validate_sampling({proposal["trait"].name: proposal["value"]})
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
            for name in [name for name in section if name in SAMPLING_SETTINGS]:
                try:
                    validate_sampling({name: section[name]})
                except (TypeError, ValueError) as error:
                    warnings.warn(f"QwenMagics.{error}: ignored", stacklevel=2)
                    del section[name]
        super()._load_config(cfg, section_names=section_names, traits=traits)

    @property
    def notebook(self) -> bool:
        """Whether replies stream as updating displays (a Jupyter kernel) or plain text."""
        if self.display_mode != "auto":
            return self.display_mode == "notebook"
        return getattr(self.shell, "kernel", None) is not None

    def detach(self) -> None:
        """Free the engine and stop following the shell and the session (``%unload_ext``).

        The session, and with it every conversation, stays on the shell for the next load.
        """
        for each in self._links:
            each.unlink()
        self._links.clear()
        if self.shell is not None:
            with contextlib.suppress(ValueError):  # already unregistered
                self.shell.events.unregister("pre_run_cell", self._on_pre_run_cell)
        self.session.unload()

    def _notice(self, text: str) -> None:
        output.notice(text, notebook=self.notebook)

    # ------------------------------------------------------------------ cell keys

    def _on_pre_run_cell(self, info: Any) -> None:
        self._cell_id = getattr(info, "cell_id", None)
        self._calls_in_cell = 0

    def _cell_key(self) -> str | None:
        """Where this reply comes from: the notebook cell, and which call within it.

        Re-running the cell replaces its turn(s); several calls in one run each add a turn.
        """
        cell_id = self._cell_id
        kernel = getattr(self.shell, "kernel", None)
        if not cell_id and kernel is not None:
            with contextlib.suppress(Exception):  # an older kernel without get_parent
                cell_id = kernel.get_parent().get("metadata", {}).get("cellId")
        if not cell_id:
            return None
        self._calls_in_cell += 1
        return f"{cell_id}#{self._calls_in_cell}"

    # ------------------------------------------------------------------ loading

    @magic_arguments()
    @argument("model_name", nargs="?", metavar="MODEL", help='"demo", "tiny", a folder or hub id')
    @argument("--dtype", help="weights dtype, e.g. bfloat16, float16, float32, auto")
    @argument("--max-model-len", type=int, help="context length in tokens")
    @argument("--gpu-memory-utilization", type=float, help="fraction of GPU memory to use")
    @argument("--tensor-parallel-size", type=int, help="number of GPUs to split the model over")
    @argument("--quantization", help="e.g. awq, gptq, fp8")
    @argument("--enforce-eager", action="store_const", const=True, help="no CUDA graphs")
    @argument("--compile", action="store_const", const=True,
              help="GPU: torch.compile as vLLM does by default (slower start)")  # fmt: skip
    @argument("--trust-remote-code", action="store_const", const=True, help="run model code")
    @argument("--seed", type=int, help="engine random seed")
    @argument("--kv-cache-gib", type=float, help="KV cache size (CPU default: up to 4 GiB)")
    @argument("--server", metavar="URL", help="use the vLLM server at URL (vllm serve) instead")
    @argument("--local", action="store_true", help="load here even if QwenMagics.server is set")
    @argument("--serve", action="store_true",
              help="run the model in a vLLM server this kernel starts and stops (interrupts "
              "never reach it); implied by --tensor-parallel-size > 1")  # fmt: skip
    @argument("--api-key-env", metavar="NAME", help="env variable with the server's API key")
    @argument("--reload", action="store_true", help="load again even if already loaded")
    @argument("--verbose", action="store_true", help="show the engine's own logs")
    @line_magic
    def qwen_load(self, line: str) -> None:
        """Load a Qwen model into this kernel (replacing any other model)."""
        loading.load(self, parse(self.qwen_load.parser, line))

    @line_magic
    def qwen_unload(self, line: str) -> None:
        """Free the engine and its memory; conversations are kept."""
        try:
            model = self.session.unload()
        except BackendError as error:  # a reply is being generated (from a widget or thread)
            raise UsageError(str(error)) from None
        self._notice("no model is loaded" if model is None else f"unloaded {Path(model).name}")

    @line_magic
    def qwen_status(self, line: str) -> None:
        """Show the model, device, context length, memory and conversations."""
        loading.show_status(self.session)

    # ------------------------------------------------------------------ chatting

    @magic_arguments()
    @argument("-s", "--system", help="set the conversation's system prompt")
    @_sampling_flags
    @argument("-n", type=int, default=1, help="number of samples, shown side by side")
    @argument("--no-history", action="store_true", help="send no past turns")
    @argument("--new", action="store_true", help="start the conversation afresh (undoable)")
    @argument("-o", "--output", metavar="VAR", help="store the reply text in VAR")
    @argument("--show-prompt", action="store_true", help="show exactly what the model saw")
    @argument("--raw", action="store_true", help="plain continuation: no ChatML, no history")
    @argument("--think", action="store_true", help="turn a thinking model's thinking on")
    @argument("--no-think", action="store_true", help="turn a thinking model's thinking off")
    @argument("--thinking-budget", type=int, metavar="N", help="most reasoning tokens, then answer")
    @argument("--show-thinking", choices=SHOW_THINKING, help="how the reasoning shows")
    @argument("--chat", metavar="NAME", help="named conversation (default: default)")
    @argument(
        "--each",
        metavar="VAR",
        help="run the cell as a template over the rows of VAR ({name} fields); a table",
    )
    @argument(
        "--sweep",
        metavar="KEY=V1,V2",
        action="append",
        help="run the cell once per value (repeatable: every combination); a table",
    )
    @argument("--record", action="store_true",
              help="--each / --sweep: add the replies to the conversation")  # fmt: skip
    @line_cell_magic
    def qwen(self, line: str, cell: str | None = None) -> Any:
        """Chat with the loaded model (%%qwen), or manage a conversation (%qwen COMMAND).

        Line commands: history, clear, undo, export PATH [--force], import PATH [--replace];
        each takes --chat NAME.
        """
        if cell is None:
            if not line.strip():
                raise UsageError(
                    "%qwen needs a command (history, clear, undo, export PATH, import PATH); "
                    "to chat, use %%qwen as a cell magic"
                )
            args = parse(self._commands, line)
            getattr(commands, f"handle_{args.command}")(self.session, args, self._notice)
            return None
        first = (line.split() or [""])[0]
        if first in commands.COMMANDS:
            raise UsageError(f"%%qwen takes options only: run %qwen {first} on a line of its own")
        args = parse(self.qwen.parser, line)
        if batch_cell.wants_batch(args):
            return batch_cell.run(self, args, cell)
        if args.record:
            raise UsageError("--record is for --each / --sweep cells: a plain cell always records")
        return self._chat_cell(args, cell)

    def _sampling(self, args: Namespace) -> dict[str, Any]:
        given = {name: getattr(args, name) for name in SAMPLING_SETTINGS}
        try:
            validate_sampling(given)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if args.n < 1:
            raise UsageError(f"-n must be at least 1, got {args.n}")
        return given

    def _chat_cell(self, args: Namespace, cell: str) -> output.ReplyResult | None:
        message = cell.strip("\n")
        if not message.strip():
            raise UsageError(render.EMPTY_MESSAGE)
        if args.raw:
            given = [flag for name, flag in _RAW_EXCLUDES if getattr(args, name)]
            if given:
                raise UsageError(
                    f"--raw continues plain text without a conversation: drop {', '.join(given)}"
                )
        if args.think and args.no_think:
            raise UsageError("--think and --no-think contradict each other: pick one")
        if args.thinking_budget is not None and args.thinking_budget < 0:
            raise UsageError(f"--thinking-budget must be >= 0, got {args.thinking_budget}")
        sampling = self._sampling(args)
        if self.session.bot is None:
            raise UsageError(render.NO_MODEL)
        stream = output.ReplyStream(
            args.n,
            notebook=self.notebook,
            show_thinking=args.show_thinking or self.show_thinking,
            live_widgets=getattr(self.shell, "kernel", None) is not None,
        )
        try:
            reply = self._generate(args, message, sampling, stream)
        except KeyboardInterrupt as interrupt:
            partial = getattr(interrupt, "reply", None)
            forget_exception(interrupt)
            stream.finish(
                partial.texts if partial is not None else None, interrupted=True, reply=partial
            )
            self._after_reply(args, partial)
            stopped = KeyboardInterrupt(render.INTERRUPTED_NOTE)
            stopped.reply = partial  # type: ignore[attr-defined]
            raise stopped from None
        except Exception as error:
            if any(stream.texts):  # what streamed before the failure stays visible, marked
                stream.finish(None, interrupted=True)
            raise self._usage_error(error) from None
        stream.finish(
            reply.texts,
            interrupted=reply.interrupted,
            finish_reasons=reply.finish_reasons,
            reply=reply,
        )
        self._after_reply(args, reply)
        if args.output:
            stream.output.set(
                render.mime_bundle(output.stored_note(args.output, notebook=self.notebook))
            )
            return output.ReplyResult(reply)
        return None

    def _generate(
        self, args: Namespace, message: str, sampling: dict[str, Any], stream: output.ReplyStream
    ) -> Any:
        if args.raw:
            return self.session.complete(message, n=args.n, on_delta=stream.on_delta, **sampling)
        return self.session.ask(
            args.chat,
            message,
            system=args.system,
            new=args.new,
            key=self._cell_key(),
            use_history=not args.no_history,
            n=args.n,
            on_delta=stream.on_delta,
            on_thinking=stream.on_thinking,
            enable_thinking=True if args.think else False if args.no_think else None,
            thinking_budget=args.thinking_budget,
            **sampling,
        )

    def _after_reply(self, args: Namespace, reply: Any) -> None:
        if reply is None:
            return
        recorded = getattr(reply, "recorded", None)
        if recorded is not None and recorded.replaced is not None:
            aside = recorded.set_aside
            later = f" and set aside {aside} later turn(s)" if aside else ""
            self._notice(
                f"replaced turn {recorded.replaced} of `{args.chat or DEFAULT_CONVERSATION}`"
                f"{later}: %qwen undo brings the old one back"
            )
        if args.show_prompt:
            plan = getattr(reply, "plan", None)
            text = plan.text if plan is not None else reply.prompt_text
            ids = plan.token_ids if plan is not None else reply.prompt_token_ids
            tokenizer = self.session.require_bot().tokenizer
            output.show(render.render_prompt(text, ids, tokenizer, sampling=reply.sampling,
                                             plan=plan))  # fmt: skip
        if args.output:
            self.shell.user_ns[args.output] = reply.text

    def _usage_error(self, error: Exception) -> Exception:
        """Turn what a user can cause into one readable line; anything else stays as it is."""
        if isinstance(error, UsageError):
            return error
        forget_exception(error)
        if isinstance(error, MessageTooLongError):
            return UsageError(render.too_long(str(error)))
        if isinstance(error, (BudgetError, BackendError, ValueError, TypeError)):
            return UsageError(str(error))
        if is_out_of_memory(error):
            return UsageError(render.OUT_OF_MEMORY.format(action="generating"))
        return error

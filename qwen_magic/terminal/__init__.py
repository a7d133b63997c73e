"""The terminal front-end: ``qwen-magic chat`` (or ``python -m qwen_magic chat``).

Start a chat with the demo model, the tiny test model, a folder or a hub id, or a model served
by vLLM elsewhere; the options are ``%qwen_load``'s::

    qwen-magic chat                              # the demo model
    qwen-magic chat tiny --max-model-len 1024    # the tiny random-weight test model
    qwen-magic chat Qwen/Qwen3-0.6B -s "Be brief."
    qwen-magic chat --server http://gpu-box:8000 --api-key-env MY_KEY

Type a message and press Enter; the reply streams as it is generated. A pasted block of several
lines is one message, and so is text typed between two ``\"\"\"`` lines (or Esc then Enter for a new
line). Up and Down recall what you typed, also in earlier chats (the history file is
``$QWEN_MAGIC_CHAT_HISTORY``, else ``chat-history`` in the cache folder; ``--no-input-history``
keeps none). Ctrl-C stops a reply (it stays in the history, marked interrupted) and never leaves;
Ctrl-D, ``/bye``, ``exit``, ``quit`` or ``退出`` leave.

Commands, named like the notebook's ``%qwen`` ones: ``/show``, ``/clear``, ``/undo``, ``/retry``,
``/system TEXT``, ``/set KEY VALUE``, ``/think on|off|default``, ``/save PATH``, ``/load PATH``,
``/help``.

One message, no chat: ``qwen-magic chat tiny -q "question"`` or ``echo question | qwen-magic chat
tiny`` print the answer on stdout (progress and notes on stderr) and exit 0; errors exit non-zero.

The modules: :mod:`~qwen_magic.terminal.cli` (options, loading, one-shot),
:mod:`~qwen_magic.terminal.app` (the loop and the commands), :mod:`~qwen_magic.terminal.commands`
(pure parsing) and :mod:`~qwen_magic.terminal.display` (what is shown). Chat logic lives in
:class:`qwen_magic.session.ChatSession`; nothing here imports a backend or vLLM.
"""

"""Starting vLLM sooner: what happens between ``%load_ext`` and the engine being built.

- ``vllm`` is first imported in a short-lived thread: its import leaves an exception traceback
  behind that pins the importing call stack, and an engine referenced from that stack would
  survive unloading. :func:`start_import` starts that thread early (at ``%load_ext``, on a GPU
  machine), so the 10-25 s import overlaps the user's reading; :func:`import_vllm` joins it.
- That thread also imports the modules the last load needed (:func:`record_load_imports`, kept
  per vLLM version in the model cache folder): vLLM imports its model runner, layers and kernels
  inside ``LLM()``, and those seconds overlap the reading too. On a GPU, a thread of its own
  then creates the CUDA context and builds Triton's CUDA helpers, which the load does not wait
  for.
- :func:`model_inspection_in_process`: the first load of a model class on a machine no longer
  pays for vLLM importing itself again in a subprocess (20 s on a fresh H100 machine).

docs/benchmarks.md (section g) has the measurements behind each of these.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from qwen_magic.backends.base import BackendError

_VLLM_MODULES = (
    "vllm",
    "vllm.sampling_params",
    "vllm.platforms",
    "vllm.engine.arg_utils",
    "vllm.entrypoints.llm",
)


_import_lock = threading.Lock()
_import_threads: list[threading.Thread] = []
_import_failure: list[BaseException] = []


def start_import(*, warm_device: bool = False) -> bool:
    """Start importing vLLM in the background (once); False when it is imported or underway.

    ``warm_device`` then also starts a thread that creates the CUDA context and builds Triton's
    CUDA helper module (a C compile of about 6 s the first time Triton runs on a machine, cached
    in ~/.triton), after the import: vLLM sets up the environment torch and Triton read before
    they load.
    """
    with _import_lock:
        if _import_threads or "vllm.entrypoints.llm" in sys.modules:
            return False

        def work() -> None:
            try:
                for name in _VLLM_MODULES:
                    importlib.import_module(name)
            except BaseException as error:  # re-raised by import_vllm, on the caller's side
                _import_failure.append(error)
                return
            if warm_device:  # its own thread: the load waits for this one, and needs neither yet
                threading.Thread(
                    target=_warm_device, name="qwen-magic-warm-device", daemon=True
                ).start()
            _replay_load_imports()

        thread = threading.Thread(target=work, name="qwen-magic-import-vllm", daemon=True)
        _import_threads[:] = [thread]  # tracked before it runs: an interrupt cannot lose it
        thread.start()
        return True


def _warm_device() -> None:
    """Create the CUDA context and build Triton's CUDA helpers (vLLM's load would do both);
    only a head start: the load reports any real problem itself. Runs beside the replay of the
    last load's imports, not in the import thread the load joins: the helpers are a 6 s C
    compile on a fresh machine, and the load needs neither before it has read the model."""
    with contextlib.suppress(Exception):
        import torch

        if not torch.cuda.is_available():
            return
        torch.empty(1, device="cuda")
    with contextlib.suppress(Exception):  # no Triton, or no GPU backend: nothing to build
        from triton.runtime import driver

        driver.active  # noqa: B018 - creating the driver compiles its helpers


_replay_failed: set[str] = set()  # modules whose replay failed in this process


def _load_imports_file() -> Path | None:
    """Where the modules the last load imported are kept, per vLLM version, as
    ``{"modules": [...], "failed": [...]}`` (None before vLLM is imported)."""
    from qwen_magic.models import cache_root

    version = getattr(sys.modules.get("vllm"), "__version__", None)
    return cache_root() / f"vllm-{version}-load-imports.json" if version else None


def _read_load_imports(path: Path) -> tuple[list[str], set[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: start again
        return [], set()
    if not isinstance(data, dict):
        return [], set()
    modules = [name for name in data.get("modules", ()) if isinstance(name, str)]
    failed = {name for name in data.get("failed", ()) if isinstance(name, str)}
    return modules, failed


def _vllm_top_level_packages() -> set[str]:
    """The top-level packages of vLLM's distribution and of the ones it requires (no extras):
    the only modules worth importing ahead, never the user's own."""
    from importlib import metadata

    def normalised(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    owners = metadata.packages_distributions()
    wanted = {normalised(name) for name in owners.get("vllm", ())}
    for distribution in list(wanted):
        for requirement in metadata.requires(distribution) or ():
            if "extra ==" not in requirement:
                wanted.add(normalised(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]))
    packages = {top for top, names in owners.items() if any(normalised(n) in wanted for n in names)}
    packages.add("vllm")  # also when vLLM runs from a folder no distribution owns
    return packages


def record_load_imports(before: set[str], loaded: list[str] | None = None) -> None:
    """Remember the modules of vLLM's packages that a successful load needed, in import order:
    those imported since ``before`` and those the background import brought in ahead (of
    ``loaded``, ``sys.modules`` by default). A cache only: whatever goes wrong here, the load
    stands."""
    loaded = list(sys.modules) if loaded is None else loaded
    with contextlib.suppress(Exception):
        path = _load_imports_file()
        if path is None:
            return
        previous, failed = _read_load_imports(path)
        failed |= _replay_failed
        candidates = (set(loaded) - before) | set(previous)
        packages = _vllm_top_level_packages()
        modules = [
            name
            for name in loaded
            if name in candidates and name not in failed and name.partition(".")[0] in packages
        ]
        if modules == previous and not _replay_failed:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps({"modules": modules, "failed": sorted(failed)}))
        os.replace(partial, path)


def _replay_load_imports() -> None:
    """Import what the last load of this vLLM version imported (see the module docstring)."""
    path = _load_imports_file()
    modules, failed = _read_load_imports(path) if path else ([], set())
    for name in modules:
        if name not in sys.modules and name not in failed:
            try:
                importlib.import_module(name)
            except Exception:  # some only import in the state a load sets up: never again
                _replay_failed.add(name)


@contextlib.contextmanager
def model_inspection_in_process() -> Iterator[None]:
    """Let vLLM inspect the model's class in this process while the block runs.

    The first time a model class is loaded on a machine (per vLLM version), vLLM's registry
    imports it in a new Python process, to keep CUDA out of a process that will fork the
    engine, and caches what it learnt (``~/.cache/vllm/modelinfos``). That subprocess imports
    all of vLLM again: 20 s of a 70 s first load on a fresh H100 machine (docs/benchmarks.md).
    Our engine runs in this process (CUDA is here anyway), so the class is inspected here; vLLM
    still writes its cache. With vLLM's multiprocessing turned back on, or a vLLM without the
    hook, nothing changes.
    """
    registry = None
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        with contextlib.suppress(ImportError):
            registry = importlib.import_module("vllm.model_executor.models.registry")
    original = getattr(registry, "_run_in_subprocess", None)
    if registry is None or not callable(original):
        yield
        return
    registry._run_in_subprocess = lambda function: function()
    try:
        yield
    finally:
        registry._run_in_subprocess = original


def import_vllm() -> ModuleType:
    """Import vLLM (in a throwaway thread the first time, see the module docstring)."""
    if "vllm.entrypoints.llm" not in sys.modules or _import_threads:
        start_import()
        for thread in list(_import_threads):
            thread.join()
        with _import_lock:
            _import_threads.clear()
            failure = list(_import_failure)
            _import_failure.clear()
        if failure:
            error = failure[0]
            if isinstance(error, ImportError):
                raise BackendError(
                    f"cannot import vLLM ({error}): pip install 'qwen-magic[gpu]' on a CUDA "
                    "machine or 'qwen-magic[cpu]' elsewhere"
                ) from error
            raise error
        for name in ("last_traceback", "last_value", "last_exc"):
            if hasattr(sys, name):
                setattr(sys, name, None)
    return importlib.import_module("vllm")

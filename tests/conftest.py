"""Session fixtures giving the paths of the real models and tokenizers (fetched once, cached)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_magic import models


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a bf16 Hugging Face folder."""
    return models.demo_model_path()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Tiny random-weight Qwen2 folder with the real Qwen2.5 tokenizer."""
    return models.tiny_model_path()


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    """Folder holding the Qwen3 tokenizer.json and tokenizer_config.json."""
    return models.qwen3_tokenizer_path()


@pytest.fixture(scope="session")
def qwen1_tiktoken_file() -> Path:
    """Qwen(1)'s qwen.tiktoken BPE ranks file."""
    return models.qwen1_tiktoken_path()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face folder."""
    return models.smollm2_path()

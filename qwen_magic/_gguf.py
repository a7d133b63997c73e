"""Turn a GGUF checkpoint into a plain Hugging Face folder (bf16 safetensors) that vLLM can load.

transformers reads GGUF files (dequantising them) but refuses to ``save_pretrained`` the result,
and a few settings are lost or misread on the way, so this module rebuilds a plain config and
state dict and writes the pieces transformers and vLLM expect: ``config.json`` (with an explicit
``rope_theta``), ``model.safetensors``, tokenizer files whose ``tokenizer_config.json`` holds the
chat template, and ``generation_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

# GGUF metadata keys some converters write for the publisher's recommended sampling defaults.
_GGUF_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
}

# Keys transformers adds to a config loaded from GGUF that do not belong in a plain checkpoint.
_GGUF_CONFIG_BOOKKEEPING = frozenset(
    {"_name_or_path", "_model_name_or_path", "quantization_config", "transformers_version"}
)


def read_gguf_metadata(gguf_file: Path) -> dict[str, Any]:
    """Return the scalar and string metadata of a GGUF file (token arrays are skipped)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(gguf_file)
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        metadata[key] = field.contents()
    return metadata


def convert_gguf_to_hf(
    gguf_file: Path,
    output_dir: Path,
    *,
    eos_token_ids: list[int] | None = None,
    sampling_defaults: dict[str, float | int] | None = None,
) -> None:
    """Write a bf16 Hugging Face model folder for ``gguf_file`` into ``output_dir``.

    Args:
        gguf_file: The (possibly quantised) GGUF checkpoint.
        output_dir: Existing, empty folder that receives the converted model.
        eos_token_ids: End-of-turn ids for ``generation_config.json``; defaults to the GGUF's eos.
        sampling_defaults: Sampling settings to use when the GGUF carries none of its own.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    metadata = read_gguf_metadata(gguf_file)
    architecture = metadata["general.architecture"]
    progress = tqdm(total=4, desc=f"converting {gguf_file.name}", unit="step")

    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.bfloat16
    )
    progress.update()

    # A fresh config of the same class drops the GGUF bookkeeping that blocks save_pretrained.
    config_values = {
        key: value
        for key, value in model.config.to_dict().items()
        if key not in _GGUF_CONFIG_BOOKKEEPING
    }
    config = type(model.config)(**config_values)
    config.dtype = "bfloat16"
    state_dict = {
        name: tensor.detach().to(torch.bfloat16).contiguous().clone()
        for name, tensor in model.state_dict().items()
    }
    if getattr(config, "tie_word_embeddings", False):
        state_dict.pop("lm_head.weight", None)
    config.architectures = [type(model).__name__]
    config.save_pretrained(output_dir)
    save_file(state_dict, output_dir / "model.safetensors", metadata={"format": "pt"})
    del model, state_dict
    progress.update()

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(output_dir)
    tokenizer_config_path = output_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["chat_template"] = chat_template or tokenizer_config.get("chat_template")
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    progress.update()

    sampling = {
        name: metadata[key] for key, name in _GGUF_SAMPLING_KEYS.items() if key in metadata
    } or dict(sampling_defaults or {})
    generation_config = GenerationConfig(
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos_token_ids or metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        do_sample=bool(sampling),
        **sampling,
    )
    generation_config.save_pretrained(output_dir)
    finish_model_folder(output_dir, rope_theta=float(metadata[f"{architecture}.rope.freq_base"]))
    progress.update()
    progress.close()


def finish_model_folder(folder: Path, *, rope_theta: float) -> None:
    """Write ``rope_theta`` at the top of config.json and make the files readable by everyone.

    transformers 5 nests rope_theta in ``rope_parameters``; some 4.x readers then fall back to
    10000, so the explicit key keeps older transformers and vLLM builds right. safetensors
    writes 0600 files, but the cache is shared between users.
    """
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_theta"] = rope_theta
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for written in folder.iterdir():
        written.chmod(0o644)

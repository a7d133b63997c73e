"""Build a random-weight Qwen2 model of a real Qwen2.5 shape, with a real Qwen tokenizer.

Decode speed does not depend on weight values, so a random model of the right shape measures the
same engine work as the real one, without shipping gigabytes of weights.

    python benchmarks/make_random_model.py --shape 0.5b --tokenizer DIR --out DIR
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# Published Qwen2.5-Instruct configurations (config.json of the 0.5B and 1.5B models).
SHAPES: dict[str, dict[str, int | bool]] = {
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def build(shape: str, tokenizer: Path, out: Path, *, device: str = "cpu") -> Path:
    """Write ``out`` (config, random bf16 safetensors, tokenizer files); returns ``out``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        bos_token_id=151643,
        eos_token_id=151645,
        dtype="bfloat16",
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy2(tokenizer / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(build(args.shape, args.tokenizer, args.out, device=args.device))


if __name__ == "__main__":
    main()

"""Build a random-weight Qwen2 model of a real Qwen2.5 shape, with a real Qwen tokenizer.

Decode speed does not depend on weight values, so a random model of the right shape measures the
same engine work as the real one, without shipping gigabytes of weights.

    python benchmarks/make_random_model.py --shape 0.5b --tokenizer DIR --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwen_magic.models import write_random_qwen2

# Published Qwen2.5-Instruct configurations (config.json of the 0.5B and 1.5B models).
SHAPES: dict[str, dict[str, int | bool]] = {
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="folder with tokenizer.json and generation_config.json",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    write_random_qwen2(args.out, args.tokenizer, device=args.device, **SHAPES[args.shape])
    print(args.out)


if __name__ == "__main__":
    main()

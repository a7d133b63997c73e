#!/usr/bin/env bash
# Install everything, fetch the demo model and execute the example notebooks headless; the
# executed copies land in example_notebooks/executed/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

shopt -s nullglob
notebooks=(example_notebooks/*.ipynb)
if (( ${#notebooks[@]} == 0 )); then
    echo "== no notebooks in example_notebooks/; nothing to run"
    exit 0
fi

echo "== executing ${#notebooks[@]} notebook(s)"
.venv/bin/jupyter nbconvert --execute --to notebook --output-dir example_notebooks/executed \
    --ExecutePreprocessor.timeout=900 "${notebooks[@]}"
echo "== executed copies are in example_notebooks/executed/"

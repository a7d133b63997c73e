#!/usr/bin/env bash
# Install if needed, then lint and run the test suite; extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh || exit
echo "== ruff"
.venv/bin/python -m ruff check qwen_magic tests || exit
echo "== pytest"
.venv/bin/python -m pytest -m "not gpu" "$@"

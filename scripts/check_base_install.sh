#!/usr/bin/env bash
# The front door on the base install alone (no test extra, so no torch): build .venv-base as `make run`
# builds .venv, then run the demo and the main job until SFT step 1 is logged, and stop it with SIGTERM
# (a graceful stop: exit status 75, checkpoint saved). CI runs this before the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-base scripts/setup_env.sh
python=.venv-base/bin/python
if "$python" -c "import torch" 2>/dev/null; then
  echo "check_base_install: torch is installed in the base venv; the check would prove nothing" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
pid=""
echo "== base install: the demo"
"$python" -m rlhf_jax.launch experiment=smollm2_hh_demo run_dir="$work/demo"
test -s "$work/demo/report.html"
echo "== base install: the main job (make run) until SFT step 1"
"$python" -m rlhf_jax.launch experiment=smollm2_hh run_dir="$work/main" > "$work/main.log" 2>&1 &
pid=$!
for _ in $(seq 1 1800); do
  if [ -s "$work/main/sft/metrics.jsonl" ] || ! kill -0 "$pid" 2>/dev/null; then
    break
  fi
  sleep 1
done
if [ ! -s "$work/main/sft/metrics.jsonl" ]; then
  echo "check_base_install: the main job logged no SFT step:" >&2
  tail -n 40 "$work/main.log" >&2
  exit 1
fi
echo "SFT step 1: $(head -n 1 "$work/main/sft/metrics.jsonl" | cut -c 1-300)"
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
tail -n 3 "$work/main.log"
if [ "$status" -ne 75 ]; then
  echo "check_base_install: the main job exited $status on SIGTERM, expected 75 (stopped and saved)" >&2
  exit 1
fi
echo "base install: demo and main job OK"

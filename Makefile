# The two commands of the README. Each creates/refreshes .venv itself.
.PHONY: run demo test test-quick

# The main job: SFT -> reward model -> PPO of SmolLM2-135M-Instruct on HH-RLHF (about 30 min on 2 CPU cores).
run:
	scripts/setup_env.sh
	.venv/bin/python -m rlhf_jax.launch experiment=smollm2_hh

# Samples only (under a minute).
demo:
	scripts/setup_env.sh
	.venv/bin/python -m rlhf_jax.launch experiment=smollm2_hh_demo

test:
	scripts/setup_env.sh test
	.venv/bin/python -m pytest -n 2 --durations=30 tests

# Developer loop: skip the real-model tests (a few minutes).
test-quick:
	scripts/setup_env.sh test
	.venv/bin/python -m pytest -n 2 -m "not slow" tests

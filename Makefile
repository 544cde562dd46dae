# The two commands of the README. Each creates/refreshes .venv itself.
.PHONY: demo test test-quick

demo:
	scripts/setup_env.sh
	.venv/bin/python -m rlhf_jax.launch experiment=smollm2_hh_demo

test:
	scripts/setup_env.sh test
	.venv/bin/python -m pytest -n 2 tests

# Developer loop: skip the real-model tests (a few minutes).
test-quick:
	.venv/bin/python -m pytest -n 2 -m "not slow" tests

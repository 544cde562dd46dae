"""Where the built-in experiments find their data.

The shared data sets sit beside the repository (``<repo>/../shared/data``); every path below can be
overridden on the command line, e.g. ``data.path=/data/hh/train.jsonl.gz``.
"""

import os
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.path.normpath(REPO_ROOT / ".." / "shared" / "data"))

# Anthropic HH-RLHF, harmless-base: {"chosen", "rejected"} dialogues (1,600 train / 200 dev pairs).
HH_HARMLESS_TRAIN = str(SHARED_DATA / "hh-rlhf-harmless" / "train.jsonl.gz")
HH_HARMLESS_DEV = str(SHARED_DATA / "hh-rlhf-harmless" / "dev.jsonl.gz")

# HH dialogues alternate "\n\nHuman:" and "\n\nAssistant:"; a response ends where the next human turn starts.
HH_STOP = ("\n\nHuman:",)


def run_dir(name: str) -> str:
    """The default run directory of an experiment, relative to the working directory."""
    return f"runs/{name}"


# Addition questions (rlhf_jax.tasks.arithmetic), written by
#   python -m rlhf_jax.tasks.arithmetic write --split train --n 2000 --seed 0 experiments/data/arith_train.jsonl
#   python -m rlhf_jax.tasks.arithmetic write --split test --n 200 --seed 0 experiments/data/arith_test.jsonl
# (tests/test_task_arithmetic.py checks the files equal what those commands write).
ARITH_DATA = REPO_ROOT / "experiments" / "data"
ARITH_TRAIN = str(ARITH_DATA / "arith_train.jsonl")
ARITH_TEST = str(ARITH_DATA / "arith_test.jsonl")

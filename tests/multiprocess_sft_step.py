"""One process of the data-parallel SFT check run by `tests/test_multiprocess.py` (not a test module).

    python tests/multiprocess_sft_step.py OUT_DIR --reference                  # one process, plain jit
    python tests/multiprocess_sft_step.py OUT_DIR --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I

Builds a tiny random Llama and a synthetic SFT dataset from fixed seeds, takes this process's rows of each
global batch of 4 (`DataIterator(process_index, process_count)`), runs ``STEPS`` SFT steps and writes the
final params to ``OUT_DIR/params_<I>.npz`` (the reference: ``params_reference.npz`` and
``params_initial.npz``). The distributed run places each local half into a global array over a "data"
mesh, steps with explicit shardings, saves a checkpoint collectively, restores it into a fresh state and
writes the restored params too (``restored_<I>.npz``).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf_jax import distributed  # noqa: E402  (must come before any JAX computation)

STEPS = 2
GLOBAL_BATCH = 4


def _dataset():
    from rlhf_jax.data import Example, Report, TokenizeConfig, TokenizedDataset

    rng = np.random.default_rng(0)
    examples = [Example(prompt=rng.integers(3, 200, int(rng.integers(2, 6))).astype(np.int32),
                        responses=(rng.integers(3, 200, int(rng.integers(3, 10))).astype(np.int32),))
                for _ in range(STEPS * GLOBAL_BATCH)]
    config = TokenizeConfig(max_length=16, max_prompt_length=8)
    return TokenizedDataset("sft", examples, pad_id=2, end_id=2, config=config,
                            report=Report("synthetic", "sft", rows=len(examples), valid=len(examples)))


def _flat(params) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()
    distributed.initialize(distributed.DistributedConfig(args.coordinator, args.num_processes, args.process_id,
                                                         initialization_timeout=120))

    import jax
    from jax.experimental import multihost_utils

    from rlhf_jax.data import DataIterator
    from rlhf_jax.models import llama
    from rlhf_jax.models.config import tiny_config
    from rlhf_jax.trainers.sft import sft_train_step
    from rlhf_jax.training.state import TrainState, make_optimizer

    config = tiny_config("llama")
    params = llama.init_params(config, jax.random.key(1))
    # SGD with momentum and clipping: linear in the gradient (so float reduction order moves the result by
    # ~1e-7, not Adam's sign(g) for g ~ 0), and the clip needs the global gradient norm
    tx = make_optimizer("sgd", 0.5, b1=0.9, grad_clip=1.0)
    state = TrainState.create(params, tx, jax.random.key(0))
    step = functools.partial(sft_train_step, config, 1)
    keys = ("tokens", "attention_mask", "loss_mask")
    batches = DataIterator(_dataset(), batch_size=GLOBAL_BATCH, seed=3, process_index=jax.process_index(),
                           process_count=jax.process_count())
    args.out_dir.mkdir(parents=True, exist_ok=True)

    if args.reference:
        assert jax.process_count() == 1
        np.savez(args.out_dir / "params_initial.npz", **_flat(params))
        step_fn = jax.jit(step)
        for _ in range(STEPS):
            batch = next(batches)
            state, _ = step_fn(state, {key: batch[key] for key in keys})
        np.savez(args.out_dir / "params_reference.npz", **_flat(state.params))
        return 0

    from rlhf_jax.config import MeshConfig
    from rlhf_jax.sharding import make_mesh, place_batch, place_state, shard_train_step, state_shardings
    from rlhf_jax.training.checkpoint import Checkpointer

    assert jax.process_count() == args.num_processes and len(jax.local_devices()) == 1, jax.devices()
    mesh = make_mesh(MeshConfig(data=-1))
    shardings = state_shardings(state, mesh)
    state = place_state(state, shardings)
    step_fn = shard_train_step(step, shardings, mesh)
    for _ in range(STEPS):
        batch = next(batches)
        assert batch["tokens"].shape[0] == GLOBAL_BATCH // jax.process_count()
        global_batch = place_batch({key: batch[key] for key in keys}, mesh)
        assert global_batch["tokens"].shape[0] == GLOBAL_BATCH
        state, metrics = step_fn(state, global_batch)
    final = multihost_utils.process_allgather(state.params, tiled=True)
    np.savez(args.out_dir / f"params_{jax.process_index()}.npz", **_flat(final))

    # checkpoints are collective: every process saves and restores the same directory
    checkpointer = Checkpointer(args.out_dir / "checkpoints", every_steps=1, keep_last=1)
    checkpointer.save(STEPS, state, {"data": batches.get_state()}, force=True)
    checkpointer.close()
    fresh = place_state(TrainState.create(params, tx, jax.random.key(0)), shardings)
    checkpointer = Checkpointer(args.out_dir / "checkpoints", every_steps=1, keep_last=1)
    restored, host_state = checkpointer.restore(fresh)
    checkpointer.close()
    assert host_state == {"data": batches.get_state()}, host_state
    assert int(restored.step) == STEPS
    restored_params = multihost_utils.process_allgather(restored.params, tiled=True)
    np.savez(args.out_dir / f"restored_{jax.process_index()}.npz", **_flat(restored_params))
    return 0


if __name__ == "__main__":
    sys.exit(main())

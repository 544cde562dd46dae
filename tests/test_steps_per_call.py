"""Several optimizer steps in one compiled call (`optimizer.steps_per_call`, `training.calls`): the same states and
metrics as one step a call, calls that stop at checkpoints, evaluations and batches of another shape, and exact
resume, a stop while a batch waits included."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import validate
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.registry import get_experiment
from rlhf_jax.sharding import make_mesh, place_batch, place_for_training
from rlhf_jax.config import MeshConfig
from rlhf_jax.stages import common
from rlhf_jax.trainers.common import with_loss_index
from rlhf_jax.trainers.sft import sft_train_step
from rlhf_jax.training.accumulate import order_by_length
from rlhf_jax.training.calls import StepCalls, signature
from rlhf_jax.training.checkpoint import Checkpointer
from rlhf_jax.training.logs import read_metrics
from rlhf_jax.training.preemption import Preempted
from rlhf_jax.training.state import TrainState, make_optimizer


def _sft_batch(seed: int, rows: int = 4, length: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    config = tiny_config("llama")
    lengths = rng.integers(4, length + 1 if seed % 2 else 13, rows)  # odd seeds: more loss positions
    column = np.arange(length)[None]
    attention = column < lengths[:, None]
    batch = {"tokens": rng.integers(3, config.vocab_size, (rows, length)).astype(np.int32),
             "attention_mask": attention, "loss_mask": attention & (column >= 2)}
    return with_loss_index(order_by_length(batch, 2, 2), num_microbatches=2)


def _assert_calls_run_as_single_steps(step, params, groups: list[list[dict]], micro_batches: int, rtol: float = 1e-12,
                                      atol: float = 1e-15):
    """`step` (float64) over the batches of `groups` one step a call, then in calls of the groups (up to the
    longest group's size a call): the same params, optimizer state and per-step metrics."""
    mesh = make_mesh(MeshConfig())
    batches = [batch for group in groups for batch in group]

    def fresh():
        return TrainState.create(jax.tree.map(jnp.copy, params), make_optimizer("adamw", 1e-2), jax.random.key(1))

    (single,), one_step = place_for_training(step, (fresh(),), mesh)
    expected = []
    for batch in batches:
        single, metrics = one_step(single, place_batch(batch, mesh))
        expected.append(jax.device_get(metrics))
    (called,), calls = place_for_training(step, (fresh(),), mesh, steps_per_call=max(map(len, groups)),
                                          micro_batches=micro_batches)
    assert isinstance(calls, StepCalls)
    got = []
    for group in groups:
        called, metrics = calls(called, [place_batch(batch, mesh) for batch in group])
        got.extend(metrics)
    assert int(called.step) == int(single.step) == len(batches) == len(got)
    for a, b in zip(jax.tree.leaves((single.params, single.opt_state)), jax.tree.leaves((called.params,
                                                                                            called.opt_state))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=rtol, err_msg=name)


def test_a_call_of_the_sft_step_gives_the_states_and_metrics_of_one_step_a_call_in_float64():
    """Three steps a call, run as a call of 3 and a call of 2 of 3 (its third skipped), against 5 single steps:
    the same params, optimizer state and per-step metrics to float64 rounding. The batches' loss indexes differ
    in width: a call widens them to its widest."""
    with jax.enable_x64(True):
        config = tiny_config("llama", dtype="float64", param_dtype="float64")
        params = llama.init_params(config, jax.random.key(0))
        step = functools.partial(sft_train_step, config, 2)
        batches = [_sft_batch(seed) for seed in range(5)]
        assert len({batch["loss_index"].shape for batch in batches}) > 1
        assert len({signature(batch) for batch in batches}) == 1  # and yet one call's: calls of 3 and 2
        _assert_calls_run_as_single_steps(step, params, [batches[:3], batches[3:]], micro_batches=2)


@pytest.mark.parametrize("micro_batches", [1, 2, 4])
def test_a_widened_loss_index_gives_each_micro_batch_its_positions_then_padding(micro_batches):
    from rlhf_jax.trainers.common import predicted_mask, widen_loss_index
    from rlhf_jax.training.accumulate import split_microbatches

    for pairs in (False, True):
        batch = _sft_batch(1, rows=8, length=16)
        if pairs:  # a preference batch: the index covers each micro-batch's [chosen; rejected] stack
            other = _sft_batch(2, rows=8, length=16)
            batch = with_loss_index({**{f"chosen_{k}": batch[k] for k in ("tokens", "attention_mask", "loss_mask")},
                                     **{f"rejected_{k}": other[k] for k in ("tokens", "attention_mask", "loss_mask")}},
                                    micro_batches)
        else:
            batch = with_loss_index({k: batch[k] for k in ("tokens", "attention_mask", "loss_mask")}, micro_batches)
        key = "pair_loss_index" if pairs else "loss_index"
        own = batch[key].shape[1]
        wide = widen_loss_index(batch, micro_batches, {key: own + 5})
        assert wide[key].shape == (8, own + 5) and wide[key].dtype == batch[key].dtype
        narrows, wides = split_microbatches(batch, micro_batches), split_microbatches(wide, micro_batches)
        for m in range(micro_batches):
            narrow, widened = ({k: np.asarray(v[m]) for k, v in split.items()} for split in (narrows, wides))
            if pairs:
                stack = {k: np.concatenate([narrow[f"chosen_{k}"], narrow[f"rejected_{k}"]])
                         for k in ("tokens", "loss_mask")}
            else:
                stack = {k: narrow[k] for k in ("tokens", "loss_mask")}
            slots = stack["tokens"].size
            positions = np.flatnonzero(np.asarray(predicted_mask(stack)))
            flat = np.asarray(widened[key]).reshape(-1)
            np.testing.assert_array_equal(flat[: positions.size], positions)  # its positions, in order
            assert (flat[positions.size:] == slots).all()  # then padding, as `position_index` writes it
            np.testing.assert_array_equal(np.asarray(narrow[key]).reshape(-1)[: positions.size], positions)


def _toy(experiment, steps_per_call: int):
    """A train state of one 2-vector and a step that adds its batch's sum (exact in float32): its state after
    any order of calls shows which batches ran."""
    state = TrainState.create({"w": jnp.zeros(2)}, make_optimizer("sgd", 0.1), jax.random.key(0))

    def step(state, batch):
        total = jnp.sum(batch["x"])
        return state.replace(step=state.step + 1, params={"w": state.params["w"] + total}), {"toy/loss": total}

    (state,), step_fn = place_for_training(step, (state,), make_mesh(MeshConfig()), steps_per_call=steps_per_call)
    sizes = []
    if steps_per_call > 1:
        program = step_fn.program
        step_fn.program = lambda *args: (sizes.append(int(args[-1][1])), program(*args))[1]
    return state, step_fn, sizes


class _Data:
    """Batches A (2 × 4) and B (2 × 6) of `kinds`, batch i all i + 1; `position` is what a checkpoint holds."""

    def __init__(self, kinds: str):
        self.kinds, self.position = kinds, 0

    def __next__(self):
        if self.position == len(self.kinds):
            raise StopIteration
        kind, self.position = self.kinds[self.position], self.position + 1
        return {"x": np.full((2, 4 if kind == "A" else 6), float(self.position), np.float32)}

    def __iter__(self):
        return self


KINDS = "AAAABBAAAAA"


def _fit(experiment, stage_dir: Path, steps_per_call: int, data: _Data | None = None):
    data = data or _Data(KINDS)
    state, step_fn, sizes = _toy(experiment, steps_per_call)
    state, records = common.fit(
        experiment=experiment, stage=experiment.stage("sft"), stage_dir=stage_dir, state=state, step_fn=step_fn,
        batches=data, total_steps=len(KINDS), host_state=lambda: {"position": data.position},
        restore_host_state=lambda saved: setattr(data, "position", saved["position"]),
        prepare=lambda batch: place_batch(batch, make_mesh(MeshConfig())),
        evaluate=lambda state: {"eval/w": state.params["w"][0]}, eval_every=5)
    return state, records, sizes


def _toy_experiment():
    experiment = get_experiment("tiny_sft")
    return dataclasses.replace(experiment, checkpoint=dataclasses.replace(experiment.checkpoint, every_steps=4,
                                                                          keep_last=10))


def test_calls_stop_at_checkpoints_evaluations_and_a_batch_of_another_shape(tmp_path):
    experiment = _toy_experiment()
    single, single_records, _ = _fit(experiment, tmp_path / "one", 1)
    called, records, sizes = _fit(experiment, tmp_path / "three", 3)
    # 3 steps; 1 to the checkpoint at 4; 1 to the evaluation at 5; B then A waits; 2 to the checkpoint at 8;
    # 2 to the evaluation at 10; the last
    assert sizes == [3, 1, 1, 1, 2, 2, 1]
    assert float(called.params["w"][0]) == float(single.params["w"][0]) == sum(
        (i + 1) * (8 if kind == "A" else 12) for i, kind in enumerate(KINDS))
    strip = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in single_records]
    assert [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records] == strip
    assert [r["step"] for r in records if "eval/w" in r] == [0, 5, 10, 11]
    assert all(r["time/step"] > 0 for r in records if r["step"] > 0)
    assert Checkpointer(tmp_path / "three" / "checkpoints")._manager.all_steps() == [4, 8, 11]


def test_a_stop_while_a_batch_waits_saves_the_data_position_before_it_and_resumes_exactly(tmp_path, monkeypatch):
    experiment = _toy_experiment()
    full, _, _ = _fit(experiment, tmp_path / "full", 3)
    # the call after step 5 runs B (step 6) and ends at the A behind it, which waits: stop there
    monkeypatch.setattr(common, "should_stop", lambda step: step == 6)
    with pytest.raises(Preempted, match="step 6"):
        _fit(experiment, tmp_path / "resumed", 3)
    saved = Checkpointer(tmp_path / "resumed" / "checkpoints")
    assert saved.latest_step() == 6
    state, _, _ = _toy(experiment, 3)
    _, host = saved.restore(state)
    assert host == {"position": 6}  # the waiting batch (the 7th) has not run
    monkeypatch.setattr(common, "should_stop", lambda step: False)
    resumed, records, sizes = _fit(experiment, tmp_path / "resumed", 3)
    assert sizes == [2, 2, 1]
    assert float(resumed.params["w"][0]) == float(full.params["w"][0])
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == list(range(0, 12))


def test_steps_per_call_must_be_at_least_one():
    experiment = get_experiment("tiny_sft")
    bad = dataclasses.replace(experiment, optimizer=dataclasses.replace(experiment.optimizer, steps_per_call=0))
    with pytest.raises(ConfigError, match="optimizer.steps_per_call"):
        validate(bad)


def test_a_call_refuses_batches_of_two_shapes_and_too_many():
    experiment = _toy_experiment()
    state, calls, _ = _toy(experiment, 2)
    mesh = make_mesh(MeshConfig())
    a, b = (place_batch({"x": np.ones((2, n), np.float32)}, mesh) for n in (4, 6))
    with pytest.raises(ValueError, match="same arrays and shapes"):
        calls(state, [a, b])
    with pytest.raises(ValueError, match="1 to 2 batches, got 3"):
        calls(state, [a, a, a])


def test_the_sft_stage_two_steps_a_call_logs_the_losses_of_one_step_a_call_and_resumes_exactly(tmp_path,
                                                                                                monkeypatch):
    from test_stages import _full_then_killed_and_resumed, _run_stage

    experiment = get_experiment("tiny_sft")
    experiment = dataclasses.replace(experiment, checkpoint=dataclasses.replace(experiment.checkpoint, every_steps=4))
    single = read_metrics(_run_stage(experiment, "sft", tmp_path / "one"))
    experiment = dataclasses.replace(experiment, optimizer=dataclasses.replace(experiment.optimizer,
                                                                               steps_per_call=2))
    full, resumed = _full_then_killed_and_resumed(experiment, "sft", tmp_path, monkeypatch, kill_after=6)
    called = read_metrics(full)
    assert [r["step"] for r in called] == [r["step"] for r in single] == list(range(1, 9))
    # the scan's body is compiled as a program of its own: float32 rounding apart, the same losses
    np.testing.assert_allclose([r["sft/loss"] for r in called], [r["sft/loss"] for r in single], rtol=1e-5)
    assert [r["sft/loss"] for r in read_metrics(resumed)][-4:] == [r["sft/loss"] for r in called][-4:]


def test_two_steps_a_call_on_a_mesh_of_two_devices_logs_the_losses_of_one_step_a_call(tmp_path):
    """The SFT stage through the launcher on 2 CPU devices (`mesh.data=2`, 2 micro-batches): the stacked batches
    split their rows over the devices (`sharding.stacked_batch_sharding`), and the losses are one step a call's."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    losses = {}
    for calls in (1, 2):
        run_dir = tmp_path / f"calls{calls}"
        done = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", "experiment=tiny_sft", f"run_dir={run_dir}",
                               "mesh.data=2", "optimizer.micro_batches=2", f"optimizer.steps_per_call={calls}"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        records = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, 9))
        losses[calls] = [r["sft/loss"] for r in records]
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)


@pytest.mark.parametrize("name, stage_name, loss, shared", [
    ("tiny_dpo", "dpo", "dpo/loss", False), ("tiny_kto", "kto", "kto/loss", False),
    ("tiny_pipeline", "rm", "rm/loss", False), ("tiny_dpo", "dpo", "dpo/loss", True),
    ("tiny_pipeline", "rm", "rm/loss", True)])
def test_the_preference_stages_two_steps_a_call_log_the_losses_of_one_step_a_call(tmp_path, name, stage_name, loss,
                                                                                   shared):
    """DPO (its pair index), KTO (its rows' and KL rows' indexes) and the reward model, in 2 micro-batches with
    per-micro-batch lengths, 2 steps a call: the losses of one step a call; DPO and the reward model also on
    shared-prefix rows (widened to a call's longest)."""
    from test_stages import _run_stage

    experiment = get_experiment(name)
    stage = experiment.stage(stage_name)
    if stage_name == "rm":
        stage = dataclasses.replace(stage, model="tiny:smollm2")
    if shared:
        stage = dataclasses.replace(stage, shared_prefix=True)
    logged = {}
    for calls in (1, 2):
        optimizer = dataclasses.replace(experiment.optimizer, micro_batches=2, length_buckets=4, steps_per_call=calls)
        run = dataclasses.replace(experiment, optimizer=optimizer, stages=(stage,))
        logged[calls] = [r for r in read_metrics(_run_stage(run, stage_name, tmp_path / f"calls{calls}"))
                         if loss in r]
    assert [r["step"] for r in logged[2]] == [r["step"] for r in logged[1]] == list(range(1, stage.max_steps + 1))
    np.testing.assert_allclose([r[loss] for r in logged[2]], [r[loss] for r in logged[1]], rtol=1e-5)


def _shared_batches(micro_batches: int = 4, buckets: int = 4) -> list[dict]:
    """Shared-prefix DPO batches (rows at per-micro-batch lengths, loss entries) of two row lengths, 64 and 128."""
    from test_length_buckets import _prompted_pairs

    from experiments.tiny import tiny_dpo

    experiment = dataclasses.replace(tiny_dpo(), optimizer=dataclasses.replace(
        tiny_dpo().optimizer, micro_batches=micro_batches, length_buckets=buckets))
    stage = dataclasses.replace(experiment.stages[0], shared_prefix=True)
    order = common.length_order(experiment, stage)
    batches = [common.shared_pairs(order(_prompted_pairs(seed, length=length)), loss_entries=True)
               for seed, length in ((6, 30), (7, 64), (8, 30))]
    assert [batch["shared_tokens"].shape[1] for batch in batches] == [64, 128, 64]
    assert len({batch["shared_loss_slots"].shape[1] for batch in batches}) > 1
    return batches


def test_widened_shared_rows_keep_their_slots_and_run_each_micro_batch_at_the_length_it_needs_of_the_new_row():
    from rlhf_jax.data.batching import SHARED_LOSS_KEYS, SHARED_ROW_KEYS
    from rlhf_jax.training.accumulate import LENGTH_BUCKET, micro_lengths, widen_shared_rows

    narrow = _shared_batches()[0]
    own, entries = narrow["shared_tokens"].shape[1], narrow["shared_loss_slots"].shape[1]
    wide = {key: np.asarray(value) for key, value in widen_shared_rows(narrow, 192, entries + 9, 4).items()}
    for keys, width in ((SHARED_ROW_KEYS, own), (SHARED_LOSS_KEYS, entries)):
        for key in keys:  # the same slots and entries, then padding (segment 0, side 0)
            np.testing.assert_array_equal(wide[key][:, :width], narrow[key], err_msg=key)
            assert not wide[key][:, width:].any() and wide[key].dtype == narrow[key].dtype, key
    for key in ("chosen_last", "rejected_last"):
        np.testing.assert_array_equal(wide[key], narrow[key])
    lengths, needed = micro_lengths(192, 4), np.sum(narrow["shared_segment_ids"] > 0, axis=1)
    assert lengths != micro_lengths(own, 4)
    for m in range(4):  # as `order_by_length` picks for rows of 192: the shortest that holds micro-batch m's rows
        picks = np.argmax(wide[LENGTH_BUCKET][m::4], axis=1)
        assert wide[LENGTH_BUCKET].dtype == bool and wide[LENGTH_BUCKET].sum() == len(needed)
        assert len(set(picks)) == 1 and lengths[picks[0]] == min(n for n in lengths if n >= needed[m::4].max())
    same = widen_shared_rows(narrow, own, entries, 4)
    np.testing.assert_array_equal(same[LENGTH_BUCKET], narrow[LENGTH_BUCKET])
    with pytest.raises(ValueError, match="shared_tokens: 64 entries a row cannot be laid out in 32"):
        widen_shared_rows(narrow, 32, entries, 4)


def test_shared_prefix_batches_of_two_row_lengths_run_in_one_call_with_the_states_and_metrics_of_single_steps():
    """The DPO step on shared-prefix rows of 64 and 128 slots at per-micro-batch lengths, in calls of 2 (the first
    holding both lengths), against single steps, in float64: the same params, optimizer state and metrics."""
    from rlhf_jax.config import PreferenceLoss
    from rlhf_jax.trainers.dpo import preference_train_step, reference_logprobs

    batches = _shared_batches()
    assert signature(batches[0]) == signature(batches[1])  # row lengths apart, one call's
    plain = [{k: v for k, v in batch.items() if k != "length_bucket"} for batch in batches]
    assert signature(plain[0]) != signature(plain[1])  # computed whole, a wider row would cost: not one call's
    with jax.enable_x64(True):
        config = tiny_config("llama", dtype="float64", param_dtype="float64")
        params = llama.init_params(config, jax.random.key(0))
        reference = jax.jit(functools.partial(reference_logprobs, config), static_argnums=2)
        batches = [{**batch, **reference(llama.init_params(config, jax.random.key(1)),
                                         {k: v for k, v in batch.items() if k != "index"}, 4)}
                   for batch in batches]
        step = functools.partial(preference_train_step, config, PreferenceLoss(), 4)
        # the widened rows' micro-batches run at lengths of the 128-slot grid (more masked keys, sums in another
        # order): float64 rounding, which AdamW's first steps scale up where a gradient is near 0
        _assert_calls_run_as_single_steps(step, params, [batches[:2], batches[2:]], micro_batches=4, rtol=1e-10,
                                          atol=1e-13)

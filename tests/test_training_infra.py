"""Train state, optimizer schedules, exact accumulation, atomic checkpoints, metric logs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.errors import UserError
from rlhf_jax.losses import Weighted, weighted
from rlhf_jax.training.accumulate import accumulate_gradients
from rlhf_jax.training.checkpoint import Checkpointer
from rlhf_jax.training.logs import MetricsLogger, read_metrics
from rlhf_jax.training.state import TrainState, learning_rate_schedule, make_optimizer


def _weighted_loss_sum(params, batch):
    """Sum of masked squared errors of a linear model and its token count."""
    prediction = batch["x"] @ params["w"] + params["b"]
    errors = jnp.where(batch["mask"], (prediction - batch["y"]) ** 2, 0.0)
    count = jnp.sum(batch["mask"]).astype(jnp.float32)
    rows = jnp.any(batch["mask"], axis=-1)
    # two metrics with denominators of their own: tokens, and rows with at least one token
    metrics = {"abs_prediction": weighted(jnp.abs(prediction), batch["mask"]),
               "row_max_error": weighted(jnp.max(errors, axis=-1), rows)}
    return jnp.sum(errors), (count, metrics)


def test_accumulated_gradient_equals_big_batch_with_uneven_counts():
    rng = np.random.default_rng(0)
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 5, 3)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
        # very uneven token counts per micro-batch: a mean of means would be wrong
        "mask": jnp.asarray(rng.random((8, 5)) < np.linspace(0.1, 0.95, 8)[:, None]),
    }
    params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "b": jnp.float32(0.3)}

    def mean_loss(p):
        loss_sum, (count, _) = _weighted_loss_sum(p, batch)
        return loss_sum / count

    want_loss, want_grads = jax.value_and_grad(mean_loss)(params)
    for micro in (1, 2, 4, 8):
        loss, grads, metrics = jax.jit(accumulate_gradients, static_argnums=(0, 3))(_weighted_loss_sum, params, batch, micro)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        for name in params:
            np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-6, atol=1e-7)
        # each metric is its own mean over the whole batch, whatever the split
        prediction = np.asarray(batch["x"] @ params["w"] + params["b"])
        mask = np.asarray(batch["mask"])
        errors = np.where(mask, (prediction - np.asarray(batch["y"])) ** 2, 0.0)
        np.testing.assert_allclose(metrics["abs_prediction"], np.abs(prediction)[mask].mean(), rtol=1e-6)
        np.testing.assert_allclose(metrics["row_max_error"], errors.max(-1)[mask.any(-1)].mean(), rtol=1e-6)


def test_weighted_metrics_value_and_empty_selection():
    metric = weighted(jnp.array([1.0, jnp.nan, 3.0]), jnp.array([True, False, True]))
    assert float(metric.total) == 4.0 and float(metric.count) == 2.0 and float(metric.value()) == 2.0
    assert float(weighted(jnp.array([True, False, True, True])).value()) == 0.75  # an accuracy
    empty = weighted(jnp.array([5.0]), jnp.array([False]))
    assert float(empty.value()) == 0.0 and isinstance(empty, Weighted)


def test_schedule_warmup_then_cosine_hand_values():
    lr = learning_rate_schedule(1.0, "cosine", warmup_steps=10, total_steps=110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.5, 1.0], atol=1e-7)
    # half-way through the 100 decay steps: (1 + cos(pi/2)) / 2 = 0.5
    np.testing.assert_allclose(lr(60), 0.5, atol=1e-6)
    np.testing.assert_allclose(lr(110), 0.0, atol=1e-7)
    linear = learning_rate_schedule(2.0, "linear", warmup_steps=0, total_steps=4)
    np.testing.assert_allclose([linear(0), linear(1), linear(4)], [2.0, 1.5, 0.0], atol=1e-7)


def test_unknown_optimizer_or_schedule_is_a_user_error():
    with pytest.raises(UserError, match="optimizer.name='lion'"):
        make_optimizer("lion")
    with pytest.raises(UserError, match="optimizer.schedule='step'"):
        learning_rate_schedule(1.0, "step", 0, 10)


def test_sgd_step_matches_hand_update_and_clipping():
    params = {"w": jnp.array([1.0, 2.0])}
    tx = make_optimizer("sgd", 0.1, b1=0.0, grad_clip=1.0)
    state = TrainState.create(params, tx, jax.random.key(0))
    grads = {"w": jnp.array([3.0, 4.0])}  # norm 5 -> clipped to [0.6, 0.8]
    state = state.apply_gradients(grads)
    np.testing.assert_allclose(state.params["w"], [1.0 - 0.06, 2.0 - 0.08], rtol=1e-6)
    assert int(state.step) == 1


def test_frozen_leaves_get_no_update():
    params = {"adapter": jnp.ones(3), "backbone": jnp.ones(3)}
    tx = make_optimizer("adamw", 0.1, grad_clip=None, trainable=lambda p: {"adapter": True, "backbone": False})
    state = TrainState.create(params, tx, jax.random.key(0))
    state = state.apply_gradients({"adapter": jnp.ones(3), "backbone": jnp.ones(3)})
    assert np.all(np.asarray(state.params["backbone"]) == 1.0)
    assert np.all(np.asarray(state.params["adapter"]) < 1.0)


def _state(seed):
    params = {"w": jnp.arange(4.0) + seed, "layer": {"b": jnp.ones((2, 3)) * seed}}
    return TrainState.create(params, optax.adam(1e-3), jax.random.key(seed))


def test_checkpoint_round_trip_keep_last_and_host_state(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=2, keep_last=2)
    assert ckpt.latest_step() is None
    saved = []
    for step in range(1, 7):
        state = _state(step).replace(step=jnp.int32(step))
        if ckpt.save(step, state, {"data_position": step * 10}):
            saved.append(step)
    assert saved == [2, 4, 6]  # every 2 steps, and not the fresh run's first step (orbax's default)
    assert ckpt.latest_step() == 6
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [4, 6]
    restored, host = ckpt.restore(_state(0))
    assert host == {"data_position": 60}
    np.testing.assert_array_equal(restored.params["w"], np.arange(4.0) + 6)
    assert int(restored.step) == 6
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(jax.random.key(6)))
    ckpt.close()


def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=1, keep_last=3)
    ckpt.save(1, _state(1), {"pos": 1})
    ckpt.close()
    # a save killed half-way leaves only orbax's temporary directory behind
    partial = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 10)
    reopened = Checkpointer(tmp_path / "ckpt", every_steps=1, keep_last=3)
    assert reopened.latest_step() == 1
    restored, host = reopened.restore(_state(0))
    assert host == {"pos": 1}
    np.testing.assert_array_equal(restored.params["w"], np.arange(4.0) + 1)
    reopened.close()


def test_metrics_logger_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(1, {"reward/mean": jnp.float32(0.25), "kl/mean": 1.5})
    logger.log(2, {"reward/mean": 0.5, "kl/mean": float("nan")})
    logger.log_samples(2, [{"prompt": "hi", "response": "hello", "reward": 0.1}])
    logger.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["reward/mean"] == 0.25 and records[1]["kl/mean"] == "nan"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert sample == {"step": 2, "prompt": "hi", "response": "hello", "reward": 0.1}

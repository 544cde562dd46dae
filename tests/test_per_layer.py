"""Per-layer weights in the micro-batch loop (`training.accumulate`'s `per_layer`): the decoder's stacked layer
weights enter the loop one array per layer, with the same losses, gradients and forward outputs; and a train
state that holds them per layer (`models.layout`), with the same steps and canonical (stacked) checkpoints."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax.config import LoRAConfig, SFTStage
from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.models.layout import has_per_layer
from rlhf_jax.sharding.partition import logical_axes_for, param_logical_axes
from rlhf_jax.stages.common import per_layer_state
from rlhf_jax.trainers.common import with_loss_index
from rlhf_jax.trainers.dpo import pair_logprobs
from rlhf_jax.trainers.reward import reward_loss_sum
from rlhf_jax.trainers.sft import sft_loss_sum, sft_train_step
from rlhf_jax.training.accumulate import (LENGTH_BUCKET, accumulate_gradients, map_microbatches, order_by_length,
                                          stack_layers, unstack_layers)
from rlhf_jax.training.checkpoint import Checkpointer
from rlhf_jax.training.state import TrainState, make_optimizer


def _rows(rng, batch, length, prefix=""):
    lengths = rng.integers(length // 4, length + 1, batch)
    column = np.arange(length)[None]
    attention = column < lengths[:, None]
    return {f"{prefix}tokens": rng.integers(3, 64, (batch, length)).astype(np.int32),
            f"{prefix}attention_mask": attention, f"{prefix}loss_mask": attention & (column >= 2)}


def _pairs(seed, pairs=8, length=32):
    rng = np.random.default_rng(seed)
    return {**_rows(rng, pairs, length, "chosen_"), **_rows(rng, pairs, length, "rejected_")}


def _device(batch):
    return {key: jnp.asarray(value) for key, value in batch.items()}


def test_unstack_gives_one_subtree_per_layer_and_stack_restores_the_tree():
    config = tiny_config("llama")
    model = llama.init_scalar_model(config, llama.init_params(config, jax.random.key(0)), jax.random.key(1))
    tree = (model, {"layers": {"w": jnp.arange(6.0).reshape(3, 2)}, "other": [jnp.ones(2)]})
    unstacked = unstack_layers(tree)
    layers = unstacked[0]["backbone"]["layers"]
    assert isinstance(layers, tuple) and len(layers) == config.num_layers
    stacked = model["backbone"]["layers"]
    for i, layer in enumerate(layers):
        for ours, want in zip(jax.tree.leaves(layer), jax.tree.leaves(stacked)):
            np.testing.assert_array_equal(ours, want[i])
    np.testing.assert_array_equal(unstacked[1]["layers"][2]["w"], [4.0, 5.0])
    assert unstacked[0]["head"]["kernel"] is model["head"]["kernel"] and unstacked[1]["other"][0] is tree[1]["other"][0]
    assert jax.tree.structure(stack_layers(unstacked)) == jax.tree.structure(tree)
    for ours, want in zip(jax.tree.leaves(stack_layers(unstacked)), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(ours, want)


@pytest.mark.parametrize("kind", ["sft", "reward", "policy_and_value"])
@pytest.mark.parametrize("buckets", [1, 4])
def test_per_layer_gradients_equal_the_stacked_ones_in_float64(kind, buckets):
    with jax.enable_x64(True):
        config = tiny_config("llama", dtype="float64", param_dtype="float64", num_layers=3)
        params = llama.init_params(config, jax.random.key(0))
        if kind == "sft":
            batch = order_by_length(_rows(np.random.default_rng(2), 8, 32), 4, buckets)
            batch = with_loss_index(batch, 4)
            loss_sum_fn = functools.partial(sft_loss_sum, config)
        elif kind == "reward":
            params = llama.init_scalar_model(config, params, jax.random.key(1))
            batch = order_by_length(_pairs(2), 4, buckets)
            loss_sum_fn = functools.partial(reward_loss_sum, config, 0.01)
        else:  # a tuple of trees, as the RL update differentiates a policy and a critic together
            value = llama.init_scalar_model(config, llama.init_params(config, jax.random.key(3)), jax.random.key(4))
            params = (params, value)
            batch = with_loss_index(order_by_length(_rows(np.random.default_rng(5), 8, 32), 4, buckets), 4)

            def loss_sum_fn(both, rows):
                loss, (count, metrics) = sft_loss_sum(config, both[0], rows)
                rewards = llama.rewards_forward(config, both[1], rows["tokens"], rows["attention_mask"])
                return loss + jnp.sum(rewards**2), (count, metrics)
        batch = _device(batch)
        runs = [jax.jit(functools.partial(accumulate_gradients, loss_sum_fn, num_microbatches=4, per_layer=flag))(
            params, batch) for flag in (False, True)]
        (want_loss, want_grads, want_metrics), (loss, grads, metrics) = runs
        assert jax.tree.structure(grads) == jax.tree.structure(params)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
        for ours, want in zip(jax.tree.leaves((grads, metrics)), jax.tree.leaves((want_grads, want_metrics))):
            assert ours.dtype == want.dtype and ours.shape == want.shape
            np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=1e-11, atol=1e-14)
        assert max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(grads)) > 1e-3  # a real gradient


@pytest.mark.parametrize("buckets", [1, 4])
def test_map_microbatches_equals_the_whole_batch_forward(buckets):
    with jax.enable_x64(True):
        config = tiny_config("llama", dtype="float64", param_dtype="float64", num_layers=3)
        params = llama.init_params(config, jax.random.key(0))
        pairs = _pairs(7)
        ordered = _device(order_by_length(pairs, 4, buckets))
        whole = pair_logprobs(config, params, {k: v for k, v in ordered.items() if k != LENGTH_BUCKET})

        def totals(params, rows):
            return tuple(side.total for side in pair_logprobs(config, params, rows))

        for flag in (False, True):
            chosen, rejected = jax.jit(functools.partial(map_microbatches, totals, num_microbatches=4,
                                                         per_layer=flag))(params, ordered)
            np.testing.assert_allclose(chosen, whole.chosen.total, rtol=1e-12)
            np.testing.assert_allclose(rejected, whole.rejected.total, rtol=1e-12)


@pytest.mark.parametrize("per_layer", [False, True])
def test_the_loop_takes_one_array_per_layer_only_with_per_layer_weights(per_layer):
    config = tiny_config("llama", num_layers=3)
    params = llama.init_params(config, jax.random.key(0))
    batch = _device(with_loss_index(_rows(np.random.default_rng(1), 4, 16), 2))
    jaxpr = jax.make_jaxpr(functools.partial(accumulate_gradients, functools.partial(sft_loss_sum, config),
                                             num_microbatches=2, per_layer=per_layer))(params, batch)
    (scan,) = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]
    shapes = {tuple(var.aval.shape) for var in scan.invars}
    stacked = params["layers"]["mlp"]["up_proj"]["kernel"].shape  # [layers, in, out]
    # the micro-batch loop's inputs: the stacked kernel, or one kernel per layer
    assert (stacked in shapes) != per_layer
    assert (stacked[1:] in shapes) == per_layer


def test_the_trainers_pass_per_layer_weights_when_the_layers_are_unrolled():
    config = tiny_config("llama")
    assert llama.layers_unrolled(config) == (jax.default_backend() == "cpu")
    assert not llama.layers_unrolled(tiny_config("llama", scan_unroll=1))
    assert llama.layers_unrolled(tiny_config("llama", scan_unroll=config.num_layers))


def _steps(config, state, micro, seeds):
    step = jax.jit(functools.partial(sft_train_step, config, micro))
    losses = []
    for seed in seeds:
        state, metrics = step(state, _device(with_loss_index(_rows(np.random.default_rng(seed), 4, 16), micro)))
        losses.append(float(metrics["sft/loss"]))
    return state, losses


@pytest.mark.parametrize("micro", [1, 2])
def test_a_per_layer_train_state_takes_the_stacked_states_steps_in_float64(micro):
    with jax.enable_x64(True):
        config = tiny_config("llama", dtype="float64", param_dtype="float64", num_layers=3)
        params = llama.init_params(config, jax.random.key(0))
        tx = make_optimizer("adamw", 1e-2, weight_decay=0.1)
        stacked, per_layer = (TrainState.create(params, tx, jax.random.key(0), per_layer=flag) for flag in (0, 1))
        assert not has_per_layer(stacked.params) and has_per_layer(per_layer.params)
        assert len(per_layer.params["layers"]) == 3 and has_per_layer(per_layer.opt_state)
        (stacked, want), (per_layer, losses) = (_steps(config, state, micro, range(3))
                                                for state in (stacked, per_layer))
        np.testing.assert_allclose(losses, want, rtol=1e-12)
        assert has_per_layer(per_layer.params)  # the step keeps the layout
        canonical = stack_layers((per_layer.params, per_layer.opt_state))
        assert jax.tree.structure(canonical) == jax.tree.structure((stacked.params, stacked.opt_state))
        for ours, want in zip(jax.tree.leaves(canonical), jax.tree.leaves((stacked.params, stacked.opt_state))):
            np.testing.assert_allclose(ours, want, rtol=1e-10, atol=1e-15)
        moved = stacked.params["layers"]["mlp"]["up_proj"]["kernel"] - params["layers"]["mlp"]["up_proj"]["kernel"]
        assert float(jnp.abs(moved).max()) > 1e-3  # the steps trained the layers


def test_a_checkpoint_holds_the_layers_stacked_and_restores_either_layout(tmp_path):
    config = tiny_config("llama", num_layers=3)
    params = llama.init_params(config, jax.random.key(0))
    tx = make_optimizer("adamw", 1e-3)
    fresh = lambda per_layer: {"state": TrainState.create(params, tx, jax.random.key(1), per_layer=per_layer),  # noqa
                               "other": jnp.zeros(2)}
    trained, _ = _steps(config, fresh(True)["state"], 2, [0])
    saved = {"state": trained, "other": jnp.arange(2.0)}
    checkpoints = Checkpointer(tmp_path / "ckpt", every_steps=1)
    assert checkpoints.save(1, saved, {"position": 3})
    for per_layer in (False, True):
        restored, host = checkpoints.restore(fresh(per_layer))
        assert host == {"position": 3} and has_per_layer(restored["state"].params) == per_layer
        want = saved if per_layer else stack_layers(saved)
        assert jax.tree.structure(restored) == jax.tree.structure(want)
        for ours, theirs in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
            np.testing.assert_array_equal(*(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                                            else x for x in (ours, theirs)))
    # the files hold the canonical (stacked) layout: a stacked state restores without the conversion
    stacked_only = checkpoints._restore(1, jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh(False)))[0]
    np.testing.assert_array_equal(stacked_only["state"].params["layers"]["self_attn"]["q_proj"]["kernel"],
                                  stack_layers(trained.params)["layers"]["self_attn"]["q_proj"]["kernel"])


def test_one_layers_weights_take_the_stacked_weights_axes_without_the_layer_axis():
    config = tiny_config("llama", num_layers=2)
    params = llama.init_params(config, jax.random.key(0))
    stacked = param_logical_axes(params)
    for i, layer in enumerate(param_logical_axes(unstack_layers(params))["layers"]):
        for ours, want in zip(jax.tree.leaves(layer), jax.tree.leaves(stacked["layers"])):
            assert tuple(ours) == tuple(want)[1:] and want[0] == "layers"
    assert logical_axes_for("layers/1/self_attn/q_proj/kernel", 2) == P("embed", "heads")
    assert logical_axes_for("layers/1/self_attn/q_proj/lora_a", 2) == P("embed", None)


def test_the_stages_hold_per_layer_states_only_where_the_step_gains():
    config = tiny_config("llama")
    sft = SFTStage(name="sft")
    assert per_layer_state(sft, config) == (jax.default_backend() == "cpu")
    assert not per_layer_state(sft, tiny_config("llama", scan_unroll=1))  # the layers in a scan: one stack
    assert not per_layer_state(dataclasses.replace(sft, lora=LoRAConfig(rank=4)), config)
    assert not per_layer_state(sft, config, trainable=lambda params: params)  # a mask of trainable params

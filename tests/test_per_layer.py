"""Per-layer weights in the micro-batch loop (`training.accumulate`'s `per_layer`): the decoder's stacked layer
weights enter the loop one array per layer, with the same losses, gradients and forward outputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.trainers.common import with_loss_index
from rlhf_jax.trainers.dpo import pair_logprobs
from rlhf_jax.trainers.reward import reward_loss_sum
from rlhf_jax.trainers.sft import sft_loss_sum
from rlhf_jax.training.accumulate import (LENGTH_BUCKET, accumulate_gradients, map_microbatches, order_by_length,
                                          stack_layers, unstack_layers)


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

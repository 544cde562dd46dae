"""SFT and reward-model steps on a tiny random model: exact accumulation, learning, masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.trainers.common import predicted_mask, teacher_forced_logprobs
from rlhf_jax.trainers.reward import reward_train_step
from rlhf_jax.trainers.sft import sft_loss_sum, sft_train_step
from rlhf_jax.training.state import TrainState, make_optimizer
from updates import assert_same_updates

CONFIG = tiny_config("llama")


def _sft_batch(seed=0, batch=4, length=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CONFIG.vocab_size, (batch, length))
    lengths = rng.integers(6, length + 1, batch)
    prompt_lengths = rng.integers(2, 5, batch)
    index = np.arange(length)[None]
    attention = index < lengths[:, None]
    loss_mask = attention & (index >= prompt_lengths[:, None])
    return {"tokens": jnp.asarray(tokens, jnp.int32), "attention_mask": jnp.asarray(attention),
            "loss_mask": jnp.asarray(loss_mask)}


def test_token_logprobs_match_full_logits_log_softmax():
    params = llama.init_params(CONFIG, jax.random.key(0))
    batch = _sft_batch()
    ours = teacher_forced_logprobs(CONFIG, params, batch, seq_chunk=4)
    logits = llama.forward(CONFIG, params, batch["tokens"], attention_mask=batch["attention_mask"]).logits
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    tokens = np.asarray(batch["tokens"])
    want = np.zeros(tokens.shape, np.float32)
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            want[b, t] = logp[b, t - 1, tokens[b, t]]
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)


def test_sft_loss_counts_exactly_response_tokens_and_ignores_nan_free_pads():
    params = llama.init_params(CONFIG, jax.random.key(0))
    batch = _sft_batch()
    loss_sum, (count, _) = sft_loss_sum(CONFIG, params, batch)
    assert int(count) == int(np.sum(np.asarray(batch["loss_mask"])[:, 1:]))
    logp = np.asarray(teacher_forced_logprobs(CONFIG, params, batch))
    np.testing.assert_allclose(loss_sum, -logp[np.asarray(batch["loss_mask"])].sum(), rtol=1e-5)


def test_packed_segment_boundaries_are_not_predicted():
    batch = {"tokens": jnp.ones((1, 6), jnp.int32), "loss_mask": jnp.ones((1, 6), bool),
             "segment_ids": jnp.array([[1, 1, 1, 2, 2, 0]])}
    np.testing.assert_array_equal(predicted_mask(batch), [[False, True, True, False, True, False]])


def test_sft_step_with_microbatches_equals_one_batch_and_learns():
    params = llama.init_params(CONFIG, jax.random.key(1))
    batch = _sft_batch(seed=3, batch=8)
    step = jax.jit(sft_train_step, static_argnums=(0, 1))
    # plain SGD so the parameter change is lr * gradient: equal gradients <=> equal params
    sgd = make_optimizer("sgd", 1.0, b1=0.0, grad_clip=None)
    one, metrics_one = step(CONFIG, 1, TrainState.create(params, sgd, jax.random.key(0)), batch)
    four, metrics_four = step(CONFIG, 4, TrainState.create(params, sgd, jax.random.key(0)), batch)
    np.testing.assert_allclose(metrics_one["sft/loss"], metrics_four["sft/loss"], rtol=1e-6)
    assert_same_updates(params, one.params, four.params)
    tx = make_optimizer("adamw", 3e-3, grad_clip=1.0)
    state = TrainState.create(params, tx, jax.random.key(0))
    losses = []
    for _ in range(30):
        state, metrics = step(CONFIG, 2, state, batch)
        losses.append(float(metrics["sft/loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def _token_preference_batch(batch_size=8, length=10):
    """Chosen responses end with token 7, rejected with token 9: a learnable preference."""
    rng = np.random.default_rng(0)
    base = rng.integers(10, CONFIG.vocab_size, (batch_size, length))
    chosen, rejected = base.copy(), base.copy()
    lengths = rng.integers(5, length + 1, batch_size)
    chosen[np.arange(batch_size), lengths - 1] = 7
    rejected[np.arange(batch_size), lengths - 1] = 9
    mask = np.arange(length)[None] < lengths[:, None]
    return {"chosen_tokens": jnp.asarray(chosen), "rejected_tokens": jnp.asarray(rejected),
            "chosen_attention_mask": jnp.asarray(mask), "rejected_attention_mask": jnp.asarray(mask)}


def test_reward_model_learns_a_token_preference():
    batch = _token_preference_batch()
    lm = llama.init_params(CONFIG, jax.random.key(0))
    model = llama.init_scalar_model(CONFIG, lm, jax.random.key(1))
    assert "lm_head" not in model["backbone"]
    state = TrainState.create(model, make_optimizer("adamw", 1e-3), jax.random.key(0))
    step = jax.jit(functools.partial(reward_train_step, CONFIG, 0.0, 2))
    first = None
    for _ in range(40):
        state, metrics = step(state, batch)
        first = first or float(metrics["rm/loss"])
    assert float(metrics["rm/accuracy"]) == 1.0
    assert float(metrics["rm/loss"]) < 0.2 * first
    assert {"rm/chosen_reward_std", "rm/rejected_reward_std", "rm/margin"} <= set(metrics)


def test_reward_head_bias_learns_only_with_centering():
    # Bradley-Terry alone sees r_c - r_r, where the bias cancels: its gradient is float rounding, which AdamW
    # would scale into steps of about the learning rate, shifting every reward together. With centering the
    # bias has a real gradient, -(r_c + r_r) pulls it.
    batch = _token_preference_batch()
    model = llama.init_scalar_model(CONFIG, llama.init_params(CONFIG, jax.random.key(0)), jax.random.key(1))
    for center_coef in (0.0, 0.05):
        state = TrainState.create(model, make_optimizer("adamw", 1e-3), jax.random.key(0))
        step = jax.jit(functools.partial(reward_train_step, CONFIG, center_coef, 2))
        for _ in range(5):
            state, metrics = step(state, batch)
        bias = float(state.params["head"]["bias"][0])
        if center_coef:
            assert abs(bias) > 1e-4, bias
        else:
            assert bias == 0.0, bias
            assert not np.allclose(np.asarray(state.params["head"]["kernel"]), np.asarray(model["head"]["kernel"]))


def test_frozen_backbone_reward_model_trains_only_the_head_with_head_only_optimizer_state():
    rng = np.random.default_rng(1)
    batch_size, length = 8, 10
    base = rng.integers(10, CONFIG.vocab_size, (batch_size, length))
    chosen, rejected = base.copy(), base.copy()
    chosen[:, -1], rejected[:, -1] = 7, 9
    mask = np.ones((batch_size, length), bool)
    batch = {"chosen_tokens": jnp.asarray(chosen), "rejected_tokens": jnp.asarray(rejected),
             "chosen_attention_mask": jnp.asarray(mask), "rejected_attention_mask": jnp.asarray(mask)}
    model = llama.init_scalar_model(CONFIG, llama.init_params(CONFIG, jax.random.key(0)), jax.random.key(1))
    trainable = lambda params: {"backbone": jax.tree.map(lambda _: False, params["backbone"]),  # noqa: E731
                                "head": jax.tree.map(lambda _: True, params["head"])}
    state = TrainState.create(model, make_optimizer("adamw", 1e-2, trainable=trainable), jax.random.key(0))
    # Adam moments exist for the head only: 2 * (D + 1) floats, plus counters
    head_floats = sum(x.size for x in jax.tree.leaves(model["head"]))
    moment_floats = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moment_floats == 2 * head_floats
    step = jax.jit(functools.partial(reward_train_step, CONFIG, 0.0, 1, freeze_backbone=True))
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["rm/loss"]))
    for before, after in zip(jax.tree.leaves(model["backbone"]), jax.tree.leaves(state.params["backbone"])):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    assert not np.allclose(np.asarray(model["head"]["kernel"]), np.asarray(state.params["head"]["kernel"]))
    assert losses[-1] < 0.5 * losses[0]
    # the head's gradient equals the logistic-regression gradient on the frozen features (numpy reference)
    from rlhf_jax.trainers.reward import reward_loss_sum

    def features(tokens):
        out = llama.forward(llama._backbone_config(CONFIG), model["backbone"], jnp.asarray(tokens),
                            attention_mask=jnp.asarray(mask), compute_logits=False)
        return np.asarray(out.hidden[:, -1], np.float64)

    difference = features(chosen) - features(rejected)
    w = np.asarray(model["head"]["kernel"], np.float64)[:, 0]
    sigmoid = 1 / (1 + np.exp(-(difference @ w)))
    expected = -((1 - sigmoid)[:, None] * difference).sum(0)  # d/dw Σ -log σ(w·(h_c - h_r))
    grads = jax.grad(lambda m: reward_loss_sum(CONFIG, 0.0, m, batch, freeze_backbone=True)[0])(model)
    np.testing.assert_allclose(np.asarray(grads["head"]["kernel"])[:, 0], expected, rtol=2e-4, atol=1e-6)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["backbone"]))

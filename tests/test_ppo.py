"""The RL engine on tiny random models: guards, experience alignment, update, and short loops that learn."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import RLAlgorithm
from rlhf_jax.losses import adaptive_kl_controller
from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.rewards import model_scores
from rlhf_jax.sampling import sampler
from rlhf_jax.sampling.sampler import SamplingSettings
from rlhf_jax.trainers import rl
from rlhf_jax.training.state import TrainState, make_optimizer
from updates import assert_same_updates

CONFIG = tiny_config("llama")
# jitted, as the stages run it: called eagerly, each of its ops compiles on its own (the layer scan among them),
# and XLA's CPU compiler crashed in one of those compilations in several CI runs
generate = jax.jit(sampler.generate, static_argnums=0)


def _python_repeated_fraction(tokens, mask, n):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1) if all(mask[i:i + n])]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def test_repeated_ngram_fraction_matches_python():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4, (16, 12))  # small alphabet: plenty of repeats
    lengths = rng.integers(0, 13, 16)
    mask = np.arange(12)[None] < lengths[:, None]
    for n in (1, 2, 3):
        ours = np.asarray(rl.repeated_ngram_fraction(jnp.asarray(tokens), jnp.asarray(mask), n))
        want = [_python_repeated_fraction(list(t), list(m), n) for t, m in zip(tokens, mask)]
        np.testing.assert_allclose(ours, want, atol=1e-7)
    # hand case: "a b a b a" has bigrams ab ba ab ba -> 2 of 4 repeat
    hand = rl.repeated_ngram_fraction(jnp.array([[5, 6, 5, 6, 5]]), jnp.ones((1, 5), bool), 2)
    np.testing.assert_allclose(hand, [0.5])


def test_shape_scores_each_guard_is_a_switch():
    scores = jnp.array([1.0, 2.0, 3.0])
    tokens = jnp.array([[1, 1, 1, 1], [1, 2, 3, 4], [7, 7, 0, 0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
    eos = jnp.array([True, False, True])
    base = RLAlgorithm()
    same, _ = rl.shape_scores(scores, tokens, mask, eos, base)
    np.testing.assert_allclose(same, scores)
    out, _ = rl.shape_scores(scores, tokens, mask, eos, dataclasses.replace(base, eos_penalty=1.5))
    np.testing.assert_allclose(out, [1.0, 0.5, 3.0])
    out, _ = rl.shape_scores(scores, tokens, mask, eos, dataclasses.replace(base, length_penalty=0.25))
    np.testing.assert_allclose(out, [0.0, 1.0, 2.5])
    out, _ = rl.shape_scores(scores, tokens, mask, eos, dataclasses.replace(base, length_normalize=True))
    np.testing.assert_allclose(out, [0.25, 0.5, 1.5])
    # unigram repeats: [1,1,1,1] -> 3/4, [1,2,3,4] -> 0, [7,7] -> 1/2
    out, metrics = rl.shape_scores(scores, tokens, mask, eos,
                                    dataclasses.replace(base, ngram_size=1, ngram_penalty=2.0))
    np.testing.assert_allclose(out, [1.0 - 1.5, 2.0, 3.0 - 1.0])
    assert "response/repeated_ngram_fraction" in metrics
    out, _ = rl.shape_scores(scores, tokens, mask, eos, dataclasses.replace(base, reward_clip=1.5))
    np.testing.assert_allclose(out, [1.0, 1.5, 1.5])


def _scores(reward, reward_params, prompts, prompt_mask, sample):
    """Raw scores of a rollout: a reward model's (`reward` its config) or a token function's."""
    if callable(reward):
        return reward(prompts, prompt_mask, sample.response_tokens, sample.response_mask)
    return model_scores(reward, reward_params, prompts, prompt_mask, sample.response_tokens, sample.response_mask)


def _rollout(policy, key, hyper, batch=4, prompt_length=6, max_new=5):
    rng = np.random.default_rng(0)
    prompt_tokens = rng.integers(3, CONFIG.vocab_size, (batch, prompt_length))
    lengths = rng.integers(2, prompt_length + 1, batch)
    prompt_mask = np.arange(prompt_length)[None] >= (prompt_length - lengths)[:, None]
    settings = SamplingSettings(max_new_tokens=max_new, temperature=hyper.temperature)
    sample = generate(CONFIG, policy, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), key, settings)
    return jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), sample


def test_experience_alignment_scores_and_zero_kl_for_identical_reference():
    policy = llama.init_params(CONFIG, jax.random.key(0))
    critic = llama.init_scalar_model(CONFIG, policy, jax.random.key(1))
    reward_model = llama.init_scalar_model(CONFIG, policy, jax.random.key(2))
    hyper = RLAlgorithm(temperature=0.7, whiten_advantages=False)
    prompts, prompt_mask, sample = _rollout(policy, jax.random.key(3), hyper)
    experience, metrics = rl.make_experience(
        CONFIG, CONFIG, hyper, policy, policy, critic, _scores(CONFIG, reward_model, prompts, prompt_mask, sample),
        prompts, prompt_mask, sample.response_tokens, sample.response_mask, sample.ended_with_eos, jnp.float32(0.1))
    mask = np.asarray(sample.response_mask)
    # teacher-forced log-probs at the sampling temperature equal the sampler's (no top-k/top-p here)
    np.testing.assert_allclose(np.asarray(experience.old_logprobs)[mask], np.asarray(sample.response_logprobs)[mask],
                               atol=1e-4)
    np.testing.assert_allclose(experience.ref_logprobs, experience.old_logprobs, atol=0)
    assert float(metrics["kl/mean"]) == 0.0
    # the score sits at the last response token; other rewards are 0 (KL is 0)
    tokens = np.asarray(experience.tokens)
    attention = np.asarray(experience.attention_mask)
    want_scores = llama.rewards_forward(CONFIG, reward_model, jnp.asarray(tokens), jnp.asarray(attention))
    rewards = np.asarray(experience.rewards)
    for row in range(rewards.shape[0]):
        last = mask[row].nonzero()[0][-1]
        np.testing.assert_allclose(rewards[row, last], want_scores[row], rtol=1e-5)
        assert np.all(rewards[row, np.arange(rewards.shape[1]) != last] == 0)
    # values: state before response token i is column P + i - 1
    values = llama.values_forward(CONFIG, critic, jnp.asarray(tokens), attention_mask=jnp.asarray(attention))
    prompt_length = prompts.shape[1]
    np.testing.assert_allclose(np.asarray(experience.old_values)[mask],
                               np.asarray(values)[:, prompt_length - 1:-1][mask], rtol=1e-5, atol=1e-6)
    assert experience.rewards.dtype == jnp.float32


def test_update_step_microbatches_match_and_push_up_advantaged_tokens():
    policy = llama.init_params(CONFIG, jax.random.key(0))
    critic = llama.init_scalar_model(CONFIG, policy, jax.random.key(1))
    hyper = RLAlgorithm(whiten_advantages=False)
    prompts, prompt_mask, sample = _rollout(policy, jax.random.key(3), hyper)
    experience, _ = rl.make_experience(
        CONFIG, CONFIG, hyper, policy, policy, critic, _scores(CONFIG, critic, prompts, prompt_mask, sample), prompts,
        prompt_mask, sample.response_tokens, sample.response_mask, sample.ended_with_eos, jnp.float32(0.0))
    advantages = jnp.where(experience.response_mask, 1.0, 0.0)  # every sampled token was good
    experience = experience.replace(advantages=advantages)
    sgd = make_optimizer("sgd", 0.5, b1=0.0, grad_clip=None)
    prompt_length = prompts.shape[1]
    outs = []
    for micro in (1, 2):
        step = jax.jit(functools.partial(rl.rl_update_step, CONFIG, CONFIG, hyper, prompt_length, 0.0,
                                         num_microbatches=micro))
        states, metrics = step((TrainState.create(policy, sgd, jax.random.key(0)),
                                TrainState.create(critic, sgd, jax.random.key(0))), experience)
        outs.append((*states, metrics))
    (p1, c1, m1), (p2, c2, m2) = outs
    assert_same_updates(policy, p1.params, p2.params)
    np.testing.assert_allclose(m1["ppo/loss"], m2["ppo/loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["policy/clipfrac"], m2["policy/clipfrac"], atol=1e-6)
    new_logprobs = rl.response_logprobs(CONFIG, p1.params, experience.tokens, experience.attention_mask,
                                         prompt_length, 1.0, 128)
    mask = np.asarray(experience.response_mask)
    assert np.mean(np.asarray(new_logprobs - experience.old_logprobs)[mask]) > 0
    assert float(m1["policy/ratio_mean"]) == pytest.approx(1.0, abs=1e-5)  # first step: on-policy


def test_short_ppo_loop_raises_the_reward_and_adapts_kl():
    policy = llama.init_params(CONFIG, jax.random.key(0))
    reference = policy
    critic = llama.init_scalar_model(CONFIG, policy, jax.random.key(1))
    # A reward model that scores only the last token: with attention and MLP outputs zeroed the residual
    # stream is the token embedding, so reward = head . norm(embed(last token)), a fixed per-token table.
    reward_model = llama.init_scalar_model(CONFIG, policy, jax.random.key(2))
    layers = reward_model["backbone"]["layers"]
    layers["self_attn"]["o_proj"]["kernel"] = jnp.zeros_like(layers["self_attn"]["o_proj"]["kernel"])
    layers["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(layers["mlp"]["down_proj"]["kernel"])
    reward_model["head"] = jax.tree.map(lambda x: 3 * x, reward_model["head"])
    table = llama.rewards_forward(CONFIG, reward_model, jnp.arange(CONFIG.vocab_size)[:, None],
                                  jnp.ones((CONFIG.vocab_size, 1), bool))

    def expected_final_reward(params, experience):
        """E_{v ~ policy}[table[v]] at the position that produced each response's last token (noise-free)."""
        logits = llama.forward(CONFIG, params, experience.tokens, attention_mask=experience.attention_mask).logits
        lengths = np.asarray(experience.response_mask.sum(1))
        rows = np.arange(len(lengths))
        probs = jax.nn.softmax(logits[rows, prompt_length + lengths - 2], axis=-1)
        return float(jnp.mean(probs @ table))

    hyper = RLAlgorithm(temperature=1.0)
    policy_state = TrainState.create(policy, make_optimizer("adamw", 5e-3), jax.random.key(0))
    critic_state = TrainState.create(critic, make_optimizer("adamw", 5e-3), jax.random.key(0))
    controller = adaptive_kl_controller(0.05, target=1.0, horizon=100)
    kl_state = controller.init()
    prompt_length = 6
    experience_fn = jax.jit(functools.partial(rl.make_experience, CONFIG, CONFIG, hyper))
    update_fn = jax.jit(functools.partial(rl.rl_update, CONFIG, CONFIG,
                                          dataclasses.replace(hyper, update_epochs=2, mini_batch_size=8), prompt_length))
    coefs, first_experience = [], None
    key = jax.random.key(42)
    for iteration in range(10):
        key, sample_key, shuffle_key = jax.random.split(key, 3)
        prompts, prompt_mask, sample = _rollout(policy_state.params, sample_key, hyper, batch=16)
        experience, metrics = experience_fn(policy_state.params, reference, critic_state.params,
                                            _scores(CONFIG, reward_model, prompts, prompt_mask, sample), prompts,
                                            prompt_mask, sample.response_tokens, sample.response_mask,
                                            sample.ended_with_eos, kl_state.kl_coef)
        first_experience = first_experience or experience
        coefs.append(float(kl_state.kl_coef))
        (policy_state, critic_state), _ = update_fn(shuffle_key, kl_state.kl_coef, (policy_state, critic_state),
                                                    experience)
        kl_state = controller.update(kl_state, metrics["kl/mean"], 16)
    before = expected_final_reward(policy, first_experience)
    after = expected_final_reward(policy_state.params, first_experience)
    # the per-token table spans about [-8, 11]; an untrained policy is near its mean
    assert after > before + 0.25, (before, after)
    assert coefs[-1] != coefs[0]


def _low_token_fraction(prompt_tokens, prompt_mask, response_tokens, response_mask):
    """Programmatic reward: fraction of response tokens with id < 32 (about 1/8 for an untrained policy)."""
    del prompt_tokens, prompt_mask
    hits = jnp.sum(response_mask & (response_tokens < 32), axis=-1)
    return hits / jnp.maximum(jnp.sum(response_mask, axis=-1), 1)


def _ppo_with_programmatic_reward(kl_coef, iterations=10):
    """PPO on the tiny model with a programmatic reward (`_low_token_fraction`) and per-token k1 KL rewards.

    Returns (per-iteration metrics, initial params, final params, the first rollout's experience).
    """
    reward = _low_token_fraction
    policy = llama.init_params(CONFIG, jax.random.key(0))
    critic = llama.init_scalar_model(CONFIG, policy, jax.random.key(1))
    hyper = RLAlgorithm(temperature=1.0, kl_estimator="k1")
    policy_state = TrainState.create(policy, make_optimizer("adamw", 5e-3), jax.random.key(0))
    critic_state = TrainState.create(critic, make_optimizer("adamw", 5e-3), jax.random.key(0))
    experience_fn = jax.jit(functools.partial(rl.make_experience, CONFIG, CONFIG, hyper))
    update_fn = jax.jit(functools.partial(rl.rl_update, CONFIG, CONFIG,
                                          dataclasses.replace(hyper, update_epochs=2, mini_batch_size=8), 6))
    history, key, first = [], jax.random.key(7), None
    for _ in range(iterations):
        key, sample_key, shuffle_key = jax.random.split(key, 3)
        prompts, prompt_mask, sample = _rollout(policy_state.params, sample_key, hyper, batch=16, max_new=8)
        experience, metrics = experience_fn(policy_state.params, policy, critic_state.params,
                                            _scores(reward, {}, prompts, prompt_mask, sample), prompts,
                                            prompt_mask, sample.response_tokens, sample.response_mask,
                                            sample.ended_with_eos, jnp.float32(kl_coef))
        first = first or experience
        history.append(jax.device_get(metrics))
        (policy_state, critic_state), _ = update_fn(shuffle_key, jnp.float32(kl_coef), (policy_state, critic_state),
                                                    experience)
    return history, policy, policy_state.params, first


def _exact_kl(params, reference, experience):
    """Mean over response positions of the exact KL(pi || pi_ref) of the next-token distributions."""
    def log_probs(p):
        logits = llama.forward(CONFIG, p, experience.tokens, attention_mask=experience.attention_mask).logits
        return jax.nn.log_softmax(logits[:, 5:-1], axis=-1)  # the distributions that produced response tokens

    logp, logq = log_probs(params), log_probs(reference)
    per_position = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    return float(jnp.sum(jnp.where(experience.response_mask, per_position, 0)) / jnp.sum(experience.response_mask))


def test_programmatic_reward_rises_without_kl_and_a_large_kl_coef_holds_the_policy_near_the_reference():
    free, start, free_params, evaluation = _ppo_with_programmatic_reward(kl_coef=0.0)
    leashed, _, leashed_params, _ = _ppo_with_programmatic_reward(kl_coef=10.0)
    free_reward = [float(m["reward/score"]) for m in free]
    # with beta = 0 the policy learns to emit low token ids more often than at the start (about 1/8)...
    assert np.mean(free_reward[-5:]) > np.mean(free_reward[:2]) + 0.1, free_reward
    # ...and drifts from the reference; a large beta keeps the same run much closer to it
    free_kl, leashed_kl = _exact_kl(free_params, start, evaluation), _exact_kl(leashed_params, start, evaluation)
    assert free_kl > 0.05, free_kl
    assert leashed_kl < 0.5 * free_kl, (leashed_kl, free_kl)


def test_update_loss_equals_the_loss_functions_applied_by_hand():
    """The step's loss on a hand-sized batch equals PPO's formulas evaluated in numpy on the model's outputs."""
    policy = llama.init_params(CONFIG, jax.random.key(0))
    critic = llama.init_scalar_model(CONFIG, policy, jax.random.key(1))
    hyper = RLAlgorithm(clip_eps=0.2, value_clip_eps=0.1, vf_coef=0.5, entropy_coef=0.01,
                                   whiten_advantages=False)
    prompts, prompt_mask, sample = _rollout(policy, jax.random.key(3), hyper, batch=2, prompt_length=4, max_new=3)
    experience, _ = rl.make_experience(
        CONFIG, CONFIG, hyper, policy, policy, critic, _scores(CONFIG, critic, prompts, prompt_mask, sample), prompts,
        prompt_mask, sample.response_tokens, sample.response_mask, sample.ended_with_eos, jnp.float32(0.1))
    # pretend the rollout came from a slightly different policy, with hand-picked advantages and old values
    experience = experience.replace(
        old_logprobs=experience.old_logprobs + jnp.array([[0.3, -0.3, 0.05], [-0.1, 0.25, 0.0]]),
        advantages=jnp.array([[1.0, -2.0, 0.5], [-1.0, 0.5, 2.0]]),
        old_values=experience.old_values + 0.2)
    loss_sum, (count, _) = rl.rl_loss_sum(CONFIG, CONFIG, hyper, 4, 0.0, (policy, critic), experience)

    logits = np.asarray(llama.forward(CONFIG, policy, experience.tokens, attention_mask=experience.attention_mask).logits,
                        np.float64)
    values = np.asarray(llama.values_forward(CONFIG, critic, experience.tokens, experience.attention_mask), np.float64)
    tokens, mask = np.asarray(experience.tokens), np.asarray(experience.response_mask)
    total, n = 0.0, 0
    for b in range(2):
        for i in range(3):
            if not mask[b, i]:
                continue
            row = logits[b, 4 + i - 1]
            log_probs = row - row.max() - np.log(np.exp(row - row.max()).sum())
            logp = log_probs[tokens[b, 4 + i]]
            entropy = -np.sum(np.exp(log_probs) * log_probs)
            ratio = np.exp(logp - float(experience.old_logprobs[b, i]))
            advantage = float(experience.advantages[b, i])
            policy_loss = max(-advantage * ratio, -advantage * np.clip(ratio, 0.8, 1.2))
            value, old_value, ret = values[b, 4 + i - 1], float(experience.old_values[b, i]), float(experience.returns[b, i])
            clipped_value = np.clip(value, old_value - 0.1, old_value + 0.1)
            value_loss = 0.5 * max((value - ret) ** 2, (clipped_value - ret) ** 2)
            total += policy_loss + 0.5 * value_loss - 0.01 * entropy
            n += 1
    assert int(count) == n == mask.sum()
    np.testing.assert_allclose(float(loss_sum), total, rtol=1e-5)


@pytest.mark.parametrize("estimator,kl_placement", [("grpo", "loss"), ("dr_grpo", "loss"), ("rloo", "reward"),
                                                    ("reinforce", "reward"), ("reinforce_pp", "reward")])
def test_critic_free_estimators_learn_the_programmatic_reward(estimator, kl_placement):
    """GRPO, Dr. GRPO, RLOO, REINFORCE and REINFORCE++ through the same experience and scanned update, with
    4 samples of each of 4 prompts (contiguous rows) and no critic, raise `_low_token_fraction`."""
    policy = llama.init_params(CONFIG, jax.random.key(0))
    hyper = RLAlgorithm(advantage_estimator=estimator, group_size=4, kl_placement=kl_placement,
                                 kl_estimator="k3" if kl_placement == "loss" else "k1", whiten_advantages=False,
                                 update_epochs=2, mini_batch_size=8)
    state = TrainState.create(policy, make_optimizer("adamw", 5e-3), jax.random.key(0))
    experience_fn = jax.jit(functools.partial(rl.make_experience, CONFIG, None, hyper))
    update_fn = jax.jit(functools.partial(rl.rl_update, CONFIG, None, hyper, 6))
    key, history = jax.random.key(7), []
    for _ in range(10):
        key, sample_key, shuffle_key = jax.random.split(key, 3)
        prompts, prompt_mask, _ = _rollout(state.params, sample_key, hyper, batch=4, max_new=8)
        prompts, prompt_mask = jnp.repeat(prompts, 4, axis=0), jnp.repeat(prompt_mask, 4, axis=0)
        sample = generate(CONFIG, state.params, prompts, prompt_mask, sample_key, SamplingSettings(max_new_tokens=8))
        scores = _scores(_low_token_fraction, {}, prompts, prompt_mask, sample)
        experience, metrics = experience_fn(state.params, policy, {}, scores, prompts, prompt_mask,
                                            sample.response_tokens, sample.response_mask, sample.ended_with_eos,
                                            jnp.float32(0.01))
        assert "value/explained_var" not in metrics and not np.any(np.asarray(experience.old_values))
        (state,), update_metrics = update_fn(shuffle_key, jnp.float32(0.01), (state,), experience)
        assert "value/loss" not in update_metrics and float(update_metrics["ppo/epochs"]) == 2.0
        history.append(float(metrics["reward/mean"]))
    assert np.mean(history[-5:]) > np.mean(history[:2]) + 0.1, history


def test_group_advantages_are_the_estimator_over_each_prompts_samples_broadcast_over_tokens():
    from rlhf_jax.losses import get_advantage_estimator

    policy = llama.init_params(CONFIG, jax.random.key(0))
    hyper = RLAlgorithm(advantage_estimator="rloo", group_size=2, kl_placement="reward",
                                 whiten_advantages=False)
    prompts, prompt_mask, sample = _rollout(policy, jax.random.key(3), hyper, batch=4)
    reference = jax.tree.map(lambda x: x * 1.01, policy)
    experience, _ = rl.make_experience(
        CONFIG, None, hyper, policy, reference, {}, _scores(_low_token_fraction, {}, prompts, prompt_mask, sample),
        prompts, prompt_mask, sample.response_tokens, sample.response_mask, sample.ended_with_eos, jnp.float32(0.5))
    mask = np.asarray(experience.response_mask)
    kl = np.where(mask, np.asarray(experience.old_logprobs - experience.ref_logprobs), 0).sum(1)
    returns = np.asarray(_low_token_fraction(prompts, prompt_mask, sample.response_tokens, sample.response_mask)) \
        - 0.5 * kl  # the KL in the reward: score − β·Σ_t KL_t (k1)
    want = np.asarray(get_advantage_estimator("rloo")(jnp.asarray(returns), 2))
    np.testing.assert_allclose(np.asarray(experience.advantages), np.where(mask, want[:, None], 0), rtol=1e-5,
                               atol=1e-6)


def test_with_the_kl_in_the_loss_one_on_policy_step_skips_the_old_logprob_pass_and_reports_the_same_kl():
    """GRPO's KL in the loss with a fixed β and one optimizer step over the rollout: the experience pass runs
    the reference but not the behaviour policy, and the update (taking its own log-probs, stop-gradient)
    reports the KL metrics the experience pass would have and makes the step of the explicit old log-probs.
    An adaptive β or the KL in the reward still needs the pass."""
    from rlhf_jax.losses import kl_penalized_rewards

    policy = llama.init_params(CONFIG, jax.random.key(0))
    algorithm = RLAlgorithm(advantage_estimator="grpo", group_size=4, kl_coef=0.04, kl_placement="loss",
                            kl_estimator="k3", update_epochs=1, mini_batch_size=8, whiten_advantages=False)
    assert rl.old_logprobs_from_update(algorithm, 8)
    assert not rl.old_logprobs_from_update(dataclasses.replace(algorithm, kl_target=6.0), 8)
    assert not rl.old_logprobs_from_update(dataclasses.replace(algorithm, kl_placement="reward"), 8)
    experience, metrics = _grouped_experience(algorithm, policy, False)
    assert not np.any(np.asarray(experience.old_logprobs)) and np.any(np.asarray(experience.ref_logprobs))
    assert "kl/mean" not in metrics and float(metrics["kl/coef"]) == pytest.approx(0.04)
    optimizer = make_optimizer("sgd", 0.5, b1=0.0, grad_clip=None)
    (state,), update = rl.rl_update(CONFIG, None, algorithm, 6, jax.random.key(5), jnp.float32(0.04),
                                    (TrainState.create(policy, optimizer, jax.random.key(0)),), experience)
    old = rl.response_logprobs(CONFIG, policy, experience.tokens, experience.attention_mask, 6, 1.0, rl.SEQ_CHUNK)
    explicit = experience.replace(old_logprobs=old)
    (expected,), expected_update = rl.rl_update_step(CONFIG, None, algorithm, 6, jnp.float32(0.04),
                                                     (TrainState.create(policy, optimizer, jax.random.key(0)),),
                                                     explicit)
    _, kl = kl_penalized_rewards(experience.scores, old, experience.ref_logprobs, experience.response_mask, 0.0,
                                 "k3")
    assert float(kl["kl/sequence_kl"]) > 1e-4  # the reference (0.9 × the policy) differs
    for name in ("kl/sequence_kl", "kl/token_kl"):
        np.testing.assert_allclose(float(update[name]), float(kl[name]), rtol=1e-5, err_msg=name)
    assert float(update["kl/mean"]) == float(update["kl/sequence_kl"])
    # The policy loss is a mean of group-centred advantages times ratios of 1, so 0 up to rounding: the two
    # programs' ratios differ by a few float32 steps, which moves the mean by that many steps of the mean |A|.
    mask = np.asarray(experience.response_mask)
    rounding = 8 * np.finfo(np.float32).eps * np.abs(np.asarray(experience.advantages))[mask].mean()
    for name in ("policy/loss", "policy/kl_loss", "policy/entropy"):
        np.testing.assert_allclose(float(update[name]), float(expected_update[name]), rtol=1e-5, atol=rounding,
                                   err_msg=name)
    assert_same_updates(policy, state.params, expected.params)


def test_continuation_logprobs_are_the_teacher_forced_logprobs_of_those_columns():
    """The LM head only at the positions that predict columns >= start gives the same numbers as the
    full-sequence log-probs sliced there (entropies too)."""
    from rlhf_jax.trainers.common import continuation_logprobs, teacher_forced_logprobs

    params = llama.init_params(CONFIG, jax.random.key(0))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, CONFIG.vocab_size, (3, 11)), jnp.int32)
    mask = jnp.asarray(np.arange(11)[None] >= np.array([[0], [2], [4]]))  # left padding
    full, full_entropy = teacher_forced_logprobs(CONFIG, params, {"tokens": tokens, "attention_mask": mask}, temperature=0.7,
                                        seq_chunk=4, with_entropy=True)
    for start in (1, 6, 10):
        part, entropy = continuation_logprobs(CONFIG, params, tokens, mask, start, 0.7, 4, with_entropy=True)
        np.testing.assert_allclose(np.asarray(part), np.asarray(full[:, start:]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(entropy), np.asarray(full_entropy[:, start:]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="start must be >= 1"):
        continuation_logprobs(CONFIG, params, tokens, mask, 0)


def test_without_kl_one_on_policy_step_skips_the_reference_and_old_logprob_passes_and_updates_the_same():
    """β = 0 and one optimizer step over the whole rollout: the experience pass runs neither the reference
    (none is given) nor the behaviour policy (the update takes its own log-probs, stop-gradient), reports no
    KL, and the update equals the one that uses separately computed old log-probs (KL term × 0)."""
    policy = llama.init_params(CONFIG, jax.random.key(0))
    free = RLAlgorithm(advantage_estimator="grpo", group_size=4, kl_coef=0.0, kl_placement="loss",
                       update_epochs=1, mini_batch_size=8, whiten_advantages=False)
    # the KL in the reward needs the old log-probs in the experience pass (its β is 0 here, as passed below)
    paid = dataclasses.replace(free, kl_coef=0.04, kl_placement="reward")
    assert rl.old_logprobs_from_update(free, 8) and not rl.old_logprobs_from_update(paid, 8)
    assert not rl.old_logprobs_from_update(free, 16)  # two mini-batches: the second is off-policy
    prompts, prompt_mask, _ = _rollout(policy, jax.random.key(3), free, batch=2)
    prompts, prompt_mask = jnp.repeat(prompts, 4, axis=0), jnp.repeat(prompt_mask, 4, axis=0)
    sample = generate(CONFIG, policy, prompts, prompt_mask, jax.random.key(4), SamplingSettings(max_new_tokens=6))
    scores = _scores(_low_token_fraction, {}, prompts, prompt_mask, sample)
    rollout = (prompts, prompt_mask, sample.response_tokens, sample.response_mask, sample.ended_with_eos)
    out = {}
    for name, algorithm, reference in (("free", free, {}), ("paid", paid, policy)):
        experience, metrics = rl.make_experience(CONFIG, None, algorithm, policy, reference, {}, scores, *rollout,
                                                 jnp.float32(0.0))
        state = TrainState.create(policy, make_optimizer("sgd", 0.5, b1=0.0, grad_clip=None), jax.random.key(0))
        (state,), update_metrics = rl.rl_update(CONFIG, None, algorithm, prompts.shape[1], jax.random.key(5),
                                                jnp.float32(0.0), (state,), experience)
        out[name] = (experience, metrics, state.params, update_metrics)
    experience, metrics, free_params, free_update = out["free"]
    assert not np.any(np.asarray(experience.old_logprobs)) and not np.any(np.asarray(experience.ref_logprobs))
    assert not any(name.startswith("kl/") for name in metrics) and "policy/kl_loss" not in free_update
    assert float(free_update["policy/ratio_mean"]) == 1.0  # exactly: the ratio of a forward to itself
    paid_experience, paid_metrics, paid_params, _ = out["paid"]
    assert "kl/mean" in paid_metrics and np.any(np.asarray(paid_experience.old_logprobs))
    np.testing.assert_allclose(np.asarray(experience.advantages), np.asarray(paid_experience.advantages), rtol=1e-6)
    moved = False
    for before, a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(free_params), jax.tree.leaves(paid_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        moved |= bool(np.any(np.asarray(a) != np.asarray(before)))
    assert moved


def _two_groups_of_three(config):
    """Rows [prompt (7, left-padded by 0 and 3) | response (5, right-padded to lengths 5 2 4 / 1 5 3)], each
    prompt in 3 contiguous rows: (tokens, mask, (group, groups, prompt length, new tokens))."""
    rng = np.random.default_rng(1)
    group, groups, prompt_length, new = 3, 2, 7, 5
    prompts = np.repeat(rng.integers(3, config.vocab_size, (groups, prompt_length)), group, axis=0)
    prompt_mask = np.repeat(np.arange(prompt_length)[None] >= np.array([[0], [3]]), group, axis=0)
    lengths = np.array([5, 2, 4, 1, 5, 3])
    tokens = jnp.asarray(np.concatenate([prompts, rng.integers(3, config.vocab_size, (groups * group, new))], 1),
                         jnp.int32)
    mask = jnp.asarray(np.concatenate([prompt_mask, np.arange(new)[None] < lengths[:, None]], 1))
    return tokens, mask, (group, groups, prompt_length, new)


def test_a_groups_prompt_computed_once_gives_the_gradients_of_separate_rows_in_float64():
    """In float64 a loss of the shared-prompt log-probs and entropies and its gradient equal the separate rows'
    to 1e-10: the layout changes which zeros attention adds, not the arithmetic."""
    from rlhf_jax.trainers.common import continuation_logprobs

    with jax.enable_x64(True):
        config = dataclasses.replace(CONFIG, dtype="float64", param_dtype="float64")
        params = llama.init_params(config, jax.random.key(0))
        tokens, mask, (group, _, prompt_length, _) = _two_groups_of_three(config)
        weights = jnp.asarray(np.random.default_rng(2).normal(size=tokens[:, prompt_length:].shape))
        response_mask = mask[:, prompt_length:]

        def loss(params, group_size):
            logprobs, entropy = continuation_logprobs(config, params, tokens, mask, prompt_length, 0.7, 4, True,
                                                      group_size=group_size)
            return jnp.sum(jnp.where(response_mask, weights * logprobs + 0.1 * entropy, 0.0))

        separate, separate_grads = jax.value_and_grad(loss)(params, 1)
        shared, shared_grads = jax.value_and_grad(loss)(params, group)
        np.testing.assert_allclose(float(shared), float(separate), rtol=1e-12)
        for a, b in zip(jax.tree.leaves(shared_grads), jax.tree.leaves(separate_grads)):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("group_size", [1, 3])
def test_the_head_skips_the_positions_after_each_response_and_gives_the_same_numbers_in_float64(group_size):
    """`kept_chunk` (what `rl.response_logprobs` runs): the LM head at the response tokens only, gathered from
    every row, chunks past them skipped. At the response tokens the log-probs and entropies are the whole
    head's, after each response's end 0; a loss of them and its gradient equal the whole head's to 1e-10."""
    from rlhf_jax.trainers.common import continuation_logprobs

    with jax.enable_x64(True):
        config = dataclasses.replace(CONFIG, dtype="float64", param_dtype="float64")
        params = llama.init_params(config, jax.random.key(0))
        tokens, mask, (_, _, prompt_length, _) = _two_groups_of_three(config)
        response_mask = np.asarray(mask[:, prompt_length:])
        assert 0 < response_mask.mean() < 1  # responses of different lengths
        weights = jnp.asarray(np.random.default_rng(2).normal(size=response_mask.shape))

        def loss(params, kept_chunk):
            logprobs, entropy = continuation_logprobs(config, params, tokens, mask, prompt_length, 0.7, 4, True,
                                                      group_size=group_size, kept_chunk=kept_chunk)
            return jnp.sum(jnp.where(response_mask, weights * logprobs + 0.1 * entropy, 0.0)), (logprobs, entropy)

        (whole, (logprobs, entropy)), whole_grads = jax.value_and_grad(loss, has_aux=True)(params, None)
        for kept_chunk in (2, 5):
            (kept, (kept_logprobs, kept_entropy)), kept_grads = jax.value_and_grad(loss, has_aux=True)(params,
                                                                                                  kept_chunk)
            for got, want in ((kept_logprobs, logprobs), (kept_entropy, entropy)):
                np.testing.assert_allclose(np.asarray(got)[response_mask], np.asarray(want)[response_mask],
                                           rtol=1e-12, atol=1e-12)
                assert not np.any(np.asarray(got)[~response_mask])
            np.testing.assert_allclose(float(kept), float(whole), rtol=1e-12)
            for a, b in zip(jax.tree.leaves(kept_grads), jax.tree.leaves(whole_grads)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", [CONFIG, dataclasses.replace(CONFIG, sliding_window=5), tiny_config("qwen2")],
                         ids=["llama", "sliding_window", "qwen2_bias"])
def test_a_groups_prompt_computed_once_gives_the_log_probs_of_its_separate_rows(config):
    """`continuation_logprobs(..., group_size=G)` lays each group's prompt out once with its G continuations
    as segments that see it: the log-probs and entropies of every column (padding included) are those of the
    G separate rows, with left-padded prompts and right-padded continuations of different lengths."""
    from rlhf_jax.trainers.common import continuation_logprobs, prompt_group_rows

    params = llama.init_params(config, jax.random.key(0))
    tokens, mask, (group, groups, prompt_length, new) = _two_groups_of_three(config)
    rows, _ = prompt_group_rows(tokens, mask, prompt_length, group)
    assert rows["tokens"].shape == (groups, prompt_length + group * new)
    separate, separate_entropy = continuation_logprobs(config, params, tokens, mask, prompt_length, 0.7, 4, True)
    shared, shared_entropy = continuation_logprobs(config, params, tokens, mask, prompt_length, 0.7, 4, True,
                                                   group_size=group)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(separate), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(shared_entropy), np.asarray(separate_entropy), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="6 rows do not split into groups of 4"):
        prompt_group_rows(tokens, mask, prompt_length, 4)


def test_a_reward_model_scores_a_groups_rows_with_the_prompt_computed_once():
    """`model_scores(..., group_size=G)` (and a `ModelReward` given a `ScoringBatch` with that group size) reads
    the head at each sample's last real token in the group's row: the scores of the separate rows, an empty
    response (scored at the prompt's last token) included."""
    from rlhf_jax.rewards import ModelReward, ScoringBatch

    model = llama.init_scalar_model(CONFIG, llama.init_params(CONFIG, jax.random.key(0)), jax.random.key(1))
    tokens, mask, (group, _, prompt_length, _) = _two_groups_of_three(CONFIG)
    mask = mask.at[3, prompt_length:].set(False)  # an empty response
    arrays = (tokens[:, :prompt_length], mask[:, :prompt_length], tokens[:, prompt_length:], mask[:, prompt_length:])
    separate = model_scores(CONFIG, model, *arrays)
    shared = model_scores(CONFIG, model, *arrays, group_size=group)
    assert np.ptp(np.asarray(separate)) > 1e-3  # the rows score differently
    np.testing.assert_allclose(np.asarray(shared), np.asarray(separate), rtol=1e-5, atol=1e-6)
    source = ModelReward("rm", CONFIG, model)
    np.testing.assert_allclose(np.asarray(source(ScoringBatch(*arrays, (None,) * 6, group))),
                               np.asarray(source(ScoringBatch(*arrays, (None,) * 6))), rtol=1e-5, atol=1e-6)


def _grouped_experience(algorithm, policy, shared_prompts, prompts=2, critic=None):
    prompt_tokens, prompt_mask, _ = _rollout(policy, jax.random.key(3), algorithm, batch=prompts)
    group = algorithm.group_size
    prompt_tokens, prompt_mask = jnp.repeat(prompt_tokens, group, axis=0), jnp.repeat(prompt_mask, group, axis=0)
    sample = generate(CONFIG, policy, prompt_tokens, prompt_mask, jax.random.key(4), SamplingSettings(max_new_tokens=6))
    scores = _scores(_low_token_fraction, {}, prompt_tokens, prompt_mask, sample)
    reference = jax.tree.map(lambda x: x * 0.9, policy)
    return rl.make_experience(CONFIG, None if critic is None else CONFIG, algorithm, policy, reference,
                              {} if critic is None else critic, scores, prompt_tokens, prompt_mask,
                              sample.response_tokens, sample.response_mask, sample.ended_with_eos, jnp.float32(0.04),
                              shared_prompts=shared_prompts)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_shared_prompts_give_the_experience_and_update_of_separate_rows(micro_batches):
    """GRPO with the KL in the loss and an adaptive β (so the experience pass computes the old and reference
    log-probs), one mini-batch of 2 groups of 4: with `shared_prompts` the experience and the update (in 1 or 2
    micro-batches) are the ones of the separate rows."""
    policy = llama.init_params(CONFIG, jax.random.key(0))
    algorithm = RLAlgorithm(advantage_estimator="grpo", group_size=4, kl_coef=0.04, kl_target=6.0,
                            kl_placement="loss", kl_estimator="k3", update_epochs=1, mini_batch_size=8,
                            whiten_advantages=False)
    assert not rl.old_logprobs_from_update(algorithm, 8)
    out = {}
    for shared in (False, True):
        experience, metrics = _grouped_experience(algorithm, policy, shared)
        state = TrainState.create(policy, make_optimizer("sgd", 0.5, b1=0.0, grad_clip=None), jax.random.key(0))
        (state,), update_metrics = rl.rl_update(CONFIG, None, algorithm, 6, jax.random.key(5), jnp.float32(0.04),
                                                (state,), experience, num_microbatches=micro_batches,
                                                shared_prompts=shared)
        out[shared] = (experience, metrics, state.params, update_metrics)
    (experience, metrics, params, update), (shared_experience, shared_metrics, shared_params, shared_update) = (
        out[False], out[True])
    assert np.any(np.asarray(experience.ref_logprobs) != np.asarray(experience.old_logprobs))
    for field in ("old_logprobs", "ref_logprobs", "advantages", "rewards"):
        np.testing.assert_allclose(np.asarray(getattr(shared_experience, field)),
                                   np.asarray(getattr(experience, field)), rtol=1e-5, atol=1e-5, err_msg=field)
    np.testing.assert_allclose(float(shared_metrics["kl/mean"]), float(metrics["kl/mean"]), rtol=1e-4, atol=1e-6)
    for name in ("policy/loss", "policy/kl_loss", "policy/entropy"):
        np.testing.assert_allclose(float(shared_update[name]), float(update[name]), rtol=1e-4, atol=1e-6, err_msg=name)
    assert_same_updates(policy, shared_params, params)


def test_shared_prompts_give_a_critics_values_and_update_of_separate_rows():
    """PPO (a critic, GAE) with 2 prompts sampled 4 times each: with `shared_prompts` the critic's values, the
    advantages and returns, and the update of both policy and critic (2 micro-batches) are the separate rows'."""
    policy = llama.init_params(CONFIG, jax.random.key(0))
    critic = llama.init_scalar_model(CONFIG, policy, jax.random.key(1))
    algorithm = RLAlgorithm(advantage_estimator="gae", group_size=4, kl_coef=0.04, update_epochs=1,
                            mini_batch_size=8, whiten_advantages=False)
    assert algorithm.has_critic
    out = {}
    for shared in (False, True):
        experience, metrics = _grouped_experience(algorithm, policy, shared, critic=critic)
        states = tuple(TrainState.create(params, make_optimizer("sgd", 0.5, b1=0.0, grad_clip=None), jax.random.key(0))
                       for params in (policy, critic))
        states, update = rl.rl_update(CONFIG, CONFIG, algorithm, 6, jax.random.key(5), jnp.float32(0.04), states,
                                      experience, num_microbatches=2, shared_prompts=shared)
        out[shared] = (experience, metrics, states, update)
    (experience, metrics, states, update), (shared_experience, shared_metrics, shared_states, shared_update) = (
        out[False], out[True])
    values = np.asarray(experience.old_values)
    mask = np.asarray(experience.response_mask)
    assert np.ptp(values[mask]) > 1e-3  # the critic's values differ across positions and rows
    for field in ("old_values", "old_logprobs", "advantages", "returns"):
        np.testing.assert_allclose(np.asarray(getattr(shared_experience, field)),
                                   np.asarray(getattr(experience, field)), rtol=1e-5, atol=1e-5, err_msg=field)
    np.testing.assert_allclose(float(shared_metrics["value/explained_var"]), float(metrics["value/explained_var"]),
                               rtol=1e-4, atol=1e-6)
    for name in ("policy/loss", "value/loss"):
        np.testing.assert_allclose(float(shared_update[name]), float(update[name]), rtol=1e-4, atol=1e-6, err_msg=name)
    assert_same_updates(policy, shared_states[0].params, states[0].params)
    assert_same_updates(critic, shared_states[1].params, states[1].params)


def test_shared_prompts_keep_groups_whole_in_shuffled_mini_batches():
    """Two epochs of two mini-batches of one group each: `rl_update` with `shared_prompts` equals optimizer steps
    over the separate rows of the groups in the order each epoch's key permutes the groups."""
    policy = llama.init_params(CONFIG, jax.random.key(0))
    algorithm = RLAlgorithm(advantage_estimator="grpo", group_size=4, kl_coef=0.04, kl_placement="loss",
                            update_epochs=2, mini_batch_size=4, whiten_advantages=False)
    experience, _ = _grouped_experience(algorithm, policy, True)
    optimizer = make_optimizer("sgd", 0.5, b1=0.0, grad_clip=None)  # Adam would amplify rounding at zero gradients
    key = jax.random.key(7)  # its epochs take the groups in the orders (1, 0), then (0, 1)
    assert [np.asarray(jax.random.permutation(k, 2)).tolist() for k in jax.random.split(key, 2)] == [[1, 0], [0, 1]]
    (shared,), metrics = rl.rl_update(CONFIG, None, algorithm, 6, key, jnp.float32(0.04),
                                      (TrainState.create(policy, optimizer, jax.random.key(0)),), experience,
                                      shared_prompts=True)
    assert float(metrics["ppo/epochs"]) == 2
    states = (TrainState.create(policy, optimizer, jax.random.key(0)),)
    for epoch_key in jax.random.split(key, 2):
        for group in np.asarray(jax.random.permutation(epoch_key, 2)):
            rows = jax.tree.map(lambda x: x[4 * group: 4 * group + 4], experience)
            states, _ = rl.rl_update_step(CONFIG, None, algorithm, 6, jnp.float32(0.04), states, rows)
    assert_same_updates(policy, shared.params, states[0].params)

"""PPO for language models (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

Four roles: policy (trained), reference (frozen SFT params), critic (trained, value head) and reward
model (frozen, reward head). One iteration:

1. sample responses for a batch of left-padded prompts (`rlhf_jax.sampling`);
2. `make_experience`: score with the reward model (+ reward-hacking guards), teacher-forced log-probs
   of policy and reference, critic values, KL-shaped per-token rewards, GAE, whitening;
3. `ppo_epochs` passes of shuffled mini-batches through `ppo_update_step` (clipped policy loss,
   clipped value loss, entropy bonus), stopping early once approx-KL exceeds a target;
4. the KL controller updates β from the sequence-summed KL.

Alignment: sequences are `[prompt (left-padded, P) | response (right-padded, N)]`. The log-prob of
response token i sits at column P + i; the value of the state before it at column P + i − 1.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.losses import (
    aggregate,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss_per_token,
    value_loss_per_token,
)
from rlhf_jax.models import llama
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.trainers.common import token_logprobs
from rlhf_jax.training.accumulate import accumulate_gradients
from rlhf_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOHyperparameters:
    """The numbers of one PPO iteration (static under jit)."""

    clip_eps: float = 0.2
    value_clip_eps: float | None = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_estimator: str = "k1"
    temperature: float = 1.0
    loss_aggregation: str = "token-mean"
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None
    length_penalty: float = 0.0
    length_normalize: bool = False
    ngram_size: int = 3
    ngram_penalty: float = 0.0
    reward_clip: float | None = None
    reward_mean: float = 0.0  # scores are normalised as (score - reward_mean) / reward_std first
    reward_std: float = 1.0
    num_microbatches: int = 1
    seq_chunk: int = 128


# ---- reward-hacking guards: pure functions of scores and responses --------------------------------


def repeated_ngram_fraction(tokens: jax.Array, mask: jax.Array, n: int) -> jax.Array:
    """Fraction of a response's n-grams that repeat an earlier n-gram of the same response.

    tokens, mask: [B, N]. An n-gram counts when all its n tokens are in the mask. Returns [B] float32
    in [0, 1) (0 for responses shorter than n). Computed by hashing n-grams (uint32; a collision, about
    1 in 4e9 per pair, would count as a repeat) and sorting.
    """
    batch, length = tokens.shape
    if length < n:
        return jnp.zeros((batch,), jnp.float32)
    windows = length - n + 1
    hashes = jnp.zeros((batch, windows), jnp.uint32)
    valid = jnp.ones((batch, windows), bool)
    for offset in range(n):  # n is small and static
        part = tokens[:, offset : offset + windows].astype(jnp.uint32)
        hashes = hashes * jnp.uint32(1_000_003) + part + jnp.uint32(1)
        valid &= mask[:, offset : offset + windows].astype(bool)
    # Invalid windows sort last (as the largest uint32) and are excluded by the position test.
    sorted_hash = jnp.sort(jnp.where(valid, hashes, jnp.array(0xFFFFFFFF, jnp.uint32)), axis=1)
    num_valid = jnp.sum(valid, axis=1)
    in_range = jnp.arange(windows)[None, 1:] < num_valid[:, None]
    duplicate = (sorted_hash[:, 1:] == sorted_hash[:, :-1]) & in_range
    return jnp.sum(duplicate, axis=1) / jnp.maximum(num_valid, 1).astype(jnp.float32)


def shape_scores(scores, response_tokens, response_mask, ended_with_eos, hyper: PPOHyperparameters):
    """Normalise raw reward-model scores [B] and apply the reward-hacking guards (each a switch in `hyper`).

    * normalisation: `(score − reward_mean) / reward_std` (statistics recorded by the reward stage);
    * missing EOS: `score − missing_eos_penalty` for responses truncated at max_new_tokens;
    * length: `score − length_penalty · length`; or `score / length` with `length_normalize`;
    * repetition: `score − ngram_penalty · repeated_ngram_fraction(response, ngram_size)`;
    * clipping: `clip(score, −reward_clip, reward_clip)`, applied last.
    Returns (scores [B] float32, metrics).
    """
    scores = (scores.astype(jnp.float32) - hyper.reward_mean) / hyper.reward_std
    lengths = jnp.sum(response_mask, axis=1).astype(jnp.float32)
    metrics = {"reward/raw_score": jnp.mean(scores)}
    if hyper.missing_eos_penalty is not None:
        scores = jnp.where(ended_with_eos, scores, scores - hyper.missing_eos_penalty)
    if hyper.length_normalize:
        scores = scores / jnp.maximum(lengths, 1.0)
    if hyper.length_penalty:
        scores = scores - hyper.length_penalty * lengths
    if hyper.ngram_penalty:
        repeated = repeated_ngram_fraction(response_tokens, response_mask, hyper.ngram_size)
        scores = scores - hyper.ngram_penalty * repeated
        metrics["response/repeated_ngram_fraction"] = jnp.mean(repeated)
    if hyper.reward_clip is not None:
        scores = jnp.clip(scores, -hyper.reward_clip, hyper.reward_clip)
    return scores, metrics


# ---- experience --------------------------------------------------------------------------------


class Experience(flax.struct.PyTreeNode):
    """One batch of rollouts, everything the update needs. T = P + N, all float32 unless noted.

    tokens, attention_mask: [B, T]; response_mask: [B, N] bool; old_logprobs, ref_logprobs, old_values,
    rewards, advantages, returns: [B, N]; scores: [B] shaped scores.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    response_mask: jax.Array
    old_logprobs: jax.Array
    ref_logprobs: jax.Array
    old_values: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    returns: jax.Array
    scores: jax.Array


def _response_slice(per_position: jax.Array, prompt_length: int, shift: int = 0) -> jax.Array:
    response_length = per_position.shape[1] - prompt_length
    start = prompt_length + shift
    return jax.lax.dynamic_slice_in_dim(per_position, start, response_length, axis=1)


def response_logprobs(config: DecoderConfig, params, tokens, attention_mask, prompt_length: int,
                      temperature: float, seq_chunk: int, with_entropy: bool = False):
    """Teacher-forced log-probs [B, N] (and entropies) of the response tokens at `temperature`."""
    batch = {"tokens": tokens, "attention_mask": attention_mask}
    out = token_logprobs(config, params, batch, temperature=temperature, seq_chunk=seq_chunk,
                         with_entropy=with_entropy)
    if with_entropy:
        return _response_slice(out[0], prompt_length), _response_slice(out[1], prompt_length)
    return _response_slice(out, prompt_length)


def response_values(config: DecoderConfig, critic, tokens, attention_mask, prompt_length: int) -> jax.Array:
    """V(state before response token i) for i < N: critic values at columns P − 1 + i. Returns [B, N]."""
    values = llama.values_forward(config, critic, tokens, attention_mask=attention_mask)
    return _response_slice(values, prompt_length, shift=-1)


def make_experience(policy_config: DecoderConfig, critic_config: DecoderConfig, reward, hyper: PPOHyperparameters,
                    policy, reference, critic, reward_model, prompt_tokens, prompt_mask, response_tokens,
                    response_mask, ended_with_eos, kl_coef):
    """Score, compute log-probs/values, shape per-token rewards and run GAE. Returns (Experience, metrics).

    prompt_tokens, prompt_mask: [B, P] left-padded; response_tokens, response_mask: [B, N];
    ended_with_eos: [B]; kl_coef: [] (traced). Each role has its own architecture config; all share the
    tokenizer. `reward` is the reward model's `DecoderConfig` (scores = its head at the last response token),
    or a programmatic reward `fn(prompt_tokens, prompt_mask, response_tokens, response_mask) -> [B]`
    (`rlhf_jax.rewards`; `reward_model` params are then ignored).
    """
    prompt_length = prompt_tokens.shape[1]
    response_mask = response_mask.astype(bool)
    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1).astype(jnp.int32)
    attention_mask = jnp.concatenate([prompt_mask.astype(bool), response_mask], axis=1)

    old_logprobs = response_logprobs(policy_config, policy, tokens, attention_mask, prompt_length,
                                     hyper.temperature, hyper.seq_chunk)
    ref_logprobs = response_logprobs(policy_config, reference, tokens, attention_mask, prompt_length,
                                     hyper.temperature, hyper.seq_chunk)
    old_values = response_values(critic_config, critic, tokens, attention_mask, prompt_length)
    if isinstance(reward, DecoderConfig):
        raw_scores = llama.rewards_forward(reward, reward_model, tokens, attention_mask)
    else:
        raw_scores = reward(prompt_tokens, prompt_mask, response_tokens, response_mask)
    scores, shaping_metrics = shape_scores(raw_scores, response_tokens, response_mask, ended_with_eos, hyper)
    has_response = jnp.any(response_mask, axis=1)
    if hyper.whiten_rewards:
        scores = masked_whiten(scores, has_response, shift_mean=False)

    rewards, kl_metrics = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, response_mask, kl_coef,
                                               hyper.kl_estimator)
    old_values = jnp.where(response_mask, old_values, 0.0)
    advantages, returns = gae(rewards, old_values, response_mask, hyper.gamma, hyper.lam)
    if hyper.whiten_advantages:
        advantages = masked_whiten(advantages, response_mask)
    lengths = jnp.sum(response_mask, axis=1).astype(jnp.float32)
    metrics = {
        **shaping_metrics,
        **kl_metrics,
        "reward/mean": masked_mean(scores, has_response),
        "reward/std": jnp.sqrt(masked_var(scores, has_response)),
        "kl/mean": kl_metrics["kl/sequence_kl"],
        "kl/coef": jnp.asarray(kl_coef, jnp.float32),
        "response/length_mean": jnp.mean(lengths),
        "response/eos_fraction": jnp.mean(ended_with_eos.astype(jnp.float32)),
        "value/explained_var": explained_variance(old_values, returns, response_mask),
    }
    experience = Experience(tokens=tokens, attention_mask=attention_mask, response_mask=response_mask,
                            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, old_values=old_values,
                            rewards=rewards, advantages=advantages, returns=returns, scores=scores)
    return experience, metrics


# ---- update ------------------------------------------------------------------------------------


def ppo_loss_sum(policy_config: DecoderConfig, critic_config: DecoderConfig, hyper: PPOHyperparameters,
                 prompt_length: int, trainable, batch):
    """(Σ policy + vf_coef·value − entropy_coef·entropy losses, (count, summed metrics)) for one micro-batch.

    trainable = (policy params, critic params); batch: an `Experience` slice.
    """
    policy, critic = trainable
    mask = batch.response_mask
    logprobs, entropy = response_logprobs(policy_config, policy, batch.tokens, batch.attention_mask, prompt_length,
                                          hyper.temperature, hyper.seq_chunk, with_entropy=True)
    values = response_values(critic_config, critic, batch.tokens, batch.attention_mask, prompt_length)
    policy_per_token, policy_metrics = ppo_policy_loss_per_token(logprobs, batch.old_logprobs, batch.advantages,
                                                                 mask, hyper.clip_eps)
    value_per_token, value_metrics = value_loss_per_token(values, batch.old_values, batch.returns, mask,
                                                          hyper.value_clip_eps)
    per_token = policy_per_token + hyper.vf_coef * value_per_token - hyper.entropy_coef * entropy
    loss_sum, count = aggregate(per_token, mask, hyper.loss_aggregation, normaliser=mask.shape[1])
    policy_sum, _ = aggregate(policy_per_token, mask, hyper.loss_aggregation, normaliser=mask.shape[1])
    value_sum, _ = aggregate(value_per_token, mask, hyper.loss_aggregation, normaliser=mask.shape[1])
    tokens = jnp.sum(mask).astype(jnp.float32)
    # token-mean metrics are re-weighted by this micro-batch's token count; the step divides by the total
    token_weighted = {**policy_metrics, **value_metrics, "policy/entropy": masked_mean(entropy, mask)}
    token_weighted.pop("policy/ratio_max")
    sums = {name: value * tokens for name, value in token_weighted.items()}
    sums["policy/loss"] = policy_sum  # divided by the total count, like the loss
    sums["value/loss"] = value_sum
    return loss_sum, (count, {"tokens": tokens, **sums})


def ppo_update_step(policy_config: DecoderConfig, critic_config: DecoderConfig, hyper: PPOHyperparameters,
                    prompt_length: int, policy_state: TrainState, critic_state: TrainState, batch: Experience):
    """One optimizer step for policy and critic on a mini-batch. Returns (policy_state, critic_state, metrics)."""
    loss_fn = functools.partial(ppo_loss_sum, policy_config, critic_config, hyper, prompt_length)
    loss, (policy_grads, critic_grads), sums = accumulate_gradients(
        loss_fn, (policy_state.params, critic_state.params), batch, hyper.num_microbatches
    )
    # `accumulate_gradients` divided every sum by the loss count; rescale the token-weighted metrics.
    count_over_tokens = 1.0 / jnp.maximum(sums.pop("tokens"), 1e-9)
    metrics = {name: value if name in ("policy/loss", "value/loss") else value * count_over_tokens
               for name, value in sums.items()}
    metrics["ppo/loss"] = loss
    return policy_state.apply_gradients(policy_grads), critic_state.apply_gradients(critic_grads), metrics


def minibatches(experience: Experience, key: jax.Array, minibatch_size: int) -> list[Experience]:
    """Shuffle the rollout batch with `key` and cut it into mini-batches of `minibatch_size` rows."""
    batch = experience.tokens.shape[0]
    order = jax.random.permutation(key, batch)
    shuffled = jax.tree.map(lambda x: x[order], experience)
    return [jax.tree.map(lambda x: x[i : i + minibatch_size], shuffled) for i in range(0, batch, minibatch_size)]

"""One RL engine for language models: PPO, GRPO, RLOO and REINFORCE over the same rollouts.

PPO (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022) has four roles: policy (trained),
reference (frozen), critic (trained, value head) and reward. The critic-free algorithms drop the critic and
replace GAE by an estimator over groups of samples of the same prompt (`rlhf_jax.losses.advantages`):
GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), RLOO (Ahmadian et al. 2024), REINFORCE with a batch-mean
baseline (Williams 1992) and REINFORCE++ (Hu 2025). They are settings of one `rlhf_jax.config.RLAlgorithm`,
the RL stages' `algorithm` field, which every function here takes as it is:

    advantage_estimator   "gae" (critic) | "grpo" | "dr_grpo" | "rloo" | "reinforce" | "reinforce_pp"
    kl_placement          "reward": −β·KL_t in the per-token reward (PPO; the sequence sum for the
                          critic-free estimators) | "loss": +β·KL_t in the loss (GRPO), with `kl_estimator`
    clip_eps, clip_eps_high, dual_clip, loss_aggregation, entropy_coef, (value_clip_eps, vf_coef with a critic)

One iteration:

1. sample responses for a batch of left-padded prompts (`rlhf_jax.sampling`), `group_size` per prompt;
2. `make_experience`: scores (+ reward-hacking guards), teacher-forced log-probs of policy and reference,
   critic values, advantages, whitening;
3. `rl_update`: `epochs` passes of shuffled mini-batches, one optimizer step each, as one program (nested
   `lax.scan`, PureJaxRL's shape), stopping the remaining epochs once approx-KL exceeds a target;
4. the KL controller updates β from the sequence-summed KL.

Alignment: sequences are `[prompt (left-padded, P) | response (right-padded, N)]`. The log-prob of
response token i sits at column P + i; the value of the state before it at column P + i − 1.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.config import RLAlgorithm
from rlhf_jax.losses import (
    Weighted,
    aggregate,
    explained_variance,
    gae,
    get_advantage_estimator,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss_per_token,
    sequence_to_token_advantages,
    value_loss_per_token,
)
from rlhf_jax.models import llama
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.models.lora import LoRASettings, full_params
from rlhf_jax.trainers.common import continuation_logprobs, group_columns, over_group_rows
from rlhf_jax.training.accumulate import accumulate_gradients


SEQ_CHUNK = 128  # positions per chunk of the LM head in the log-prob passes
KEPT_CHUNK = 256  # response positions per chunk where the head skips those after a response's end


def old_logprobs_from_update(algorithm: RLAlgorithm, rows: int) -> bool:
    """True when the experience pass skips the behaviour policy's log-probs and the update takes them from its
    own forward, stop-gradient: the update is one optimizer step over all `rows` rollouts (one epoch, one
    mini-batch), so the policy it differentiates is the one that sampled (the ratio is exactly 1, as in TRL's
    GRPO with one iteration), and no reward needs them: no KL (`algorithm.use_reference` False), or the KL in
    the loss with a fixed β (`kl_placement="loss"`, no `kl_target`), whose `kl/*` metrics the update then
    reports from that same forward (TRL's GRPO with β > 0 and one iteration computes the same passes)."""
    one_step = algorithm.update_epochs == 1 and rows == algorithm.mini_batch_size
    kl_in_loss = algorithm.kl_placement == "loss" and algorithm.kl_target is None
    return one_step and (not algorithm.use_reference or kl_in_loss)


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


def shape_scores(scores, response_tokens, response_mask, ended_with_eos, algorithm: RLAlgorithm):
    """Apply the reward-hacking guards to the scores [B] (each a switch in `algorithm`). The scores come from
    the reward sources (`rlhf_jax.rewards.combine`; a reward model's already normalised by its statistics).

    * missing EOS: `score − eos_penalty` for responses truncated at max_new_tokens;
    * length: `score − length_penalty · length`; or `score / length` with `length_normalize`;
    * repetition: `score − ngram_penalty · repeated_ngram_fraction(response, ngram_size)`;
    * clipping: `clip(score, −reward_clip, reward_clip)`, applied last.
    Returns (scores [B] float32, metrics).
    """
    scores = scores.astype(jnp.float32)
    lengths = jnp.sum(response_mask, axis=1).astype(jnp.float32)
    metrics = {"reward/raw_score": jnp.mean(scores)}
    if algorithm.eos_penalty is not None:
        scores = jnp.where(ended_with_eos, scores, scores - algorithm.eos_penalty)
    if algorithm.length_normalize:
        scores = scores / jnp.maximum(lengths, 1.0)
    if algorithm.length_penalty:
        scores = scores - algorithm.length_penalty * lengths
    if algorithm.ngram_penalty:
        repeated = repeated_ngram_fraction(response_tokens, response_mask, algorithm.ngram_size)
        scores = scores - algorithm.ngram_penalty * repeated
        metrics["response/repeated_ngram_fraction"] = jnp.mean(repeated)
    if algorithm.reward_clip is not None:
        scores = jnp.clip(scores, -algorithm.reward_clip, algorithm.reward_clip)
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
                      temperature: float, seq_chunk: int, with_entropy: bool = False, group_size: int = 1):
    """Teacher-forced log-probs [B, N] (and entropies) of the response tokens at `temperature`, 0 after each
    response's end; the LM head runs at the response tokens only (not over the prompt, nor after the end:
    the rows' response tokens gathered and visited `KEPT_CHUNK` at a time, `continuation_logprobs`'
    `kept_chunk`). With `group_size` > 1 each group of that many rows shares its prompt, which the backbone
    runs once (`trainers.common.prompt_group_rows`)."""
    return continuation_logprobs(config, params, tokens, attention_mask, prompt_length, temperature, seq_chunk,
                                 with_entropy, group_size, kept_chunk=KEPT_CHUNK)


def _prompt_group(algorithm: RLAlgorithm, shared_prompts: bool) -> int:
    """Rows per shared prompt in the log-prob passes: the algorithm's group with `shared_prompts`, else 1."""
    return algorithm.group_size if shared_prompts else 1


def response_values(config: DecoderConfig, critic, tokens, attention_mask, prompt_length: int,
                    group_size: int = 1) -> jax.Array:
    """V(state before response token i) for i < N: critic values at columns P − 1 + i. Returns [B, N].

    With `group_size` > 1 each group of that many rows shares its prompt, which the critic's backbone runs once
    (`trainers.common.prompt_group_rows`), as `response_logprobs` does for the policy."""
    if group_size == 1:
        values = llama.values_forward(config, critic, tokens, attention_mask=attention_mask)
        return _response_slice(values, prompt_length, shift=-1)
    values, slots = over_group_rows(lambda *rows, **layout: llama.values_forward(config, critic, *rows, **layout),
                                    tokens, attention_mask, prompt_length, group_size)
    return group_columns(values, slots, slice(prompt_length - 1, -1))


def make_experience(policy_config: DecoderConfig, critic_config: DecoderConfig | None, algorithm: RLAlgorithm,
                    policy, reference, critic, raw_scores, prompt_tokens, prompt_mask, response_tokens,
                    response_mask, ended_with_eos, kl_coef, shared_prompts: bool = False):
    """Shape the scores, compute log-probs (and values), and the advantages. Returns (Experience, metrics).

    raw_scores: [B], from the reward sources (`rlhf_jax.rewards`: a reward model, token or text functions,
    their weighted sum); prompt_tokens, prompt_mask: [B, P] left-padded; response_tokens, response_mask:
    [B, N]; ended_with_eos: [B]; kl_coef: [] (traced). Policy and reference share `policy_config`. Without a
    critic (`critic_config` None, a critic-free `algorithm.advantage_estimator`) `critic` is ignored and
    values are 0.

    Advantages: with "gae", per-token rewards `score at the last token − β·KL_t` (KL in the reward) and GAE;
    otherwise the group estimator over the sequence scores (minus β·Σ_t KL_t when the KL is in the reward),
    broadcast over the response tokens. With `kl_placement="loss"` the rewards carry no KL.

    shared_prompts: each group of `algorithm.group_size` contiguous rows holds one prompt, and the log-prob
    and value passes run it once per group (`response_logprobs`'s and `response_values`'s `group_size`); the
    same numbers to float rounding.
    """
    prompt_length = prompt_tokens.shape[1]
    group = _prompt_group(algorithm, shared_prompts)
    response_mask = response_mask.astype(bool)
    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1).astype(jnp.int32)
    attention_mask = jnp.concatenate([prompt_mask.astype(bool), response_mask], axis=1)

    skipped = jnp.zeros(response_mask.shape, jnp.float32)  # what a pass nobody needs leaves (see below)
    from_update = old_logprobs_from_update(algorithm, tokens.shape[0])
    if from_update:
        old_logprobs = skipped
    else:
        old_logprobs = response_logprobs(policy_config, policy, tokens, attention_mask, prompt_length,
                                         algorithm.temperature, SEQ_CHUNK, group_size=group)
    if algorithm.use_reference:
        ref_logprobs = response_logprobs(policy_config, reference, tokens, attention_mask, prompt_length,
                                         algorithm.temperature, SEQ_CHUNK, group_size=group)
    else:
        ref_logprobs = skipped
    if algorithm.has_critic:
        old_values = jnp.where(response_mask, response_values(critic_config, critic, tokens, attention_mask,
                                                              prompt_length, group), 0.0)
    else:
        old_values = jnp.zeros(response_mask.shape, jnp.float32)
    scores, shaping_metrics = shape_scores(raw_scores, response_tokens, response_mask, ended_with_eos, algorithm)
    has_response = jnp.any(response_mask, axis=1)
    if algorithm.whiten_rewards:
        scores = masked_whiten(scores, has_response, shift_mean=False)

    in_reward = kl_coef if algorithm.kl_placement == "reward" and algorithm.use_reference else 0.0
    rewards, kl_metrics = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, response_mask, in_reward,
                                               algorithm.kl_estimator)
    measured_kl = algorithm.use_reference and not from_update  # else the update reports it (`rl_loss_sum`)
    if not measured_kl:
        kl_metrics = {name: value for name, value in kl_metrics.items() if not name.startswith("kl/")}
    if algorithm.has_critic:
        advantages, returns = gae(rewards, old_values, response_mask, algorithm.gamma, algorithm.lam)
    else:
        sequence_returns = jnp.sum(jnp.where(response_mask, rewards, 0.0), axis=1)  # score − β·Σ KL_t
        estimator = get_advantage_estimator(algorithm.advantage_estimator)
        advantages = sequence_to_token_advantages(
            estimator(sequence_returns, algorithm.group_size, algorithm.advantage_eps), response_mask)
        returns = jnp.where(response_mask, sequence_returns[:, None], 0.0)
    if algorithm.whiten_advantages:
        advantages = masked_whiten(advantages, response_mask)
    lengths = jnp.sum(response_mask, axis=1).astype(jnp.float32)
    metrics = {
        **shaping_metrics,
        **kl_metrics,
        "reward/mean": masked_mean(scores, has_response),
        "reward/std": jnp.sqrt(masked_var(scores, has_response)),
        **({"kl/mean": kl_metrics["kl/sequence_kl"]} if measured_kl else {}),
        **({"kl/coef": jnp.asarray(kl_coef, jnp.float32)} if algorithm.use_reference else {}),
        "response/length_mean": jnp.mean(lengths),
        "response/eos_fraction": jnp.mean(ended_with_eos.astype(jnp.float32)),
    }
    if algorithm.has_critic:
        metrics["value/explained_var"] = explained_variance(old_values, returns, response_mask)
    experience = Experience(tokens=tokens, attention_mask=attention_mask, response_mask=response_mask,
                            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, old_values=old_values,
                            rewards=rewards, advantages=advantages, returns=returns, scores=scores)
    return experience, metrics


# ---- update ------------------------------------------------------------------------------------


def rl_loss_sum(policy_config: DecoderConfig, critic_config: DecoderConfig | None, algorithm: RLAlgorithm,
                prompt_length: int, kl_coef, trainable, batch, *, old_logprobs_from_update: bool = False,
                shared_prompts: bool = False):
    """(Σ policy + vf_coef·value + β·KL − entropy_coef·entropy losses, (count, `Weighted` metrics)) for one
    micro-batch; the value term with a critic, the KL term with `kl_placement="loss"` (and a reference).

    trainable = (policy params,) or (policy params, critic params); batch: an `Experience` slice. With
    `old_logprobs_from_update` (`old_logprobs_from_update(algorithm, rows)`) the ratio's denominator is
    this forward's own log-probs, stop-gradient, instead of `batch.old_logprobs`. With `shared_prompts` the
    batch's leaves are [groups, group_size, ...] (`rl_update`'s layout) and the policy's and the critic's
    forwards run each group's prompt once.
    """
    policy = trainable[0]
    if shared_prompts:
        batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
    mask = batch.response_mask
    normaliser = mask.shape[1]
    logprobs, entropy = response_logprobs(policy_config, policy, batch.tokens, batch.attention_mask, prompt_length,
                                          algorithm.temperature, SEQ_CHUNK, with_entropy=True,
                                          group_size=_prompt_group(algorithm, shared_prompts))
    old_logprobs = jax.lax.stop_gradient(logprobs) if old_logprobs_from_update else batch.old_logprobs
    policy_per_token, policy_metrics = ppo_policy_loss_per_token(logprobs, old_logprobs, batch.advantages,
                                                                 mask, algorithm.clip_eps, algorithm.clip_eps_high,
                                                                 algorithm.dual_clip)
    per_token = policy_per_token - algorithm.entropy_coef * entropy
    token_means = {**policy_metrics, "policy/entropy": masked_mean(entropy, mask)}
    token_means.pop("policy/ratio_max")
    metrics = {"policy/loss": Weighted(*aggregate(policy_per_token, mask, algorithm.loss_aggregation,
                                                  normaliser=normaliser))}
    if algorithm.has_critic:
        values = response_values(critic_config, trainable[1], batch.tokens, batch.attention_mask, prompt_length,
                                 _prompt_group(algorithm, shared_prompts))
        value_per_token, value_metrics = value_loss_per_token(values, batch.old_values, batch.returns, mask,
                                                              algorithm.value_clip_eps)
        per_token = per_token + algorithm.vf_coef * value_per_token
        token_means.update(value_metrics)
        metrics["value/loss"] = Weighted(*aggregate(value_per_token, mask, algorithm.loss_aggregation,
                                                    normaliser=normaliser))
    if algorithm.kl_placement == "loss" and algorithm.use_reference:
        kl_per_token = jnp.where(mask, kl_estimate(logprobs, batch.ref_logprobs, algorithm.kl_estimator), 0.0)
        per_token = per_token + kl_coef * kl_per_token
        token_means["policy/kl_loss"] = masked_mean(kl_per_token, mask)
        if old_logprobs_from_update:  # this forward is the sampling policy's: the experience's KL metrics
            total = jnp.sum(kl_per_token)  # 0 off the mask: per sequence over rows with a response, per token
            sequence_kl = Weighted(total, jnp.sum(jnp.any(mask, axis=1)).astype(jnp.float32))
            metrics.update({"kl/sequence_kl": sequence_kl, "kl/mean": sequence_kl,
                            "kl/token_kl": Weighted(total, jnp.sum(mask).astype(jnp.float32))})
    loss_sum, count = aggregate(per_token, mask, algorithm.loss_aggregation, normaliser=normaliser)
    tokens = jnp.sum(mask).astype(jnp.float32)
    metrics.update({name: Weighted(value * tokens, tokens) for name, value in token_means.items()})
    return loss_sum, (count, metrics)


def rl_update_step(policy_config: DecoderConfig, critic_config: DecoderConfig | None, algorithm: RLAlgorithm,
                   prompt_length: int, kl_coef, states: tuple, batch: Experience, *,
                   old_logprobs_from_update: bool = False, num_microbatches: int = 1, bases: tuple = (),
                   lora: LoRASettings | None = None, shared_prompts: bool = False):
    """One optimizer step for the policy (and critic) on a mini-batch, accumulated over `num_microbatches`.
    states: (policy,) or (policy, critic) `TrainState`s. Returns (states, metrics).

    With `lora` (rank > 0) each state's params are its trainable tree (`models.lora.trainable_params`) and
    `bases` holds the frozen weights of each, in the same order; the loss runs `full_params(base, trainable)`.
    `shared_prompts`: `batch`'s leaves are [groups, group_size, ...] (see `rl_loss_sum`).
    """
    loss_fn = functools.partial(rl_loss_sum, policy_config, critic_config, algorithm, prompt_length, kl_coef,
                                old_logprobs_from_update=old_logprobs_from_update, shared_prompts=shared_prompts)
    if lora is not None and lora.rank > 0:
        trained_loss = loss_fn

        def loss_fn(trainables, microbatch):
            return trained_loss(tuple(full_params(base, trainable, lora)
                                      for base, trainable in zip(bases, trainables)), microbatch)

    unrolled = all(llama.layers_unrolled(c) for c in (policy_config, critic_config) if c is not None)
    loss, grads, metrics = accumulate_gradients(loss_fn, tuple(state.params for state in states), batch,
                                                num_microbatches, per_layer=unrolled)
    metrics["ppo/loss"] = loss
    return tuple(state.apply_gradients(g) for state, g in zip(states, grads)), metrics


def rl_update(policy_config: DecoderConfig, critic_config: DecoderConfig | None, algorithm: RLAlgorithm,
              prompt_length: int, key: jax.Array, kl_coef, states: tuple, experience: Experience,
              num_microbatches: int = 1, bases: tuple = (), lora: LoRASettings | None = None,
              shared_prompts: bool = False):
    """All of an iteration's optimizer steps as one program: `epochs` × (B / mini_batch_size) mini-batches.

    Each epoch shuffles the rollout batch with its own key (`jax.random.split(key, epochs)`) and scans the
    mini-batches; once an epoch ends with the mini-batch approx-KL above `target_approx_kl` the remaining
    epochs are skipped (`lax.cond`). Returns (states, metrics): means over the mini-batch steps taken, and
    `ppo/epochs`, the number of epochs run. `bases`, `lora`: as in `rl_update_step`.

    shared_prompts: the rows' groups of `algorithm.group_size` (one prompt each, contiguous) stay whole: the
    shuffle permutes groups, each mini-batch (a multiple of the group size) and micro-batch holds whole
    groups, and every policy forward runs a group's prompt once (`rl_loss_sum`). Without it rows are shuffled
    one by one.
    """
    batch = experience.tokens.shape[0]
    per_epoch = batch // algorithm.mini_batch_size
    step = functools.partial(rl_update_step, policy_config, critic_config, algorithm, prompt_length, kl_coef,
                             old_logprobs_from_update=old_logprobs_from_update(algorithm, batch),
                             num_microbatches=num_microbatches, bases=bases, lora=lora, shared_prompts=shared_prompts)
    group = _prompt_group(algorithm, shared_prompts)
    if algorithm.mini_batch_size % group:
        raise ValueError(f"mini_batch_size {algorithm.mini_batch_size} is not a multiple of the group size {group}")
    units = experience if group == 1 else jax.tree.map(lambda x: x.reshape(batch // group, group, *x.shape[1:]),
                                                       experience)
    size = algorithm.mini_batch_size // group

    def shuffled(epoch_key):
        order = jax.random.permutation(epoch_key, batch // group)
        return jax.tree.map(lambda x: x[order].reshape(per_epoch, size, *x.shape[1:]), units)

    first = jax.tree.map(lambda x: x[:size], units)
    metrics_shape = jax.eval_shape(lambda: step(states, first)[1])

    def epoch(carry, epoch_key):
        states, stopped = carry

        def run(states):
            return jax.lax.scan(lambda s, minibatch: step(s, minibatch), states, shuffled(epoch_key))

        def skip(states):
            return states, jax.tree.map(lambda s: jnp.zeros((per_epoch, *s.shape), s.dtype), metrics_shape)

        states, metrics = jax.lax.cond(stopped, skip, run, states)
        ran = jnp.logical_not(stopped)
        if algorithm.target_approx_kl is not None:
            stopped = stopped | (metrics["policy/approx_kl"][-1] > algorithm.target_approx_kl)
        return (states, stopped), (metrics, ran)

    epoch_keys = jax.random.split(key, algorithm.update_epochs)
    (states, _), (metrics, ran) = jax.lax.scan(epoch, (states, jnp.array(False)), epoch_keys)
    epochs_run = jnp.sum(ran)
    weights = ran.astype(jnp.float32)[:, None]
    means = {name: jnp.sum(value * weights) / jnp.maximum(epochs_run * per_epoch, 1)
             for name, value in metrics.items()}
    return states, {**means, "ppo/epochs": epochs_run.astype(jnp.float32)}

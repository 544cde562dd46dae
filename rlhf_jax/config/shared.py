"""The settings every stage shares (model, data, optimizer, mesh, checkpoints, logging, LoRA), each beside its checks.

Also the helpers every config class is declared with: ``_config`` (a frozen, keyword-only dataclass), and the
field kinds that validation looks for, ``_source`` (a model source) and ``_path`` (an input file).
"""

import dataclasses
import re
from typing import Any

from rlhf_jax.config.engine import (
    _AT_LEAST_ONE,
    _HALF_OPEN_UNIT,
    _NON_NEGATIVE,
    _POSITIVE,
    _bad,
    _check_range,
    _require,
)
from rlhf_jax.config.names import (
    DTYPES,
    MAX_SEED,
    DataFormat,
    OptimizerName,
    RematPolicy,
    Schedule,
)

_config = dataclasses.dataclass(frozen=True, kw_only=True)


def _source(role: str, **kwargs) -> Any:
    """A model-source field; ``role`` (a key of ``names.ROLE_KINDS``) says which stage kinds a ``stage:``
    reference may name."""
    return dataclasses.field(metadata={"source": role}, **kwargs)


def _path(**kwargs) -> Any:
    """A field naming an input file or directory, checked to exist by ``validate(check_paths=True)``."""
    return dataclasses.field(metadata={"path": True}, **kwargs)


def _data_path(**kwargs) -> Any:
    """A stage's input data: a file (checked to exist, as `_path`), or ``stage:<name>``, the data an earlier stage
    wrote (checked by ``validate`` to name an earlier stage of a kind in ``names.DATA_WRITING_KINDS``)."""
    return dataclasses.field(metadata={"path": True, "data": True}, **kwargs)


@_config
class ModelSpec:
    """Which weights to start from, and the numeric precision to run them in."""

    source: str = _source("any_model")
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    param_dtype: str = "float32"  # stored parameter dtype
    remat: bool = False  # recompute activations in the backward pass (saves memory)
    remat_policy: RematPolicy = RematPolicy.NOTHING  # what each block keeps for the backward pass when remat=true
    scan_unroll: int | None = None  # layers per iteration of the scan over layers; None: all on a CPU, else 1


def _check_model(model: ModelSpec, prefix: str) -> None:
    """The source's syntax is checked with the stage references, by ``experiment.validate``."""
    for name in ("dtype", "param_dtype"):
        value = getattr(model, name)
        _require(value in DTYPES, prefix + name, value, "one of " + ", ".join(DTYPES))
    if model.scan_unroll is not None:
        _require(model.scan_unroll >= 1, prefix + "scan_unroll", model.scan_unroll, "a positive integer or null")


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


def _check_data(data: DataConfig, prefix: str) -> None:
    """Whether `path` is needed depends on the stages: see ``stage._check_training``."""
    _check_range(data, prefix, {
        "max_prompt_length": _AT_LEAST_ONE, "max_length": (lambda v: v >= 2, "an integer >= 2"),
        "batch_size": _AT_LEAST_ONE, "eval_fraction": _HALF_OPEN_UNIT,
        "shuffle_seed": (lambda v: 0 <= v < MAX_SEED, f"an integer in [0, {MAX_SEED})"),
        "max_examples": _AT_LEAST_ONE,
    })
    _require(data.max_prompt_length < data.max_length, prefix + "max_prompt_length", data.max_prompt_length,
             f"less than {prefix}max_length ({data.max_length})")
    if data.eval_path is not None:
        _require(bool(data.eval_path.strip()), prefix + "eval_path", data.eval_path, "a file path, or None")
        _require(data.eval_fraction == 0, prefix + "eval_fraction", data.eval_fraction,
                 f"0 when {prefix}eval_path is set (one source of evaluation data)")


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
    # rows sorted by length, each micro-batch run at the shortest of this many fractions of the batch's length
    # that holds its rows (1: every micro-batch at the batch's length); padded SFT, reward and DPO batches
    length_buckets: int = 1
    # optimizer steps run in one compiled call (a `lax.scan` over that many batches; SFT, reward, DPO and KTO
    # stages): on a CPU, XLA frees and maps a step's temporaries again at every call, so K steps a call fault
    # them in once (`training.calls`)
    steps_per_call: int = 1


def _check_optimizer(optimizer: OptimizerConfig, prefix: str) -> None:
    _check_range(optimizer, prefix, {
        "learning_rate": _POSITIVE, "weight_decay": _NON_NEGATIVE, "b1": _HALF_OPEN_UNIT,
        "b2": _HALF_OPEN_UNIT, "eps": _POSITIVE, "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
        "grad_clip": _POSITIVE, "micro_batches": _AT_LEAST_ONE,
        "length_buckets": _AT_LEAST_ONE, "steps_per_call": _AT_LEAST_ONE,
    })


@_config
class MeshConfig:
    """Device mesh axis sizes; -1 means "all the remaining devices" (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def _check_mesh(mesh: MeshConfig, prefix: str) -> None:
    rest_axes = []
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(mesh, axis)
        _require(size == -1 or size >= 1, prefix + axis, size, "an integer >= 1, or -1 for the remaining devices")
        if size == -1:
            rest_axes.append(axis)
            _require(len(rest_axes) == 1, prefix + axis, size,
                     f"at most one axis set to -1 ({prefix}{rest_axes[0]} is already -1)")


@_config
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 2


def _check_checkpoint(checkpoint: CheckpointConfig, prefix: str) -> None:
    _check_range(checkpoint, prefix, {"every_steps": _AT_LEAST_ONE, "keep_last": _AT_LEAST_ONE})


@_config
class LoggingConfig:
    every_steps: int = 10
    tensorboard: bool = False  # also write TensorBoard event files under <run_dir>/<stage>/
    sample_every: int | None = 100  # log generated samples every N steps; None: never


def _check_logging(logging: LoggingConfig, prefix: str) -> None:
    _check_range(logging, prefix, {"every_steps": _AT_LEAST_ONE, "sample_every": _AT_LEAST_ONE})


@_config
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, arXiv:2106.09685): W x + (alpha / rank) b(a(x)).

    ``targets`` are regular expressions searched in the path of each projection inside the decoder
    layers, e.g. ``layers/self_attn/q_proj`` or ``layers/mlp/down_proj``; every pattern must match one.
    """

    rank: int = 0  # 0: off (full fine-tuning); e.g. 8 or 16
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("self_attn/q_proj", "self_attn/v_proj")


def _check_lora(lora: LoRAConfig, prefix: str) -> None:
    _check_range(lora, prefix, {"rank": (lambda v: v >= 0, "an integer >= 0 (0: off)"), "alpha": _POSITIVE})
    _require(bool(lora.targets), prefix + "targets", lora.targets, "at least one projection pattern")
    for pattern in lora.targets:
        try:
            re.compile(pattern)
        except re.error as error:
            raise _bad(prefix + "targets", pattern, f"a regular expression ({error})") from None

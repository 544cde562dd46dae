"""What the stage runners share: loading roles, building datasets and optimizers, the resumable loop.

The loop is the only place with Python control flow, progress bars, logging and checkpoints; the maths
lives in `rlhf_jax.trainers` as pure jitted steps.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np

from rlhf_jax.config import DataConfig, ExperimentConfig, Stage, data_reference, model_for, stage_data, stage_optimizer
from rlhf_jax.config.names import STAGE_DATA_FILES
from rlhf_jax.errors import UserError
from rlhf_jax.models.config import DecoderConfig
from rlhf_jax.training.accumulate import LENGTH_BUCKET, order_by_length
from rlhf_jax.training.artifacts import is_artifact, load_artifact
from rlhf_jax.training.checkpoint import Checkpointer
from rlhf_jax.training.logs import MetricsLogger
from rlhf_jax.training.preemption import should_stop, stopped, training_loop
from rlhf_jax.training.state import TrainState, make_optimizer


class StagePrograms(NamedTuple):
    """What a training stage compiles, built once by its module's ``programs(experiment, stage, config)`` and
    read by its ``run`` and ``dry_run`` (on real arrays) and by ``--plan`` (`rlhf_jax.plan`, on abstract ones):
    a stage is wired in one place.

    - ``name``: the train step's name in plans and reports ("sft", "reward", "dpo", "kto");
    - ``step``: ``(*bases, state, batch) -> (state, metrics)``, bound to the model config, the loss, the
      micro-batch count and LoRA (`bind_base`);
    - ``batch``: ``(rows, length) -> {key: (shape, dtype)}``, the step's batch as the loader gives it, before any
      reference log-probs;
    - ``reference_pass``: ``(reference config, reference params, batch) -> {key: [B]}``, the frozen reference's
      log-probs that the step reads from its batch (un-jitted), or None when the stage needs no reference;
    - ``keep``: subtrees trained whole under LoRA (the reward model's head);
    - ``trainable``: ``params -> bool tree`` of what the optimizer updates (None: everything).
    """

    name: str
    step: Callable
    batch: Callable[[int, int], dict]
    reference_pass: Callable | None = None
    keep: tuple[str, ...] = ()
    trainable: Callable | None = None


def token_batch(rows: int, length: int, prefixes: tuple[str, ...] = ("",),
                keys: tuple[str, ...] = ("tokens", "attention_mask", "loss_mask")) -> dict:
    """``{prefix + key: ((rows, length), dtype)}``: int32 tokens, bool masks (`StagePrograms.batch`)."""
    import jax.numpy as jnp

    return {prefix + key: ((rows, length), jnp.int32 if key == "tokens" else jnp.bool_)
            for prefix in prefixes for key in keys}


@dataclasses.dataclass
class Role:
    """A loaded model: `kind` is "lm" or "scalar" (params {"backbone", "head"})."""

    config: DecoderConfig
    params: Any
    tokenizer: Any | None
    kind: str
    metadata: dict


def load_role(experiment: ExperimentConfig, source: str | None, resolve: Callable[[str], str],
              with_tokenizer: bool = True) -> Role:
    """Load a model for a stage from `source` (None: the experiment's model), with the experiment's dtypes."""
    spec = model_for(experiment, source)
    resolved = resolve(spec.source)
    if is_artifact(Path(resolved) / "model"):  # a stage directory: its output model
        resolved = str(Path(resolved) / "model")
    if is_artifact(resolved):
        artifact = load_artifact(resolved, with_tokenizer)
        config = dataclasses.replace(artifact.config, dtype=spec.dtype, param_dtype=spec.param_dtype,
                                     remat=spec.remat, remat_policy=str(spec.remat_policy),
                                     scan_unroll=spec.scan_unroll)
        params = jax.tree.map(lambda x: x.astype(config.param_dtype), artifact.params)
        return Role(config, params, artifact.tokenizer, artifact.kind, artifact.metadata)
    from rlhf_jax.models import load

    config, params, tokenizer = load(resolved, dtype=spec.dtype, param_dtype=spec.param_dtype,
                                     with_tokenizer=with_tokenizer)
    return Role(dataclasses.replace(config, remat=spec.remat, remat_policy=str(spec.remat_policy),
                                    scan_unroll=spec.scan_unroll), params, tokenizer,
                "lm", {})


def require_language_model(role: Role, what: str) -> None:
    """Refuse a reward/value model where a stage needs a language model (it has no LM head to train or sample)."""
    if role.kind != "lm":
        raise UserError(f"{what}: expected a language model, got a {role.kind} (reward/value) model; point it at "
                        "an SFT stage, a Hugging Face directory or a GGUF file")


def require_tokenizer(role: Role, what: str):
    if role.tokenizer is None:
        raise UserError(f"{what}: the model has no tokenizer; use a model source with one (a GGUF file, a "
                        "Hugging Face directory, or an earlier stage)")
    return role.tokenizer


def adapted_training(stage: Stage, params, dtype, key: jax.Array, keep: tuple[str, ...] = ()) -> tuple[Any, tuple]:
    """(what the stage's train state holds, the frozen inputs of its step) under `stage.lora`.

    LoRA off: (params, ()). On: (the adapters, plus the top-level subtrees named in `keep`, e.g. a scalar
    model's "head"; (the base params in the compute dtype,)): the forward casts weights to that dtype anyway,
    so a bf16 run holds the frozen backbone in half the bytes. A bad `lora.targets` names the stage's key.
    """
    from rlhf_jax.errors import ConfigError
    from rlhf_jax.models.lora import trainable_params

    lora = stage.lora
    if lora.rank == 0:
        return params, ()
    try:
        trainable = trainable_params(params, lora, key, keep)
    except ConfigError as error:  # "stages.sft.lora.targets: ..."
        raise ConfigError(f"stages.{stage.name}.{error}") from None
    return trainable, (jax.tree.map(lambda x: x.astype(dtype), params),)  # never donated: no copy needed


def per_layer_state(stage: Stage, config: DecoderConfig, trainable=None) -> bool:
    """Whether the stage's train state holds the layers' weights one array per layer (`models.layout`,
    `TrainState.create`): for a decoder whose layers are unrolled (`llama.layers_unrolled`, a CPU's default),
    without LoRA or a mask of trainable params, in one process (a checkpoint stacks them on the host)."""
    from rlhf_jax.models import llama

    return (llama.layers_unrolled(config) and stage.lora.rank == 0 and trainable is None
            and jax.process_count() == 1)


class PolicyTraining(NamedTuple):
    """What a stage that trains a language model on a dataset (SFT, DPO, KTO) has before its first step."""

    role: Role
    tokenizer: Any
    dataset: Any
    eval_dataset: Any  # None without a held-out split
    data: DataConfig
    iterator: Any
    total_steps: int
    state: TrainState
    programs: "StagePrograms"
    frozen: tuple  # the step's frozen inputs: under LoRA (the base params,), else ()


def policy_training(experiment: ExperimentConfig, stage: Stage, resolve: Callable[[str], str], source: str | None,
                    data_kind: str, programs: Callable[..., "StagePrograms"], **iterator_settings) -> PolicyTraining:
    """Load the language model ``source`` names and its tokenizer, the stage's ``data_kind`` data, the training
    iterator and step count (`stage_iterator`, ``iterator_settings``), the train state (under LoRA: the adapters,
    the base frozen) and the stage's `programs(experiment, stage, config)`."""
    role = load_role(experiment, source, resolve)
    require_language_model(role, f"stages.{stage.name}.model")
    tokenizer = require_tokenizer(role, f"stages.{stage.name}.model")
    dataset, eval_dataset, data = load_stage_dataset(experiment, stage, data_kind, tokenizer, resolve)
    iterator, total_steps = stage_iterator(experiment, stage, dataset, data, **iterator_settings)
    key = jax.random.key(experiment.seed)
    trainable, frozen = adapted_training(stage, role.params, role.config.dtype, jax.random.fold_in(key, 1))
    state = TrainState.create(trainable, build_optimizer(experiment, stage, total_steps), key,
                              per_layer=per_layer_state(stage, role.config))
    return PolicyTraining(role, tokenizer, dataset, eval_dataset, data, iterator, total_steps, state,
                          programs(experiment, stage, role.config), frozen)


def frozen_reference(experiment: ExperimentConfig, stage: Stage, resolve: Callable[[str], str], role: Role,
                     tokenizer, frozen: tuple, source: str | None) -> tuple[DecoderConfig, Any]:
    """(config, params) of a DPO or KTO stage's frozen reference: the language model `source` names (its
    tokenizer must be the model's: log-prob ratios compare the same token ids), else under LoRA the base itself
    (`frozen[0]`, adapters off), else a copy of the starting weights (the policy's buffers are donated to the
    train step)."""
    if source is None and frozen:
        return role.config, frozen[0]
    if source is None:
        return role.config, jax.tree.map(lambda x: x.copy(), role.params)
    what = f"stages.{stage.name}.reference"
    reference = load_role(experiment, source, resolve)
    require_language_model(reference, what)
    if reference.config.vocab_size != role.config.vocab_size or (
            reference.tokenizer is not None and reference.tokenizer.get_vocab() != tokenizer.get_vocab()):
        raise UserError(f"{what}: its tokenizer differs from the model's; {stage.kind} needs a reference that "
                        "shares one")
    return reference.config, reference.params


def frozen_params(params, dtype):
    """A frozen role's own copy of `params` in the compute dtype: the forward casts weights to it anyway, so
    the outputs are unchanged while bf16 runs hold half the bytes (and never alias a donated train state)."""
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.dtype(dtype), copy=True), params)


def bind_base(step: Callable, lora) -> Callable:
    """`step(state, batch, base=, lora=)` as `step(base, state, batch)` under LoRA (the frozen base first, as
    `place_for_training` passes frozen inputs); the step itself without."""
    if lora.rank == 0:
        return step

    def adapted(base, state, batch):
        return step(state, batch, base=base, lora=lora)

    adapted.__name__ = getattr(step, "__name__", getattr(getattr(step, "func", None), "__name__", "train_step"))
    return adapted


def build_optimizer(experiment: ExperimentConfig, stage: Stage, total_steps: int, trainable=None):
    opt = stage_optimizer(experiment, stage)
    return make_optimizer(
        str(opt.name), opt.learning_rate, weight_decay=opt.weight_decay, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        schedule=str(opt.schedule), warmup_steps=opt.warmup_steps, total_steps=total_steps,
        grad_clip=opt.grad_clip, trainable=trainable,
    )


def stage_data_source(experiment: ExperimentConfig, stage: Stage,
                      resolve: Callable[[str], str] | None = None) -> tuple[DataConfig, str, str]:
    """(data config, path, format) of the data the stage reads.

    A `data_path` of ``stage:<name>`` is the file that earlier stage wrote in its directory (`resolve`: the
    pipeline's resolver; None: the one of `experiment.run_dir`), read as JSONL whatever `data.format` says.
    """
    data = stage_data(experiment, stage)
    if not data.path:
        raise UserError(f"stages.{stage.name}.data_path: no data file (set data.path or the stage's data_path)")
    target = data_reference(data.path)
    if target is None:
        return data, data.path, str(data.format)
    if resolve is None:
        from rlhf_jax.stages import make_resolver

        resolve = make_resolver(experiment, Path(experiment.run_dir).expanduser().resolve())
    path = Path(resolve(data.path)) / STAGE_DATA_FILES[experiment.stage(target).kind]
    if not path.is_file():
        raise UserError(f"stages.{stage.name}.data_path: {data.path} has not written {path} yet; run stage "
                        f"{target!r} first")
    return data, str(path), "jsonl"


def load_stage_dataset(experiment: ExperimentConfig, stage: Stage, kind: str, tokenizer,
                       resolve: Callable[[str], str] | None = None):
    """(train, eval or None) tokenized datasets from the stage's data config (`stage_data_source`)."""
    from rlhf_jax.data import load_dataset
    from rlhf_jax.data.tokenize import TokenizeConfig

    data, path, format = stage_data_source(experiment, stage, resolve)
    tokenize = TokenizeConfig(max_length=data.max_length, max_prompt_length=data.max_prompt_length)
    dataset = load_dataset(path, kind, tokenizer, format=format, config=tokenize)
    if data.max_examples is not None:
        dataset = dataclasses.replace(dataset, examples=dataset.examples[: data.max_examples])
    eval_dataset = None
    if data.eval_path:
        eval_dataset = load_dataset(data.eval_path, kind, tokenizer, format=str(data.format), config=tokenize)
    elif data.eval_fraction > 0:
        order = np.random.default_rng(experiment.seed).permutation(len(dataset))
        held = max(1, int(round(len(dataset) * data.eval_fraction)))
        examples = dataset.examples
        eval_dataset = dataclasses.replace(dataset, examples=[examples[i] for i in sorted(order[:held])])
        dataset = dataclasses.replace(dataset, examples=[examples[i] for i in sorted(order[held:])])
    return dataset, eval_dataset, data


def device_batch(batch: dict, keys: tuple[str, ...] | None = None) -> dict:
    """The arrays a step needs (drops bookkeeping such as `index`; keeps a `length_order`'s lengths)."""
    return {k: v for k, v in batch.items() if k != "index" and (keys is None or k in keys or k == LENGTH_BUCKET)}


def length_order(experiment, stage) -> Callable[[dict], dict]:
    """Host batch -> the batch with its rows ordered for per-micro-batch lengths (``optimizer.length_buckets``,
    `training.accumulate.order_by_length`; apply it first, so that the example `index` moves with its row), or
    the batch as it is: with one bucket, or when each process holds only its rows of the global batch. With
    ``shared_prefix`` the pairs are ordered by the lengths of the rows :func:`shared_pairs` makes of them, and
    each micro-batch runs at a fraction of those rows' length. The SFT, reward and DPO stages apply it."""
    buckets = experiment.optimizer.length_buckets
    if buckets <= 1 or jax.process_count() > 1:
        return lambda batch: batch
    order = functools.partial(order_by_length, num_microbatches=experiment.optimizer.micro_batches, buckets=buckets)
    if not getattr(stage, "shared_prefix", False):
        return order
    from rlhf_jax.data.batching import shared_row_lengths

    def by_row_length(batch):
        needed, length = shared_row_lengths(batch, SHARED_LENGTH_MULTIPLE)
        return order(batch, needed=needed, length=length)

    return by_row_length


def with_length_bucket(experiment, stage, batch: Callable[[int, int], dict]) -> Callable[[int, int], dict]:
    """A `StagePrograms.batch` plus the `LENGTH_BUCKET` array that :func:`length_order` adds to the stage's
    batches, so that ``--plan`` compiles the step the run compiles."""
    buckets = experiment.optimizer.length_buckets
    if buckets <= 1:
        return batch
    import jax.numpy as jnp

    return lambda rows, length: {**batch(rows, length), LENGTH_BUCKET: ((rows, buckets), jnp.bool_)}


def loss_batch(batch: dict, keys: tuple[str, ...], num_microbatches: int = 1, whole: bool = False) -> dict:
    """`device_batch` plus the positions that carry a loss (`trainers.common.with_loss_index`), so the steps run
    the LM head there only. The index refers to the global batch: it is added in a single process, or when
    every process holds the whole batch (`whole`, the whole-set evaluations); otherwise the step computes
    every position, the same numbers."""
    from rlhf_jax.trainers.common import with_loss_index

    batch = device_batch(batch, keys)
    if whole or jax.process_count() == 1:
        batch = with_loss_index(batch, num_microbatches)
    return batch


SHARED_LENGTH_MULTIPLE = 64  # shared-prefix rows are rounded up to a multiple of this many tokens


def shared_pairs(batch: dict, loss_entries: bool = False, whole: bool = False) -> dict:
    """A padded preference batch with each pair in one row, its common prefix once
    (`data.batching.share_prefixes`; ``loss_entries`` for the log-prob losses). In a multi-process run every
    process holds some pairs of the global batch, and the rows (and loss entries) take the length that any pair
    fits, twice the batch's; unless every process holds the whole batch (``whole``, the whole-set passes).
    A `LENGTH_BUCKET` that :func:`length_order` gave the pairs stays with their rows."""
    from rlhf_jax.data.batching import share_prefixes

    lengths = {LENGTH_BUCKET: batch[LENGTH_BUCKET]} if LENGTH_BUCKET in batch else {}  # from `length_order`
    if jax.process_count() > 1 and not whole:
        return share_prefixes(batch, length=2 * batch["chosen_tokens"].shape[1], loss_entries=loss_entries)
    return {**share_prefixes(batch, SHARED_LENGTH_MULTIPLE, loss_entries=loss_entries), **lengths}


def shared_pair_shapes(rows: int, length: int, loss_entries: bool = False) -> dict:
    """`shared_pairs`' arrays for ``rows`` pairs of ``length`` tokens a side, at their longest (two whole
    sequences a row, as many loss entries) (`StagePrograms.batch`)."""
    import jax.numpy as jnp

    from rlhf_jax.data.batching import SHARED_LOSS_KEYS

    row, pair = (rows, 2 * length), (rows,)
    shapes = {"shared_tokens": (row, jnp.int32), "shared_positions": (row, jnp.int32),
              "shared_segment_ids": (row, jnp.int32), "shared_prefix": (row, jnp.bool_),
              "chosen_last": (pair, jnp.int32), "rejected_last": (pair, jnp.int32)}
    if loss_entries:
        shapes.update({key: (row, jnp.int32) for key in SHARED_LOSS_KEYS})
    return shapes


def training_iterator(dataset, **settings):
    """The training `DataIterator`: in a multi-process run each process yields its rows of every global
    batch (`batch_size` stays the global batch size; `place_batch` assembles the global arrays)."""
    from rlhf_jax.data import DataIterator

    return DataIterator(dataset, process_index=jax.process_index(), process_count=jax.process_count(), **settings)


def stage_iterator(experiment: ExperimentConfig, stage: Stage, dataset, data, **settings):
    """(the training iterator over ``dataset`` in batches of ``data.batch_size`` for ``stage.epochs``, the stage's
    step count): ``max_steps`` capped by the epochs' batches, or all of them. ``settings`` go to `DataIterator`
    (packing: each epoch's batches are counted from its packing plan)."""
    iterator = training_iterator(dataset, batch_size=data.batch_size, seed=data.shuffle_seed or experiment.seed,
                                 num_epochs=stage.epochs, **settings)
    batches = iterator.num_batches()
    return iterator, batches if stage.max_steps is None else min(stage.max_steps, batches)


def whole_set_evaluator(eval_step: Callable, mesh=None) -> tuple[Callable, Callable[[dict], dict]]:
    """(jitted `eval_step(params, batch)`, batch placer) for a pass over a whole held-out set.

    With `mesh` (where the params live), each host batch is replicated over the mesh and so are the
    outputs: every process of a multi-process run iterates the whole set in the same order (the last batch
    may be short: no per-process split is needed) and reads the same results. The data-parallel devices
    repeat each other's work, which is cheap for held-out sets. Without a mesh: plain `jax.jit`.
    """
    if mesh is None:
        return jax.jit(eval_step), lambda batch: batch
    from rlhf_jax.sharding import place_state, replicated

    sharding = replicated(mesh)
    return (jax.jit(eval_step, out_shardings=sharding),
            lambda batch: place_state(batch, jax.tree.map(lambda _: sharding, batch)))


def outputs_over(eval_step: Callable, params, dataset, batch_size: int, host_batch: Callable[[dict], dict],
                 mesh=None):
    """`eval_step(params, host_batch(batch))`'s outputs over every example of `dataset`, in order, each leaf [B]
    concatenated to [N] (e.g. (chosen, rejected) rewards, or `PairLogps` records; a whole-set pass: see
    `whole_set_evaluator`). `host_batch` turns a loader batch into the step's (host numpy). `dataset`: a
    `TokenizedDataset`, batched here, or a list of its loader batches, taken as they are."""
    from rlhf_jax.data import DataIterator

    iterator = dataset if isinstance(dataset, list) else DataIterator(
        dataset, batch_size=min(batch_size, len(dataset)), shuffle=False, drop_remainder=False)
    step, place = whole_set_evaluator(eval_step, mesh)
    outputs = [jax.device_get(step(params, place(host_batch(batch)))) for batch in iterator]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def pair_outputs_over(eval_step: Callable, params, dataset, batch_size: int, keys: tuple[str, ...],
                      mesh=None, shared_prefix: bool = False):
    """:func:`outputs_over` a preference `dataset`, each batch the `keys` with their loss index, or with
    ``shared_prefix`` each pair in one row with its common prefix once (:func:`shared_pairs`, with loss entries
    when `keys` hold the loss masks); `eval_step` reads either."""
    if shared_prefix:
        host_batch = functools.partial(shared_pairs, loss_entries="chosen_loss_mask" in keys, whole=True)
    else:
        host_batch = functools.partial(loss_batch, keys=keys, whole=True)
    return outputs_over(eval_step, params, dataset, batch_size, host_batch, mesh)


def with_reference_logps(reference_fn: Callable, reference, mesh, host_batch: Callable[[dict], dict]):
    """Loader batch -> the step's batch on the mesh with the frozen reference's log-probs merged in:
    `host_batch(batch)` placed, then `reference_fn(reference, batch)` (a dict of [B] arrays, jitted) under the
    mesh. DPO and KTO give their own `host_batch` and `reference_fn`."""
    from rlhf_jax.sharding import place_batch, use_mesh

    def prepare(batch):
        batch = place_batch(host_batch(batch), mesh)
        with use_mesh(mesh):
            logps = reference_fn(reference, batch)
        return place_batch({**batch, **logps}, mesh)

    return prepare


def fit(
    *,
    experiment: ExperimentConfig,
    stage: Stage,
    stage_dir: Path,
    state: TrainState,
    step_fn: Callable[[TrainState, dict], tuple[TrainState, dict]],
    batches: Iterator[dict],
    total_steps: int,
    host_state: Callable[[], dict],
    restore_host_state: Callable[[dict], None],
    prepare: Callable[[dict], dict] = device_batch,
    after_step: Callable[[int, MetricsLogger], None] | None = None,
    evaluate: Callable[[TrainState], dict] | None = None,
    eval_every: int | None = None,
) -> tuple[TrainState, list[dict]]:
    """Run `step_fn` until `total_steps`, resuming from the latest checkpoint under `stage_dir`.

    Checkpoints (every `checkpoint.every_steps` and at the end) hold the state and `host_state()` (the data
    position...). Metrics go to `<stage_dir>/metrics.jsonl` (+ TensorBoard) every `logging.every_steps`;
    `after_step(step, logger)` runs after each step (e.g. to log samples). `state` is any pytree with a
    `step` (steps done). With `evaluate(state) -> metrics`, held-out metrics are logged at step 0 (before
    training; not again on a resume), every `eval_every` steps and after the last step, in that step's record.
    Returns the final state and the logged metric records.

    `step_fn` is one step, `(state, batch) -> (state, metrics)`, or a `training.calls.StepCalls` that runs up to
    its `steps_per_call` steps a call (`optimizer.steps_per_call`). A call then takes the next batches up to
    the next checkpoint or evaluation (so both see the state after a whole call), and ends early at a batch of
    another shape, which starts the next call; a checkpoint saved while such a batch waits records the data
    position before it. Each step's metrics are logged as they would be one step a call; ``time/step`` shares a
    call's time equally among its steps.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rlhf_jax.training.calls import joins, one_step_calls

    checkpointer = Checkpointer(stage_dir / "checkpoints", experiment.checkpoint.every_steps,
                                experiment.checkpoint.keep_last)
    start = 0
    if checkpointer.latest_step() is not None:
        state, saved = checkpointer.restore(state)
        restore_host_state(saved)
        start = int(state.step)
    logger = MetricsLogger(stage_dir, tensorboard=experiment.logging.tensorboard, resume_step=start)
    records: list[dict] = []
    every = max(experiment.logging.every_steps, 1)
    columns = (TextColumn(f"[bold]{stage.name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}"))
    step = start
    per_call = getattr(step_fn, "steps_per_call", 1)
    calls = step_fn if per_call > 1 else one_step_calls(step_fn)
    waiting: list = []  # [(a prepared batch that ends a call, the host state before it)]: it starts the next

    def evaluation_due(step: int) -> bool:
        return evaluate is not None and (step == total_steps or bool(eval_every) and step % eval_every == 0)

    def timed_evaluation(state) -> dict:
        evaluation_start = time.perf_counter()
        metrics = dict(jax.device_get(evaluate(state)))
        return {**metrics, "time/eval": time.perf_counter() - evaluation_start}

    def call_size(step: int) -> int:
        """Steps of the next call: up to the next checkpoint or evaluation, and the last step."""
        size = min(per_call, total_steps - step)
        for interval in (experiment.checkpoint.every_steps, eval_every if evaluate is not None else None):
            if interval and interval > 0:
                size = min(size, interval - step % interval)
        return size

    def next_batches(size: int) -> list:
        """Up to `size` prepared batches of one shape (fewer at the data's end)."""
        taken = []
        while len(taken) < size:
            if waiting:
                batch, _ = waiting.pop()
            else:
                before = host_state() if per_call > 1 else None
                try:
                    batch = prepare(next(batches))
                except StopIteration:
                    break
                if not joins(taken, batch, per_call):
                    waiting.append((batch, before))
                    break
            taken.append(batch)
        return taken

    def saved_host_state() -> dict:
        return waiting[0][1] if waiting else host_state()

    with Progress(*columns, transient=False) as progress, training_loop():
        if evaluate is not None and start == 0:
            records.append({"step": 0, **logger.log(0, timed_evaluation(state))})
        task = progress.add_task(stage.name, total=total_steps, completed=start, status="")
        mark, elapsed = time.perf_counter(), 0.0  # `elapsed`: the time of the steps since the last log
        while step < total_steps:
            taken = next_batches(call_size(step))
            if not taken:
                break
            state, step_metrics = calls(state, taken)
            now = time.perf_counter()
            share, mark = (now - mark) / len(taken), now  # what follows a call counts in the next one's time
            for metrics in step_metrics:
                step += 1
                elapsed += share
                check_finite_losses(metrics, step, stage.name)
                evaluated = evaluation_due(step)  # only at a call's last step (`call_size`)
                if evaluated:  # its time is reported as time/eval, not in time/step
                    metrics = {**metrics, **timed_evaluation(state)}
                    mark += metrics["time/eval"]
                if step % every == 0 or step == total_steps or evaluated:
                    metrics = {**jax.device_get(metrics), "time/step": elapsed / every}
                    elapsed = 0.0
                    values = logger.log(step, metrics)
                    records.append({"step": step, **values})
                    shown = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in list(values.items())[:3])
                    progress.update(task, status=shown)
                progress.update(task, completed=step)
                if after_step is not None:
                    after_step(step, logger)
            if should_stop(step):
                checkpointer.save(step, state, saved_host_state(), force=checkpointer.latest_step() != step)
                checkpointer.close()
                logger.close()
                raise stopped(stage.name, step)
            checkpointer.save(step, state, saved_host_state())
    checkpointer.save(step, state, saved_host_state(), force=checkpointer.latest_step() != step)
    checkpointer.close()
    logger.close()
    return state, records


def check_finite_losses(metrics: dict, step: int, stage_name: str) -> None:
    """Stop (before this step is checkpointed) when a loss is NaN or infinite."""
    for name, value in metrics.items():
        if name.endswith("loss") and not np.isfinite(np.asarray(value)).all():
            raise UserError(f"stage {stage_name}: {name} is {float(np.asarray(value))} at step {step}; stopping "
                            "(lower the learning rate, check the data, or enable gradient clipping); the last "
                            "checkpoint is kept and no model was written")


def write_summary(stage_dir: Path, title: str, values: dict[str, float]) -> None:
    """Print a final summary table and keep it as `<stage_dir>/summary.json`."""
    import json

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in values.items():
        table.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value))
    Console().print(table)
    from rlhf_jax.distributed import is_main_process

    if is_main_process():
        (stage_dir / "summary.json").write_text(json.dumps(values, indent=1))


def dry_run_source(experiment: ExperimentConfig, source: str | None, resolve: Callable[[str], str]) -> str | None:
    """For a dry run: a `stage:` reference whose stage has not produced its model yet is replaced by the model
    that stage starts from (followed up the chain), so shapes, tokenizer and data can still be checked."""
    from rlhf_jax.config import SourceKind, parse_source

    while source is not None and parse_source(source, "source").kind is SourceKind.STAGE:
        produced = Path(resolve(source))
        if is_artifact(produced / "model"):
            return source
        upstream = experiment.stage(parse_source(source, "source").value)
        source = getattr(upstream, "model", None) or getattr(upstream, "policy", None)
    return source


def dry_run_data_path(experiment: ExperimentConfig, stage: Stage, resolve: Callable[[str], str]) -> str | None:
    """For a dry run: a `data_path` naming an earlier stage's data that is not written yet is replaced by the data
    that stage reads (followed up the chain), so tokenization and batches can still be checked."""
    path = getattr(stage, "data_path", None)
    while (target := data_reference(path)) is not None:
        if (Path(resolve(path)) / STAGE_DATA_FILES[experiment.stage(target).kind]).is_file():
            return path
        path = stage_data(experiment, experiment.stage(target)).path
    return path


def call_options(experiment: ExperimentConfig) -> dict:
    """`sharding.place_for_training`'s settings for a stage's train step: ``optimizer.steps_per_call`` and the
    micro-batches its batches' loss indexes are laid out for."""
    return {"steps_per_call": experiment.optimizer.steps_per_call,
            "micro_batches": experiment.optimizer.micro_batches}


def compile_train_step(experiment: ExperimentConfig, name: str, step, state, batch, mesh, frozen: tuple = ()
                       ) -> dict[str, float]:
    """A dry run's :func:`compile_report` of the train step `step(*frozen, state, batch)` as the stage's run
    compiles it (`sharding.place_for_training`): with ``optimizer.steps_per_call`` > 1, the program of that many
    steps, on `batch` repeated."""
    from rlhf_jax.sharding import param_shardings, shard_train_step, state_shardings

    calls = experiment.optimizer.steps_per_call
    frozen_shardings = tuple(param_shardings(params, mesh) for params in frozen)
    program = shard_train_step(step, state_shardings(state, mesh), mesh, frozen_shardings=frozen_shardings,
                               steps_per_call=calls)
    if calls > 1:
        batch = (jax.tree.map(lambda leaf: np.stack([np.asarray(leaf)] * calls), batch), np.int32(calls))
    return compile_report(name if calls == 1 else f"{name} ({calls} steps a call)", program, *frozen, state, batch)


def compile_report(name: str, step_fn, *args) -> dict[str, float]:
    """Compile `step_fn(*args)` ahead of time (nothing runs) and print its memory analysis."""
    start = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    report = {"compile_seconds": seconds}
    if analysis is not None:
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
            report[field] = float(getattr(analysis, field, 0) or 0)
    sizes = ", ".join(f"{k.replace('_size_in_bytes', '')} {v / 2**20:.1f} MiB" for k, v in report.items()
                      if k.endswith("bytes"))
    print(f"  {name}: compiled in {seconds:.1f} s; {sizes}")
    return report

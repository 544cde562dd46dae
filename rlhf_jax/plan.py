"""Memory plans: compile each stage's real steps ahead of time on abstract arrays and report per-device bytes.

    python -m rlhf_jax.launch experiment=ppo_7b --plan [--devices 8] [--accelerator a100-80gb] [--stage NAME]

Nothing is allocated: parameters are `jax.ShapeDtypeStruct`s (`llama2:*` sources give exactly that), states
come from `jax.eval_shape`, and each program (SFT/RM/DPO/KTO train step; for PPO, GRPO, RLOO and REINFORCE the
update of a whole iteration, the experience pass and the sampler) is lowered with the stage's explicit
shardings on the configured mesh and compiled. Per device:

- trained params and optimizer state: exact, from each array's shard shape under its `NamedSharding`; under
  LoRA (`stages.<name>.lora`) the adapters (and a scalar model's head) only;
- frozen bases: under LoRA, the base weights every program reads, in the compute dtype (bf16 for large
  runs); the reference *is* the policy's base and a PPO critic's base *is* the reward model, counted once;
- frozen roles (reference and reward model, DPO reference) in the compute dtype, when they are not a base;
- temporaries: the largest `temp_size_in_bytes` of the stage's compiled programs (activations, gradients,
  the KV cache of one `generation_batch_size` chunk), from XLA's memory analysis on this backend (a CPU
  estimate of the accelerator's figure).

On a CPU the device count is faked (``--xla_force_host_platform_device_count``) so the mesh is the real one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rlhf_jax.config import ExperimentConfig, SourceKind, StageKind, model_for, parse_source, stage_data
from rlhf_jax.errors import UserError

# The training stages whose module builds their programs (`stages.common.StagePrograms`): `--plan` compiles what
# their runs compile.
TRAINING_STAGES = {StageKind.SFT: "rlhf_jax.stages.sft", StageKind.REWARD: "rlhf_jax.stages.reward",
                   StageKind.DPO: "rlhf_jax.stages.dpo", StageKind.KTO: "rlhf_jax.stages.kto"}

GIB = 2**30
# Usable device memory (what the driver reports), bytes.
ACCELERATORS: dict[str, int] = {
    "a100-40gb": 40 * GIB,
    "a100-80gb": 80 * GIB,
    "h100-80gb": 80 * GIB,
    "h200-141gb": 141 * GIB,
}
DEFAULT_ACCELERATOR = "a100-80gb"
# Headroom left for the runtime, fragmentation and collectives' buffers.
USABLE_FRACTION = 0.9


@dataclasses.dataclass
class StagePlan:
    """Per-device bytes of one stage on a mesh; `programs` maps program name -> (temp bytes, compile s)."""

    stage: str
    kind: str
    mesh: dict[str, int]
    trained_params: int = 0
    optimizer_state: int = 0
    frozen_roles: int = 0  # reference, reward model: what `offload_frozen` parks in host memory
    frozen_bases: int = 0  # LoRA's frozen base weights: read by every program, always on the devices
    programs: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)
    note: str = ""
    frozen_offloaded: bool = False  # frozen roles on the devices only during `FROZEN_PROGRAM`

    FROZEN_PROGRAM = "experience pass"

    @property
    def temporaries(self) -> int:
        return max((temp for temp, _ in self.programs.values()), default=0)

    @property
    def total(self) -> int:
        states = self.trained_params + self.optimizer_state + self.frozen_bases
        if not self.frozen_offloaded:
            return states + self.frozen_roles + self.temporaries
        peaks = [temp + (self.frozen_roles if name == self.FROZEN_PROGRAM else 0)
                 for name, (temp, _) in self.programs.items()]
        return states + max(peaks, default=self.frozen_roles)


def device_bytes(tree) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs carrying `.sharding`)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.shape
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        tree, shardings)


def _root_source(experiment: ExperimentConfig, source: str | None) -> str:
    """A `stage:` reference followed up to the model its chain starts from (plans have no stage outputs)."""
    while True:
        spec = model_for(experiment, source)
        parsed = parse_source(spec.source, "source")
        if parsed.kind is not SourceKind.STAGE:
            return source
        upstream = experiment.stage(parsed.value)
        source = getattr(upstream, "model", None) or getattr(upstream, "policy", None)


def _abstract_model(experiment: ExperimentConfig, source: str | None):
    """(DecoderConfig, abstract LM params) of a role, in the experiment's dtypes."""
    from rlhf_jax.models import load

    spec = model_for(experiment, _root_source(experiment, source))
    config, params, _ = load(spec.source, dtype=spec.dtype, param_dtype=spec.param_dtype, with_tokenizer=False)
    # the program an accelerator runs: by default one layer per scan iteration (`llama.layer_unroll`)
    config = dataclasses.replace(config, remat=spec.remat, remat_policy=str(spec.remat_policy),
                                 scan_unroll=spec.scan_unroll or 1)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return config, params


def _abstract_scalar_model(config, params):
    from rlhf_jax.models import llama

    return jax.eval_shape(lambda p: llama.init_scalar_model(config, p, jax.random.key(0)), params)


def _abstract_state(params, tx):
    from rlhf_jax.training.state import TrainState

    return jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.key(0)), params)


def _frozen(params, dtype) -> Any:
    """A frozen role as the stage holds it: params only, in the compute dtype."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)), params)


def _compile(name: str, function: Callable, args: tuple, in_shardings, out_shardings, mesh, donate=()) -> tuple:
    from rlhf_jax.sharding import activation_rules

    def traced(*a):
        with activation_rules(mesh):
            return function(*a)

    start = time.perf_counter()
    compiled = jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                       donate_argnums=donate).lower(*args).compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis is not None else 0
    return temp, seconds


def _batch_struct(shapes: dict[str, tuple[tuple[int, ...], Any]], mesh):
    from rlhf_jax.sharding import batch_sharding

    sharding = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def _optimizer(experiment, stage, trainable=None):
    from rlhf_jax.stages.common import build_optimizer

    return build_optimizer(experiment, stage, total_steps=1000, trainable=trainable)


def _train_state(experiment, stage, params, mesh, trainable=None):
    from rlhf_jax.sharding import state_shardings

    state = _abstract_state(params, _optimizer(experiment, stage, trainable))
    shardings = state_shardings(state, mesh)
    return _with_shardings(state, shardings), shardings


def _placed_frozen(params, dtype, mesh):
    """A frozen tree in the compute dtype with its `param_shardings`: (structs, shardings)."""
    from rlhf_jax.sharding import param_shardings

    frozen = _frozen(params, dtype)
    shardings = param_shardings(frozen, mesh)
    return _with_shardings(frozen, shardings), shardings


@dataclasses.dataclass
class _Trained:
    """A trained role as its stage holds it (`stages.common.adapted_training`): the train state of what it
    trains and, under LoRA, the frozen base in the compute dtype (`bases`: () or (base,))."""

    state: Any
    shardings: Any
    bases: tuple
    base_shardings: tuple


def _trained(experiment, stage, params, dtype, mesh, keep: tuple[str, ...] = (), trainable=None) -> _Trained:
    from rlhf_jax.models.lora import trainable_params

    lora = stage.lora
    if lora.rank == 0:
        state, shardings = _train_state(experiment, stage, params, mesh, trainable)
        return _Trained(state, shardings, (), ())
    adapters = jax.eval_shape(lambda p: trainable_params(p, lora, jax.random.key(0), keep), params)
    state, shardings = _train_state(experiment, stage, adapters, mesh)
    base, base_shardings = _placed_frozen(params, dtype, mesh)
    return _Trained(state, shardings, (base,), (base_shardings,))


def _full(lora, bases: tuple, trainable):
    """The params a forward runs: `trainable`, or under LoRA the base with the adapters (`full_params`)."""
    from rlhf_jax.models.lora import full_params

    return full_params(bases[0], trainable, lora) if bases else trainable


def _check_batch(rows: int, what: str, mesh) -> None:
    from rlhf_jax.sharding import batch_shards

    shards = batch_shards(mesh)
    if rows % shards:
        raise UserError(f"{what}={rows} is not divisible by mesh data*fsdp={shards}; choose a multiple of {shards}")


def _compile_train_step(name: str, step, trained: _Trained, batch, mesh, steps_per_call: int = 1) -> tuple:
    """`step(*bases, state, batch) -> (state, metrics)` compiled as `shard_train_step` compiles it: with
    `steps_per_call` > 1, that many steps in one program (`training.calls.in_one_call`, the batches stacked)."""
    from rlhf_jax.sharding import replicated, stacked_batch_sharding
    from rlhf_jax.training.calls import in_one_call

    shardings = batch_sharding_of(batch)
    if steps_per_call > 1:
        step = in_one_call(step, steps_per_call, len(trained.bases) + 1)
        stacked, count = stacked_batch_sharding(mesh), replicated(mesh)
        batch = (jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((steps_per_call, *leaf.shape), leaf.dtype,
                                                                sharding=stacked), batch),
                 jax.ShapeDtypeStruct((), jnp.int32, sharding=count))
        shardings = (stacked, count)
    return _compile(name, step, (*trained.bases, trained.state, batch),
                    (*trained.base_shardings, trained.shardings, shardings),
                    (trained.shardings, replicated(mesh)), mesh, donate=(len(trained.bases),))


def _account_trained(plan: "StagePlan", *roles: _Trained) -> None:
    plan.trained_params = sum(device_bytes(role.state.params) for role in roles)
    plan.optimizer_state = sum(device_bytes(role.state.opt_state) for role in roles)
    plan.frozen_bases = sum(device_bytes(role.bases) for role in roles)


def plan_stage(experiment: ExperimentConfig, stage, mesh) -> StagePlan:
    """Compile the stage's programs for `mesh` on abstract arrays and account its per-device bytes."""
    from rlhf_jax.sharding import validate_mesh_for_model

    plan = StagePlan(stage=stage.name, kind=str(stage.kind), mesh=dict(mesh.shape))
    data = stage_data(experiment, stage) if hasattr(stage, "data_path") else experiment.data
    if stage.kind in TRAINING_STAGES:
        config, params = _abstract_model(experiment, stage.model)
        # the stage's own builder: the step, batch and reference pass its run and dry run compile
        built = importlib.import_module(TRAINING_STAGES[stage.kind]).programs(experiment, stage, config)
        validate_mesh_for_model(config, mesh)
        rows, length = data.batch_size, data.max_length
        _check_batch(rows, f"stages.{stage.name} batch size", mesh)
        if stage.kind is StageKind.REWARD:
            params = _abstract_scalar_model(config, params)
        trained = _trained(experiment, stage, params, config.dtype, mesh, keep=built.keep, trainable=built.trainable)
        batch = _batch_struct(built.batch(rows, length), mesh)
        if built.reference_pass is not None:
            batch = _with_reference_program(experiment, stage, config, trained, mesh, plan, built.reference_pass,
                                            batch)
        plan.programs[f"{built.name} train step"] = _compile_train_step(built.name, built.step, trained, batch, mesh,
                                                                        experiment.optimizer.steps_per_call)
        _account_trained(plan, trained)
        return plan
    if stage.kind in (StageKind.PPO, StageKind.GRPO, StageKind.RLOO, StageKind.REINFORCE):
        return _plan_rl(experiment, stage, mesh, data, plan)
    plan.note = f"no memory plan for {stage.kind} stages in this version"
    return plan


def batch_sharding_of(batch):
    return jax.tree.map(lambda leaf: leaf.sharding, batch)


def _with_reference_program(experiment, stage, config, trained: _Trained, mesh, plan: StagePlan, reference_pass,
                            batch) -> dict:
    """A DPO or KTO stage's frozen reference and its log-prob program: under LoRA with no `reference` of its own
    the policy's base (no bytes of its own), else a frozen copy of `reference` (or the model). Compiles
    `reference_pass(reference config, reference, batch)` (`StagePrograms.reference_pass`) as "reference log-probs"
    and returns `batch` plus its outputs' structs (the train step's batch)."""
    if trained.bases and stage.reference in (None, stage.model):
        reference, reference_shardings = trained.bases[0], trained.base_shardings[0]
    else:
        config, reference_params = _abstract_model(experiment, stage.reference or stage.model)
        reference, reference_shardings = _placed_frozen(reference_params, config.dtype, mesh)
        plan.frozen_roles = device_bytes(reference)
    reference_pass = functools.partial(reference_pass, config)
    plan.programs["reference log-probs"] = _compile("reference", reference_pass, (reference, batch),
                                                    (reference_shardings, batch_sharding_of(batch)), None, mesh)
    logps = jax.eval_shape(reference_pass, reference, batch)
    return {**batch, **_batch_struct({k: (v.shape, v.dtype) for k, v in logps.items()}, mesh)}


def _reward_is_model(source: str) -> bool:
    return parse_source(source, "source").kind not in (SourceKind.FUNCTION, SourceKind.TEXT)


def _plan_rl(experiment, stage, mesh, data, plan: StagePlan) -> StagePlan:
    """PPO, GRPO, RLOO, REINFORCE: the sampler (one chunk of `generation_batch_size` sequences), the experience
    pass (log-probs, values, reward model scores, advantages) and the update of a whole iteration.

    Roles, as `stages.rl` holds them: the policy's train state (under LoRA its adapters, the base frozen in
    the compute dtype); the reference (none when `algorithm.use_reference` is false; under LoRA with no
    `reference` of its own, the policy's base: no bytes of its own; else a frozen copy); the reward model
    (frozen, when `reward_model` is a model); PPO's critic (trained; under LoRA adapters + head on the critic's
    base, which is the reward model's very weights when `critic` is None). Bases every program reads stay on
    the devices (`frozen_bases`); the reference and reward model, when no base, are what `offload_frozen` parks.
    """
    from rlhf_jax.rewards import model_scores
    from rlhf_jax.sampling.sampler import SamplingSettings, batch_bucket, generate
    from rlhf_jax.sharding import batch_shards, batch_sharding, replicated, validate_mesh_for_model
    from rlhf_jax.config.rl import with_shared_prefix
    from rlhf_jax.stages.rl import programs as rl_programs

    stage = with_shared_prefix(stage, experiment.optimizer.micro_batches, batch_shards(mesh))  # as the stage decides
    rep = replicated(mesh)
    lora, algorithm = stage.lora, stage.algorithm
    policy_config, policy_params = _abstract_model(experiment, stage.policy)
    validate_mesh_for_model(policy_config, mesh)
    policy = _trained(experiment, stage, policy_params, policy_config.dtype, mesh)
    frozen, frozen_shardings = {}, {}  # the offloadable roles: reference, reward model
    if algorithm.use_reference and not (policy.bases and stage.reference is None):
        _, reference_params = _abstract_model(experiment, stage.reference or stage.policy)
        frozen["reference"], frozen_shardings["reference"] = _placed_frozen(reference_params, policy_config.dtype,
                                                                            mesh)
    reward_config = None
    if _reward_is_model(stage.reward_model):
        reward_config, reward_lm = _abstract_model(experiment, stage.reward_model)
        validate_mesh_for_model(reward_config, mesh)
        frozen["reward"], frozen_shardings["reward"] = _placed_frozen(
            _abstract_scalar_model(reward_config, reward_lm), reward_config.dtype, mesh)
    critic, critic_config, critic_is_reward = None, None, False
    if algorithm.has_critic:
        critic_source = stage.critic if stage.critic is not None else stage.reward_model
        critic_config, critic_lm = _abstract_model(experiment, critic_source)
        critic = _trained(experiment, stage, _abstract_scalar_model(critic_config, critic_lm), critic_config.dtype,
                          mesh, keep=("head",))
        if critic.bases and stage.critic is None and "reward" in frozen:
            # the critic's base is the reward model's own arrays: resident for the update, counted once
            critic_is_reward = True
            critic.bases, critic.base_shardings = (frozen.pop("reward"),), (frozen_shardings.pop("reward"),)
    roles = (policy,) if critic is None else (policy, critic)
    sequences = stage.rollout_batch_size * algorithm.group_size
    _check_batch(sequences, f"stages.{stage.name}.rollout_batch_size*group_size", mesh)
    _check_batch(algorithm.mini_batch_size, f"stages.{stage.name}.algorithm.mini_batch_size", mesh)
    rows_sharding = batch_sharding(mesh)
    prompt_length, new_tokens = data.max_prompt_length, stage.max_new_tokens

    def rollout_arrays(rows):
        shapes = ((rows, prompt_length), jnp.int32), ((rows, prompt_length), jnp.bool_), \
                 ((rows, new_tokens), jnp.int32), ((rows, new_tokens), jnp.bool_), ((rows,), jnp.bool_)
        return tuple(jax.ShapeDtypeStruct(s, d, sharding=rows_sharding) for s, d in shapes)

    # the sampler: one chunk of generation_batch_size sequences (padded as `Sampler` pads), its KV cache
    chunk = stage.generation_batch_size or sequences
    shards = batch_shards(mesh)
    chunk_rows = shards * math.ceil(batch_bucket(chunk) / shards)
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=algorithm.temperature, eos_token_ids=(2,),
                                pad_token_id=0)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)

    def sample(bases, trainable, prompt_tokens, prompt_mask, key):
        return generate(policy_config, _full(lora, bases, trainable), prompt_tokens, prompt_mask, key, settings)

    plan.programs[f"sampler ({chunk_rows} sequences at once)"] = _compile(
        "sampler", sample, (policy.bases, policy.state.params, *rollout_arrays(chunk_rows)[:2], key),
        (policy.base_shardings, policy.shardings.params, rows_sharding, rows_sharding, rep), None, mesh)

    # the experience pass (the stage's own program, `stages.rl.programs`) with the reward model's scores
    built = rl_programs(experiment, stage, policy_config, critic_config)
    kl = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    critic_bases = critic.bases if critic is not None else ()
    critic_trainable = critic.state.params if critic is not None else {}

    def experience(policy_bases, policy_trainable, critic_bases, critic_trainable, frozen, prompt_tokens,
                   prompt_mask, response_tokens, response_mask, ended_with_eos, kl_coef):
        reward_params = critic_bases[0] if critic_is_reward else frozen.get("reward")
        if reward_params is None:  # a programmatic reward: scores come from the host
            scores = jnp.zeros(prompt_tokens.shape[:1], jnp.float32)
        else:
            scores = model_scores(reward_config, reward_params, prompt_tokens, prompt_mask, response_tokens,
                                  response_mask, algorithm.group_size if stage.shared_prefix else 1)
        reference = frozen.get("reference", policy_bases[0] if policy_bases and algorithm.use_reference else {})
        return built.experience(policy_trainable, policy_bases[0] if policy_bases else {}, reference,
                                critic_trainable, critic_bases[0] if critic_bases else {}, scores, prompt_tokens,
                                prompt_mask, response_tokens, response_mask, ended_with_eos, kl_coef)

    args = (policy.bases, policy.state.params, critic_bases, critic_trainable, frozen,
            *rollout_arrays(sequences), kl)
    in_shardings = (policy.base_shardings, policy.shardings.params,
                    critic.base_shardings if critic is not None else (),
                    critic.shardings.params if critic is not None else {}, frozen_shardings,
                    *(rows_sharding,) * 5, rep)
    plan.programs[StagePlan.FROZEN_PROGRAM] = _compile("experience", experience, args, in_shardings, None, mesh)

    # the update: every epoch and mini-batch of an iteration, one program (the stage's own, as it runs it)
    rollout = jax.eval_shape(experience, *args)[0]
    rollout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows_sharding), rollout)
    bases = tuple(role.bases[0] for role in roles) if lora.rank > 0 else ()
    states = tuple(role.state for role in roles)
    state_shardings = tuple(role.shardings for role in roles)
    plan.programs["update (all mini-batches)"] = _compile(
        "update", built.update(prompt_length), (key, kl, bases, *states, rollout),
        (rep, rep, tuple(role.base_shardings[0] for role in roles) if bases else (), *state_shardings,
         jax.tree.map(lambda _: rows_sharding, rollout)),
        (*state_shardings, rep), mesh, donate=tuple(range(3, 3 + len(states))))
    _account_trained(plan, *roles)
    plan.frozen_roles = device_bytes(frozen)
    plan.frozen_offloaded = stage.offload_frozen and bool(frozen)
    return plan


def levers(plan: StagePlan) -> list[str]:
    """Memory levers for a stage that does not fit, with their estimated per-device saving."""
    out = []
    states = plan.trained_params + plan.optimizer_state + plan.frozen_bases
    fsdp = plan.mesh.get("fsdp", 1)
    largest = max(plan.programs, key=lambda name: plan.programs[name][0], default="")
    temp = plan.temporaries / GIB
    if largest.startswith("sampler"):
        out.append(f"a smaller stages.{plan.stage}.generation_batch_size: the sampler's KV cache dominates "
                   f"({temp:.1f} GiB; it scales with the sequences sampled at once and the sequence length)")
    elif largest:
        out.append(f"more micro-batches (optimizer.micro_batches), a smaller mini-batch, or model.remat=true: "
                   f"the {largest} needs {temp:.1f} GiB of temporaries")
    if plan.optimizer_state and not plan.frozen_bases:
        out.append(f"LoRA (adapters trained, the base frozen in bf16): about "
                   f"-{(plan.optimizer_state + plan.trained_params // 2) / GIB:.1f} GiB of optimizer state and fp32 "
                   "master weights")
    if plan.frozen_roles and not plan.frozen_offloaded and plan.kind in ("ppo", "grpo", "rloo", "reinforce"):
        out.append(f"stages.{plan.stage}.offload_frozen=true: the reference and reward model "
                   f"({plan.frozen_roles / GIB:.1f} GiB) wait in host memory outside the experience pass")
    out.append(f"twice the devices on the fsdp axis: -{(states + plan.frozen_roles) / 2 / GIB:.1f} GiB of states "
               f"(now fsdp={fsdp}; temporaries shrink too when the batch is split further)")
    return out


def plan_experiment(experiment: ExperimentConfig, num_devices: int,
                    stages: tuple[str, ...] | None = None) -> list[StagePlan]:
    """Plans of the experiment's stages (only those named in `stages`, when given) on `num_devices` devices."""
    from rlhf_jax.sharding import make_mesh

    chosen = [experiment.stage(name) for name in stages] if stages else experiment.stages  # unknown: one line

    devices = jax.devices()
    if len(devices) < num_devices:
        raise UserError(f"--devices {num_devices}: only {len(devices)} devices are visible (on a CPU the launcher "
                        "fakes them with XLA_FLAGS=--xla_force_host_platform_device_count)")
    mesh = make_mesh(experiment.mesh, devices[:num_devices])
    plans = []
    for stage in chosen:
        if stage.kind in (StageKind.GENERATE, StageKind.EVALUATE):
            continue
        plans.append(plan_stage(experiment, stage, mesh))
    return plans


def print_plans(experiment: ExperimentConfig, plans: list[StagePlan], accelerator: str, num_devices: int) -> bool:
    """Print one table per stage and a verdict; True when every stage fits."""
    from rich.console import Console
    from rich.table import Table

    capacity = ACCELERATORS[accelerator]
    usable = int(capacity * USABLE_FRACTION)
    console = Console()
    all_fit = True
    for plan in plans:
        mesh = " x ".join(f"{axis}={size}" for axis, size in plan.mesh.items())
        table = Table(title=f"{experiment.name} / {plan.stage} ({plan.kind}) on {num_devices} x {accelerator}: "
                            f"mesh {mesh}")
        table.add_column("per device")
        table.add_column("GiB", justify="right")
        if plan.note:
            console.print(f"{experiment.name} / {plan.stage}: {plan.note}")
            continue
        frozen = "frozen roles (compute dtype" + (", in host memory outside the experience pass)"
                                                  if plan.frozen_offloaded else ")")
        rows = [("trained params", plan.trained_params), ("optimizer state", plan.optimizer_state),
                ("frozen bases (LoRA, compute dtype)", plan.frozen_bases), (frozen, plan.frozen_roles)]
        rows += [(f"temporaries: {name} (compiled in {seconds:.0f} s)", temp)
                 for name, (temp, seconds) in plan.programs.items()]
        for name, value in rows:
            table.add_row(name, f"{value / GIB:.2f}")
        table.add_row("total (params + state + bases + frozen + largest temporaries)" if not plan.frozen_offloaded
                      else "total (params + state + bases + the largest program's temporaries, frozen roles with "
                      "the experience pass)", f"{plan.total / GIB:.2f}")
        table.add_row(f"usable on {accelerator} ({USABLE_FRACTION:.0%})", f"{usable / GIB:.2f}")
        console.print(table)
        fits = plan.total <= usable
        all_fit &= fits
        verdict = "FITS" if fits else "DOES NOT FIT"
        console.print(f"verdict: {verdict} ({plan.total / GIB:.1f} of {usable / GIB:.1f} GiB per device)")
        if not fits:
            for lever in levers(plan):
                console.print(f"  lever: {lever}")
    return all_fit


def plan_summary(plans: list[StagePlan]) -> list[dict]:
    """JSON-friendly rows (bytes) for tests and docs."""
    return [{"stage": p.stage, "kind": p.kind, "mesh": p.mesh, "trained_params": p.trained_params,
             "optimizer_state": p.optimizer_state, "frozen_roles": p.frozen_roles,
             "frozen_bases": p.frozen_bases, "temporaries": p.temporaries,
             "total": p.total, "programs": {k: v[0] for k, v in p.programs.items()}, "note": p.note}
            for p in plans]


__all__ = ["ACCELERATORS", "StagePlan", "device_bytes", "levers", "plan_experiment", "plan_stage", "plan_summary",
           "print_plans"]

"""Memory plans: compile each stage's real steps ahead of time on abstract arrays and report per-device bytes.

    python -m rlhf_jax.launch experiment=ppo_7b --plan [--devices 8] [--accelerator a100-80gb]

Nothing is allocated: parameters are `jax.ShapeDtypeStruct`s (`llama2:*` sources give exactly that), states
come from `jax.eval_shape`, and each program (SFT/RM/DPO train step; PPO update of a whole iteration, experience pass
and sampler) is lowered with the stage's explicit shardings on the configured mesh and compiled. Per device:

- trained params and optimizer state: exact, from each array's shard shape under its `NamedSharding`;
- frozen roles (PPO reference and reward model, DPO reference) in the compute dtype (bf16 for large runs);
- temporaries: the largest `temp_size_in_bytes` of the stage's compiled programs (activations, gradients,
  the KV cache), from XLA's memory analysis on this backend (a CPU estimate of the accelerator's figure).

On a CPU the device count is faked (``--xla_force_host_platform_device_count``) so the mesh is the real one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rlhf_jax.config import ExperimentConfig, SourceKind, StageKind, model_for, parse_source, stage_data
from rlhf_jax.errors import UserError

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
    frozen_roles: int = 0
    programs: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)
    note: str = ""
    frozen_offloaded: bool = False  # frozen roles on the devices only during `FROZEN_PROGRAM`

    FROZEN_PROGRAM = "experience pass"

    @property
    def temporaries(self) -> int:
        return max((temp for temp, _ in self.programs.values()), default=0)

    @property
    def total(self) -> int:
        states = self.trained_params + self.optimizer_state
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
    config = dataclasses.replace(config, remat=spec.remat, remat_policy=str(spec.remat_policy))
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


def _check_batch(rows: int, what: str, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise UserError(f"{what}={rows} is not divisible by mesh data*fsdp={shards}; choose a multiple of {shards}")


def plan_stage(experiment: ExperimentConfig, stage, mesh) -> StagePlan:
    """Compile the stage's programs for `mesh` on abstract arrays and account its per-device bytes."""
    from rlhf_jax.sharding import replicated, validate_mesh_for_model

    plan = StagePlan(stage=stage.name, kind=str(stage.kind), mesh=dict(mesh.shape))
    data = stage_data(experiment, stage) if hasattr(stage, "data_path") else experiment.data
    micro = experiment.optimizer.micro_batches
    rep = replicated(mesh)
    if stage.kind in (StageKind.SFT, StageKind.REWARD, StageKind.DPO):
        config, params = _abstract_model(experiment, stage.model)
        validate_mesh_for_model(config, mesh)
        rows, length = data.batch_size, data.max_length
        _check_batch(rows, f"stages.{stage.name} batch size", mesh)
        if stage.kind is StageKind.SFT:
            from rlhf_jax.trainers.sft import sft_train_step

            state, shardings = _train_state(experiment, stage, params, mesh)
            batch = _batch_struct({k: ((rows, length), dt) for k, dt in (
                ("tokens", jnp.int32), ("attention_mask", jnp.bool_), ("loss_mask", jnp.bool_))}, mesh)
            step = functools.partial(sft_train_step, config, micro)
            plan.programs["sft train step"] = _compile("sft", step, (state, batch), (shardings, batch_sharding_of(
                batch)), (shardings, rep), mesh, donate=(0,))
        elif stage.kind is StageKind.REWARD:
            from rlhf_jax.trainers.reward import reward_train_step

            model = _abstract_scalar_model(config, params)
            trainable = None
            if stage.freeze_backbone:
                trainable = lambda p: {"backbone": jax.tree.map(lambda _: False, p["backbone"]),  # noqa: E731
                                       "head": jax.tree.map(lambda _: True, p["head"])}
            state, shardings = _train_state(experiment, stage, model, mesh, trainable)
            batch = _batch_struct({f"{side}_{k}": ((rows, length), dt) for side in ("chosen", "rejected")
                                   for k, dt in (("tokens", jnp.int32), ("attention_mask", jnp.bool_))}, mesh)
            step = functools.partial(reward_train_step, config, stage.center_rewards_coef, micro,
                                     freeze_backbone=stage.freeze_backbone)
            plan.programs["reward train step"] = _compile("rm", step, (state, batch), (shardings, batch_sharding_of(
                batch)), (shardings, rep), mesh, donate=(0,))
        else:
            _plan_dpo(experiment, stage, mesh, config, params, rows, length, plan)
            return plan
        plan.trained_params = device_bytes(state.params)
        plan.optimizer_state = device_bytes(state.opt_state)
        return plan
    if stage.kind is StageKind.PPO:
        return _plan_ppo(experiment, stage, mesh, data, plan)
    plan.note = f"no memory plan for {stage.kind} stages in this version"
    return plan


def batch_sharding_of(batch):
    return jax.tree.map(lambda leaf: leaf.sharding, batch)


def _plan_dpo(experiment, stage, mesh, config, params, rows, length, plan: StagePlan) -> None:
    """DPO: the frozen reference's log-prob pass, then the train step on the batch plus reference log-probs."""
    from rlhf_jax.sharding import param_shardings, replicated
    from rlhf_jax.trainers import dpo

    rep = replicated(mesh)
    state, shardings = _train_state(experiment, stage, params, mesh)
    reference = _frozen(params, config.dtype)
    reference_shardings = param_shardings(reference, mesh)
    reference = _with_shardings(reference, reference_shardings)
    batch = _batch_struct({f"{side}_{k}": ((rows, length), dt) for side in ("chosen", "rejected")
                           for k, dt in (("tokens", jnp.int32), ("attention_mask", jnp.bool_),
                                         ("loss_mask", jnp.bool_))}, mesh)
    reference_pass = functools.partial(dpo.reference_logprobs, config)
    plan.programs["reference log-probs"] = _compile("reference", reference_pass, (reference, batch),
                                                    (reference_shardings, batch_sharding_of(batch)), None, mesh)
    logps = jax.eval_shape(reference_pass, reference, batch)
    full = {**batch, **_batch_struct({k: (v.shape, v.dtype) for k, v in logps.items()}, mesh)}
    step = functools.partial(dpo.dpo_train_step, config, stage.beta, str(stage.loss), stage.label_smoothing,
                             experiment.optimizer.micro_batches)
    plan.programs["dpo train step"] = _compile("dpo", step, (state, full), (shardings, batch_sharding_of(full)),
                                               (shardings, rep), mesh, donate=(0,))
    plan.trained_params = device_bytes(state.params)
    plan.optimizer_state = device_bytes(state.opt_state)
    plan.frozen_roles = device_bytes(reference)


def _plan_ppo(experiment, stage, mesh, data, plan: StagePlan) -> StagePlan:
    from rlhf_jax.sampling.sampler import SamplingSettings, generate
    from rlhf_jax.sharding import batch_sharding, param_shardings, replicated, validate_mesh_for_model
    from rlhf_jax.rewards import model_scores
    from rlhf_jax.trainers import rl

    rep = replicated(mesh)
    policy_config, policy_params = _abstract_model(experiment, stage.policy)
    validate_mesh_for_model(policy_config, mesh)
    critic_source = stage.critic if stage.critic is not None else stage.reward_model
    critic_config, critic_lm = _abstract_model(experiment, critic_source)
    critic = _abstract_scalar_model(critic_config, critic_lm)
    reward_config = critic_config
    reward = _frozen(critic, reward_config.dtype)
    reference = _frozen(policy_params, policy_config.dtype)
    reward = _with_shardings(reward, param_shardings(reward, mesh))
    reference = _with_shardings(reference, param_shardings(reference, mesh))
    policy_state, policy_shardings = _train_state(experiment, stage, policy_params, mesh)
    critic_state, critic_shardings = _train_state(experiment, stage, critic, mesh)
    algorithm = stage.algorithm
    prompt_length, new_tokens = data.max_prompt_length, stage.max_new_tokens
    _check_batch(stage.rollout_batch_size, f"stages.{stage.name}.rollout_batch_size", mesh)
    _check_batch(algorithm.mini_batch_size, f"stages.{stage.name}.algorithm.mini_batch_size", mesh)
    rows_sharding = batch_sharding(mesh)

    def rollout_arrays(rows):
        shapes = ((rows, prompt_length), jnp.int32), ((rows, prompt_length), jnp.bool_), \
                 ((rows, new_tokens), jnp.int32), ((rows, new_tokens), jnp.bool_), ((rows,), jnp.bool_)
        return tuple(jax.ShapeDtypeStruct(s, d, sharding=rows_sharding) for s, d in shapes)

    # the sampler: rollout_batch_size prompts, KV cache of prompt + new tokens
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=algorithm.temperature, eos_token_ids=(2,),
                                pad_token_id=0)
    prompts = rollout_arrays(stage.rollout_batch_size)[:2]
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    sample = functools.partial(generate, policy_config, settings=settings)
    plan.programs["sampler (rollouts)"] = _compile(
        "sampler", lambda p, t, m, k: sample(p, t, m, k), (policy_state.params, *prompts, key),
        (policy_shardings.params, rows_sharding, rows_sharding, rep), None, mesh)
    # the experience pass: log-probs of policy and reference, values, scores, GAE
    kl = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    def experience(policy, reference, critic, reward_params, prompt_tokens, prompt_mask, response_tokens,
                   response_mask, ended_with_eos, kl_coef):  # the reward model's scores, then the experience
        scores = model_scores(reward_config, reward_params, prompt_tokens, prompt_mask, response_tokens, response_mask)
        return rl.make_experience(policy_config, critic_config, algorithm, policy, reference, critic, scores,
                                  prompt_tokens, prompt_mask, response_tokens, response_mask, ended_with_eos, kl_coef)

    args = (policy_state.params, reference, critic_state.params, reward, *rollout_arrays(stage.rollout_batch_size),
            kl)
    in_shardings = (policy_shardings.params, param_shardings(reference, mesh), critic_shardings.params,
                    param_shardings(reward, mesh), *(rows_sharding,) * 5, rep)
    plan.programs["experience pass"] = _compile("experience", experience, args, in_shardings, None, mesh)
    # the update: every epoch and mini-batch of an iteration, one program (what the stage runs)
    rollout = jax.eval_shape(experience, *args)[0]
    rollout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows_sharding), rollout)

    def update(key, kl_coef, policy_state, critic_state, batch):
        (policy_state, critic_state), metrics = rl.rl_update(
            policy_config, critic_config, algorithm, prompt_length, key, kl_coef, (policy_state, critic_state), batch,
            num_microbatches=experiment.optimizer.micro_batches)
        return policy_state, critic_state, metrics

    plan.programs["update (all mini-batches)"] = _compile(
        "update", update, (key, kl, policy_state, critic_state, rollout),
        (rep, rep, policy_shardings, critic_shardings, jax.tree.map(lambda _: rows_sharding, rollout)),
        (policy_shardings, critic_shardings, rep), mesh, donate=(2, 3))
    plan.trained_params = device_bytes(policy_state.params) + device_bytes(critic_state.params)
    plan.optimizer_state = device_bytes(policy_state.opt_state) + device_bytes(critic_state.opt_state)
    plan.frozen_roles = device_bytes(reference) + device_bytes(reward)
    plan.frozen_offloaded = stage.offload_frozen
    return plan


def levers(plan: StagePlan) -> list[str]:
    """Memory levers for a stage that does not fit, with their estimated per-device saving."""
    out = []
    states = plan.trained_params + plan.optimizer_state
    fsdp = plan.mesh.get("fsdp", 1)
    largest = max(plan.programs, key=lambda name: plan.programs[name][0], default="")
    temp = plan.temporaries / GIB
    if largest.startswith("sampler"):
        out.append(f"a smaller stages.{plan.stage}.rollout_batch_size: the sampler's KV cache for the whole rollout "
                   f"batch dominates ({temp:.1f} GiB; it scales with the rollout batch and the sequence length)")
    elif largest:
        out.append(f"more micro-batches (optimizer.micro_batches), a smaller mini-batch, or model.remat=true: "
                   f"the {largest} needs {temp:.1f} GiB of temporaries")
    if plan.optimizer_state:
        out.append(f"LoRA (adapters trained, the base frozen in bf16): about "
                   f"-{(plan.optimizer_state + plan.trained_params // 2) / GIB:.1f} GiB of optimizer state and fp32 "
                   "master weights")
    if plan.frozen_roles and not plan.frozen_offloaded and plan.kind == "ppo":
        out.append(f"stages.{plan.stage}.offload_frozen=true: the reference and reward model "
                   f"({plan.frozen_roles / GIB:.1f} GiB) wait in host memory outside the experience pass")
    out.append(f"twice the devices on the fsdp axis: -{(states + plan.frozen_roles) / 2 / GIB:.1f} GiB of states "
               f"(now fsdp={fsdp}; temporaries shrink too when the batch is split further)")
    return out


def plan_experiment(experiment: ExperimentConfig, num_devices: int) -> list[StagePlan]:
    from rlhf_jax.sharding import make_mesh

    devices = jax.devices()
    if len(devices) < num_devices:
        raise UserError(f"--devices {num_devices}: only {len(devices)} devices are visible (on a CPU the launcher "
                        "fakes them with XLA_FLAGS=--xla_force_host_platform_device_count)")
    mesh = make_mesh(experiment.mesh, devices[:num_devices])
    plans = []
    for stage in experiment.stages:
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
                (frozen, plan.frozen_roles)]
        rows += [(f"temporaries: {name} (compiled in {seconds:.0f} s)", temp)
                 for name, (temp, seconds) in plan.programs.items()]
        for name, value in rows:
            table.add_row(name, f"{value / GIB:.2f}")
        table.add_row("total (params + state + frozen + largest temporaries)" if not plan.frozen_offloaded else
                      "total (params + state + the largest program's temporaries, frozen roles with the experience "
                      "pass)", f"{plan.total / GIB:.2f}")
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
             "optimizer_state": p.optimizer_state, "frozen_roles": p.frozen_roles, "temporaries": p.temporaries,
             "total": p.total, "programs": {k: v[0] for k, v in p.programs.items()}, "note": p.note}
            for p in plans]


__all__ = ["ACCELERATORS", "StagePlan", "device_bytes", "levers", "plan_experiment", "plan_stage", "plan_summary",
           "print_plans"]

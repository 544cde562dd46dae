"""`--plan`: ahead-of-time memory plans on fake CPU devices (the launcher re-runs itself with them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

# Runs inside a process with 8 fake devices: the plan of tiny_pipeline as JSON, plus the model's param count.
_SUMMARY = """
import json, dataclasses
import jax
from rlhf_jax.config import MeshConfig
from rlhf_jax.models import load
from rlhf_jax.plan import plan_experiment, plan_summary
from rlhf_jax.registry import get_experiment
experiment = get_experiment("tiny_pipeline")
experiment = dataclasses.replace(experiment, mesh=MeshConfig(data=1, fsdp=8, tensor=1),
                                 data=dataclasses.replace(experiment.data, batch_size=8),
                                 stages=experiment.stages[:2])
config, params, _ = load("tiny:smollm2")
print(json.dumps({"plans": plan_summary(plan_experiment(experiment, 8)),
                  "param_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)),
                  "hidden": config.hidden_size}))
"""


def _env(devices: int | None = None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices else ""
    return env


def _launch(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_jax.launch", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_plan_accounts_fsdp_sharded_state_exactly():
    out = subprocess.run([sys.executable, "-c", _SUMMARY], cwd=REPO, env=_env(8), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    sft, rm = result["plans"]
    assert sft["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # FSDP over 8 devices: each holds 1/8 of every sharded array; only the small norm scales are replicated
    total = result["param_bytes"]
    assert total / 8 <= sft["trained_params"] < total / 8 * 1.02
    # AdamW keeps two moments per param (fp32), sharded like the params; plus replicated step counters
    assert 2 * sft["trained_params"] <= sft["optimizer_state"] <= 2 * sft["trained_params"] + 64
    assert sft["temporaries"] > 0 and sft["programs"]["sft train step"] == sft["temporaries"]
    # tiny:smollm2 ties its embeddings, so the reward model is the same backbone plus a replicated head of
    # hidden + 1 floats
    assert rm["trained_params"] == sft["trained_params"] + (result["hidden"] + 1) * 4


def test_plan_refuses_a_mesh_that_does_not_fit_the_devices_before_compiling():
    out = _launch("experiment=ppo_70b", "--plan", "--devices", "12", timeout=120)
    assert out.returncode == 2
    assert "mesh.data=1, mesh.fsdp=-1, mesh.tensor=8: the fixed axes use 8 devices, which does not divide the 12" \
           in out.stderr
    out = _launch("experiment=ppo_7b", "--plan", "--accelerator", "tpu-v9", timeout=120)
    assert out.returncode == 2 and "--accelerator tpu-v9: unknown" in out.stderr


def test_plan_refuses_heads_not_divisible_by_the_tensor_axis():
    out = _launch("experiment=tiny_pipeline", "--plan", "--devices", "3", "mesh.data=1", "mesh.fsdp=1",
                  "mesh.tensor=3", "data.batch_size=3", timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "not divisible by mesh.tensor=3" in out.stderr


@pytest.mark.slow
def test_plan_ppo_7b_on_8_devices_prints_the_tables_and_a_verdict():
    out = _launch("experiment=ppo_7b", "--plan", "--devices", "8")
    assert out.returncode in (0, 1), out.stderr[-3000:]
    for stage in ("sft", "rm", "ppo"):
        assert f"ppo_7b / {stage}" in out.stdout
    for row in ("trained params", "optimizer state", "frozen bases", "frozen roles",
                "temporaries: update (all mini-batches)", "temporaries: sampler (64 sequences at once)",
                "usable on a100-80gb"):
        assert row in out.stdout, row
    assert out.stdout.count("verdict: ") == 3


def test_offloaded_frozen_roles_count_only_with_the_experience_pass():
    from rlhf_jax.plan import StagePlan, levers

    plan = StagePlan(stage="ppo", kind="ppo", mesh={"data": 1, "fsdp": 8, "tensor": 1}, trained_params=10 * GIB,
                     optimizer_state=20 * GIB, frozen_roles=6 * GIB,
                     programs={"sampler (rollouts)": (30 * GIB, 1.0), "experience pass": (20 * GIB, 1.0),
                               "update step": (25 * GIB, 1.0)})
    assert plan.total == (10 + 20 + 6 + 30) * GIB  # everything resident, the largest temporaries
    assert any("offload_frozen=true" in lever for lever in levers(plan))
    plan.frozen_offloaded = True
    assert plan.total == (10 + 20 + max(30, 20 + 6, 25)) * GIB
    plan.programs["experience pass"] = (28 * GIB, 1.0)
    assert plan.total == (10 + 20 + 28 + 6) * GIB
    assert not any("offload_frozen" in lever for lever in levers(plan))


def _plan_one(experiment, stage_name: str):
    from rlhf_jax.plan import plan_experiment

    (plan,) = plan_experiment(experiment, 1, (stage_name,))
    return plan


def _tiny(name: str, *overrides: str):
    from rlhf_jax.config import apply_overrides, validate
    from rlhf_jax.registry import get_experiment

    experiment = apply_overrides(get_experiment(name), list(overrides))
    validate(experiment)
    return experiment


@pytest.mark.parametrize("rank, calls", [(0, 1), (4, 1), (0, 2)])
def test_sft_plan_matches_the_stage_s_own_train_state_and_compiled_step(tmp_path, rank, calls):
    """On one CPU device: the plan's params, optimizer state and LoRA base are the bytes of the state the SFT
    stage builds (exact), and its temporaries are XLA's figure for the step the stage compiles (with
    `optimizer.steps_per_call`, the program of that many steps)."""
    import jax

    from rlhf_jax import stages as stage_registry
    from rlhf_jax.models.lora import nbytes
    from rlhf_jax.sharding import make_mesh, param_shardings, shard_train_step, state_shardings
    from rlhf_jax.stages import sft
    from rlhf_jax.stages.common import device_batch

    # model.scan_unroll=1: the program the plan models (an accelerator's); a CPU run unrolls by default
    experiment = _tiny("tiny_sft", f"run_dir={tmp_path}", f"stages.sft.lora.rank={rank}", "mesh.data=1",
                       "model.scan_unroll=1", f"optimizer.steps_per_call={calls}")
    stage = experiment.stage("sft")
    plan = _plan_one(experiment, "sft")
    resolve = stage_registry.make_resolver(experiment, tmp_path)
    setup = sft._setup(experiment, stage, resolve, None)
    role, iterator, state, step, frozen = setup.role, setup.iterator, setup.state, setup.programs.step, setup.frozen
    assert plan.trained_params == nbytes(state.params)
    assert plan.optimizer_state == nbytes(state.opt_state)
    assert plan.frozen_bases == nbytes(frozen) and (plan.frozen_bases > 0) == (rank > 0)
    if rank:  # adapters only: a small fraction of the model
        assert plan.trained_params < nbytes(role.params) / 20
    batch = device_batch(next(iterator), sft.SFT_KEYS)
    assert {k: v.shape for k, v in batch.items()} == {k: (4, 96) for k in ("tokens", "attention_mask", "loss_mask")}
    mesh = make_mesh(experiment.mesh, jax.devices()[:1])
    if calls > 1:  # the call's input: the batches stacked, and how many of them to run
        batch = ({k: np.stack([v] * calls) for k, v in batch.items()}, np.int32(calls))
    compiled = shard_train_step(step, state_shardings(state, mesh), mesh, frozen_shardings=tuple(
        param_shardings(params, mesh) for params in frozen), steps_per_call=calls).lower(*frozen, state,
                                                                                        batch).compile()
    assert plan.programs["sft train step"][0] == compiled.memory_analysis().temp_size_in_bytes > 0


def test_lora_rl_plans_count_adapters_as_trained_and_no_reference_bytes():
    """PPO under LoRA: adapters (+ the critic's head) trained; the reference is the policy's base and the
    critic's base is the reward model, so the frozen bytes are two bases and no offloadable role."""
    import jax

    from rlhf_jax.models import llama, load
    from rlhf_jax.models.lora import nbytes, trainable_params

    experiment = _tiny("tiny_pipeline", "stages.ppo.lora.rank=4", "stages.ppo.generation_batch_size=4",
                       "mesh.data=1")
    stage = experiment.stage("ppo")
    plan = _plan_one(experiment, "ppo")
    config, params, _ = load("tiny:smollm2")
    scalar = jax.eval_shape(lambda p: llama.init_scalar_model(config, p, jax.random.key(0)), params)
    adapters = jax.eval_shape(lambda p: trainable_params(p, stage.lora, jax.random.key(0)), params)
    critic = jax.eval_shape(lambda p: trainable_params(p, stage.lora, jax.random.key(0), ("head",)), scalar)
    assert plan.trained_params == nbytes(adapters) + nbytes(critic)
    assert plan.frozen_roles == 0 and not plan.frozen_offloaded
    assert plan.frozen_bases == nbytes(params) + nbytes(scalar)  # tiny models compute in float32
    assert "sampler (4 sequences at once)" in plan.programs


@pytest.mark.parametrize("overrides, reference", [
    ((), True),  # GRPO's default β = 0.04: a frozen copy of the policy's start
    (("stages.grpo.algorithm.kl_coef=0.0",), False),  # β = 0 and no kl_target: no reference role at all
    (("stages.grpo.lora.rank=4",), False),  # LoRA: the reference is the base, counted once
])
def test_grpo_plan_has_no_critic_and_a_reference_only_when_the_kl_needs_one(overrides, reference):
    from rlhf_jax.models import load
    from rlhf_jax.models.lora import nbytes

    experiment = _tiny("tiny_grpo", "mesh.data=1", *overrides)
    plan = _plan_one(experiment, "grpo")
    _, params, _ = load("tiny:smollm2")
    lora = experiment.stage("grpo").lora.rank > 0
    assert plan.kind == "grpo" and not plan.note
    # no critic, a programmatic reward: the policy is the only model, once as a state (or base), once as reference
    if lora:
        assert 0 < plan.trained_params < nbytes(params) / 20
    else:
        assert plan.trained_params == nbytes(params)
    assert plan.frozen_bases == (nbytes(params) if lora else 0)
    assert plan.frozen_roles == (nbytes(params) if reference else 0)
    assert set(plan.programs) == {"sampler (16 sequences at once)", "experience pass", "update (all mini-batches)"}


@pytest.mark.parametrize("name, overrides, reference", [
    ("tiny_dpo", ("stages.dpo.reference=tiny:smollm2",), True),  # DPO with a reference named: a frozen copy
    # shared-prefix rows: both programs compile on the rows and loss entries the stage's batches carry
    ("tiny_dpo", ("stages.dpo.reference=tiny:smollm2", "stages.dpo.shared_prefix=true"), True),
    ("tiny_simpo", (), False),  # reference-free: neither a reference role nor its log-prob program
    ("tiny_orpo", (), False),
])
def test_preference_plans_hold_a_reference_only_when_the_loss_needs_one(name, overrides, reference):
    from rlhf_jax.models import load
    from rlhf_jax.models.lora import nbytes

    experiment = _tiny(name, "mesh.data=1", *overrides)
    stage = experiment.stages[0].name
    plan = _plan_one(experiment, stage)
    assert plan.kind == "dpo" and not plan.note
    assert plan.trained_params == nbytes(load("tiny:smollm2")[1])
    if reference:
        assert plan.frozen_roles == nbytes(load("tiny:smollm2")[1])
        assert set(plan.programs) == {"reference log-probs", "dpo train step"}
    else:
        assert not plan.frozen_roles and set(plan.programs) == {"dpo train step"}


def test_plan_of_one_stage_through_the_launcher():
    out = _launch("experiment=tiny_pipeline", "--plan", "--devices", "1", "mesh.data=1", "--stage", "sft",
                  timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tiny_pipeline / sft" in out.stdout and out.stdout.count("verdict: FITS") == 1
    assert "tiny_pipeline / rm" not in out.stdout and "tiny_pipeline / ppo" not in out.stdout
    out = _launch("experiment=ppo_7b", "--plan", "--stage", "rn", timeout=120)
    assert out.returncode == 2 and out.stderr == "error: stages.rn: no such stage\n"


def test_each_planned_training_stage_is_built_by_its_runners_module():
    # one builder per stage (stages.common.StagePrograms): --plan, run and dry_run read the same step and batch
    import importlib

    from rlhf_jax import stages
    from rlhf_jax.plan import TRAINING_STAGES
    from rlhf_jax.stages.common import StagePrograms

    for kind, module in TRAINING_STAGES.items():
        assert stages.RUNNERS[kind].partition(":")[0] == module
        assert callable(importlib.import_module(module).programs)
    from rlhf_jax.models.config import tiny_config
    from rlhf_jax.registry import get_experiment

    experiment = get_experiment("tiny_pipeline")
    built = importlib.import_module(TRAINING_STAGES["sft"]).programs(experiment, experiment.stage("sft"),
                                                                        tiny_config("smollm2"))
    assert isinstance(built, StagePrograms) and set(built.batch(2, 8)) == {"tokens", "attention_mask", "loss_mask"}


def test_rl_plans_compile_the_rl_stage_s_own_experience_and_update(monkeypatch):
    # the RL stage's builder (stages.rl.programs) is what --plan compiles, as the run does
    from rlhf_jax.config import stage_data
    from rlhf_jax.stages import rl as rl_stage

    built_for, updates_for = [], []
    original = rl_stage.programs

    def spy(experiment, stage, policy_config, critic_config):
        built = original(experiment, stage, policy_config, critic_config)
        built_for.append((stage.name, critic_config is not None))
        return built._replace(update=lambda prompt_length: updates_for.append(prompt_length) or
                              built.update(prompt_length))

    monkeypatch.setattr(rl_stage, "programs", spy)
    for name, stage, critic in (("tiny_grpo", "grpo", False), ("tiny_pipeline", "ppo", True)):
        experiment = _tiny(name, "mesh.data=1")
        plan = _plan_one(experiment, stage)
        assert "update (all mini-batches)" in plan.programs and "experience pass" in plan.programs
        assert built_for[-1] == (stage, critic)
        assert updates_for[-1] == stage_data(experiment, experiment.stage(stage)).max_prompt_length

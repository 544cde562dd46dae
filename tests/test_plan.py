"""`--plan`: ahead-of-time memory plans on fake CPU devices (the launcher re-runs itself with them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
    for row in ("trained params", "optimizer state", "frozen roles", "temporaries: update (all mini-batches)",
                "temporaries: sampler (rollouts)", "usable on a100-80gb"):
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

"""Mesh, sharding rules and sharded steps.

The multi-device checks need 8 (fake CPU) devices, which XLA only creates when the flag is set before jax
starts; pytest has imported jax by then, so they run this file as a script in one subprocess
(`python tests/test_sharding.py`, see `_device_checks`) that prints a JSON report, and the tests assert on it.
The rest runs in-process on one device.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the subprocess: 8 CPU devices, before jax is imported
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                               "--xla_backend_optimization_level=0")  # compile fast
    os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses
import functools
import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from rlhf_jax.config import MeshConfig, PreferenceLoss, RLAlgorithm
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.models import llama
from rlhf_jax.models.config import llama2_config, tiny_config
from rlhf_jax.sharding import (make_mesh, mesh_shape, param_logical_axes, param_shardings, state_shardings,
                               validate_mesh_for_model)
from rlhf_jax.training.state import TrainState, make_optimizer

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
# float32 tiny llama with an untied head (embedding and lm_head both present)
CONFIG = tiny_config("llama")
ROOT = Path(__file__).resolve().parents[1]


# ---- in-process: shapes, rules and errors that need no devices ---------------------------------------------


def test_mesh_shape_resolves_minus_one_and_refuses_a_mismatch_naming_the_axes_and_device_count():
    assert mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match=r"mesh.data=3, mesh.fsdp=1, mesh.tensor=1: the mesh has 3 devices but 8 are"):
        mesh_shape(MeshConfig(data=3, fsdp=1, tensor=1), 8)
    with pytest.raises(ConfigError, match=r"mesh.data=-1, mesh.fsdp=3.*does not divide the 8 devices"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ConfigError, match=r"mesh.data=2.*2 devices but 1 are available"):
        make_mesh(MeshConfig(data=2))  # this process has one device


def test_a_mesh_larger_than_the_machine_stops_a_real_run_with_one_line(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}  # one CPU device
    result = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", "experiment=tiny_sft", "mesh.data=2",
                             f"run_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**env, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["error: mesh.data=2, mesh.fsdp=1, mesh.tensor=1: the mesh has 2 devices but "
                                          "1 are available; make the product equal the device count, or set one "
                                          "axis to -1 for the remaining devices"]
    assert not (tmp_path / "run" / "sft" / "checkpoints").exists()


def test_logical_axes_of_every_llama_param():
    params = llama.abstract_params(dataclasses.replace(CONFIG, attention_bias=True))
    axes = param_logical_axes(params)
    assert axes["embed_tokens"]["embedding"] == P("vocab", "embed")
    assert axes["lm_head"]["kernel"] == P("embed", "vocab")
    attn, mlp = axes["layers"]["self_attn"], axes["layers"]["mlp"]
    assert attn["q_proj"]["kernel"] == P("layers", "embed", "heads")
    assert attn["k_proj"]["kernel"] == P("layers", "embed", "kv_heads")
    assert attn["v_proj"]["bias"] == P("layers", "kv_heads")
    assert attn["o_proj"]["kernel"] == P("layers", "heads", "embed")
    assert mlp["gate_proj"]["kernel"] == mlp["up_proj"]["kernel"] == P("layers", "embed", "mlp")
    assert mlp["down_proj"]["kernel"] == P("layers", "mlp", "embed")
    assert axes["layers"]["input_layernorm"]["scale"] == P("layers", "norm")
    assert axes["norm"]["scale"] == P("norm")
    for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(axes)):
        assert len(spec) == leaf.ndim
    scalar = param_logical_axes(jax.eval_shape(lambda: llama.init_scalar_model(
        CONFIG, llama.init_params(CONFIG, jax.random.key(0)), jax.random.key(1))))
    assert scalar["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"] == P("layers", "embed", "heads")
    assert scalar["head"]["kernel"] == P(None, None) and scalar["head"]["bias"] == P(None)


def test_llama2_70b_plan_on_an_abstract_mesh_shards_fsdp_and_tensor():
    """Ahead-of-time: no allocation, no devices (the 70B params never exist)."""
    from jax.sharding import NamedSharding

    config = llama2_config("70b")
    mesh = AbstractMesh((2, 16, 8), ("data", "fsdp", "tensor"))
    validate_mesh_for_model(config, mesh)
    shardings = param_shardings(llama.abstract_params(config), mesh)
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))
    assert shardings["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    assert shardings["layers"]["self_attn"]["k_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shardings["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert shardings["layers"]["input_layernorm"]["scale"].spec == P(None, None)
    # the fallback: a vocabulary of 32001 does not divide over tensor=8, so that dimension is replicated
    odd = param_shardings(llama.abstract_params(dataclasses.replace(config, vocab_size=32001)), mesh)
    assert odd["lm_head"]["kernel"].spec == P("fsdp", None)


def test_heads_not_divisible_by_tensor_is_refused_before_compiling():
    with pytest.raises(ConfigError, match=r"num_heads=4 is not divisible by mesh.tensor=3"):
        validate_mesh_for_model(CONFIG, AbstractMesh((1, 1, 3), ("data", "fsdp", "tensor")))
    with pytest.raises(ConfigError, match=r"num_kv_heads=8 is not divisible by mesh.tensor=16"):
        validate_mesh_for_model(llama2_config("70b"), AbstractMesh((1, 1, 16), ("data", "fsdp", "tensor")))


def test_opt_state_shardings_mirror_params_abstractly_also_under_multi_transform():
    mesh = AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"))
    params = llama.abstract_params(CONFIG)
    for tx in (make_optimizer("adamw", 1e-3),
               make_optimizer("adamw", 1e-3, trainable=lambda p: jax.tree.map(lambda _: True, p))):
        state = jax.eval_shape(lambda: TrainState.create(llama.init_params(CONFIG, jax.random.key(0)), tx,
                                                         jax.random.key(0)))
        shardings = state_shardings(state, mesh)
        q_spec = shardings.params["layers"]["self_attn"]["q_proj"]["kernel"].spec
        assert q_spec == P(None, "fsdp", "tensor")
        specs = [s.spec for s in jax.tree.leaves(shardings.opt_state)]
        assert specs.count(q_spec) >= 2  # Adam's mu and nu of q_proj (and of gate/up: same axes)
        assert P() in specs  # the step count
        assert shardings.step.spec == P() and shardings.key.spec == P()
    del params


# ---- in a subprocess with 8 devices ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def device_report():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve())], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sharded_steps_equal_the_single_device_step(device_report):
    steps = device_report["steps"]
    assert set(steps) == {"sft", "reward", "ppo", "dpo"}
    for name, per_mesh in steps.items():
        assert set(per_mesh) == {str(list(m)) for m in (MESHES if name != "dpo" else MESHES[-1:])}, name
        for mesh, result in per_mesh.items():
            assert result["max_param_rel_err"] < 1e-5, (name, mesh, result)
            assert result["metrics_rel_err"] < 1e-5, (name, mesh, result)
            assert result["opt_state_like_params"], (name, mesh)
            assert result["params_changed"] > 0, (name, mesh)


def test_params_and_optimizer_state_have_the_promised_layout(device_report):
    layout = device_report["layout"]
    assert layout["[2, 4, 1]"]["embed_tokens/embedding"] == [None, "fsdp"]
    assert layout["[2, 4, 1]"]["layers/self_attn/q_proj/kernel"] == [None, "fsdp", None]
    assert layout["[2, 2, 2]"]["layers/self_attn/q_proj/kernel"] == [None, "fsdp", "tensor"]
    assert layout["[2, 2, 2]"]["lm_head/kernel"] == ["fsdp", "tensor"]
    assert layout["[2, 2, 2]"]["layers/mlp/down_proj/kernel"] == [None, "tensor", "fsdp"]
    assert layout["[8, 1, 1]"]["embed_tokens/embedding"] == [None, None]
    assert layout["[2, 2, 2]"]["momentum/layers/self_attn/q_proj/kernel"] == [None, "fsdp", "tensor"]
    assert layout["[2, 2, 2]"]["batch/tokens"] == [["data", "fsdp"], None]
    assert layout["[2, 2, 2]"]["reward/head/kernel"] == [None, None]
    # bytes of the param tree on one device: FSDP x tensor split it about 4 ways on (2, 2, 2)
    assert layout["[2, 2, 2]"]["param_bytes_device0"] < 0.4 * layout["[8, 1, 1]"]["param_bytes_device0"]


def test_activation_constraints_reach_the_compiled_step(device_report):
    assert device_report["hlo_has_batch_constraint"]


def test_the_rl_head_gathers_response_tokens_within_each_data_shard(device_report):
    assert device_report["batch_blocks"] == {"8 rows": 4, "6 rows": 1, "outside a mesh": 1}


def test_sampler_output_is_identical_sharded_and_unsharded(device_report):
    for mesh, result in device_report["sampler"].items():
        assert result["tokens_equal"], mesh
        assert result["logprobs_max_abs_err"] < 1e-5, mesh


def test_bad_inputs_raise_clear_errors_before_compiling(device_report):
    errors = device_report["errors"]
    assert errors["mesh"] == ["ConfigError", "mesh.data=3, mesh.fsdp=1, mesh.tensor=1: the mesh has 3 devices but "
                              "8 are available; make the product equal the device count, or set one axis to -1 for "
                              "the remaining devices"]
    assert errors["batch"][0] == "UserError"
    assert errors["batch"][1].startswith("batch size 6 (batch field '")
    assert "is not divisible by mesh.data*mesh.fsdp = 2*4 = 8" in errors["batch"][1]
    assert errors["heads"] == ["ConfigError", "model num_heads=4 is not divisible by mesh.tensor=8; choose "
                               "mesh.tensor dividing 4"]
    assert errors["compilations_before_errors"] == 0


# ---- the subprocess body -------------------------------------------------------------------------------------


def _sft_batch(rng, batch=8, length=12):
    tokens = rng.integers(3, CONFIG.vocab_size, (batch, length)).astype(np.int32)
    lengths = rng.integers(6, length + 1, batch)
    index = np.arange(length)[None]
    attention = index < lengths[:, None]
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": attention & (index >= 3)}


def _pair_batch(rng, batch=8, length=10):
    sides = {}
    for side in ("chosen", "rejected"):
        one = _sft_batch(rng, batch, length)
        sides.update({f"{side}_tokens": one["tokens"], f"{side}_attention_mask": one["attention_mask"],
                      f"{side}_loss_mask": one["loss_mask"]})
    return sides


def _tree_rel_err(a, b) -> float:
    """Largest per-leaf ||a - b|| / ||b||; a leaf of norm below 1e-2 (a zero-initialised bias that barely
    moved) is compared absolutely, ||a - b|| / 1e-2."""
    return max(float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                     / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-2))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _spec_of(array) -> list:
    spec = list(array.sharding.spec) + [None] * (array.ndim - len(array.sharding.spec))
    return [list(axis) if isinstance(axis, tuple) else axis for axis in spec]


def _device_checks() -> dict:
    """Everything that needs 8 devices; returns the JSON report the tests read."""
    import rlhf_jax.sharding as sharding
    from rlhf_jax.sampling.sampler import Sampler, SamplingSettings, generate
    from rlhf_jax.rewards import model_scores
    from rlhf_jax.trainers import dpo, rl
    from rlhf_jax.trainers.reward import reward_train_step
    from rlhf_jax.trainers.sft import sft_train_step

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    policy = llama.init_params(CONFIG, jax.random.key(0))
    scalar = llama.init_scalar_model(CONFIG, policy, jax.random.key(1))
    # SGD with momentum: Adam would turn float-rounding noise in near-zero gradients into full-size
    # updates, which says nothing about sharding. The momentum trace mirrors the params.
    tx = make_optimizer("sgd", 0.5, b1=0.9, grad_clip=1.0)
    report: dict = {"steps": {}, "layout": {}, "sampler": {}, "errors": {}}

    # PPO experience from the unsharded model (the update step is what is compared)
    hyper = RLAlgorithm(update_epochs=1, mini_batch_size=8)
    momentum = lambda state: state.opt_state[1][0].trace  # noqa: E731  chain(clip, chain(trace, lr))
    prompt_tokens = rng.integers(3, CONFIG.vocab_size, (8, 6)).astype(np.int32)
    prompt_mask = np.arange(6)[None] >= rng.integers(0, 4, 8)[:, None]
    sample = generate(CONFIG, policy, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), jax.random.key(3),
                      SamplingSettings(max_new_tokens=5))
    scores = model_scores(CONFIG, scalar, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), sample.response_tokens,
                          sample.response_mask)
    experience, _ = rl.make_experience(CONFIG, CONFIG, hyper, policy, policy, scalar, scores,
                                       jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), sample.response_tokens,
                                       sample.response_mask, sample.ended_with_eos, jnp.float32(0.1))
    experience = jax.tree.map(np.asarray, experience)
    dpo_batch = {**_pair_batch(rng), "reference_chosen_logps": rng.normal(-20, 1, 8).astype(np.float32),
                 "reference_rejected_logps": rng.normal(-20, 1, 8).astype(np.float32)}

    def ppo_update(policy_state, critic_state, batch):  # an iteration (shuffle, one mini-batch), one program
        states, metrics = rl.rl_update(CONFIG, CONFIG, hyper, 6, jax.random.key(9), jnp.float32(0.1),
                                       (policy_state, critic_state), batch, num_microbatches=2)
        return (*states, metrics)

    # name -> (step(*states, batch), initial params of each state, numpy batch)
    cases = {
        "sft": (functools.partial(sft_train_step, CONFIG, 2), (policy,), _sft_batch(rng)),
        "reward": (functools.partial(reward_train_step, CONFIG, 0.01, 2), (scalar,), _pair_batch(rng)),
        "ppo": (ppo_update, (policy, scalar), experience),
        "dpo": (functools.partial(dpo.preference_train_step, CONFIG, PreferenceLoss(), 2), (policy,), dpo_batch),
    }

    def fresh_states(params_list):
        return tuple(TrainState.create(jax.tree.map(jnp.copy, p), tx, jax.random.key(5)) for p in params_list)

    def run(step, states, batch, num_steps=3):
        metrics = None
        for _ in range(num_steps):
            *states, metrics = step(*states, batch)
        return states, jax.device_get(metrics)

    for name, (step_fn, params_list, batch) in cases.items():
        reference_states, reference_metrics = run(jax.jit(step_fn), fresh_states(params_list),
                                                  jax.tree.map(jnp.asarray, batch))
        report["steps"][name] = {}
        for shape in MESHES if name != "dpo" else MESHES[-1:]:  # DPO's model calls are SFT's: one mesh
            mesh = sharding.make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
            sharding.validate_mesh_for_model(CONFIG, mesh)
            states = fresh_states(params_list)
            shardings = tuple(sharding.state_shardings(state, mesh) for state in states)
            states = sharding.place_state(states, shardings)
            step = sharding.shard_train_step(step_fn, shardings, mesh)
            out_states, metrics = run(step, states, sharding.place_batch(batch, mesh))
            opt_like = all(
                a.sharding.is_equivalent_to(b, a.ndim)
                for s, sh in zip(out_states, shardings)
                for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(sh)))
            opt_like &= all(
                mu.sharding.is_equivalent_to(p.sharding, p.ndim)
                for s in out_states for mu, p in zip(jax.tree.leaves(momentum(s)), jax.tree.leaves(s.params)))
            report["steps"][name][str(list(shape))] = {
                "max_param_rel_err": max(_tree_rel_err(o.params, r.params)
                                         for o, r in zip(out_states, reference_states)),
                "metrics_rel_err": max(float(abs(metrics[k] - reference_metrics[k]) / max(abs(reference_metrics[k]), 1))
                                       for k in reference_metrics),
                "opt_state_like_params": bool(opt_like),
                "params_changed": max(float(np.max(np.abs(a - b)))
                                      for a, b in zip(jax.tree.leaves(out_states[0].params),
                                                      jax.tree.leaves(params_list[0]))),
            }
            if name == "sft":
                state = out_states[0]
                layout = {path: _spec_of(leaf) for path, leaf in _flat(state.params).items()}
                layout.update({f"momentum/{path}": _spec_of(leaf) for path, leaf in _flat(momentum(state)).items()})
                layout["batch/tokens"] = _spec_of(sharding.place_batch(batch, mesh)["tokens"])
                layout["param_bytes_device0"] = sum(leaf.addressable_shards[0].data.nbytes
                                                    for leaf in jax.tree.leaves(state.params))
                report["layout"][str(list(shape))] = layout
                if shape == (2, 2, 2):
                    hlo = step.lower(*fresh_states(params_list), sharding.place_batch(batch, mesh)).as_text()
                    report["hlo_has_batch_constraint"] = "sharding_constraint" in hlo or "Sharding" in hlo
            if name == "reward":
                report["layout"][str(list(shape))].update(
                    {f"reward/{path}": _spec_of(leaf) for path, leaf in _flat(out_states[0].params).items()})

    # the RL head's response-token gathering stays within each data shard: it reads the shards off the mesh that
    # a train step is traced under (`trainers.common.batch_blocks`)
    from rlhf_jax.trainers.common import batch_blocks

    with sharding.activation_rules(sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        report["batch_blocks"] = {"8 rows": batch_blocks(8), "6 rows": batch_blocks(6)}
    report["batch_blocks"]["outside a mesh"] = batch_blocks(8)

    # sampler: same key, same output, with sharded params and a sharded prompt batch
    settings = SamplingSettings(max_new_tokens=6, temperature=0.8)
    tokens = rng.integers(3, CONFIG.vocab_size, (6, 7)).astype(np.int32)
    mask = np.arange(7)[None] >= rng.integers(0, 5, 6)[:, None]
    want = jax.device_get(Sampler(CONFIG)(policy, tokens, mask, jax.random.key(11), settings))
    for shape in MESHES[-1:]:
        mesh = sharding.make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
        params = sharding.place_state(policy, sharding.param_shardings(policy, mesh))
        got = jax.device_get(Sampler(CONFIG, mesh=mesh)(params, tokens, mask, jax.random.key(11), settings))
        report["sampler"][str(list(shape))] = {
            "tokens_equal": bool(np.array_equal(got.response_tokens, want.response_tokens)
                                 and np.array_equal(got.response_lengths, want.response_lengths)),
            "logprobs_max_abs_err": float(np.max(np.abs(got.response_logprobs - want.response_logprobs))),
        }

    # bad inputs: each raises before anything is compiled
    compiled = []
    step_fn = jax.jit(lambda x: compiled.append(1) or x)

    def error_of(thunk):
        try:
            thunk()
        except UserError as error:
            return [type(error).__name__, str(error)]
        return None

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    report["errors"] = {
        "mesh": error_of(lambda: sharding.make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))),
        "batch": error_of(lambda: step_fn(sharding.place_batch(_sft_batch(rng, batch=6), mesh))),
        "heads": error_of(lambda: sharding.validate_mesh_for_model(
            CONFIG, sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8)))),
        "compilations_before_errors": len(compiled),
    }
    return report


def _flat(tree) -> dict:
    from rlhf_jax.sharding.partition import path_string

    return {path_string(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


if __name__ == "__main__":
    print(json.dumps(_device_checks()))


def test_frozen_roles_move_to_pinned_host_memory_and_back_unchanged():
    from rlhf_jax.sharding import move_to_memory, supports_host_offload

    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}
    if not supports_host_offload():
        assert move_to_memory(params, "pinned_host") is params
        return
    parked = move_to_memory(params, "pinned_host")
    assert all(x.sharding.memory_kind == "pinned_host" for x in jax.tree.leaves(parked))
    back = move_to_memory(parked, "device")
    assert all(x.sharding.memory_kind == "device" for x in jax.tree.leaves(back))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

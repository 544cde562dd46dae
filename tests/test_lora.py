"""LoRA: adapters start at the base model, train alone, shrink the train state, merge for export."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import LoRAConfig
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import llama, load_hf, save_hf
from rlhf_jax.models.config import tiny_config
from rlhf_jax.models.lora import adapter_paths, apply_lora, init_lora, lora_scale, merge, nbytes, num_params
from rlhf_jax.trainers.lora import adapter_loss_sum, policy_and_reference
from rlhf_jax.trainers.sft import sft_loss_sum, sft_train_step
from rlhf_jax.training.state import TrainState, make_optimizer
from updates import assert_same_updates

CONFIG = tiny_config("llama")
QV = LoRAConfig(rank=4, alpha=8.0, targets=("self_attn/(q|v)_proj",))
ALL = LoRAConfig(rank=2, alpha=4.0, targets=("self_attn", "mlp"))


def lora_sft_train_step(config, lora_config, num_microbatches, base, state, batch):
    """The SFT step with LoRA, the frozen base given first (as the stage binds it)."""
    return sft_train_step(config, num_microbatches, state, batch, base=base, lora=lora_config)


def _sft_batch(seed=0, batch=4, length=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CONFIG.vocab_size, (batch, length))
    lengths = rng.integers(6, length + 1, batch)
    prompt_lengths = rng.integers(2, 5, batch)
    index = np.arange(length)[None]
    attention = index < lengths[:, None]
    loss_mask = attention & (index >= prompt_lengths[:, None])
    return {"tokens": jnp.asarray(tokens, jnp.int32), "attention_mask": jnp.asarray(attention),
            "loss_mask": jnp.asarray(loss_mask)}


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, batch):
    return llama.forward(config, params, batch["tokens"], attention_mask=batch["attention_mask"]).logits


_init_params = jax.jit(llama.init_params, static_argnums=0)


def _random_adapters(params, lora_config, seed):
    """Adapters with b != 0 too (init has b = 0, which hides mistakes in the update)."""
    adapters = init_lora(params, lora_config, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_adapter_shapes_and_targets():
    params = _init_params(CONFIG, jax.random.key(0))
    adapters = init_lora(params, QV, jax.random.key(1))
    assert adapter_paths(params, QV) == [("layers", "self_attn", "q_proj"), ("layers", "self_attn", "v_proj")]
    assert set(adapters["layers"]["self_attn"]) == {"q_proj", "v_proj"}
    for name in ("q_proj", "v_proj"):
        layers, fan_in, fan_out = params["layers"]["self_attn"][name]["kernel"].shape
        assert adapters["layers"]["self_attn"][name]["lora_a"].shape == (layers, fan_in, QV.rank)
        assert adapters["layers"]["self_attn"][name]["lora_b"].shape == (layers, QV.rank, fan_out)
    assert len(adapter_paths(params, ALL)) == 7  # q k v o gate up down; never embed_tokens or lm_head


def test_initial_adapters_leave_logits_unchanged():
    for family in ("llama", "qwen2"):  # qwen2: q/k/v carry biases
        config = tiny_config(family)
        params = _init_params(config, jax.random.key(0))
        adapters = init_lora(params, ALL, jax.random.key(1))
        batch = _sft_batch()
        np.testing.assert_array_equal(_logits(config, apply_lora(params, adapters, ALL), batch),
                                      _logits(config, params, batch))


@pytest.mark.parametrize("remat", [False, True])
def test_factored_forward_equals_merged_weights(remat):
    # float64: x W + s (x a) b and x (W + s a b) are the same algebra rounded differently; in float32 the
    # difference depends on the CPU's kernels (1.1e-5 on one logit of an AMD EPYC, under 1e-5 on Intel hosts)
    with jax.enable_x64(True):
        config = dataclasses.replace(CONFIG, remat=remat, dtype="float64", param_dtype="float64")
        params = jax.jit(llama.init_params, static_argnums=0)(config, jax.random.key(0))
        adapters = _random_adapters(params, ALL, 3)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves((params, adapters)))
        batch = _sft_batch()
        factored = _logits(config, apply_lora(params, adapters, ALL), batch)
        # the explicit formula, independent of merge(): W + (alpha / r) a @ b, kernel by kernel
        explicit = jax.tree.map(lambda x: x, params)
        for module, adapter in adapters["layers"]["self_attn"].items():
            kernel = params["layers"]["self_attn"][module]["kernel"]
            explicit["layers"]["self_attn"][module] = {"kernel": kernel + 2.0 * adapter["lora_a"] @ adapter["lora_b"]}
        for module, adapter in adapters["layers"]["mlp"].items():
            kernel = params["layers"]["mlp"][module]["kernel"]
            explicit["layers"]["mlp"][module] = {"kernel": kernel + 2.0 * adapter["lora_a"] @ adapter["lora_b"]}
        assert lora_scale(ALL) == 2.0
        reference = _logits(config, explicit, batch)
        assert float(jnp.max(jnp.abs(reference - _logits(config, params, batch)))) > 1e-2  # the adapters matter
        np.testing.assert_allclose(factored, reference, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(_logits(config, merge(params, adapters, ALL), batch), factored, rtol=1e-10,
                                   atol=1e-12)


def test_adapter_gradient_is_the_chain_rule_through_the_merged_weight():
    """dL/da = s dL/dW' bᵀ and dL/db = s aᵀ dL/dW' at W' = W + s a b (the full fine-tuning gradient)."""
    params = _init_params(CONFIG, jax.random.key(0))
    adapters = _random_adapters(params, QV, 5)
    batch = _sft_batch(seed=2)
    loss = lambda p: sft_loss_sum(CONFIG, p, batch)[0]  # noqa: E731
    adapter_grads = jax.jit(jax.grad(lambda a: loss(apply_lora(params, a, QV))))(adapters)
    weight_grads = jax.jit(jax.grad(loss))(merge(params, adapters, QV))
    scale = lora_scale(QV)
    for module in ("q_proj", "v_proj"):
        a, b = adapters["layers"]["self_attn"][module]["lora_a"], adapters["layers"]["self_attn"][module]["lora_b"]
        d_weight = np.asarray(weight_grads["layers"]["self_attn"][module]["kernel"], np.float64)
        want_a = scale * d_weight @ np.swapaxes(np.asarray(b, np.float64), -1, -2)
        want_b = scale * np.swapaxes(np.asarray(a, np.float64), -1, -2) @ d_weight
        got = adapter_grads["layers"]["self_attn"][module]
        np.testing.assert_allclose(got["lora_a"], want_a, rtol=2e-4, atol=1e-6 * np.abs(want_a).max())
        np.testing.assert_allclose(got["lora_b"], want_b, rtol=2e-4, atol=1e-6 * np.abs(want_b).max())


def test_adapter_only_training_learns_and_leaves_every_base_param_bit_identical():
    params = _init_params(CONFIG, jax.random.key(1))
    base_copy = jax.tree.map(np.array, params)
    batch = _sft_batch(seed=3, batch=8)
    adapters = init_lora(params, ALL, jax.random.key(2))
    state = TrainState.create(adapters, make_optimizer("adamw", 1e-2, grad_clip=1.0), jax.random.key(0))
    step = jax.jit(lora_sft_train_step, static_argnums=(0, 1, 2), donate_argnums=4)
    losses = []
    for _ in range(25):
        state, metrics = step(CONFIG, ALL, 2, params, state, batch)
        losses.append(float(metrics["sft/loss"]))
    assert losses[-1] < 0.9 * losses[0], losses
    for before, after in zip(jax.tree.leaves(base_copy), jax.tree.leaves(params)):
        np.testing.assert_array_equal(before, np.asarray(after))
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)  # the state holds adapters only
    for module in ("q_proj", "v_proj"):
        assert float(jnp.max(jnp.abs(state.params["layers"]["self_attn"][module]["lora_b"]))) > 0
    # the loss the step reports is the merged model's loss
    loss_sum, (count, _) = sft_loss_sum(CONFIG, merge(params, state.params, ALL), batch)
    step_loss = lora_sft_train_step(CONFIG, ALL, 1, params, state, batch)[1]["sft/loss"]
    np.testing.assert_allclose(step_loss, loss_sum / count, rtol=1e-5)


def test_microbatched_adapter_step_equals_one_batch():
    params = _init_params(CONFIG, jax.random.key(1))
    adapters = _random_adapters(params, QV, 7)
    batch = _sft_batch(seed=4, batch=8)
    sgd = make_optimizer("sgd", 1.0, b1=0.0, grad_clip=None)
    step = jax.jit(lora_sft_train_step, static_argnums=(0, 1, 2))
    one, _ = step(CONFIG, QV, 1, params, TrainState.create(adapters, sgd, jax.random.key(0)), batch)
    four, _ = step(CONFIG, QV, 4, params, TrainState.create(adapters, sgd, jax.random.key(0)), batch)
    assert_same_updates(adapters, one.params, four.params)


def _state_bytes(state: TrainState) -> int:
    return nbytes((state.params, state.opt_state))


def test_train_state_memory_drops_by_the_ratio_of_adapter_to_base_params():
    params = _init_params(CONFIG, jax.random.key(0))
    adapters = init_lora(params, QV, jax.random.key(1))
    tx = make_optimizer("adamw", 1e-3)
    full = _state_bytes(TrainState.create(params, tx, jax.random.key(0)))
    lora = _state_bytes(TrainState.create(adapters, tx, jax.random.key(0)))
    # from shapes: AdamW keeps params + mu + nu (float32), plus the same few step counters either way
    layers, hidden = CONFIG.num_layers, CONFIG.hidden_size
    q_out, v_out = CONFIG.num_heads * CONFIG.head_dim, CONFIG.num_kv_heads * CONFIG.head_dim
    adapter_count = layers * QV.rank * ((hidden + q_out) + (hidden + v_out))
    base_count = num_params(params)
    assert num_params(adapters) == adapter_count
    counters = full - 3 * 4 * base_count
    assert 0 <= counters < 64
    assert lora == 3 * 4 * adapter_count + counters
    assert (lora - counters) / (full - counters) == pytest.approx(adapter_count / base_count)
    assert lora < 0.1 * full


def test_merged_export_round_trips_through_hugging_face_files(tmp_path):
    params = _init_params(CONFIG, jax.random.key(0))
    adapters = _random_adapters(params, ALL, 11)
    batch = _sft_batch(seed=5)
    merged = merge(params, adapters, ALL)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert merged["embed_tokens"]["embedding"] is params["embed_tokens"]["embedding"]  # untargeted: shared
    adapted = _logits(CONFIG, apply_lora(params, adapters, ALL), batch)
    save_hf(tmp_path / "hf", CONFIG, jax.tree.map(np.asarray, merged))
    config, loaded = load_hf(tmp_path / "hf")
    np.testing.assert_allclose(_logits(config, jax.tree.map(jnp.asarray, loaded), batch), adapted,
                               rtol=1e-5, atol=1e-5)


def test_reference_is_the_base_params_themselves_not_a_copy():
    params = _init_params(CONFIG, jax.random.key(0))
    adapters = init_lora(params, QV, jax.random.key(1))
    policy, reference = policy_and_reference(params, adapters, QV)
    assert reference is params
    base_leaves = {id(leaf) for leaf in jax.tree.leaves(params)}
    extra = [leaf for leaf in jax.tree.leaves(policy) if id(leaf) not in base_leaves]
    assert num_params(extra) == num_params(adapters)  # the policy adds only lora_a / lora_b
    # and any (params, batch) loss turns into an adapter loss
    batch = _sft_batch()
    loss_fn = adapter_loss_sum(functools.partial(sft_loss_sum, CONFIG), QV, params)
    np.testing.assert_allclose(loss_fn(adapters, batch)[0], sft_loss_sum(CONFIG, params, batch)[0], rtol=1e-6)


def test_a_pattern_that_matches_nothing_names_the_projections():
    params = _init_params(CONFIG, jax.random.key(0))
    with pytest.raises(ConfigError, match=r"pattern 'qproj' matches no projection; the projections are: "
                                          r"layers/mlp/down_proj, .*layers/self_attn/q_proj"):
        init_lora(params, LoRAConfig(rank=4, targets=("q_proj", "qproj")), jax.random.key(0))
    with pytest.raises(ConfigError, match="pattern 'lm_head' matches no projection"):
        init_lora(params, LoRAConfig(rank=4, targets=("lm_head",)), jax.random.key(0))
    with pytest.raises(ConfigError, match="lora.rank"):
        init_lora(params, LoRAConfig(rank=0), jax.random.key(0))


def test_full_fine_tuning_step_is_untouched_by_the_lora_aware_dense():
    """Plain params (no lora_* leaves) must train exactly as before: same tree in, same tree out."""
    params = _init_params(CONFIG, jax.random.key(0))
    state = TrainState.create(params, make_optimizer("sgd", 0.1, b1=0.0), jax.random.key(0))
    new_state, _ = jax.jit(sft_train_step, static_argnums=(0, 1))(CONFIG, 1, state, _sft_batch())
    assert jax.tree.structure(new_state.params) == jax.tree.structure(params)


@pytest.mark.slow
def test_sft_stage_with_lora_checkpoints_adapters_and_writes_the_merged_model(tmp_path):
    from pathlib import Path

    from rlhf_jax import stages as stage_registry
    from rlhf_jax.config import apply_overrides, validate
    from rlhf_jax.registry import get_experiment
    from rlhf_jax.stages.common import load_role
    from rlhf_jax.training.artifacts import load_artifact
    from rlhf_jax.training.checkpoint import Checkpointer

    experiment = apply_overrides(get_experiment("tiny_sft"), [
        f"run_dir={tmp_path}", "stages.sft.max_steps=4", "checkpoint.every_steps=2", "optimizer.learning_rate=1e-2",
        "stages.sft.lora.rank=4", "stages.sft.lora.targets=(self_attn/(q|v)_proj,mlp/down_proj)",
    ])
    validate(experiment)
    stage = experiment.stage("sft")
    resolve = stage_registry.make_resolver(experiment, Path(tmp_path))
    stage_registry.load_runner(stage.kind)(experiment, stage, tmp_path / "sft", resolve)
    role = load_role(experiment, None, resolve, with_tokenizer=False)
    base = role.params
    model = load_artifact(tmp_path / "sft" / "model", with_tokenizer=False).params
    assert jax.tree.structure(model) == jax.tree.structure(base)  # a plain model: later stages load it as usual
    changed = {jax.tree_util.keystr(path)
               for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(model)[0], jax.tree.leaves(base))
               if not np.array_equal(np.asarray(new), np.asarray(old))}
    assert changed == {"['layers']['self_attn']['q_proj']['kernel']", "['layers']['self_attn']['v_proj']['kernel']",
                       "['layers']['mlp']['down_proj']['kernel']"}
    # the checkpoint holds the adapters and their optimizer state, not the backbone
    adapters = init_lora(base, stage.lora, jax.random.key(0))
    like = TrainState.create(adapters, make_optimizer("adamw", 1e-3, total_steps=4), jax.random.key(0))
    checkpointer = Checkpointer(tmp_path / "sft" / "checkpoints")
    restored, _ = checkpointer.restore(like)
    checkpointer.close()
    assert int(restored.step) == 4
    batch = _sft_batch()
    np.testing.assert_allclose(_logits(role.config, apply_lora(base, restored.params, stage.lora), batch),
                               _logits(role.config, model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_adapters_on_q_and_v_start_at_the_base_model(smollm2, left_padded):
    config, params, tokenizer = smollm2
    lora_config = LoRAConfig(rank=8, alpha=16.0, targets=("self_attn/(q|v)_proj",))
    adapters = init_lora(params, lora_config, jax.random.key(0))
    sequences = [tokenizer.encode(text) for text in ("The capital of France is", "LoRA adds low-rank adapters")]
    tokens, mask = left_padded(sequences, pad_id=config.pad_token_id)
    batch = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(mask)}
    # b = 0: the update (x a) b is exactly zero in every adapted layer
    adapted = apply_lora(params, adapters, lora_config)
    for name in ("q_proj", "v_proj"):
        module = adapted["layers"]["self_attn"][name]
        assert not np.any(np.asarray(module["lora_b"])) and module["kernel"] is params["layers"]["self_attn"][name]["kernel"]
    # so the logits are the base model's. The adapted program is compiled apart (XLA fuses and tiles its
    # projections differently), so in float32 the two differ by the order of 30 layers' roundings; in float64
    # that noise is ~1e-13 and any real difference (a wrong scale, a stray update) stands out.
    with jax.enable_x64(True):
        wide = dataclasses.replace(config, dtype="float64", param_dtype="float64")
        to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
        np.testing.assert_allclose(_logits(wide, apply_lora(to64(params), to64(adapters), lora_config), batch),
                                   _logits(wide, to64(params), batch), rtol=1e-9, atol=1e-9)
    # rank * (in + out) per layer for q [576 -> 576] and v [576 -> 192], 30 layers: 460,800 of 134.5M params
    q_out, v_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    expected = config.num_layers * 8 * ((config.hidden_size + q_out) + (config.hidden_size + v_out))
    assert num_params(adapters) == expected == 460_800
    assert num_params(adapters) / num_params(params) < 0.004


@pytest.mark.parametrize("override, message", [
    ("stages.sft.lora.rank=-1", "stages.sft.lora.rank: got -1, expected an integer >= 0 (0: off)"),
    ("stages.sft.lora.alpha=0", "stages.sft.lora.alpha: got 0.0, expected a number > 0"),
    ('stages.sft.lora.targets="(q_proj"', "stages.sft.lora.targets: got '(q_proj', expected a regular expression"),
])
def test_lora_config_errors_name_the_key(override, message):
    from rlhf_jax.config import apply_overrides, validate
    from rlhf_jax.registry import get_experiment

    with pytest.raises(ConfigError) as error:
        validate(apply_overrides(get_experiment("tiny_sft"), [override]))
    assert str(error.value).startswith(message)

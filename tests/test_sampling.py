"""The KV-cache sampler: log-probs equal a teacher-forced forward, EOS/pad masking, filters, keys, buckets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.errors import UserError
from rlhf_jax.models import forward, init_params, tiny_config
from rlhf_jax.sampling import (
    Sampler,
    SamplingSettings,
    batch_bucket,
    first_argmax,
    left_pad,
    packed_bucket,
    prompt_bucket,
    sample_from_logits,
    sampler_logprobs,
    top_k_filter,
    top_p_filter,
)

CONFIG = tiny_config("llama")
# Mixed lengths, left-padded to 20 -> bucket [4, 32]; 29 real tokens, so the Sampler packs the prefill.
PROMPTS = [[5, 6, 7], list(range(9, 29)), [3, 4, 5, 6, 7, 8]]
NEW = 12
# Pad id 2 is also an EOS id, and a quarter of the vocab ends a row: rows stop early, at different steps.
EOS_IDS = (2,) + tuple(range(3, 256, 4))
SAMPLED = SamplingSettings(temperature=0.7, max_new_tokens=NEW, eos_token_ids=EOS_IDS, pad_token_id=2)
FILTERED = SamplingSettings(temperature=1.3, top_k=20, top_p=0.8, max_new_tokens=NEW, eos_token_ids=())
GREEDY = SamplingSettings(greedy=True, max_new_tokens=NEW, eos_token_ids=())

_jit_forward = jax.jit(forward, static_argnums=0)
_jit_init = jax.jit(init_params, static_argnums=0)


@pytest.fixture(scope="module")
def params():
    return _jit_init(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def sampler():
    return Sampler(CONFIG)


def teacher_forced(config, params, prompt_tokens, prompt_mask, out):
    """Logits [B, N, V] that predicted each response token, from one forward over prompt + response."""
    tokens = jnp.concatenate([prompt_tokens, out.response_tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, out.response_mask], axis=1)
    logits = _jit_forward(config, params, tokens, attention_mask=mask).logits
    prompt_length = prompt_tokens.shape[1]
    return logits[:, prompt_length - 1:-1]


@pytest.mark.parametrize("settings", [SAMPLED, FILTERED, GREEDY], ids=["temperature_eos", "top_k_top_p", "greedy"])
def test_logprobs_equal_teacher_forced_forward(params, sampler, settings):
    tokens, mask = left_pad(PROMPTS, pad_id=2)
    out = sampler(params, tokens, mask, jax.random.key(1), settings)
    assert out.response_tokens.shape == (3, NEW) and out.response_logprobs.dtype == jnp.float32
    if not settings.eos_token_ids:  # no EOS ids: every row runs to the end
        assert np.all(np.asarray(out.response_lengths) == NEW)
    logits = teacher_forced(CONFIG, params, jnp.asarray(tokens), jnp.asarray(mask), out)
    expected = jnp.where(out.response_mask, sampler_logprobs(logits, out.response_tokens, settings), 0.0)
    np.testing.assert_allclose(np.asarray(out.response_logprobs), np.asarray(expected), atol=1e-4)
    assert np.all(np.isfinite(np.asarray(out.response_logprobs)))
    if settings.greedy:
        np.testing.assert_array_equal(np.asarray(out.response_tokens), np.asarray(jnp.argmax(logits, -1)))
        np.testing.assert_allclose(np.asarray(expected), np.asarray(
            jnp.take_along_axis(jax.nn.log_softmax(logits), out.response_tokens[..., None], -1)[..., 0]), atol=1e-6)
    if settings.top_k:  # every sampled token is among the top k of the teacher-forced logits
        rank = np.sum(np.asarray(logits) > np.take_along_axis(
            np.asarray(logits), np.asarray(out.response_tokens)[..., None], -1), axis=-1)
        assert rank.max() < settings.top_k


def test_eos_masks_everything_after_it_with_pad_equal_to_eos(params, sampler):
    settings, eos_ids = SAMPLED, EOS_IDS
    tokens, mask = left_pad(PROMPTS + PROMPTS[:1], pad_id=2)
    out = jax.device_get(sampler(params, tokens, mask, jax.random.key(3), settings))
    lengths = out.response_lengths
    assert out.ended_with_eos.any() and (lengths < NEW).any() and len(set(lengths.tolist())) > 1
    for row in range(len(lengths)):
        n = lengths[row]
        np.testing.assert_array_equal(out.response_mask[row], np.arange(NEW) < n)
        emitted = out.response_tokens[row, :n]
        is_eos = np.isin(emitted, eos_ids)
        assert is_eos.sum() == int(out.ended_with_eos[row])  # at most one EOS, and only as the last token
        if out.ended_with_eos[row]:
            assert is_eos[-1]
        else:
            assert n == NEW
        assert np.all(out.response_tokens[row, n:] == 2) and np.all(out.response_logprobs[row, n:] == 0)
        assert np.all(out.response_logprobs[row, :n] < 0)  # the EOS token itself keeps its log-prob
    # The log-probs still match teacher forcing where the mask is True (the EOS included).
    logits = teacher_forced(CONFIG, params, jnp.asarray(tokens), jnp.asarray(mask), out)
    expected = np.where(out.response_mask, np.asarray(sampler_logprobs(logits, out.response_tokens, settings)), 0)
    np.testing.assert_allclose(out.response_logprobs, expected, atol=1e-4)


def test_same_key_same_output_different_key_different_output(params, sampler):
    tokens, mask = left_pad(PROMPTS, pad_id=2)
    first = sampler(params, tokens, mask, jax.random.key(7), FILTERED)
    again = sampler(params, tokens, mask, jax.random.key(7), FILTERED)
    other = sampler(params, tokens, mask, jax.random.key(8), FILTERED)
    np.testing.assert_array_equal(np.asarray(first.response_tokens), np.asarray(again.response_tokens))
    np.testing.assert_array_equal(np.asarray(first.response_logprobs), np.asarray(again.response_logprobs))
    assert np.mean(np.asarray(first.response_tokens) != np.asarray(other.response_tokens)) > 0.5


def test_bucketing_does_not_recompile_and_padding_rows_do_not_change_results(params):
    sampler = Sampler(CONFIG)
    settings = SamplingSettings(temperature=0.8, max_new_tokens=4, eos_token_ids=())
    key = jax.random.key(0)
    prompts = [[5, 6, 7], list(range(9, 19)), [3, 4, 5, 6, 7, 8]]
    three = sampler(params, *left_pad(prompts, pad_id=2), key, settings)  # [3, 10] -> bucket [4, 16]
    assert sampler.num_compilations == 2  # the prefill and the sampling loop
    four = sampler(params, *left_pad(prompts[:1] + [[7], [8, 9], [10]], pad_id=2), key, settings)  # same bucket
    assert sampler.num_compilations == 2
    # temperature and top-p values are traced: new values reuse the programs
    sampler(params, *left_pad(prompts, pad_id=2), key, settings.replace(temperature=1.7))
    assert sampler.num_compilations == 2
    # a row's draw does not depend on the other rows nor on batch padding
    np.testing.assert_array_equal(np.asarray(three.response_tokens[0]), np.asarray(four.response_tokens[0]))
    assert three.response_tokens.shape == (3, 4) and all(len(array) == 3 for array in three)


def test_a_new_packed_length_compiles_only_the_prefill_and_the_two_programs_equal_generate(params):
    """The Sampler runs `prefill` and `decode` as two programs: prompts that pack into a new length compile
    the prefill again, not the sampling loop, and the outputs equal `generate` compiled as one program."""
    from rlhf_jax.sampling import generate

    sampler = Sampler(CONFIG)
    settings = SamplingSettings(temperature=0.9, max_new_tokens=5, eos_token_ids=())
    run = jax.jit(generate, static_argnums=(0, 6))
    short = [list(range(3 + row, 3 + row + n)) for row, n in enumerate((30, 2, 3, 4, 5, 6, 7, 8))]
    longer = [list(range(3 + row, 3 + row + n)) for row, n in enumerate((30, 30, 30, 30, 30, 6, 7, 8))]
    # 8 distinct prompts in a [8, 32] bucket: 65 real tokens pack into 128 slots, 171 into 192
    for prompts, programs in ((short, 2), (longer, 3)):
        tokens, mask = left_pad(prompts, pad_id=2)
        out = jax.device_get(sampler(params, tokens, mask, jax.random.key(5), settings))
        assert sampler.num_compilations == programs
        whole = jax.device_get(run(CONFIG, params, tokens, mask, jax.random.key(5), settings,
                                   packed_bucket(int(mask.sum()))))
        for field in ("response_tokens", "response_lengths", "response_mask", "ended_with_eos"):
            np.testing.assert_array_equal(getattr(out, field), getattr(whole, field), err_msg=field)
        np.testing.assert_allclose(out.response_logprobs, whole.response_logprobs, atol=1e-5)


def test_buckets():
    assert [prompt_bucket(n) for n in (1, 5, 16, 17, 40, 64, 65, 130, 328)] == [16, 16, 16, 32, 64, 64, 128, 192, 384]
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert [packed_bucket(n) for n in (1, 64, 65, 100, 883, 1100)] == [64, 64, 128, 128, 896, 1280]


@pytest.mark.parametrize("block", [64, 8, 2], ids=["one_block", "blocks_of_8", "blocks_of_2"])
@pytest.mark.parametrize("config", [CONFIG, tiny_config("llama", sliding_window=4)], ids=["llama", "sliding_window"])
def test_packed_prefill_equals_padded_prefill(config, block, monkeypatch):
    """With blocks of 8 queries, the 32 packed slots attend block-locally (4 windows of 8 + 19 keys), and the
    20-token prompt spans three blocks. With blocks of 2, its last token (packed slot 22) opens a block and
    attends to all 19 slots before it: the window's full reach."""
    from rlhf_jax.sampling import decode, generate

    monkeypatch.setattr(decode, "_PREFILL_BLOCK", block)
    jax.clear_caches()  # a trace made with another block size would be reused
    params = _jit_init(config, jax.random.key(2))
    settings = SamplingSettings(greedy=True, max_new_tokens=4, eos_token_ids=())
    tokens, mask = left_pad(PROMPTS + [[]], pad_id=2)
    run = jax.jit(generate, static_argnums=(0, 6))
    padded = jax.device_get(run(config, params, tokens, mask, jax.random.key(0), settings, None))
    packed = jax.device_get(run(config, params, tokens, mask, jax.random.key(0), settings, 32))
    np.testing.assert_array_equal(packed.response_tokens, padded.response_tokens)
    np.testing.assert_array_equal(packed.response_lengths, padded.response_lengths)
    np.testing.assert_allclose(packed.response_logprobs, padded.response_logprobs, atol=1e-5)


def _flops(lowered) -> float:
    cost = lowered.compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_distinct_prompts_ignore_what_padding_slots_hold():
    from rlhf_jax.sampling.sampler import distinct_prompts

    tokens, mask = left_pad([[5, 6], [7], [5, 6], [], [7], []], length=3, pad_id=2)
    tokens[2, 0], tokens[5, 1] = 9, 4  # padding slots holding other ids: still the same prompts
    unique_tokens, unique_mask, rows = distinct_prompts(tokens, mask)
    assert rows.tolist() == [0, 1, 0, 2, 1, 2]
    np.testing.assert_array_equal(unique_mask, mask[[0, 1, 3]])
    np.testing.assert_array_equal(unique_tokens[unique_mask], tokens[[0, 1, 3]][mask[[0, 1, 3]]])


@pytest.mark.parametrize("settings", [SAMPLED, GREEDY], ids=["temperature_eos", "greedy"])
def test_repeated_prompts_are_prefilled_once_and_sample_as_the_repeated_batch(params, settings, monkeypatch):
    from rlhf_jax.sampling import generate
    from rlhf_jax.sampling import sampler as sampler_module

    prefilled = []  # the prompt batch each call of the compiled program prefills
    compiled = sampler_module._compiled_prefill
    monkeypatch.setattr(sampler_module, "_compiled_prefill",
                        lambda *args: prefilled.append(np.shape(args[2])) or compiled(*args))

    # a GRPO batch: each prompt 4 times, its samples contiguous rows (and a batch-padding row after them)
    prompts = [prompt for prompt in PROMPTS for _ in range(4)]
    tokens, mask = left_pad(prompts, pad_id=2, rows=16)
    run = jax.jit(generate, static_argnums=(0, 6))
    whole = jax.device_get(run(CONFIG, params, tokens, mask, jax.random.key(3), settings, None))
    sampler = Sampler(CONFIG)
    out = jax.device_get(sampler(params, tokens[:12], mask[:12], jax.random.key(3), settings))
    assert prefilled == [(4, 32)]  # 12 rows (16 in the batch bucket), 3 distinct prompts and a padding row
    # the prefill of the 3 distinct prompts (and one batch-padding row), 4 rows, costs a quarter of 16 rows'
    distinct = tokens[[0, 4, 8, 12]], mask[[0, 4, 8, 12]]
    flops = [_flops(run.lower(CONFIG, params, *batch, jax.random.key(3), settings, None, *rows))
             for batch, rows in (((tokens, mask), ()), (distinct, (np.repeat(np.arange(4, dtype=np.int32), 4),)))]
    assert flops[1] < 0.5 * flops[0], flops
    for field in ("response_tokens", "response_lengths", "response_mask", "ended_with_eos"):
        np.testing.assert_array_equal(getattr(out, field), getattr(whole, field)[:12], err_msg=field)
    np.testing.assert_allclose(out.response_logprobs, whole.response_logprobs[:12], atol=1e-5)
    # the samples of one prompt differ from each other (each row draws its own tokens)
    assert len({tuple(row) for row in out.response_tokens[:4]}) > 1 or settings.greedy
    # a new batch of the same shape and groups reuses the programs
    compiled_before = sampler.num_compilations
    again = sampler(params, *left_pad([prompt for prompt in PROMPTS[::-1] for _ in range(4)], pad_id=2),
                    jax.random.key(4), settings)
    assert sampler.num_compilations == compiled_before and again.response_tokens.shape == (12, NEW)


def test_empty_prompt_rows_generate_nothing(params, sampler):
    tokens, mask = left_pad(PROMPTS + [[]], pad_id=2)
    out = jax.device_get(sampler(params, tokens, mask, jax.random.key(1), FILTERED))
    assert out.response_lengths[3] == 0 and not out.response_mask[3].any() and np.all(out.response_tokens[3] == 2)
    assert np.all(out.response_lengths[:3] == NEW)


# ---- the filters and the draw, against numpy ------------------------------------------------------------


def numpy_kept(logits, temperature, top_k, top_p):
    """float64 reference of the kept set: temperature, then top-k, then the nucleus."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    if top_p is not None:
        masked = np.where(keep, z, -np.inf)
        order = np.argsort(-masked, kind="stable")
        probs = np.exp(masked[order] - masked[order].max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        count = max(1, int(np.sum(before < top_p)))
        keep &= masked >= masked[order][count - 1]
    return keep, np.where(keep, z, -np.inf)


@pytest.mark.parametrize("top_k,top_p", [(5, None), (0, 0.7), (12, 0.5)])
def test_draws_never_leave_the_kept_set_and_follow_its_distribution(top_k, top_p):
    logits = jax.random.normal(jax.random.key(4), (1, 50)) * 2.0
    settings = SamplingSettings(temperature=0.9, top_k=top_k, top_p=top_p)
    keep, z = numpy_kept(np.asarray(logits[0]), 0.9, top_k, top_p)
    draws = 4000
    keys = jax.random.split(jax.random.key(5), draws)
    tokens, logprobs = jax.jit(jax.vmap(lambda key: sample_from_logits(logits, key, settings)))(keys)
    tokens, logprobs = np.asarray(tokens[:, 0]), np.asarray(logprobs[:, 0])
    assert keep[tokens].all()
    expected = np.exp(z - np.logaddexp.reduce(z[keep]))
    frequencies = np.bincount(tokens, minlength=50) / draws
    assert np.abs(frequencies - expected).max() < 0.03
    np.testing.assert_allclose(logprobs, np.log(expected[tokens]), atol=1e-5)


def test_first_argmax_and_the_draw_equal_numpy_argmax_and_jax_categorical():
    rng = np.random.default_rng(0)
    values = rng.integers(-3, 4, size=(64, 37)).astype(np.float32)  # many ties for the largest value
    values[5] = -np.inf
    values[6, 10:] = -np.inf
    values[7, :] = values[7, 0]
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(values))), np.argmax(values, axis=-1))
    logits = jnp.asarray(rng.normal(size=(6, 300)).astype(np.float32) * 3.0).at[2, 100:].set(-jnp.inf)
    settings = SamplingSettings(temperature=1.0)
    for seed in range(20):
        key = jax.random.key(seed)
        tokens, _ = sample_from_logits(logits, key, settings)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(6))
        expected = jax.vmap(jax.random.categorical)(row_keys, logits)
        np.testing.assert_array_equal(np.asarray(tokens), np.asarray(expected))


def test_filters_match_numpy_on_batches():
    logits = np.asarray(jax.random.normal(jax.random.key(6), (4, 3, 40)) * 3.0)
    for top_k, top_p in [(7, None), (0, 0.9), (0, 0.3), (0, 1.0), (10, 0.6)]:
        filtered = np.asarray(top_p_filter(top_k_filter(jnp.asarray(logits), top_k), top_p)
                              if top_p is not None else top_k_filter(jnp.asarray(logits), top_k))
        for index in np.ndindex(logits.shape[:-1]):
            keep, _ = numpy_kept(logits[index], 1.0, top_k, top_p)
            np.testing.assert_array_equal(np.isfinite(filtered[index]), keep)
    # the most probable token always survives, even with a tiny nucleus
    assert np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), 1e-6))).sum(-1).min() == 1


def test_settings_are_validated(params, sampler):
    tokens, mask = left_pad(PROMPTS, pad_id=2)
    for bad in (SamplingSettings(temperature=0.0), SamplingSettings(top_p=1.5), SamplingSettings(max_new_tokens=0),
                SamplingSettings(eos_token_ids=(CONFIG.vocab_size,))):
        with pytest.raises(UserError):
            sampler(params, tokens, mask, jax.random.key(0), bad)


# ---- the decode step against the reference forward, for every config option ------------------------------


@pytest.mark.parametrize("config", [
    tiny_config("qwen2"),  # qkv bias, tied embeddings
    tiny_config("llama", sliding_window=4),  # window shorter than prompt + response
], ids=["qwen2", "sliding_window"])
def test_greedy_decode_matches_forward_for_config_options(config):
    params = _jit_init(config, jax.random.key(1))
    settings = SamplingSettings(greedy=True, max_new_tokens=8, eos_token_ids=())
    tokens, mask = left_pad(PROMPTS, pad_id=2)
    out = Sampler(config)(params, tokens, mask, jax.random.key(0), settings)
    logits = teacher_forced(config, params, jnp.asarray(tokens), jnp.asarray(mask), out)
    np.testing.assert_array_equal(np.asarray(out.response_tokens), np.asarray(jnp.argmax(logits, -1)))
    np.testing.assert_allclose(np.asarray(out.response_logprobs),
                               np.asarray(sampler_logprobs(logits, out.response_tokens, settings)), atol=1e-4)


def test_generate_is_pure_and_jittable_inside_a_step(params):
    from rlhf_jax.sampling import generate

    @jax.jit
    def step(params, tokens, mask, key, temperature):
        settings = SamplingSettings(temperature=temperature, max_new_tokens=4, eos_token_ids=())
        out = generate(CONFIG, params, tokens, mask, key, settings)
        return jnp.sum(jnp.where(out.response_mask, out.response_logprobs, 0.0))

    tokens, mask = left_pad(PROMPTS, pad_id=2)
    total = step(params, tokens, mask, jax.random.key(0), 0.8)
    assert np.isfinite(float(total)) and float(total) < 0


# ---- the real model ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_generate(smollm2, smollm2_path, hh_dev_dialogues):
    import torch  # the test extra installs it: parity with transformers must run, not skip
    from transformers import AutoModelForCausalLM

    from rlhf_jax.models import apply_chat_template

    config, params, tokenizer = smollm2
    prompts = [apply_chat_template(tokenizer, messages) for messages in hh_dev_dialogues_prompts(hh_dev_dialogues)]
    settings = SamplingSettings(greedy=True, max_new_tokens=32, eos_token_ids=(tokenizer.eos_token_id,))
    tokens, mask = left_pad(prompts, pad_id=tokenizer.pad_token_id)
    out = jax.device_get(Sampler(config)(params, tokens, mask, jax.random.key(0), settings))

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                 dtype=torch.float32).eval()
    for row, prompt in enumerate(prompts):  # one prompt at a time: no padding on the reference side
        with torch.inference_mode():
            generated = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=32, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id)
        reference = generated[0, len(prompt):].tolist()
        ours = out.response_tokens[row, :out.response_lengths[row]].tolist()
        assert ours == reference, (row, tokenizer.decode(ours), tokenizer.decode(reference))


def hh_dev_dialogues_prompts(dialogues, count: int = 8) -> list[list[dict]]:
    """The first `count` dialogues up to (not including) their final assistant answer."""
    prompts = []
    for messages in dialogues:
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        prompts.append(messages)
        if len(prompts) == count:
            break
    return prompts


def test_chunked_generation_is_each_chunk_generated_alone_with_its_own_key(params):
    """`chunk_rows`: the rows are generated a chunk at a time (chunk c with fold_in(key, c)); each chunk's
    outputs equal a call on that chunk alone, and equal chunks compile one program."""
    sampler = Sampler(CONFIG)
    settings = SamplingSettings(temperature=0.9, max_new_tokens=5, eos_token_ids=())
    key = jax.random.key(3)
    prompts = [[5, 6, 7], list(range(9, 19)), [3, 4, 5, 6, 7, 8], [11, 12], [4] * 7, [8, 9, 10, 11]]
    tokens, mask = left_pad(prompts, pad_id=2)
    chunked = sampler(params, tokens, mask, key, settings, chunk_rows=2)
    assert chunked.response_tokens.shape == (6, 5) and all(len(array) == 6 for array in chunked)
    assert sampler.num_compilations == 2  # three chunks of two rows: one prefill and one sampling loop
    for index, start in enumerate(range(0, 6, 2)):
        alone = sampler(params, tokens[start:start + 2], mask[start:start + 2], jax.random.fold_in(key, index),
                        settings)
        for got, want in zip(chunked, alone):
            np.testing.assert_array_equal(np.asarray(got[start:start + 2]), np.asarray(want))
    whole = sampler(params, tokens, mask, key, settings, chunk_rows=6)  # one chunk: the plain call
    np.testing.assert_array_equal(np.asarray(whole.response_tokens),
                                  np.asarray(sampler(params, tokens, mask, key, settings).response_tokens))


def test_lora_params_sample_the_adapted_model(params, sampler):
    """Params with LoRA adapters (`apply_lora`: `lora_a`, `lora_b` beside the kernels, as the RL stages sample
    their policy) decode the adapted model at every step, prefill and KV-cache decode alike: the sampler's
    log-probs equal the teacher-forced forward of the adapted params, and its tokens those of the merged
    model. (A decode step that ignored the adapters once sampled a mix of the adapted prompt and the base.)"""
    from rlhf_jax.config import LoRAConfig
    from rlhf_jax.models.lora import apply_lora, init_lora, merge

    lora = LoRAConfig(rank=4, alpha=8.0, targets=("self_attn", "mlp"))
    adapters = init_lora(params, lora, jax.random.key(3))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    adapters = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) * 0.3 for k, x in zip(keys, leaves)])
    adapted, merged = apply_lora(params, adapters, lora), merge(params, adapters, lora)
    tokens, mask = left_pad(PROMPTS, pad_id=2)
    out = sampler(adapted, tokens, mask, jax.random.key(1), SAMPLED)
    logits = teacher_forced(CONFIG, adapted, jnp.asarray(tokens), jnp.asarray(mask), out)
    expected = jnp.where(out.response_mask, sampler_logprobs(logits, out.response_tokens, SAMPLED), 0.0)
    np.testing.assert_allclose(np.asarray(out.response_logprobs), np.asarray(expected), atol=1e-4)
    greedy = sampler(adapted, tokens, mask, jax.random.key(1), GREEDY)
    np.testing.assert_array_equal(np.asarray(greedy.response_tokens),
                                  np.asarray(sampler(merged, tokens, mask, jax.random.key(1), GREEDY).response_tokens))
    base = sampler(params, tokens, mask, jax.random.key(1), GREEDY)
    assert np.any(np.asarray(base.response_tokens) != np.asarray(greedy.response_tokens))  # the adapters matter

"""`rlhf_jax.rewards` reward sources: model, token and text rewards behind one interface, weighted sums, specs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import rewards
from rlhf_jax.errors import UserError
from rlhf_jax.models import llama, load
from rlhf_jax.rewards import ModelReward, RewardSource, ScoringBatch, TextReward, TokenReward

EOS = 2  # SmolLM2: pad = EOS = 2


@pytest.fixture(scope="module")
def tiny():
    config, params, tokenizer = load("tiny:smollm2")
    assert tokenizer.eos_token_id == EOS and tokenizer.pad_token_id == EOS
    reward_params = llama.init_scalar_model(config, params, jax.random.key(1))
    return config, params, reward_params, tokenizer


def random_batch(seed, prompt_lengths, response_lengths, prompt=5, response=6, vocab=50, references=None):
    """Random ids; prompts left-padded and responses right-padded with EOS ids, masks from the lengths."""
    rng = np.random.default_rng(seed)
    batch = len(prompt_lengths)
    prompt_mask = np.arange(prompt)[None] >= prompt - np.asarray(prompt_lengths)[:, None]
    response_mask = np.arange(response)[None] < np.asarray(response_lengths)[:, None]
    prompt_tokens = np.where(prompt_mask, rng.integers(3, vocab, (batch, prompt)), EOS)
    response_tokens = np.where(response_mask, rng.integers(3, vocab, (batch, response)), EOS)
    return ScoringBatch(jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_mask),
                        jnp.asarray(response_tokens, jnp.int32), jnp.asarray(response_mask),
                        tuple(references or (None,) * batch))


def text_batch(tokenizer, prompts, responses, lengths, references, prompt=12, response=12):
    """Prompts left-padded with EOS ids; each response is its ids right-padded with EOS ids, its mask the first
    `lengths[row]` columns (so tokens after the mask may be anything, as a sampler leaves them)."""
    prompt_tokens = np.full((len(prompts), prompt), EOS, np.int32)
    prompt_mask = np.zeros((len(prompts), prompt), bool)
    for row, text in enumerate(prompts):
        ids = tokenizer.encode(text)
        prompt_tokens[row, prompt - len(ids):] = ids
        prompt_mask[row, prompt - len(ids):] = True
    response_tokens = np.full((len(responses), response), EOS, np.int32)
    for row, ids in enumerate(responses):
        response_tokens[row, :len(ids)] = ids
    response_mask = np.arange(response)[None] < np.asarray(lengths)[:, None]
    return ScoringBatch(jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), jnp.asarray(response_tokens),
                        jnp.asarray(response_mask), tuple(references))


# ---- ModelReward ---------------------------------------------------------------------------------------------


def test_model_reward_scores_the_concatenation_and_compiles_once(tiny, monkeypatch):
    config, _, reward_params, _ = tiny
    traces = []
    real = llama.rewards_forward

    def counting(*args, **kwargs):
        traces.append(1)  # runs only while tracing
        return real(*args, **kwargs)

    monkeypatch.setattr(llama, "rewards_forward", counting)
    source = ModelReward("rm", config, reward_params)
    assert isinstance(source, RewardSource)
    batch = random_batch(0, prompt_lengths=[5, 3, 1], response_lengths=[6, 2, 0])
    tokens = jnp.concatenate([batch.prompt_tokens, batch.response_tokens], axis=1)
    mask = jnp.concatenate([batch.prompt_mask, batch.response_mask], axis=1)
    want = np.asarray(real(config, reward_params, tokens, mask))

    got = source(batch)
    assert got.dtype == jnp.float32 and got.shape == (3,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    # each row's score is the model on its unpadded [prompt | response], at its last real token
    for row in range(3):
        sequence = np.asarray(tokens[row])[np.asarray(mask[row])][None]
        alone = real(config, reward_params, jnp.asarray(sequence), jnp.ones(sequence.shape, bool))
        np.testing.assert_allclose(float(got[row]), float(alone[0]), atol=1e-4)

    other = random_batch(1, prompt_lengths=[2, 5, 4], response_lengths=[1, 6, 3])
    source(batch), source(other)
    assert len(traces) == 1  # same shapes: no retrace
    source(random_batch(2, prompt_lengths=[2, 5, 4], response_lengths=[1, 6, 3], response=8))
    assert len(traces) == 2  # a new response width compiles once more (the counter does count traces)
    # with its reward stage's statistics, the source returns (score − mean) / std
    normalised = ModelReward("rm", config, reward_params, normalisation=(0.25, 2.0))
    np.testing.assert_allclose(np.asarray(normalised(batch)), (want - 0.25) / 2.0, rtol=1e-5, atol=1e-6)


# ---- TokenReward ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["fn:target_token_fraction:7", "fn:length:0.5"])
def test_token_reward_equals_the_function(spec):
    batch = random_batch(3, prompt_lengths=[5, 1, 0, 4], response_lengths=[6, 0, 3, 1], vocab=10)
    fn = rewards.get_reward_function(spec)
    want = np.asarray(fn(*batch[:4]))
    source = TokenReward("x", fn)
    got = source(batch)
    assert got.dtype == jnp.float32 and got.shape == (4,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # {0, 1} masks score the same
    as_int = batch._replace(prompt_mask=batch.prompt_mask.astype(jnp.int32),
                            response_mask=batch.response_mask.astype(jnp.int32))
    np.testing.assert_allclose(np.asarray(source(as_int)), want, rtol=1e-6)


# ---- TextReward ----------------------------------------------------------------------------------------------


def arith_rows(tokenizer):
    """(responses as ids, mask lengths, references, expected arith_exact rewards)."""
    encode = tokenizer.encode
    answer = encode("The answer is 42.")
    rows = [
        (answer + [EOS], len(answer) + 1, "42", 1.0),  # ends in EOS, then pads that are also EOS ids
        (encode("17 + 25 = 41") + [EOS], len(encode("17 + 25 = 41")) + 1, "42", 0.0),  # wrong answer
        (answer + [EOS] + encode(" = 7"), len(answer) + 1, "42", 1.0),  # ids after the mask are not read
        (encode("The answer is 42"), len(encode("The answer is 42")) - 1, "4", 1.0),  # cut at its length: "... 4"
        ([], 0, "3", 0.0),  # an empty response has no number
        (answer + [EOS], len(answer) + 1, " 42 ", 1.0),  # a reference with spaces around the integer
    ]
    return [list(column) for column in zip(*rows)]


def test_text_reward_arith_exact(tiny):
    tokenizer = tiny[3]
    responses, lengths, references, want = arith_rows(tokenizer)
    batch = text_batch(tokenizer, ["What is 17 + 25?"] * len(responses), responses, lengths, references)
    [source] = rewards.build_reward_sources(["text:arith_exact"], load_model=None, tokenizer=tokenizer)
    assert isinstance(source, TextReward) and source.name == "arith_exact"
    got = source(batch)
    assert got.dtype == np.float32 and got.shape == (len(want),)
    np.testing.assert_array_equal(got, want)


def test_text_reward_decodes_prompt_and_response_by_their_masks(tiny):
    tokenizer = tiny[3]
    responses, lengths, references, _ = arith_rows(tokenizer)
    prompts = ["What is 17 + 25?", "Add 1 and 3.", "Hi", "What is 2 + 2?", "x", "Compute 40 plus 2."]
    batch = text_batch(tokenizer, prompts, responses, lengths, references)
    seen = []

    def probe(response_text, reference, prompt_text):
        seen.append((response_text, reference, prompt_text))
        return 0.5 * len(seen)

    got = TextReward("probe", probe, tokenizer)(batch)
    np.testing.assert_array_equal(got, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0])  # fractional scores stay float
    assert [prompt for _, _, prompt in seen] == prompts
    assert [reference for _, reference, _ in seen] == references
    assert [response for response, _, _ in seen] == [
        "The answer is 42.", "17 + 25 = 41", "The answer is 42.", "The answer is 4", "", "The answer is 42."]


@pytest.mark.parametrize("reference,message", [
    (None, "text reward 'arith_exact', row 1 of the batch: no reference answer"),
    ("4.5", "text reward 'arith_exact', row 1 of the batch: the reference answer '4.5' is not an integer"),
    ("forty-two", "row 1 of the batch: the reference answer 'forty-two' is not an integer"),
])
def test_arith_exact_needs_an_integer_reference(tiny, reference, message):
    tokenizer = tiny[3]
    ids = tokenizer.encode("The answer is 42.") + [EOS]
    batch = text_batch(tokenizer, ["q", "q"], [ids, ids], [len(ids), len(ids)], ["42", reference], response=10)
    source = TextReward("arith_exact", rewards.get_text_reward("text:arith_exact"), tokenizer)
    with pytest.raises(UserError, match=re.escape(message)):
        source(batch)


def test_a_registered_text_reward_is_built_from_its_spec(tiny):
    tokenizer = tiny[3]

    @rewards.register_text_reward("min_words", "1 if the response has at least COUNT words, else 0")
    def min_words(count: int):
        return lambda response_text, reference, prompt_text: float(len(response_text.split()) >= count)

    try:
        assert "text:min_words:COUNT  1 if the response has" in rewards.describe_text_rewards()
        responses = [tokenizer.encode("one two three") + [EOS], tokenizer.encode("one two") + [EOS]]
        batch = text_batch(tokenizer, ["q", "q"], responses, [len(ids) for ids in responses], [None, None])
        [source] = rewards.build_reward_sources(["text:min_words:3"], None, tokenizer)
        assert source.name == "min_words"
        np.testing.assert_array_equal(source(batch), [1.0, 0.0])
    finally:
        del rewards.TEXT_REWARDS.factories["min_words"]


# ---- combine -------------------------------------------------------------------------------------------------


class HostScores:
    """A reward source written by hand: fixed numpy scores."""

    def __init__(self, name, scores):
        self.name, self.scores = name, np.asarray(scores, np.float32)

    def __call__(self, batch):
        return self.scores


def test_combine_is_the_weighted_sum_with_each_source_logged():
    batch = random_batch(4, prompt_lengths=[5, 2, 3], response_lengths=[6, 1, 0], vocab=8)
    length = TokenReward("length", rewards.get_reward_function("fn:length"))
    fraction = TokenReward("target_token_fraction", rewards.get_reward_function("fn:target_token_fraction:5"))
    judge = HostScores("judge", [0.25, -1.5, 0.7])
    logged_only = HostScores("logged_only", [np.nan, 1.0, 2.0])  # weight 0: its NaN must not reach the total
    assert isinstance(judge, RewardSource)
    weights = [0.5, -2.0, 1.0, 0.0]

    total, metrics = rewards.combine([length, fraction, judge, logged_only], weights, batch)

    raw = {source.name: np.asarray(source(batch), np.float64) for source in (length, fraction, judge, logged_only)}
    want = 0.5 * raw["length"] - 2.0 * raw["target_token_fraction"] + raw["judge"]
    assert total.dtype == jnp.float32 and total.shape == (3,)
    np.testing.assert_allclose(np.asarray(total), want, rtol=1e-6)
    assert set(metrics) == {"reward/length", "reward/target_token_fraction", "reward/judge", "reward/logged_only"}
    for name in ("length", "target_token_fraction", "judge"):
        assert metrics[f"reward/{name}"].dtype == jnp.float32 and metrics[f"reward/{name}"].shape == ()
        np.testing.assert_allclose(float(metrics[f"reward/{name}"]), raw[name].mean(), rtol=1e-6)  # raw, unweighted
    assert np.isnan(float(metrics["reward/logged_only"]))


def test_combine_checks_weights_and_names():
    batch = random_batch(5, prompt_lengths=[1], response_lengths=[1])
    with pytest.raises(UserError, match=re.escape("1 reward weights for 2 reward sources (a, b)")):
        rewards.combine([HostScores("a", [1.0]), HostScores("b", [1.0])], [1.0], batch)
    with pytest.raises(ValueError, match="distinct names"):
        rewards.combine([HostScores("a", [1.0]), HostScores("a", [1.0])], [1.0, 1.0], batch)


# ---- specs ----------------------------------------------------------------------------------------------------


def test_build_reward_sources_names_and_kinds(tiny):
    config, _, reward_params, tokenizer = tiny
    loaded = []

    def load_model(spec):
        loaded.append(spec)
        return config, reward_params, "scalar", {"reward_mean": 1.0, "reward_std": 4.0} if spec == "runs/b/reward" \
            else {}

    specs = ["fn:length", "runs/a/reward", "text:arith_exact", "runs/b/reward", "fn:length:2", "runs/c/reward"]
    sources = rewards.build_reward_sources(specs, load_model, tokenizer)
    assert [source.name for source in sources] == ["length", "rm", "arith_exact", "rm_2", "length_2", "rm_3"]
    assert [type(source) for source in sources] == [TokenReward, ModelReward, TextReward, ModelReward, TokenReward,
                                                    ModelReward]
    assert loaded == ["runs/a/reward", "runs/b/reward", "runs/c/reward"]
    batch = random_batch(6, prompt_lengths=[4, 2], response_lengths=[3, 6])
    np.testing.assert_allclose(np.asarray(sources[4](batch)), [6.0, 12.0])
    raw = np.asarray(rewards.model_scores(config, reward_params, *batch[:4]))
    np.testing.assert_allclose(np.asarray(sources[1](batch)), raw, rtol=1e-6)
    # each reward model is normalised by the statistics in its own metadata
    np.testing.assert_allclose(np.asarray(sources[3](batch)), (raw - 1.0) / 4.0, rtol=1e-5, atol=1e-6)


def never_load(spec):
    raise AssertionError(f"{spec} loaded before the function specs were checked")


@pytest.mark.parametrize("specs,message", [
    (["rm", "text:no_such_reward"],
     "unknown text reward 'no_such_reward' in 'text:no_such_reward'; expected one of arith_exact"),
    (["rm", "text:arith_exact:3"], "text reward 'text:arith_exact:3': expected text:arith_exact"),
    (["text:"], "text reward 'text:': expected text:NAME[:ARG...]"),
    (["rm", "fn:no_such_reward"], "unknown reward function 'no_such_reward' in 'fn:no_such_reward'"),
    (["fn:length:abc"], "reward function 'fn:length:abc': argument 'abc' is not a number"),
    ([], "no reward sources"),
])
def test_bad_specs_are_user_errors_before_any_model_loads(tiny, specs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        rewards.build_reward_sources(specs, never_load, tiny[3])


def test_a_text_reward_needs_a_tokenizer():
    with pytest.raises(UserError, match=re.escape("reward 'text:arith_exact': a text reward needs a tokenizer")):
        rewards.build_reward_sources(["fn:length", "text:arith_exact"], never_load, tokenizer=None)


def test_a_language_model_is_not_a_reward_model(tiny):
    config, params, _, tokenizer = tiny
    with pytest.raises(UserError, match=re.escape("reward 'tiny:smollm2': a language model, expected a reward model")):
        rewards.build_reward_sources(["tiny:smollm2"], lambda spec: (config, params, "lm", {}), tokenizer)

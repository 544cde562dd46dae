"""Chosen-token log-probs and entropy: plain, chunked over T and V, from hidden states; memory and masking."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.losses import (
    chunked_token_entropy,
    chunked_token_logprobs,
    logprobs_and_entropy_from_hidden,
    logprobs_from_hidden,
    sft_loss,
    token_entropy,
    logprobs_from_logits,
)
from rlhf_jax.losses.logprobs import kept_rows_logprobs_from_hidden

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
FP32 = dict(rtol=1e-5, atol=2e-6)
B, T, V, D = 2, 7, 11, 4
# (seq_chunk, vocab_chunk): none, ragged over T only, ragged over both, one position and one column at a time
CHUNKINGS = [(None, None), (3, None), (2, 5), (1, 1)]


def ref_log_softmax(logits, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ref_logprobs(logits, tokens, temperature=1.0):
    return np.take_along_axis(ref_log_softmax(logits, temperature), tokens[..., None], -1)[..., 0]


def ref_entropy(logits, temperature=1.0):
    logp = ref_log_softmax(logits, temperature)
    return -(np.exp(logp) * logp).sum(-1)


def random_inputs(seed, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(B, T, V)) * scale).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    unembedding = rng.normal(size=(D, V)).astype(np.float32)
    return logits, tokens, hidden, unembedding


# Every variant as f(logits, tokens, hidden, unembedding, temperature) -> (logprobs or None, entropy or None),
# so the shared properties below are tested on each.
def _variants():
    variants = {
        "token_logprobs": lambda lg, tk, h, w, tau: (logprobs_from_logits(lg, tk, tau), None),
        "token_entropy": lambda lg, tk, h, w, tau: (None, token_entropy(lg, tau)),
    }
    for sc, vc in CHUNKINGS:
        variants[f"chunked_logprobs[{sc},{vc}]"] = (
            lambda lg, tk, h, w, tau, sc=sc, vc=vc: (chunked_token_logprobs(lg, tk, tau, seq_chunk=sc, vocab_chunk=vc),
                                                     None))
        variants[f"chunked_entropy[{sc},{vc}]"] = (
            lambda lg, tk, h, w, tau, sc=sc, vc=vc: (None,
                                                     chunked_token_entropy(lg, tau, seq_chunk=sc, vocab_chunk=vc)))
        variants[f"from_hidden[{sc},{vc}]"] = (
            lambda lg, tk, h, w, tau, sc=sc, vc=vc: logprobs_and_entropy_from_hidden(h, w, tk, tau, seq_chunk=sc,
                                                                                     vocab_chunk=vc))
    variants["logprobs_from_hidden[3,4]"] = lambda lg, tk, h, w, tau: (
        logprobs_from_hidden(h, w, tk, tau, seq_chunk=3, vocab_chunk=4), None)
    return variants


VARIANTS = _variants()
# The shared properties (jit, bf16, vmap) are checked on every public function, chunked both ways at once.
PROPERTY_VARIANTS = ["token_logprobs", "token_entropy", "chunked_logprobs[2,5]", "chunked_entropy[2,5]",
                     "from_hidden[2,5]", "logprobs_from_hidden[3,4]"]


def _masked_variants():
    sc, vc = 2, 5
    return {
        "token_logprobs": lambda lg, tk, h, w, m: (logprobs_from_logits(lg, tk, mask=m), None),
        "token_entropy": lambda lg, tk, h, w, m: (None, token_entropy(lg, mask=m)),
        f"chunked_logprobs[{sc},{vc}]": lambda lg, tk, h, w, m: (
            chunked_token_logprobs(lg, tk, mask=m, seq_chunk=sc, vocab_chunk=vc), None),
        f"chunked_entropy[{sc},{vc}]": lambda lg, tk, h, w, m: (
            None, chunked_token_entropy(lg, mask=m, seq_chunk=sc, vocab_chunk=vc)),
        f"from_hidden[{sc},{vc}]": lambda lg, tk, h, w, m: logprobs_and_entropy_from_hidden(
            h, w, tk, mask=m, seq_chunk=sc, vocab_chunk=vc),
        "logprobs_from_hidden[3,4]": lambda lg, tk, h, w, m: (
            logprobs_from_hidden(h, w, tk, mask=m, seq_chunk=3, vocab_chunk=4), None),
        "from_hidden_masked_first[3]": lambda lg, tk, h, w, m: logprobs_and_entropy_from_hidden(
            h, w, tk, mask=m, seq_chunk=sc, masked_first=3),
        "logprobs_from_hidden_masked_first[4,5]": lambda lg, tk, h, w, m: (
            logprobs_from_hidden(h, w, tk, mask=m, vocab_chunk=vc, masked_first=4), None),
    }


MASKED_VARIANTS = _masked_variants()
_JITTED = {}


def _jitted(name):
    if name not in _JITTED:
        _JITTED[name] = jax.jit(VARIANTS[name])
    return _JITTED[name]


def _reference(name, logits, tokens, hidden, unembedding, tau):
    if "from_hidden" in name:
        logits = np.asarray(hidden, np.float64) @ np.asarray(unembedding, np.float64)
    return ref_logprobs(logits, tokens, tau), ref_entropy(logits, tau)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@SETTINGS
@given(seed=st.integers(0, 2**31), tau=st.sampled_from([1.0, 0.7, 1.5]), scale=st.sampled_from([0.1, 3.0, 30.0]))
def test_matches_float64_numpy(name, seed, tau, scale):
    logits, tokens, hidden, unembedding = random_inputs(seed, scale)
    hidden = hidden * np.float32(scale / 3)
    # τ is traced, so each variant compiles once for all examples
    logprobs, entropy = _jitted(name)(logits, tokens, hidden, unembedding, tau)
    want_logprobs, want_entropy = _reference(name, logits, tokens, hidden, unembedding, tau)
    tolerance = dict(FP32)
    if "from_hidden" in name:
        # the logits themselves are float32 products h·W, each off by up to ~D ulp(|h|·|W|) from the float64 ones
        logit_scale = np.abs(hidden).max() * np.abs(unembedding).max() * D / tau
        tolerance["atol"] = max(FP32["atol"], D * np.finfo(np.float32).eps * logit_scale)
    if logprobs is not None:
        assert logprobs.dtype == jnp.float32 and logprobs.shape == (B, T)
        np.testing.assert_allclose(np.asarray(logprobs), want_logprobs, **tolerance)
    if entropy is not None:
        assert entropy.dtype == jnp.float32 and entropy.shape == (B, T)
        np.testing.assert_allclose(np.asarray(entropy), want_entropy, **tolerance)


def test_hand_computed():
    # logits [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2]
    # log p(token 2) = ln(1/2) = -0.693147; log p(token 0) = ln(1/4) = -1.386294
    # entropy = -(2 · ¼ ln ¼ + ½ ln ½) = ½ ln 4 + ½ ln 2 = 1.5 ln 2 = 1.039721
    # with temperature 2: logits [0, 0, ½ ln 2] -> weights [1, 1, √2], log p(token 2) = ½ ln 2 − ln(2 + √2)
    logits = jnp.array([[[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)]]])
    tokens = jnp.array([[2, 0]])
    np.testing.assert_allclose(np.asarray(logprobs_from_logits(logits, tokens)), [[math.log(0.5), math.log(0.25)]],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(token_entropy(logits)), [[1.5 * math.log(2)] * 2], rtol=1e-6)
    np.testing.assert_allclose(float(logprobs_from_logits(logits, tokens, temperature=2.0)[0, 0]),
                               0.5 * math.log(2) - math.log(2 + math.sqrt(2)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(chunked_token_logprobs(logits, tokens, seq_chunk=1, vocab_chunk=2)),
                               [[math.log(0.5), math.log(0.25)]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(chunked_token_entropy(logits, seq_chunk=1, vocab_chunk=2)),
                               [[1.5 * math.log(2)] * 2], rtol=1e-6)
    # hidden [1, 0] with W = [[0, 0, ln 2], [5, 5, 5]] gives the same logits
    hidden = jnp.array([[[1.0, 0.0], [1.0, 0.0]]])
    unembedding = jnp.array([[0.0, 0.0, math.log(2)], [5.0, 5.0, 5.0]])
    np.testing.assert_allclose(np.asarray(logprobs_from_hidden(hidden, unembedding, tokens, vocab_chunk=2)),
                               [[math.log(0.5), math.log(0.25)]], rtol=1e-6)


@pytest.mark.parametrize("name", PROPERTY_VARIANTS)
def test_jit_equals_eager(name):
    args = random_inputs(0)
    eager = VARIANTS[name](*args, 0.8)
    jitted = _jitted(name)(*args, 0.8)
    for e, j in zip(eager, jitted):
        if e is not None:
            np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PROPERTY_VARIANTS)
def test_bf16_inputs_give_float32(name):
    logits, tokens, hidden, unembedding = random_inputs(1)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (logits, hidden, unembedding)]
    logprobs, entropy = _jitted(name)(bf16[0], tokens, bf16[1], bf16[2], 1.0)
    # float32 arithmetic on the bf16 values (products of bf16 are exact in float32)
    upcast = [np.asarray(x.astype(jnp.float32), np.float64) for x in bf16]
    want_logprobs, want_entropy = _reference(name, upcast[0], tokens, upcast[1], upcast[2], 1.0)
    for got, want in ((logprobs, want_logprobs), (entropy, want_entropy)):
        if got is not None:
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(got), want, **FP32)


@pytest.mark.parametrize("name", PROPERTY_VARIANTS)
def test_vmap_over_leading_axis(name):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, B, T, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(3, B, T))
    hidden = rng.normal(size=(3, B, T, D)).astype(np.float32)
    unembedding = rng.normal(size=(D, V)).astype(np.float32)
    batched = jax.jit(jax.vmap(VARIANTS[name], in_axes=(0, 0, 0, None, None)))(logits, tokens, hidden, unembedding,
                                                                              0.8)
    for i in range(3):
        # each member equals the float64 reference for that member alone
        want = _reference(name, logits[i], tokens[i], hidden[i], unembedding, 0.8)
        for got, expected in zip(batched, want):
            if got is not None:
                assert got.shape == (3, B, T)
                np.testing.assert_allclose(np.asarray(got[i]), expected, **FP32)


def _assert_directional_derivatives(value_and_grad, args, num_directions=3, step=1e-6):
    """Central differences of a float64 function along random directions against ``<grad, direction>``.

    ``value_and_grad(*args) -> (value, grads)`` is one compiled function, used for both.
    """
    rng = np.random.default_rng(7)
    args = [np.asarray(a, np.float64) for a in args]  # direction arithmetic in numpy: no extra compilations
    _, grad = value_and_grad(*args)
    for _ in range(num_directions):
        directions = [rng.normal(size=a.shape) for a in args]
        plus, _ = value_and_grad(*[a + step * d for a, d in zip(args, directions)])
        minus, _ = value_and_grad(*[a - step * d for a, d in zip(args, directions)])
        numeric = (float(plus) - float(minus)) / (2 * step)
        analytic = sum(float(np.vdot(np.asarray(g), d)) for g, d in zip(grad, directions))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sc,vc", [(None, None), (2, 5)])
def test_gradients_float64(sc, vc):
    logits, tokens, hidden, unembedding = random_inputs(3)
    rng = np.random.default_rng(4)
    weights = rng.normal(size=(B, T))
    mask = rng.random((B, T)) < 0.7
    with jax.enable_x64(True):
        lg, h, w, c = (jnp.asarray(x, jnp.float64) for x in (logits, hidden, unembedding, weights))

        def from_logits(x):
            lp = chunked_token_logprobs(x, tokens, 0.9, mask=mask, seq_chunk=sc, vocab_chunk=vc)
            ent = chunked_token_entropy(x, 0.9, seq_chunk=sc, vocab_chunk=vc)
            return jnp.sum(c * lp) + jnp.sum(jnp.sin(ent))

        def from_hidden(hh, ww):
            lp, ent = logprobs_and_entropy_from_hidden(hh, ww, tokens, 0.9, mask=mask, seq_chunk=sc, vocab_chunk=vc)
            return jnp.sum(c * lp) + jnp.sum(jnp.sin(ent))

        def plain(x):
            return jnp.sum(c * logprobs_from_logits(x, tokens, 0.9, mask=mask)) + jnp.sum(jnp.sin(token_entropy(x, 0.9)))

        chunked = jax.eval_shape(lambda x: chunked_token_logprobs(x, tokens, seq_chunk=sc, vocab_chunk=vc), lg)
        assert chunked.dtype == jnp.float64  # float64 in, float64 out
        logits_value_and_grad = jax.jit(jax.value_and_grad(from_logits, argnums=(0,)))
        _assert_directional_derivatives(logits_value_and_grad, [lg])
        _assert_directional_derivatives(jax.jit(jax.value_and_grad(from_hidden, argnums=(0, 1))), [h, w])
        logits_grad = logits_value_and_grad(lg)[1][0]
        # the chunked gradient equals the plain one
        np.testing.assert_allclose(np.asarray(logits_grad), np.asarray(jax.jit(jax.grad(plain))(lg)), rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("name", PROPERTY_VARIANTS)
def test_nan_and_inf_at_masked_positions(name):
    # Padding positions may hold garbage logits / hidden states: NaN, inf and −inf are planted there.
    logits, tokens, hidden, unembedding = random_inputs(5)
    mask = np.ones((B, T), bool)
    mask[0, 4:] = False
    mask[1, :2] = False
    poison = np.zeros((B, T, 1), np.float32)
    poison[0, 4], poison[0, 5], poison[0, 6], poison[1, :2] = np.nan, np.inf, -np.inf, np.nan
    bad_logits = np.where(mask[..., None], logits, poison).astype(np.float32)
    bad_hidden = np.where(mask[..., None], hidden, poison).astype(np.float32)
    masked_fn = MASKED_VARIANTS[name]
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(B, T)), jnp.float32)

    def loss(lg, h):
        outputs = [o for o in masked_fn(lg, tokens, h, unembedding, mask) if o is not None]
        return sum(jnp.sum(weights * o) for o in outputs)

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, grads = value_and_grads(bad_logits, bad_hidden)
    clean_value, clean_grads = value_and_grads(logits, hidden)
    assert np.isfinite(value)
    np.testing.assert_allclose(float(value), float(clean_value), rtol=1e-6)
    for grad, clean_grad in zip(grads, clean_grads):
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(clean_grad), rtol=1e-6, atol=1e-8)
    # with the mask given, masked outputs are 0
    for output in masked_fn(bad_logits, tokens, bad_hidden, unembedding, mask):
        if output is not None:
            assert np.all(np.asarray(output)[~mask] == 0)


def test_without_mask_a_nan_position_stays_local_and_the_loss_masks_it():
    # No mask passed to the log-prob function: the NaN stays at its own position and sft_loss's `where` keeps it
    # out of the loss value (the gradient needs the mask passed to the log-prob function, tested above).
    logits, tokens, _, _ = random_inputs(6)
    mask = np.ones((B, T), bool)
    mask[0, 6] = False
    bad_logits = np.where(mask[..., None], logits, np.nan).astype(np.float32)
    for logprobs in (logprobs_from_logits(bad_logits, tokens),
                     chunked_token_logprobs(bad_logits, tokens, seq_chunk=2, vocab_chunk=5)):
        assert np.isnan(logprobs[0, 6]) and np.all(np.isfinite(np.asarray(logprobs)[mask]))
        np.testing.assert_allclose(float(sft_loss(logprobs, mask)[0]),
                                   float(sft_loss(logprobs_from_logits(logits, tokens), mask)[0]), rtol=1e-6)


def test_entropy_with_minus_inf_logits_is_finite():
    # A −inf logit (a banned token) has probability 0 and contributes 0 to the entropy, not 0 · −inf = NaN.
    logits = np.array([[[0.0, 0.0, -np.inf, math.log(2)]]], np.float32)  # entropy as the hand case: 1.5 ln 2
    for entropy in (token_entropy(logits), chunked_token_entropy(logits, seq_chunk=1, vocab_chunk=2),
                    chunked_token_entropy(logits, seq_chunk=1, vocab_chunk=3)):
        np.testing.assert_allclose(np.asarray(entropy), [[1.5 * math.log(2)]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(chunked_token_logprobs(logits, jnp.array([[3]]), vocab_chunk=3)),
                               [[math.log(0.5)]], rtol=1e-6)


def test_invalid_arguments():
    logits, tokens, hidden, unembedding = random_inputs(0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        logprobs_from_logits(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="seq_chunk must be a positive integer"):
        chunked_token_logprobs(logits, tokens, seq_chunk=0)
    with pytest.raises(ValueError, match="hidden size 4 does not match unembedding rows 3"):
        logprobs_from_hidden(hidden, unembedding[:3], tokens)


# --------------------------------------------------------------------------------------------------------------
# Memory: the chunked variants never form a float32 [B, T, V] array, forward or backward.


def _intermediate_avals(closed_jaxpr):
    """Every value produced inside a jaxpr, including inside scan/map/checkpoint/pjit bodies."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.extend(v.aval for v in eqn.outvars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(closed_jaxpr.jaxpr)
    return found


def _largest_float32(fn, *args):
    avals = _intermediate_avals(jax.make_jaxpr(fn)(*args))
    sizes = [math.prod(a.shape) for a in avals if getattr(a, "dtype", None) == jnp.float32]
    return max(sizes)


MB, MT, MV, MD = 2, 32, 64, 4


def test_chunked_logprobs_never_form_float32_full_logits():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(MB, MT, MV)), jnp.bfloat16)
    tokens = jnp.asarray(rng.integers(0, MV, size=(MB, MT)))
    full = MB * MT * MV
    assert _largest_float32(lambda x: logprobs_from_logits(x, tokens), logits) >= full  # the plain one does

    seq_chunk, vocab_chunk = 8, 16
    for fn in (lambda x: chunked_token_logprobs(x, tokens, seq_chunk=seq_chunk),
               lambda x: chunked_token_entropy(x, seq_chunk=seq_chunk)):
        assert _largest_float32(fn, logits) <= MB * seq_chunk * MV
        assert _largest_float32(jax.grad(lambda x: jnp.sum(fn(x))), logits) <= MB * seq_chunk * MV
    for fn in (lambda x: chunked_token_logprobs(x, tokens, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk),
               lambda x: chunked_token_entropy(x, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk)):
        # [B, T]-sized float32 outputs are allowed; no [B, c, V] or larger float32 block
        assert _largest_float32(fn, logits) <= max(MB * seq_chunk * vocab_chunk, MB * MT)
        assert _largest_float32(jax.grad(lambda x: jnp.sum(fn(x))), logits) <= max(MB * seq_chunk * vocab_chunk,
                                                                                     MB * MT)


def test_logprobs_from_hidden_never_form_full_logits():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(MB, MT, MD)), jnp.float32)
    unembedding = jnp.asarray(rng.normal(size=(MD, MV)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, MV, size=(MB, MT)))
    seq_chunk, vocab_chunk = 8, 16

    def loss(h, w):
        lp, ent = logprobs_and_entropy_from_hidden(h, w, tokens, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk)
        return jnp.sum(lp) + jnp.sum(ent)

    # biggest float32 blocks: a [B, c, vc] logit tile, the [D, V] weight (and its gradient), [B, T] outputs
    bound = max(MB * seq_chunk * vocab_chunk, MD * MV, MB * MT * MD)
    assert bound < MB * MT * MV
    assert _largest_float32(loss, hidden, unembedding) <= bound
    assert _largest_float32(jax.grad(loss, argnums=(0, 1)), hidden, unembedding) <= bound


@pytest.mark.parametrize("vocab_chunk, gathers_columns", [(None, False), (5, True)])
def test_the_whole_vocabulary_reads_the_chosen_logit_from_its_product(vocab_chunk, gathers_columns):
    """Without vocab_chunk every logit is formed, so the chosen one is read from that product; the gradient of
    gathered unembedding columns (a scatter into W) is left to the chunked path, which never forms every logit."""
    _, tokens, hidden, unembedding = random_inputs(5)

    def loss(h, w):
        return jnp.sum(logprobs_from_hidden(h, w, tokens, seq_chunk=None, vocab_chunk=vocab_chunk))

    def scatters_into_w(jaxpr):
        found = 0
        for eqn in jaxpr.eqns:
            found += eqn.primitive.name.startswith("scatter") and eqn.outvars[0].aval.shape == unembedding.shape
            found += sum(scatters_into_w(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        return found

    assert bool(scatters_into_w(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, unembedding).jaxpr)) == \
        gathers_columns
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(hidden, unembedding)
    chunked_value, chunked_grads = jax.value_and_grad(
        lambda h, w: jnp.sum(logprobs_from_hidden(h, w, tokens, seq_chunk=None, vocab_chunk=7)), argnums=(0, 1))(
        hidden, unembedding)
    np.testing.assert_allclose(value, chunked_value, rtol=1e-5)
    for grad, chunked in zip(grads, chunked_grads):
        np.testing.assert_allclose(grad, chunked, rtol=1e-4, atol=1e-5)


def _primitives(jaxpr) -> set[str]:
    found = set()
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= _primitives(sub)
    return found


@pytest.mark.parametrize("seq_chunk", [None, 3])  # the backward keeps each chunk's logits, or recomputes them
@pytest.mark.parametrize("chunk", [1, 3, 5, 64])  # one column at a time, ragged, past the longest row, whole
def test_masked_first_computes_the_kept_positions_only_and_matches_float64(chunk, seq_chunk):
    """`masked_first`: each row's kept positions moved to its front and the rows visited `chunk` columns at a
    time, chunks with none skipped. Values against numpy in float64 at kept positions and 0 elsewhere; gradients
    against the plain masked function's; an all-masked batch gives zeros."""
    _, tokens, hidden, unembedding = random_inputs(11)
    rng = np.random.default_rng(12)
    mask = np.array([[1, 0, 1, 1, 0, 0, 1], [0, 0, 1, 0, 0, 0, 0]], bool)  # kept positions anywhere, 4 and 1
    weights = rng.normal(size=(B, T))
    reference = _reference("from_hidden", None, tokens, hidden, unembedding, 0.8)
    with jax.enable_x64(True):
        h, w, c = (jnp.asarray(x, jnp.float64) for x in (hidden, unembedding, weights))

        def loss(hh, ww, kept, **skip):
            lp, ent = logprobs_and_entropy_from_hidden(hh, ww, tokens, 0.8, mask=kept, seq_chunk=seq_chunk, **skip)
            return jnp.sum(c * lp) + jnp.sum(jnp.sin(ent)), (lp, ent)

        skipping = jax.jit(jax.value_and_grad(lambda hh, ww, kept: loss(hh, ww, kept, masked_first=chunk),
                                              argnums=(0, 1), has_aux=True))
        plain = jax.jit(jax.value_and_grad(lambda hh, ww, kept: loss(hh, ww, kept), argnums=(0, 1), has_aux=True))
        (value, (lp, ent)), grads = skipping(h, w, mask)
        for got, want in zip((lp, ent), reference):
            np.testing.assert_allclose(np.asarray(got)[mask], want[mask], rtol=1e-10, atol=1e-12)
            assert np.all(np.asarray(got)[~mask] == 0)
        (plain_value, _), plain_grads = plain(h, w, mask)
        np.testing.assert_allclose(float(value), float(plain_value), rtol=1e-12)
        for got, want in zip(grads, plain_grads):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12)
        (value, (lp, ent)), grads = skipping(h, w, np.zeros((B, T), bool))
        assert float(value) == 0 and not np.any(lp) and not np.any(ent)
        assert not any(np.any(np.asarray(g)) for g in grads)
        # a chunk without a kept position is a branch not taken (forward and backward), when there are chunks
        primitives = _primitives(jax.make_jaxpr(skipping)(h, w, mask).jaxpr)
        assert ("cond" in primitives) == (chunk < T)


def test_masked_first_needs_a_mask_and_a_positive_chunk():
    _, tokens, hidden, unembedding = random_inputs(13)
    with pytest.raises(ValueError, match="needs a mask"):
        logprobs_from_hidden(hidden, unembedding, tokens, masked_first=4)
    with pytest.raises(ValueError, match="must be a positive integer, got 0"):
        logprobs_from_hidden(hidden, unembedding, tokens, mask=np.ones((B, T), bool), masked_first=0)


KEPT_ROWS = 9  # K rows of hidden states; the sizes below leave branches of 2, 4, 6 and 9 rows
KEPT_SIZES = (2, 4, 6)
KEPT_MASKS = {
    "none": np.zeros(KEPT_ROWS, bool),
    "first 1 (size 2)": np.arange(KEPT_ROWS) < 1,
    "first 3 (size 4)": np.arange(KEPT_ROWS) < 3,
    "first 6 (size 6)": np.arange(KEPT_ROWS) < 6,
    "first 7 (all 9)": np.arange(KEPT_ROWS) < 7,
    "every row": np.ones(KEPT_ROWS, bool),
    "scattered, last at 5": np.isin(np.arange(KEPT_ROWS), [0, 2, 4]),
}


@pytest.mark.parametrize("vocab_first", [False, True])
@pytest.mark.parametrize("case", sorted(KEPT_MASKS))
def test_kept_rows_head_matches_float64_and_the_masked_head(case, vocab_first):
    """`kept_rows_logprobs_from_hidden`: the head at the smallest leading run of `sizes` rows holding every kept
    row (a switch, with its gradient written out). Values against numpy in float64 at kept rows and exactly 0
    elsewhere; the gradients (hidden and unembedding) against autodiff of the plain masked `logprobs_from_hidden`,
    both layouts of the weight, at τ = 0.8; NaN hidden states at unkept rows reach neither."""
    rng = np.random.default_rng(21)
    mask = KEPT_MASKS[case]
    hidden = rng.normal(size=(KEPT_ROWS, D))
    hidden[~mask] = np.nan  # unkept rows may hold anything
    unembedding = rng.normal(size=(D, V))
    tokens = rng.integers(0, V, size=KEPT_ROWS)
    weights = rng.normal(size=KEPT_ROWS)
    want = ref_logprobs(np.nan_to_num(hidden) @ unembedding, tokens, 0.8)
    with jax.enable_x64(True):
        h, w, c = (jnp.asarray(x, jnp.float64) for x in (hidden, unembedding, weights))
        stored = w.T if vocab_first else w

        def kept_rows(hh, ww):
            lp = kept_rows_logprobs_from_hidden(hh, ww, tokens, mask, 0.8, sizes=KEPT_SIZES, vocab_first=vocab_first)
            return jnp.sum(c * lp), lp

        def plain(hh, ww):
            lp = logprobs_from_hidden(hh[None], ww.T if vocab_first else ww, tokens[None], 0.8, mask=mask[None],
                                      seq_chunk=None)[0]
            return jnp.sum(c * lp), lp

        (value, lp), grads = jax.jit(jax.value_and_grad(kept_rows, argnums=(0, 1), has_aux=True))(h, stored)
        (plain_value, _), plain_grads = jax.jit(jax.value_and_grad(plain, argnums=(0, 1), has_aux=True))(h, stored)
        assert lp.dtype == jnp.float64 and lp.shape == (KEPT_ROWS,)
        np.testing.assert_allclose(np.asarray(lp)[mask], want[mask], rtol=1e-12, atol=1e-12)
        assert np.all(np.asarray(lp)[~mask] == 0)
        np.testing.assert_allclose(float(value), float(plain_value), rtol=1e-12, atol=1e-14)
        for got, expected in zip(grads, plain_grads):
            assert got.shape == expected.shape and np.all(np.isfinite(np.asarray(got)))
            np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-10, atol=1e-12)
        assert not np.any(np.asarray(grads[0])[~mask])
        if not mask.any():
            assert not np.any(np.asarray(grads[1]))
        # and the float64 gradient itself, by central differences (NaN rows replaced: a difference needs numbers)
        finite = np.where(mask[:, None], hidden, 0.0)
        _assert_directional_derivatives(jax.jit(jax.value_and_grad(lambda hh, ww: kept_rows(hh, ww)[0],
                                                                   argnums=(0, 1))), [finite, np.asarray(stored)])


def test_kept_rows_head_runs_the_branch_of_the_smallest_size_holding_the_kept_rows():
    """The branch taken forms logits for that many rows only: the rows after it do not enter the product, so a
    value there (here NaN, unmasked) changes nothing, while a row inside it would reach its own log-prob."""
    rng = np.random.default_rng(22)
    hidden = rng.normal(size=(KEPT_ROWS, D)).astype(np.float32)
    unembedding = rng.normal(size=(D, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=KEPT_ROWS)
    mask = np.arange(KEPT_ROWS) < 3  # size 4: rows 0-3 enter the product
    fn = jax.jit(lambda hh: kept_rows_logprobs_from_hidden(hh, unembedding, tokens, mask, sizes=KEPT_SIZES))
    clean = np.asarray(fn(hidden))
    beyond = hidden.copy()
    beyond[4:] = np.inf  # past the branch's rows: not computed at all
    np.testing.assert_array_equal(np.asarray(fn(beyond)), clean)
    jaxpr = jax.make_jaxpr(fn)(hidden)
    assert "cond" in _primitives(jaxpr.jaxpr)
    # τ may be traced: the same numbers as a Python τ
    traced = jax.jit(lambda hh, tau: kept_rows_logprobs_from_hidden(hh, unembedding, tokens, mask, tau,
                                                                    sizes=KEPT_SIZES))(hidden, 0.7)
    static = kept_rows_logprobs_from_hidden(hidden, unembedding, tokens, mask, 0.7, sizes=KEPT_SIZES)
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(static))


def test_kept_rows_head_bf16_and_its_errors():
    """bf16 hidden states and weight: float32 log-probs, gradients in the inputs' dtypes, close to the float32
    head on the same (upcast) values; a shape that does not fit, and τ <= 0, are refused."""
    rng = np.random.default_rng(23)
    hidden = jnp.asarray(rng.normal(size=(KEPT_ROWS, D)), jnp.bfloat16)
    unembedding = jnp.asarray(rng.normal(size=(D, V)), jnp.bfloat16)
    tokens = rng.integers(0, V, size=KEPT_ROWS)
    mask = np.arange(KEPT_ROWS) < 5

    def total(hh, ww):
        return jnp.sum(kept_rows_logprobs_from_hidden(hh, ww, tokens, mask, sizes=KEPT_SIZES))

    lp = kept_rows_logprobs_from_hidden(hidden, unembedding, tokens, mask, sizes=KEPT_SIZES)
    assert lp.dtype == jnp.float32
    want = ref_logprobs(np.asarray(hidden, np.float64) @ np.asarray(unembedding, np.float64), tokens)
    np.testing.assert_allclose(np.asarray(lp)[mask], want[mask], rtol=1e-5, atol=1e-5)
    grads = jax.grad(total, argnums=(0, 1))(hidden, unembedding)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
    upcast = jax.grad(total, argnums=(0, 1))(hidden.astype(jnp.float32), unembedding.astype(jnp.float32))
    for got, want_grad in zip(grads, upcast):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want_grad), rtol=8e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"hidden \[K, D\] and unembedding \[V, D\] expected"):
        kept_rows_logprobs_from_hidden(hidden, unembedding, tokens, mask, sizes=KEPT_SIZES, vocab_first=True)
    with pytest.raises(ValueError, match="temperature must be positive"):
        kept_rows_logprobs_from_hidden(hidden, unembedding, tokens, mask, 0.0, sizes=KEPT_SIZES)

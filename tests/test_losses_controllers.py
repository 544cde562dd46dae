"""KL controllers: the Ziegler et al. 2019 rule against a Python reference, by hand, under jit/scan/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.losses import (
    KLControllerState,
    adaptive_kl_coef,
    adaptive_kl_controller,
    fixed_kl_controller,
)

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


def ref_adaptive(kl_coef, kls, n_steps, target, horizon):
    """lm-human-preferences' AdaptiveKLController.update, in float64, applied to a sequence of KLs."""
    coefs = []
    for kl in kls:
        error = np.clip(kl / target - 1, -0.2, 0.2)
        kl_coef = kl_coef * (1 + error * n_steps / horizon)
        coefs.append(kl_coef)
    return np.array(coefs)


@SETTINGS
@given(init=st.floats(0.001, 1.0), kls=st.lists(st.floats(0.0, 50.0), min_size=1, max_size=20),
       n_steps=st.sampled_from([1, 64, 512]), target=st.sampled_from([1.0, 6.0]),
       horizon=st.sampled_from([1000.0, 10000.0]))
def test_matches_python_reference_over_a_run(init, kls, n_steps, target, horizon):
    controller = adaptive_kl_controller(init, target, horizon)
    padded = np.zeros(20, np.float32)
    padded[: len(kls)] = kls
    # one compiled scan over the run (padded to a fixed length, so every example reuses the compilation)
    coefs = _run(controller.init(), jnp.asarray(padded), n_steps, target, horizon)[: len(kls)]
    want = ref_adaptive(np.float64(np.float32(init)), np.asarray(padded[: len(kls)], np.float64), n_steps, target,
                        horizon)
    assert coefs.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(coefs), want, rtol=2e-6)


@jax.jit
def _run(state, kls, n_steps, target, horizon):
    def step(state, kl):
        state = KLControllerState(adaptive_kl_coef(state.kl_coef, kl, n_steps, target, horizon))
        return state, state.kl_coef

    return jax.lax.scan(step, state, kls)[1]


def test_hand_computed():
    # β = 0.1, target 6, n_steps 256, horizon 10000 (n/H = 0.0256):
    #   KL = 9:   e = clip(0.5, ±0.2) = 0.2   -> β = 0.1 · (1 + 0.2 · 0.0256) = 0.100512
    #   KL = 3:   e = clip(−0.5) = −0.2      -> β = 0.1 · (1 − 0.00512) = 0.099488
    #   KL = 6.6: e = 0.1                     -> β = 0.1 · 1.00256 = 0.100256  (not ×1.1 as a 0.9/1.1 rule would)
    controller = adaptive_kl_controller(0.1, target=6.0, horizon=10000.0)
    state = controller.init()
    for kl, want in ((9.0, 0.100512), (3.0, 0.099488), (6.6, 0.100256), (6.0, 0.1)):
        np.testing.assert_allclose(float(controller.update(state, kl, 256).kl_coef), want, rtol=1e-6)


def test_fixed_controller_never_moves():
    controller = fixed_kl_controller(0.05)
    state = controller.init()
    for kl in (0.0, 6.0, 1e6):
        state = controller.update(state, kl, 512)
    assert state.kl_coef.dtype == jnp.float32
    np.testing.assert_allclose(float(state.kl_coef), 0.05, rtol=1e-7)


def test_moves_toward_target_and_is_bounded():
    controller = adaptive_kl_controller(0.1, target=6.0, horizon=100.0)
    above = controller.update(controller.init(), 1e9, 100)  # error clipped at +0.2 -> ×1.2 at most
    below = controller.update(controller.init(), 0.0, 100)  # −0.2 -> ×0.8
    np.testing.assert_allclose([float(above.kl_coef), float(below.kl_coef)], [0.12, 0.08], rtol=1e-6)


def test_jit_equals_eager_and_state_is_a_pytree():
    controller = adaptive_kl_controller(0.2, target=6.0, horizon=10000.0)
    state = controller.init()
    assert len(jax.tree.leaves(state)) == 1  # checkpointable as a pytree
    eager = controller.update(state, 7.5, 128)
    jitted = jax.jit(controller.update)(state, jnp.float32(7.5), 128)
    np.testing.assert_allclose(float(jitted.kl_coef), float(eager.kl_coef), rtol=1e-7)
    fixed = fixed_kl_controller(0.2)
    assert float(jax.jit(fixed.update)(fixed.init(), 7.5, 128).kl_coef) == float(fixed.init().kl_coef)


def test_bf16_kl_gives_float32_coefficient():
    controller = adaptive_kl_controller(0.1, target=6.0, horizon=10000.0)
    state = controller.update(controller.init(), jnp.asarray(9.0, jnp.bfloat16), 256)
    assert state.kl_coef.dtype == jnp.float32
    np.testing.assert_allclose(float(state.kl_coef), 0.100512, rtol=1e-6)


def test_vmap_over_controllers():
    controller = adaptive_kl_controller(0.1, target=6.0, horizon=10000.0)
    states = KLControllerState(kl_coef=jnp.array([0.1, 0.2, 0.3], jnp.float32))
    kls = jnp.array([9.0, 3.0, 6.6])
    updated = jax.vmap(lambda s, kl: controller.update(s, kl, 256))(states, kls)
    for i in range(3):
        want = controller.update(KLControllerState(states.kl_coef[i]), kls[i], 256).kl_coef
        np.testing.assert_allclose(float(updated.kl_coef[i]), float(want), rtol=1e-7)


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="target > 0 and horizon > 0"):
        adaptive_kl_controller(0.1, target=0.0, horizon=10000.0)
    with pytest.raises(ValueError, match="target > 0 and horizon > 0"):
        adaptive_kl_controller(0.1, target=6.0, horizon=-1.0)

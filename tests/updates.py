"""One check shared by the micro-batch tests: two parameter updates from the same start are the same update."""

import jax
import numpy as np


def assert_same_updates(before, after_a, after_b, rtol=1e-4):
    """`after_a - before` equals `after_b - before` leaf by leaf, up to float32 reordering.

    Splitting a batch into micro-batches reorders float32 sums. An element that cancels to near zero keeps the
    rounding of its summands, which are the size of the leaf's largest updates, so the absolute slack is `rtol`
    times that leaf's largest update; an element-wise absolute slack fixed at 1e-7 passed on one CPU and failed
    on another.
    """
    leaves = [jax.tree.leaves(tree) for tree in (before, after_a, after_b)]
    assert len({len(x) for x in leaves}) == 1
    for start, a, b in zip(*leaves):
        want = np.asarray(b, np.float64) - np.asarray(start, np.float64)
        got = np.asarray(a, np.float64) - np.asarray(start, np.float64)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())

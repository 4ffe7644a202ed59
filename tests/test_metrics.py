"""Metrics against numpy, and their refusals to broadcast."""

import jax.numpy as jnp
import numpy as np
import pytest

from fbp import metrics
from fbp.core import ShapeError


def test_accuracy_for_labels_one_hot_and_binary_logits():
    pred = jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    labels = jnp.array([0, 2, 0, 1], jnp.int32)
    assert float(metrics.accuracy(pred, labels)) == 0.5
    assert float(metrics.accuracy(pred, jnp.eye(3)[labels])) == 0.5
    logits = jnp.array([[1.5], [-0.5], [0.2]])
    assert float(metrics.accuracy(logits, jnp.array([[1.0], [0.0], [0.0]]))) == pytest.approx(2 / 3)


def test_float_labels_and_mismatched_shapes_are_refused():
    pred = jnp.zeros((2, 3))
    with pytest.raises(TypeError, match=r"labels of shape \(2,\) must be integers"):
        metrics.accuracy(pred, jnp.array([0.0, 1.0]))
    with pytest.raises(ShapeError, match="accuracy"):
        metrics.accuracy(pred, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ShapeError, match=r"mae: target should have shape \(4, 1\), got \(4,\)"):
        metrics.mae(jnp.zeros((4, 1)), jnp.zeros(4))


def test_mae_against_numpy():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    assert float(metrics.mae(jnp.asarray(p), jnp.asarray(t))) == pytest.approx(
        np.mean(np.abs(p - t))
    )

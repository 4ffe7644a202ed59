"""Metrics: ``metric(pred, target) -> scalar``, the mean over the batch, jittable.

``accuracy`` reads the target the way the losses do:

    integer labels, shape pred.shape[:-1]        argmax(pred, -1) == label         (softmax CE)
    one-hot / probabilities, shape pred.shape     argmax(pred, -1) == argmax(target, -1)
    binary, pred.shape[-1] == 1 (or 0/1 targets)  (pred > 0) == (target > 0.5)      (sigmoid BCE,
                                                  pred are logits)
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from fbp.core import Array, ShapeError, check_shape

Metric = Callable[[Array, Array], Array]


def accuracy(pred: Array, target: Array) -> Array:
    """Fraction of correct predictions (see the module docstring for the three target kinds)."""
    binary = pred.ndim == 1 or pred.shape[-1] == 1
    if binary and target.shape in (pred.shape, pred.shape[:-1]):
        return jnp.mean((pred.reshape(target.shape) > 0) == (target > 0.5))
    if target.shape == pred.shape[:-1] and jnp.issubdtype(target.dtype, jnp.integer):
        return jnp.mean(jnp.argmax(pred, -1).astype(target.dtype) == target)
    if target.shape == pred.shape:
        return jnp.mean(jnp.argmax(pred, -1) == jnp.argmax(target, -1))
    if target.shape == pred.shape[:-1]:
        raise TypeError(
            f"accuracy: labels of shape {target.shape} must be integers, got {target.dtype}; "
            "pass y.astype(int), or one-hot targets of the prediction's shape."
        )
    raise ShapeError(
        f"accuracy: target should have shape {pred.shape[:-1]} (integer labels) or "
        f"{pred.shape} (one-hot or binary), got {target.shape}."
    )


def mae(pred: Array, target: Array) -> Array:
    """Mean absolute error, ``mean |pred - target|`` (a metric for regression); no broadcasting."""
    check_shape(
        "mae", "target", pred.shape, target.shape, "Pass a target of the prediction's shape."
    )
    return jnp.mean(jnp.abs(pred - target.astype(pred.dtype)))


METRICS: dict[str, Metric] = {"accuracy": accuracy, "mae": mae}


def resolve(metrics) -> tuple[tuple[str, Metric], ...]:
    """``("accuracy", my_fn)`` -> ``(("accuracy", accuracy), ("my_fn", my_fn))``."""
    out = []
    for m in metrics or ():
        if isinstance(m, str):
            if m not in METRICS:
                raise ValueError(
                    f"Unknown metric {m!r}; known: {sorted(METRICS)}, or pass a function."
                )
            out.append((m, METRICS[m]))
        elif callable(m):
            out.append((getattr(m, "__name__", "metric"), m))
        else:
            raise TypeError(
                f"A metric is a name or a function (pred, target) -> scalar, got {m!r}."
            )
    return tuple(out)

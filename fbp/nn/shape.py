"""Layers that only change the shape: Flatten and Reshape.

Their backward reshapes ``dy`` back to the input's shape. The cache is a zero-size array
``(0, *input_shape)`` that carries that shape through ``jit`` and ``scan`` at no cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

from fbp.core import Layer, ShapeError
from fbp.nn._base import stateless


def _shape_carrier(x):
    return jnp.zeros((0, *x.shape[1:]), x.dtype)


def _unflatten(like, dy):
    return dy.reshape(dy.shape[0], *like.shape[1:])  # (batch, *input_shape)


def _flatten_fwd(x):
    if x.ndim < 2:
        raise ShapeError(
            f"the input should have a batch axis and at least one more, got {x.shape}. "
            "Pass x of shape (batch, *example_shape).",
            layer="Flatten",
        )
    return x.reshape(x.shape[0], -1), _shape_carrier(x)


Flatten = stateless(
    "Flatten",
    _flatten_fwd,
    _unflatten,
    lambda s: (math.prod(s),),
    lambda like: (None, math.prod(like.shape[1:])),
)
"""``(batch, *shape) -> (batch, prod(shape))``."""


def Reshape(shape: Sequence[int]) -> Layer:
    """``(batch, *input_shape) -> (batch, *shape)``; ``shape`` excludes the batch axis and may
    hold one -1, which takes the size the others leave (as ``numpy.reshape``)."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1 or any(s < -1 or s == 0 for s in shape):
        raise ValueError(
            f"Reshape({shape}): sizes must be positive, with at most one -1 (the inferred size)."
        )
    name = f"Reshape({shape})"

    def target(input_shape) -> tuple[int, ...]:
        size, known = math.prod(input_shape), math.prod(s for s in shape if s != -1)
        out = tuple(size // known if s == -1 else s for s in shape)
        if math.prod(out) != size or (-1 in shape and size % known):
            raise ShapeError(
                f"cannot reshape an example of shape {tuple(input_shape)} ({size} values) to "
                f"{shape}. Pass a shape with the same number of values.",
                layer=name,
            )
        return out

    def fwd(x):
        return x.reshape(x.shape[0], *target(x.shape[1:])), _shape_carrier(x)

    def dy_shape(like):
        return (None, *target(like.shape[1:]))

    return stateless(name, fwd, _unflatten, target, dy_shape, config=("Reshape", shape))

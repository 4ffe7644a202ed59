"""The three contracts of fbp: ``Layer``, ``Loss`` and ``Optimizer``.

Layer(init, apply, forward, backward, name, layers)
    init(key, input_shape)          -> (output_shape, params)   shapes exclude the batch axis
    apply(params, x, *, key=None)   -> y                         x has a leading batch axis
    forward(params, x, *, key=None) -> (y, cache)                cache: only what backward needs
    backward(params, cache, dy)     -> (dparams, dx)             dparams has params' tree structure
    Invariant: forward(p, x, key=k)[0] == apply(p, x, key=k). ``key`` is a PRNG key for
    stochastic layers (Dropout); ``key=None`` means deterministic evaluation, and every layer
    accepts (and deterministic layers ignore) the keyword. ``layers`` lists a combinator's children.
Loss(value, value_and_grad, name)
    loss(pred, target) == value(pred, target) -> scalar, the mean over the batch (plain JAX)
    value_and_grad(pred, target) -> (scalar, dloss/dpred)        hand-written, dpred.shape == pred.shape
Optimizer(init, update)
    init(params) -> state                                        a NamedTuple with a ``count`` field
    update(grads, state, params) -> (new_params, new_state)      pure; same tree/shapes/dtypes each step

Params and states are plain pytrees (dicts, tuples, NamedTuples of arrays), so ``jit``, ``scan``,
``vmap``, sharding and :mod:`fbp.io` checkpoints work on them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Array = jax.Array
PyTree = Any
Shape = tuple[int, ...]


class Layer(NamedTuple):
    """A layer: four pure functions (see the module docstring), a display name and its children."""

    init: Callable[..., tuple[Shape, PyTree]]
    apply: Callable[..., Array]
    forward: Callable[..., tuple[Array, PyTree]]
    backward: Callable[[PyTree, PyTree, Array], tuple[PyTree, Array]]
    name: str = "Layer"
    layers: tuple[Layer, ...] = ()

    def __repr__(self) -> str:
        return self.name


class Loss(NamedTuple):
    """A loss: ``value`` in plain JAX (the autodiff reference) and its hand-written gradient."""

    value: Callable[[Array, Array], Array]
    value_and_grad: Callable[[Array, Array], tuple[Array, Array]]
    name: str = "loss"

    def __call__(self, pred: Array, target: Array) -> Array:
        return self.value(pred, target)

    def grad(self, pred: Array, target: Array) -> Array:
        """dloss/dpred, hand-written; same shape and dtype as ``pred``."""
        return self.value_and_grad(pred, target)[1]

    def __repr__(self) -> str:
        return self.name


class Optimizer(NamedTuple):
    """An optimizer: ``init(params) -> state``, ``update(grads, state, params) -> (params, state)``."""

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]]


class ShapeError(ValueError):
    """A shape that does not fit: raised at trace time, naming the place and both shapes."""


def check_shape(where: str, what: str, expected: tuple, got: tuple, fix: str) -> None:
    """Raise :class:`ShapeError` unless ``got`` matches ``expected`` (``None`` matches any size).

    ``where`` names the layer or loss, ``what`` the argument, ``fix`` says how to fix the call.
    """
    got = tuple(got)
    ok = len(expected) == len(got) and all(e is None or e == g for e, g in zip(expected, got))
    if not ok:
        sizes = ["batch" if e is None else str(e) for e in expected]
        shown = f"({sizes[0]},)" if len(sizes) == 1 else "(" + ", ".join(sizes) + ")"
        raise ShapeError(f"{where}: {what} should have shape {shown}, got {got}. {fix}")

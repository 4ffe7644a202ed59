"""Helpers shared by the layer families: parameter-free layers, shape checks, broadcasting."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fbp.core import Array, Layer, PyTree, Shape, check_shape, check_tree


def check_dy(name: str, expected: tuple, dy: Array) -> None:
    """``dy`` must have the shape forward's output had (``None`` entries match any size)."""
    check_shape(name, "dy (the gradient of the output)", expected, dy.shape,
                "Pass dL/dy with the shape forward's output had.")  # fmt: skip


def no_params(name: str, params: PyTree, state: PyTree) -> None:
    """A layer without params or state must be given ``()`` for both."""
    check_tree(name, "params", params, (), "This layer has no params: pass ().")
    check_tree(name, "state", state, (), "This layer has no state: pass ().")


def grad_sharding(p: Array, axes: tuple[int, ...] | None = None):
    """The sharding for ``p``'s gradient where it contracts the batch axis (``dw = x^T dy``):
    ``p``'s own. ``axes`` (optional) names, for each axis of the contraction's result, the axis
    of ``p`` it holds, when the result is transposed into ``p``'s layout afterwards.

    Under a mesh with Explicit axes, a contraction over the sharded batch axis must be told
    where its result lives (else ``ShardingTypeError: Contracting dimensions are sharded``);
    XLA then sums the per-device parts with an all-reduce, the data-parallel gradient
    reduction. On one device and under Auto meshes it changes nothing."""
    sharding = jax.typeof(p).sharding
    if axes is None:
        return sharding
    spec = (*sharding.spec, *(None,) * (p.ndim - len(sharding.spec)))
    return sharding.update(spec=P(*(spec[a] for a in axes)))


def like_batch(x: Array, ndim: int):
    """The sharding of an ``ndim``-axis result laid out like ``x`` on its leading axes (the
    batch split over devices) and unsplit on the others; None when ``x`` is not split (one
    device, or an Auto mesh, where XLA infers layouts itself). Under a mesh with Explicit axes,
    ops whose result layout JAX cannot infer (a gather by batch-split ids, a reshape merging
    the split batch axis with another) must be given it."""
    sharding = jax.typeof(x).sharding
    spec = tuple(getattr(sharding, "spec", ()))
    if not any(s is not None for s in spec):
        return None
    return sharding.update(spec=P(*spec[: min(len(spec), ndim)], *(None,) * (ndim - len(spec))))


def lead(v: Array, ndim: int) -> Array:
    """View a per-feature vector ``(d,)`` as ``(1, ..., 1, d)`` so it meets an ``ndim`` array."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def sum_last(v: Array) -> Array:
    return jnp.sum(v, axis=-1, keepdims=True)


def sequence_mask(name: str, mask: Array | None, batch: int, time: int) -> Array | None:
    """A sequence layer's mask as ``(batch, time)`` booleans, or None.

    ``(batch, time)`` marks real steps; ``(batch,)`` marks whole sequences (``fit``'s padded
    last batch: a False row is padding at every step) and is broadcast over time. Non-boolean
    masks count any nonzero entry as real, as Keras does.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.shape != (batch,):
        check_shape(name, "mask", (batch, time), mask.shape,
                    f"Pass booleans of shape ({batch}, {time}) (real steps) or ({batch},) "
                    "(real sequences), False on padding.")  # fmt: skip
    if mask.dtype != jnp.bool_:
        mask = mask != 0
    return jnp.broadcast_to(mask[:, None], (batch, time)) if mask.ndim == 1 else mask


def stateless(
    name: str,
    fwd: Callable[[Array], tuple[Array, PyTree]],
    bwd: Callable[[PyTree, Array], Array],
    out_shape: Callable[[Shape], Shape] = lambda s: s,
    dy_shape: Callable[[PyTree], tuple] | None = lambda cache: cache.shape,
    config=None,
) -> Layer:
    """A layer without params or state from ``fwd(x) -> (y, cache)`` and ``bwd(cache, dy) -> dx``.

    ``dy_shape(cache)`` is the shape ``dy`` must have (``None`` entries match any size); by
    default the cache's own shape, right for every layer that caches its input or output.
    """

    def init(key, input_shape):
        return out_shape(tuple(input_shape)), (), ()

    def forward(params, state, x, *, key=None, train=False, mask=None):
        no_params(name, params, state)
        y, cache = fwd(x)
        return y, state, cache

    def backward(params, cache, dy):
        if dy_shape is not None:
            check_dy(name, dy_shape(cache), dy)
        return (), bwd(cache, dy)

    return Layer(init, forward, backward, name, config=config)


def output_shape(layer: Layer, input_shape):
    """The output shape ``layer.init`` declares for ``input_shape``, without creating arrays."""
    out = []

    def f(key):
        shape, params, state = layer.init(key, input_shape)
        out.append(shape)
        return params, state

    jax.eval_shape(f, jax.random.key(0))
    return out[0]

"""Normalization layers: LayerNorm (per example) and BatchNorm (over the batch, with state).

Both compute ``xhat = (x - mean) r`` with ``r = 1 / sqrt(var + epsilon)``, the mean and the
(biased) variance taken over some axes, then ``y = scale * xhat + bias``. With ``g = dy *
scale`` and the mean ``<.>`` over the same axes, the chain rule through the mean and the
variance gives the compact backward (Ioffe & Szegedy, 2015, section 3, with the sums collected)::

    dscale = sum dy * xhat             (over every axis but the feature axis)
    dbias  = sum dy
    dx     = r * (g - <g> - xhat * <g * xhat>)

which reads: the direct path ``r g``, minus what the mean takes out, minus what the variance
takes out. When padding is masked out of the statistics, ``<.>`` becomes ``sum(.) / n`` with
``n`` the number of real entries, and the correction only flows to the real ones.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import Array, Layer, ShapeError, check_shape, check_tree
from fbp.initializers import ones, zeros
from fbp.nn._base import check_dy, lead


def _normalized_dx(g: Array, xhat: Array, r: Array, axes: tuple, weight: Array) -> Array:
    """``r * (g - w * sum(g) - w * xhat * sum(g * xhat))``, sums over ``axes``, where ``w`` is
    ``1/n`` on the entries that entered the statistics and 0 on the others."""
    sum_g = jnp.sum(g, axis=axes, keepdims=True)
    sum_gx = jnp.sum(g * xhat, axis=axes, keepdims=True)
    return r * (g - weight * sum_g - weight * xhat * sum_gx)


def LayerNorm(epsilon: float = 1e-5, *, dtype=jnp.float32) -> Layer:
    """Layer normalization over the last axis (Ba et al., 2016); params ``{"scale", "bias"}``.

    Per example, over its ``d`` features: ``xhat = (x - mean(x)) r``, ``r = 1/sqrt(var(x) +
    epsilon)``, ``y = scale * xhat + bias``. Backward (module docstring, means over the last
    axis)::

        dscale = sum_batch dy * xhat
        dbias  = sum_batch dy
        dx     = r * (g - mean(g) - xhat * mean(g * xhat)),   g = dy * scale

    ``epsilon`` defaults to 1e-5 as PyTorch (Keras uses 1e-3, Flax 1e-6). No state.
    """
    if not epsilon > 0:
        raise ValueError(f"LayerNorm(epsilon={epsilon}): epsilon must be > 0.")
    name = "LayerNorm"

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if not input_shape:
            raise ShapeError(f"needs an input with a feature axis, got {input_shape}.", layer=name)
        d = input_shape[-1]
        return input_shape, {"scale": ones(key, (d,), dtype), "bias": zeros(key, (d,), dtype)}, ()

    def forward(params, state, x, *, key=None, train=False, mask=None):
        scale = params.get("scale") if isinstance(params, dict) else None
        d = scale.shape[0] if getattr(scale, "ndim", 0) == 1 else x.shape[-1]
        check_tree(name, "params", params, {"scale": (d,), "bias": (d,)})
        check_tree(name, "state", state, (), "LayerNorm has no state: pass ().")
        if x.ndim < 2 or x.shape[-1] != d:
            check_shape(name, "the input", (None, d), x.shape, f"Pass x of shape (batch, {d}).")
        mean = jnp.mean(x, axis=-1, keepdims=True)
        xc = x - mean
        r = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + epsilon)  # (..., 1)
        xhat = xc * r
        y = lead(params["scale"], x.ndim) * xhat + lead(params["bias"], x.ndim)
        return y, state, (xhat, r)

    def backward(params, cache, dy):
        xhat, r = cache
        check_dy(name, xhat.shape, dy)
        axes = tuple(range(dy.ndim - 1))
        dscale = jnp.sum(dy * xhat, axis=axes).astype(params["scale"].dtype)  # (d,)
        dbias = jnp.sum(dy, axis=axes).astype(params["bias"].dtype)  # (d,)
        g = dy * lead(params["scale"], dy.ndim)  # dL/dxhat
        weight = jnp.asarray(1.0 / xhat.shape[-1], xhat.dtype)  # the mean over d features
        return {"scale": dscale, "bias": dbias}, _normalized_dx(g, xhat, r, (-1,), weight)

    return Layer(init, forward, backward, name, config=("LayerNorm", epsilon, jnp.dtype(dtype)))


class BatchNormCache(NamedTuple):
    """What BatchNorm's backward needs: ``xhat``, ``r`` (per feature, broadcastable), and in
    training mode ``weight`` (``1/n`` on entries that entered the statistics, else 0); in
    evaluation mode ``weight`` is None (the statistics were constants)."""

    xhat: Array
    r: Array
    weight: Array | None


def BatchNorm(
    momentum: float = 0.99, epsilon: float = 1e-3, axis: int = -1, *, dtype=jnp.float32
) -> Layer:
    """Batch normalization (Ioffe & Szegedy, 2015), with Keras's defaults and conventions.

    ``axis`` is the feature axis of ``x`` (batch axis included, so -1 is the last); statistics
    are taken over every other axis, which serves Dense outputs ``(batch, features)`` and
    images ``(batch, height, width, channels)`` alike. Params ``{"scale", "bias"}`` (Keras's
    gamma and beta) and state ``{"mean", "var"}`` (Keras's moving mean and variance), each of
    shape ``(features,)``, initialised to 1, 0, 0 and 1.

    ``train=True``: the batch's mean and biased variance normalize ``x``, and the running
    statistics move toward them::

        new = momentum * old + (1 - momentum) * batch

    ``train=False``: the running statistics normalize ``x`` and the state is returned as is.
    ``mask`` (over ``x``'s leading axes) leaves padding out of the batch statistics, so a
    padded batch gives the statistics of its real entries. Backward in training mode is the
    compact formula of the module docstring; in evaluation mode ``dx = dy * scale * r``.

    PyTorch's ``BatchNorm1d/2d(momentum=0.1, eps=1e-5)`` is ``BatchNorm(momentum=0.9,
    epsilon=1e-5)`` here, except that PyTorch keeps the unbiased variance (``n / (n - 1)``
    times this one) in its running estimate; the normalization of a batch is the same.
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"BatchNorm(momentum={momentum}): momentum must be in [0, 1).")
    if not epsilon > 0:
        raise ValueError(f"BatchNorm(epsilon={epsilon}): epsilon must be > 0.")
    if not isinstance(axis, int) or axis == 0:
        raise ValueError(
            f"BatchNorm(axis={axis!r}): axis is the feature axis of x, an int other than 0 "
            "(the batch axis), e.g. -1 for channels-last."
        )
    name = "BatchNorm" if axis == -1 else f"BatchNorm(axis={axis})"

    def feature_axis(ndim: int) -> int:
        f = axis if axis >= 0 else ndim + axis
        if not 1 <= f < ndim:
            raise ShapeError(
                f"the feature axis {axis} does not exist in an input with {ndim} axes "
                "(batch axis included).",
                layer=name,
            )
        return f

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        d = input_shape[feature_axis(len(input_shape) + 1) - 1]
        params = {"scale": ones(key, (d,), dtype), "bias": zeros(key, (d,), dtype)}
        state = {"mean": zeros(key, (d,), dtype), "var": ones(key, (d,), dtype)}
        return input_shape, params, state

    def forward(params, state, x, *, key=None, train=False, mask=None):
        f = feature_axis(x.ndim)
        d = x.shape[f]
        fix = f"This BatchNorm sees {d} features on axis {axis}; pass the params it was built for."
        check_tree(name, "params", params, {"scale": (d,), "bias": (d,)}, fix)
        check_tree(name, "state", state, {"mean": (d,), "var": (d,)}, fix)
        view_shape = tuple(d if a == f else 1 for a in range(x.ndim))

        def view(v):  # (d,) -> broadcastable against x
            return v.reshape(view_shape)

        axes = tuple(a for a in range(x.ndim) if a != f)
        if not train:
            mean, var, weight, new_state = view(state["mean"]), view(state["var"]), None, state
        else:
            if mask is None:
                n = math.prod(x.shape[a] for a in axes)
                weight = jnp.full((1,) * x.ndim, 1.0 / n, x.dtype)
            else:
                k = mask.ndim
                if mask.shape != x.shape[:k] or f < k:
                    raise ShapeError(
                        f"mask should cover leading axes of the input {x.shape} other than "
                        f"the feature axis, got a mask of shape {mask.shape}.",
                        layer=name,
                    )
                per_mask_entry = math.prod(x.shape[a] for a in axes if a >= k)
                w = mask.astype(x.dtype).reshape(mask.shape + (1,) * (x.ndim - k))
                weight = w / (jnp.sum(w) * per_mask_entry)  # 1/n on real entries, else 0
            mean = jnp.sum(x * weight, axis=axes, keepdims=True)
            xc = x - mean
            var = jnp.sum(xc * xc * weight, axis=axes, keepdims=True)  # biased, as Keras

            def move(old, batch):
                new = momentum * old.astype(batch.dtype) + (1 - momentum) * batch.reshape(d)
                return new.astype(old.dtype)

            new_state = {"mean": move(state["mean"], mean), "var": move(state["var"], var)}
        r = jax.lax.rsqrt(var + epsilon)  # view_shape
        xhat = (x - mean) * r
        y = view(params["scale"]) * xhat + view(params["bias"])
        return y, new_state, BatchNormCache(xhat, r, weight)

    def backward(params, cache, dy):
        xhat, r, weight = cache
        check_dy(name, xhat.shape, dy)
        f = feature_axis(dy.ndim)
        axes = tuple(a for a in range(dy.ndim) if a != f)
        dscale = jnp.sum(dy * xhat, axis=axes).astype(params["scale"].dtype)  # (d,)
        dbias = jnp.sum(dy, axis=axes).astype(params["bias"].dtype)  # (d,)
        g = dy * params["scale"].reshape(r.shape)  # dL/dxhat
        if weight is None:  # evaluation: mean and var were constants
            dx = g * r
        else:
            dx = _normalized_dx(g, xhat, r, axes, weight)
        return {"scale": dscale, "bias": dbias}, dx

    config = ("BatchNorm", momentum, epsilon, axis, jnp.dtype(dtype))
    return Layer(init, forward, backward, name, config=config)

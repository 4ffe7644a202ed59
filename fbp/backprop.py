"""Backpropagation through a network and a loss, with no autodiff.

``value_and_grad(net, loss)(params, state, x, y)`` runs the three steps of the textbook:

    pred, new_state, cache = net.forward(params, state, x, train=True)  # keep what backward needs
    L, dpred = loss.value_and_grad(pred, y)                             # dL/dpred, by hand
    grads, _ = net.backward(params, cache, dpred)                       # chain rule, last layer first

``as_custom_vjp(net)`` wraps the same forward and backward in ``jax.custom_vjp``, so that
JAX's ``grad`` of any code that calls the network runs fbp's hand-written backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from fbp.core import Array, Layer, Loss, PyTree, conform_mask


def forward_backward(
    net: Layer,
    loss: Loss,
    params: PyTree,
    state: PyTree,
    x: Any,
    y: Array,
    *,
    key: jax.Array | None = None,
    train: bool = True,
    mask: Array | None = None,
) -> tuple[Array, PyTree, PyTree, Any]:
    """One forward and one backward pass: ``(loss_value, grads, new_state, pred)``.

    ``mask`` (booleans over ``x``'s leading axes, optional) marks the real examples of a
    padded batch, ``(batch,)``, or the real steps of padded sequences, ``(batch, time)``: the
    loss is the mean over them, BatchNorm's statistics and the recurrences leave the others
    out, and the padding gets no gradient, so the step is exactly that of the unpadded batch. This is the one
    place that computes a training step's gradients; :mod:`fbp.train` calls it. The prediction
    comes along for metrics at no extra cost. The input gradient of the first layer is
    computed by ``net.backward`` and dropped; under ``jit`` XLA removes that dead computation.
    """
    pred, new_state, cache = net.forward(params, state, x, key=key, train=train, mask=mask)
    value, dpred = loss.value_and_grad(pred, y, conform_mask(mask, pred))
    grads, _ = net.backward(params, cache, dpred)
    return value, grads, new_state, pred


def value_and_grad(net: Layer, loss: Loss) -> Callable[..., tuple[tuple[Array, PyTree], PyTree]]:
    """Return ``f(params, state, x, y, *, key=None, train=True, mask=None) -> ((loss, new_state),
    grads)``; jittable, no autodiff.

    ``grads`` has the tree structure of ``params``; the state gets no gradient (it is
    non-trainable) and comes back updated when ``train`` is True (BatchNorm's running
    statistics). ``key`` feeds Dropout, which needs one when ``train`` is True.
    """

    def f(params, state, x, y, *, key=None, train=True, mask=None):
        value, grads, new_state, _ = forward_backward(
            net, loss, params, state, x, y, key=key, train=train, mask=mask
        )
        return (value, new_state), grads

    return f


def as_custom_vjp(net: Layer) -> Callable[..., tuple[Any, PyTree]]:
    """Return ``f(params, state, x, *, key=None, train=False, mask=None) -> (y, new_state)``
    whose VJP is ``net.backward``.

    JAX's ``grad``, ``vjp`` and friends applied to code that calls ``f`` differentiate through
    fbp's hand-written backward pass with respect to ``params`` and ``x``. The state, the key
    and the mask get no cotangent, nor does an integer ``x``. Forward mode (``jvp``) is not
    available, as for any ``custom_vjp``.
    """

    def primal(train, params, state, x, key, mask):
        y, new_state, _ = net.forward(params, state, x, key=key, train=train, mask=mask)
        return y, new_state

    def f_fwd(train, params, state, x, key, mask):
        y, new_state, cache = net.forward(params, state, x, key=key, train=train, mask=mask)
        return (y, new_state), (params, cache)

    def f_bwd(train, residuals, cotangents):
        params, cache = residuals
        dy, _ = cotangents  # the state's cotangent is dropped: no gradient flows through state
        dparams, dx = net.backward(params, cache, dy)
        return dparams, None, dx, None, None  # None: a zero cotangent (state, key, mask)

    f = jax.custom_vjp(primal, nondiff_argnums=(0,))
    f.defvjp(f_fwd, f_bwd)

    def call(params, state, x, *, key=None, train=False, mask=None):
        return f(train, params, state, x, key, mask)

    return call

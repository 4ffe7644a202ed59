"""Backpropagation through a network and a loss, with no autodiff.

``value_and_grad(net, loss)(params, x, y)`` runs the three steps of the textbook:

    pred, cache = net.forward(params, x)       # forward pass, keeping what backward needs
    L, dpred    = loss.value_and_grad(pred, y)  # dL/dpred, written by hand
    grads, _    = net.backward(params, cache, dpred)  # chain rule, last layer first

``as_custom_vjp(net)`` wraps the same forward and backward in ``jax.custom_vjp``, so that
JAX's ``grad`` of any code that calls the network runs fbp's hand-written backward.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from fbp.core import Array, Layer, Loss, PyTree


def value_and_grad(net: Layer, loss: Loss) -> Callable[..., tuple[Array, PyTree]]:
    """Return ``f(params, x, y, *, key=None) -> (loss_value, grads)``; jittable, no autodiff.

    ``grads`` has the tree structure of ``params``. ``key`` is passed to ``net.forward`` for
    stochastic layers (Dropout); ``None`` evaluates them deterministically.
    """

    def f(params: PyTree, x: Array, y: Array, *, key: jax.Array | None = None):
        value, grads, _ = forward_backward(net, loss, params, x, y, key=key)
        return value, grads

    return f


def forward_backward(
    net: Layer, loss: Loss, params: PyTree, x: Array, y: Array, *, key: jax.Array | None = None
) -> tuple[Array, PyTree, Array]:
    """One forward and one backward pass: ``(loss_value, grads, pred)``.

    The prediction comes along for metrics (accuracy) at no extra cost. The input gradient
    of the first layer is computed by ``net.backward`` and dropped; under ``jit`` XLA removes
    that dead computation.
    """
    pred, cache = net.forward(params, x, key=key)
    value, dpred = loss.value_and_grad(pred, y)
    grads, _ = net.backward(params, cache, dpred)
    return value, grads, pred


def as_custom_vjp(net: Layer) -> Callable[..., Array]:
    """Return ``f(params, x, key=None) -> y`` whose VJP is ``net.backward``.

    JAX's ``grad``, ``vjp`` and friends applied to code that calls ``f`` differentiate
    through fbp's hand-written backward pass (w.r.t. ``params`` and ``x``; the key gets
    no cotangent). Forward-mode (``jvp``) is not available, as for any ``custom_vjp``.
    """

    @jax.custom_vjp
    def f(params, x, key):
        return net.apply(params, x, key=key)

    def f_fwd(params, x, key):
        y, cache = net.forward(params, x, key=key)
        return y, (params, cache)

    def f_bwd(residuals, dy):
        params, cache = residuals
        dparams, dx = net.backward(params, cache, dy)
        return dparams, dx, None

    f.defvjp(f_fwd, f_bwd)

    def call(params: PyTree, x: Array, key: jax.Array | None = None) -> Array:
        return f(params, x, key)

    return call

"""Elementwise activations (and Softmax/LogSoftmax over the last axis); no params, no state.

Each forward computes ``y`` the way JAX's autodiff should differentiate it, so that ``jax.grad``
of ``apply`` (the reference in :mod:`fbp.check`) gives the same derivative as the hand-written
backward everywhere, kinks included. At a kink the derivative taken is stated in the docstring:

    Relu       at x = 0: 0                   (jax.nn.relu, PyTorch)
    LeakyRelu  at x = 0: negative_slope      (PyTorch; jax.nn.leaky_relu takes 1)
    Elu        at x = 0: alpha               (jax.nn.elu, PyTorch)

``-0.0`` counts as 0. The caches hold the output where the derivative is a function of it
(Relu, LeakyRelu, Elu, Sigmoid, Tanh, Softplus, Softmax, LogSoftmax), else the input.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erfc

from fbp.core import Layer
from fbp.nn._base import stateless, sum_last


def _relu_fwd(x):
    y = jax.nn.relu(x)  # its autodiff derivative at 0 is 0, as the backward below
    return y, y


Relu = stateless(
    "Relu",
    _relu_fwd,
    # relu'(x) = [x > 0] = [y > 0]; 0 at the kink
    lambda y, dy: jnp.where(y > 0, dy, 0),
)


def LeakyRelu(negative_slope: float = 0.01) -> Layer:
    """``y = x if x > 0 else negative_slope * x``; ``dy/dx = 1 if x > 0 else negative_slope``.

    At ``x = 0`` (and ``-0.0``) the derivative is ``negative_slope``, as PyTorch (``jax.nn``'s
    ``leaky_relu`` takes 1 there). Default slope 0.01, as PyTorch and ``jax.nn.leaky_relu``
    (Keras 3 uses 0.3). The slope must be >= 0 so that ``y > 0`` exactly when ``x > 0``, which
    lets the cache be the output.
    """
    if not negative_slope >= 0:
        raise ValueError(f"LeakyRelu(negative_slope={negative_slope}): the slope must be >= 0.")

    def fwd(x):
        y = jnp.where(x > 0, x, negative_slope * x)  # autodiff takes the else branch at 0
        return y, y

    def bwd(y, dy):
        return jnp.where(y > 0, dy, negative_slope * dy)

    return stateless(f"LeakyRelu({negative_slope})", fwd, bwd,
                     config=("LeakyRelu", negative_slope))  # fmt: skip


def Elu(alpha: float = 1.0) -> Layer:
    """``y = x if x > 0 else alpha * (exp(x) - 1)``; ``dy/dx = 1 if x > 0 else y + alpha``.

    At ``x = 0`` the derivative is ``alpha`` (the left one), as ``jax.nn.elu`` and PyTorch.
    The exponential only ever sees ``x <= 0`` (it would overflow for large ``x``), through a
    ``where`` rather than ``minimum(x, 0)``, whose autodiff derivative at the tie is 1/2.
    """
    if not alpha > 0:
        raise ValueError(f"Elu(alpha={alpha}): alpha must be > 0.")

    def fwd(x):
        negative = jnp.where(x > 0, jnp.zeros_like(x), x)
        y = jnp.where(x > 0, x, alpha * jnp.expm1(negative))
        return y, y

    def bwd(y, dy):
        return jnp.where(y > 0, dy, (y + alpha) * dy)

    return stateless(f"Elu({alpha})", fwd, bwd, config=("Elu", alpha))


_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def _gelu_fwd(x):
    cdf = 0.5 * erfc(-x * _INV_SQRT2)  # Phi(x), erfc keeps precision for x << 0
    return x * cdf, x


def _gelu_bwd(x, dy):
    cdf = 0.5 * erfc(-x * _INV_SQRT2)
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)  # phi(x)
    return (cdf + x * pdf) * dy  # d(x Phi(x))/dx = Phi(x) + x phi(x)


# Exact (erf) GELU, as Keras's and PyTorch's defaults (jax.nn.gelu defaults to the tanh form).
Gelu = stateless("Gelu", _gelu_fwd, _gelu_bwd)


def _sigmoid_fwd(x):
    y = jax.nn.sigmoid(x)
    return y, y


Sigmoid = stateless("Sigmoid", _sigmoid_fwd, lambda y, dy: y * (1 - y) * dy)


def _tanh_fwd(x):
    y = jnp.tanh(x)
    return y, y


Tanh = stateless("Tanh", _tanh_fwd, lambda y, dy: (1 - y * y) * dy)


def _softplus_fwd(x):
    y = jnp.logaddexp(x, 0)  # log(1 + e^x), stable for large |x|, smooth everywhere
    return y, y


# softplus'(x) = sigmoid(x) = 1 - e^{-y}; -expm1(-y) keeps full precision when y is tiny.
Softplus = stateless("Softplus", _softplus_fwd, lambda y, dy: -jnp.expm1(-y) * dy)


def _silu_fwd(x):
    return x * jax.nn.sigmoid(x), x


def _silu_bwd(x, dy):
    s = jax.nn.sigmoid(x)
    return s * (1 + x * (1 - s)) * dy  # d(x s(x))/dx = s + x s (1 - s)


Silu = stateless("Silu", _silu_fwd, _silu_bwd)


def _softmax_fwd(x):
    y = jax.nn.softmax(x, axis=-1)
    return y, y


# dx_i = sum_j dy_j dy_j/dx_i = y_i (dy_i - sum_j dy_j y_j)
Softmax = stateless("Softmax", _softmax_fwd, lambda y, dy: y * (dy - sum_last(dy * y)))


def _log_softmax_fwd(x):
    y = jax.nn.log_softmax(x, axis=-1)
    return y, y


# y_j = x_j - logsumexp(x): dx_i = dy_i - softmax(x)_i sum_j dy_j, and softmax(x) = e^y
LogSoftmax = stateless("LogSoftmax", _log_softmax_fwd, lambda y, dy: dy - jnp.exp(y) * sum_last(dy))

Identity = stateless("Identity", lambda x: (x, ()), lambda cache, dy: dy, dy_shape=None)

ACTIVATIONS: dict[str, Layer] = {
    "relu": Relu,
    "leaky_relu": LeakyRelu(),
    "elu": Elu(),
    "gelu": Gelu,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "softplus": Softplus,
    "silu": Silu,
}
"""Activations by name, for builders and the command line (``nn.mlp(..., "gelu")``)."""

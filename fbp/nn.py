"""Layers with hand-written backward passes (the ``Layer`` contract is in :mod:`fbp.core`).

Layers without options are ``Layer`` values (``nn.Relu``); layers with options are
constructors (``nn.Dense(128)``), as in stax. Every backward reads like micrograd: local
derivative times upstream gradient, one line per input, shapes in a comment.

Randomness: ``forward(params, x, key=k)`` and ``apply(params, x, key=k)`` pass a PRNG key
to stochastic layers (Dropout), which then train; with ``key=None`` (the default) they are
deterministic evaluation. ``serial`` splits its key into one key per child, as stax does.

Caches hold only what backward needs: the output for Relu, Sigmoid, Tanh, Elu, Softplus,
Softmax and LogSoftmax (their derivatives are functions of the output), the input for Dense,
Gelu and Silu, the normalized input and the reciprocal std for LayerNorm, the mask for Dropout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import erfc

from fbp import initializers
from fbp.core import Array, Layer, PyTree, Shape, ShapeError, check_shape


def _no_params_layer(
    name: str,
    fwd: Callable[[Array], tuple[Array, PyTree]],
    bwd: Callable[[PyTree, Array], Array],
    out_shape: Callable[[Shape], Shape] = lambda s: s,
    dy_shape: Callable[[PyTree], tuple] | None = lambda cache: cache.shape,
) -> Layer:
    """A parameter-free layer from ``fwd(x) -> (y, cache)`` and ``bwd(cache, dy) -> dx``.

    ``dy_shape(cache)`` is the shape ``dy`` must have (``None`` entries match any size); by
    default the cache's own shape, right for every layer that caches its input or output.
    """

    def init(key, input_shape):
        return out_shape(tuple(input_shape)), ()

    def apply(params, x, *, key=None):
        return fwd(x)[0]

    def forward(params, x, *, key=None):
        return fwd(x)

    def backward(params, cache, dy):
        if dy_shape is not None:
            _check_dy(name, dy_shape(cache), dy)
        return (), bwd(cache, dy)

    return Layer(init, apply, forward, backward, name)


def _check_dy(name: str, expected: tuple, dy: Array) -> None:
    check_shape(name, "dy (the gradient of the output)", expected, dy.shape,
                "Pass dL/dy with the shape forward's output had.")  # fmt: skip


def _sum_last(v: Array) -> Array:
    return jnp.sum(v, axis=-1, keepdims=True)


def _lead(v: Array, ndim: int) -> Array:
    """View a per-feature vector ``(d,)`` as ``(1, ..., 1, d)`` so it meets an ``ndim`` array."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


# ---------------------------------------------------------------- activations (elementwise)


def _relu_fwd(x):
    y = jax.nn.relu(x)  # its autodiff derivative at 0 is 0, as the backward below
    return y, y


Relu = _no_params_layer(
    "Relu",
    _relu_fwd,
    # relu'(x) = [x > 0] = [y > 0]
    lambda y, dy: jnp.where(y > 0, dy, 0),
)


def LeakyRelu(negative_slope: float = 0.01) -> Layer:
    """``y = x if x > 0 else negative_slope * x``; ``dy/dx = 1 or negative_slope``.

    Default 0.01, as PyTorch and ``jax.nn.leaky_relu`` (Keras 3 uses 0.3). The slope must be
    >= 0 so that the sign of ``y`` is the sign of ``x`` and the cache can be the output.
    """
    if not negative_slope >= 0:
        raise ValueError(f"LeakyRelu(negative_slope={negative_slope}): the slope must be >= 0.")

    def fwd(x):
        y = jnp.where(x > 0, x, negative_slope * x)
        return y, y

    def bwd(y, dy):
        return jnp.where(y > 0, dy, negative_slope * dy)

    return _no_params_layer(f"LeakyRelu({negative_slope})", fwd, bwd)


def Elu(alpha: float = 1.0) -> Layer:
    """``y = x if x > 0 else alpha * (exp(x) - 1)``; ``dy/dx = 1 if x > 0 else y + alpha``."""
    if not alpha > 0:
        raise ValueError(f"Elu(alpha={alpha}): alpha must be > 0.")

    def fwd(x):
        y = jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))
        return y, y

    def bwd(y, dy):
        return jnp.where(y > 0, dy, (y + alpha) * dy)

    return _no_params_layer(f"Elu({alpha})", fwd, bwd)


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
Gelu = _no_params_layer("Gelu", _gelu_fwd, _gelu_bwd)


def _sigmoid_fwd(x):
    y = jax.nn.sigmoid(x)
    return y, y


Sigmoid = _no_params_layer("Sigmoid", _sigmoid_fwd, lambda y, dy: y * (1 - y) * dy)


def _tanh_fwd(x):
    y = jnp.tanh(x)
    return y, y


Tanh = _no_params_layer("Tanh", _tanh_fwd, lambda y, dy: (1 - y * y) * dy)


def _softplus_fwd(x):
    y = jnp.logaddexp(x, 0)  # log(1 + e^x), stable for large |x|
    return y, y


# softplus'(x) = sigmoid(x) = 1 - e^{-y}; -expm1(-y) keeps full precision when y is tiny.
Softplus = _no_params_layer("Softplus", _softplus_fwd, lambda y, dy: -jnp.expm1(-y) * dy)


def _silu_fwd(x):
    return x * jax.nn.sigmoid(x), x


def _silu_bwd(x, dy):
    s = jax.nn.sigmoid(x)
    return s * (1 + x * (1 - s)) * dy  # d(x s(x))/dx = s + x s (1 - s)


Silu = _no_params_layer("Silu", _silu_fwd, _silu_bwd)


def _softmax_fwd(x):
    y = jax.nn.softmax(x, axis=-1)
    return y, y


# dx_i = sum_j dy_j dy_j/dx_i = y_i (dy_i - sum_j dy_j y_j)
Softmax = _no_params_layer("Softmax", _softmax_fwd, lambda y, dy: y * (dy - _sum_last(dy * y)))


def _log_softmax_fwd(x):
    y = jax.nn.log_softmax(x, axis=-1)
    return y, y


# y_j = x_j - logsumexp(x): dx_i = dy_i - softmax(x)_i sum_j dy_j, and softmax(x) = e^y
LogSoftmax = _no_params_layer(
    "LogSoftmax", _log_softmax_fwd, lambda y, dy: dy - jnp.exp(y) * _sum_last(dy)
)

Identity = _no_params_layer("Identity", lambda x: (x, ()), lambda cache, dy: dy, dy_shape=None)


# ---------------------------------------------------------------- shape


def _flatten_fwd(x):
    if x.ndim < 2:
        raise ShapeError(
            f"Flatten: the input should have a batch axis and at least one more, got {x.shape}. "
            "Pass x of shape (batch, *example_shape)."
        )
    # The cache is a zero-size array that carries the input's per-example shape for backward.
    return x.reshape(x.shape[0], -1), jnp.zeros((0, *x.shape[1:]), x.dtype)


Flatten = _no_params_layer(
    "Flatten",
    _flatten_fwd,
    lambda like, dy: dy.reshape(dy.shape[0], *like.shape[1:]),  # (batch, *input_shape)
    lambda s: (math.prod(s),),
    lambda like: (None, math.prod(like.shape[1:])),
)


# ---------------------------------------------------------------- layers with parameters


def Dense(
    out_dim: int,
    *,
    w_init: initializers.Initializer = initializers.glorot_uniform,
    b_init: initializers.Initializer = initializers.zeros,
    dtype=jnp.float32,
) -> Layer:
    """Fully connected: ``y = x @ w + b`` over the last axis; params ``{"w": (in, out), "b": (out,)}``.

    Backward, with ``x`` viewed as ``(n, in)`` (``n`` = all leading axes)::

        dw = x^T dy      # (in, out)
        db = sum_n dy    # (out,)
        dx = dy w^T      # (n, in)

    Defaults as Keras: glorot-uniform ``w`` and zero ``b``. An input whose last axis is not
    ``in`` raises :class:`fbp.core.ShapeError` at trace time, naming both shapes.
    """
    if not (isinstance(out_dim, int) and out_dim > 0):
        raise ValueError(f"Dense(out_dim={out_dim!r}): out_dim must be a positive int.")
    name = f"Dense({out_dim})"

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 1:
            raise ShapeError(f"{name}: needs an input with a feature axis, got {input_shape}.")
        k_w, k_b = jax.random.split(key)
        params = {
            "w": w_init(k_w, (input_shape[-1], out_dim), dtype),
            "b": b_init(k_b, (out_dim,), dtype),
        }
        return (*input_shape[:-1], out_dim), params

    def _check(params, x):
        in_dim = params["w"].shape[0]
        if x.ndim < 2 or x.shape[-1] != in_dim:
            lead = (None, *x.shape[1:-1]) if x.ndim >= 2 else (None,)
            check_shape(
                name,
                "the input",
                (*lead, in_dim),
                x.shape,
                f"This layer was initialized for {in_dim} input features (its last axis); pass "
                f"x of shape (batch, ..., {in_dim}), or re-run init with the input shape "
                f"{tuple(x.shape[1:])}.",
            )

    def apply(params, x, *, key=None):
        _check(params, x)
        return x @ params["w"] + _lead(params["b"], x.ndim)

    def forward(params, x, *, key=None):
        return apply(params, x), x

    def backward(params, x, dy):
        w = params["w"]
        _check_dy(name, (*x.shape[:-1], w.shape[1]), dy)
        x2 = x.reshape(-1, x.shape[-1])  # (n, in)
        dy2 = dy.reshape(-1, dy.shape[-1])  # (n, out)
        dw = x2.T @ dy2  # (in, out)
        db = dy2.sum(0)  # (out,)
        dx = dy @ w.T  # (..., in)
        # In the params' dtype, as autodiff gives it (a float64 x must not widen float32 grads).
        return {"w": dw.astype(w.dtype), "b": db.astype(params["b"].dtype)}, dx

    return Layer(init, apply, forward, backward, name)


def LayerNorm(epsilon: float = 1e-5, *, dtype=jnp.float32) -> Layer:
    """Layer normalization over the last axis (Ba et al., 2016); params ``{"scale", "bias"}``.

    Forward, per example over the ``d`` features::

        xhat = (x - mean(x)) * r,   r = 1 / sqrt(var(x) + epsilon)
        y    = scale * xhat + bias

    Backward, with ``g = dy * scale``::

        dscale = sum_batch dy * xhat
        dbias  = sum_batch dy
        dx     = r * (g - mean(g) - xhat * mean(g * xhat))

    ``epsilon`` defaults to 1e-5 as PyTorch (Keras uses 1e-3, Flax 1e-6).
    """
    if not epsilon > 0:
        raise ValueError(f"LayerNorm(epsilon={epsilon}): epsilon must be > 0.")
    name = "LayerNorm"

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if not input_shape:
            raise ShapeError(f"{name}: needs an input with a feature axis, got {input_shape}.")
        d = input_shape[-1]
        return input_shape, {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}

    def forward(params, x, *, key=None):
        d = params["scale"].shape[0]
        if x.ndim < 2 or x.shape[-1] != d:
            check_shape(name, "the input", (None, d), x.shape, f"Pass x of shape (batch, {d}).")
        mean = jnp.mean(x, axis=-1, keepdims=True)
        xc = x - mean
        r = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + epsilon)  # (..., 1)
        xhat = xc * r
        y = _lead(params["scale"], x.ndim) * xhat + _lead(params["bias"], x.ndim)
        return y, (xhat, r)

    def apply(params, x, *, key=None):
        return forward(params, x)[0]

    def backward(params, cache, dy):
        xhat, r = cache
        _check_dy(name, xhat.shape, dy)
        axes = tuple(range(dy.ndim - 1))
        dscale = jnp.sum(dy * xhat, axis=axes).astype(params["scale"].dtype)  # (d,)
        dbias = jnp.sum(dy, axis=axes).astype(params["bias"].dtype)  # (d,)
        g = dy * _lead(params["scale"], dy.ndim)  # dL/dxhat
        mean_g = jnp.mean(g, axis=-1, keepdims=True)
        mean_gx = jnp.mean(g * xhat, axis=-1, keepdims=True)
        dx = r * (g - mean_g - xhat * mean_gx)
        return {"scale": dscale, "bias": dbias}, dx

    return Layer(init, apply, forward, backward, name)


def Dropout(rate: float) -> Layer:
    """Inverted dropout: with a key, each element is zeroed with probability ``rate``.

    ``rate`` is the probability of DROPPING (as Keras and PyTorch; stax's ``Dropout`` takes the
    keep probability). Training (``key`` given): ``y = x * m / (1 - rate)``, ``m ~ Bernoulli(1 -
    rate)``, and ``dx = dy * m / (1 - rate)``. Evaluation (``key=None``): ``y = x``.
    """
    if not 0 <= rate < 1:
        raise ValueError(f"Dropout(rate={rate}): rate is the drop probability, in [0, 1).")
    keep = 1.0 - rate

    def forward(params, x, *, key=None):
        if key is None or rate == 0:
            return x, ()
        mask = jax.random.bernoulli(key, keep, x.shape)
        return jnp.where(mask, x / keep, 0), mask

    def apply(params, x, *, key=None):
        return forward(params, x, key=key)[0]

    def backward(params, mask, dy):
        if isinstance(mask, tuple):  # evaluation mode: identity
            return (), dy
        _check_dy(f"Dropout({rate})", mask.shape, dy)
        return (), jnp.where(mask, dy / keep, 0)

    def init(key, input_shape):
        return tuple(input_shape), ()

    return Layer(init, apply, forward, backward, f"Dropout({rate})")


# ---------------------------------------------------------------- combinators


def serial(*layers: Layer) -> Layer:
    """Compose layers: forward in order, backward in reverse (the chain rule, layer by layer).

    Params and caches are tuples with one entry per layer. A key given to ``init``,
    ``forward`` or ``apply`` is split into one key per layer. A shape error inside is
    re-raised naming the layer's index in this ``serial``.
    """
    if not layers:
        raise ValueError("serial() needs at least one layer.")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            hint = (
                " Did you forget to call a constructor, e.g. nn.Dense(128)?"
                if callable(layer)
                else ""
            )
            raise TypeError(f"serial: argument {i} is {layer!r}, not a Layer.{hint}")
    n = len(layers)
    name = "serial(" + ", ".join(layer.name for layer in layers) + ")"

    def keys(key):
        return (None,) * n if key is None else tuple(jax.random.split(key, n))

    def check_params(params):
        if not isinstance(params, (tuple, list)) or len(params) != n:
            got = (
                f"a {type(params).__name__} of length {len(params)}"
                if isinstance(params, (tuple, list))
                else type(params).__name__
            )
            raise TypeError(
                f"{name}: params should be a tuple of {n} entries, one per layer, got {got}. "
                "Pass the params returned by this network's init."
            )

    def at(i, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShapeError as e:
            raise ShapeError(f"serial layer {i} ({layers[i].name}): {e}") from None

    def init(key, input_shape):
        params = []
        shape = tuple(input_shape)
        for i, (layer, k) in enumerate(zip(layers, jax.random.split(key, n))):
            shape, p = at(i, layer.init, k, shape)
            params.append(p)
        return shape, tuple(params)

    def apply(params, x, *, key=None):
        check_params(params)
        for i, (layer, p, k) in enumerate(zip(layers, params, keys(key))):
            x = at(i, layer.apply, p, x, key=k)
        return x

    def forward(params, x, *, key=None):
        check_params(params)
        caches = []
        for i, (layer, p, k) in enumerate(zip(layers, params, keys(key))):
            x, cache = at(i, layer.forward, p, x, key=k)
            caches.append(cache)
        return x, tuple(caches)

    def backward(params, caches, dy):
        grads = [None] * n
        for i in reversed(range(n)):
            grads[i], dy = layers[i].backward(params[i], caches[i], dy)
        return tuple(grads), dy

    return Layer(init, apply, forward, backward, name, tuple(layers))

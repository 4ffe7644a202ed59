"""Weight initializers: ``init(key, shape, dtype) -> array``.

Fans follow Keras and ``jax.nn.initializers`` for a weight of shape ``(..., fan_in, fan_out)``;
a 1-D shape ``(n,)`` has ``fan_in = fan_out = n``. "Normal" variance-scaling initializers draw
from a normal truncated at two standard deviations and rescaled so the variance is exact, as
Keras and JAX do (``0.87962566103423978`` is the std of a unit normal truncated to [-2, 2]).

    name              distribution                       variance
    glorot_uniform    U(-l, l), l = sqrt(6/(in+out))     2/(in+out)   Glorot & Bengio, 2010
    glorot_normal     truncated normal                   2/(in+out)
    he_uniform        U(-l, l), l = sqrt(6/in)           2/in         He et al., 2015
    he_normal         truncated normal                   2/in
    lecun_normal      truncated normal                   1/in         LeCun et al., 1998
    normal(stddev)    N(0, stddev^2)                     stddev^2
    uniform(lo, hi)   U(lo, hi); Keras's Embedding default is (-0.05, 0.05)
    orthogonal(gain)  gain * Q, Q orthonormal (QR of a normal draw)   Saxe et al., 2014; Keras's
                      recurrent kernels
    zeros, ones       constants

``split(key, n)`` is ``jax.random.split`` as a tuple of keys, for ``init`` functions. Called
eagerly, each draw and each split is one program of its own, compiled with options that make
XLA:CPU compile it faster, to the same bits; inside a trace they are plain JAX.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import Array, Shape

Initializer = Callable[[jax.Array, Shape, jnp.dtype], Array]

_TRUNCATED_STD = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]


def _fans(shape: Shape) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


# An initializer runs once, so the time XLA takes to compile its draw is all it costs: a
# network's init used to compile, eagerly and op by op, a key split and its unstacking per
# layer and a threefry draw per weight shape, 0.8 s for an MLP 784-256-10 on a 2-core CPU. Each
# split and each draw is now one program, compiled with XLA:CPU's loop emitters, which compile
# a draw about 1.5x faster than its default fusion emitters (0.13 s against 0.20 s for a
# (784, 256) glorot draw) to the same bits (tests/test_initializers.py checks them against a
# plain jit). A per-program option, not JAX's global configuration; an XLA that no longer knows
# it compiles the draw with its defaults instead.
_QUICK_COMPILE = {"xla_cpu_use_fusion_emitters": False}


def _quick_program(fn: Callable[..., Array], static_argnums: tuple[int, ...]) -> Callable:
    """``jax.jit(fn)`` compiled with :data:`_QUICK_COMPILE` when it is a program of its own;
    inside a trace (an init under ``jit``, ``vmap`` or ``eval_shape``), where jit takes no
    compiler options, or with an XLA that lacks an option, a plain ``jax.jit(fn)``."""
    quick = jax.jit(fn, static_argnums=static_argnums, compiler_options=_QUICK_COMPILE)
    plain = jax.jit(fn, static_argnums=static_argnums)

    @functools.wraps(fn)
    def program(*args):
        if not any(isinstance(a, jax.core.Tracer) for a in args):
            try:
                return quick(*args)
            except ValueError as e:  # a concrete key, but inside a trace all the same
                if "top-level" not in str(e):
                    raise
            except jax.errors.JaxRuntimeError as e:
                if "compile option" not in str(e):
                    raise
        return plain(*args)

    return program


def _draw_fn(kind: str, key: jax.Array, shape: Shape, dtype, a: float, b: float) -> Array:
    """``shape`` draws of ``kind``: "uniform" ``U(a, b)``, "truncated" ``a`` times a unit
    normal truncated to [-2, 2], "normal" ``a`` times a unit normal. Drawn as one flat vector
    and reshaped: the same numbers (JAX's threefry bits are indexed by position), but XLA:CPU
    compiles a flat draw up to 5x faster for shapes with a short last axis, as the
    (hidden, 10) weight of a classifier."""
    n = (math.prod(shape),)
    if kind == "uniform":
        flat = jax.random.uniform(key, n, dtype, a, b)
    elif kind == "truncated":
        flat = a * jax.random.truncated_normal(key, -2.0, 2.0, n, dtype)
    else:
        flat = a * jax.random.normal(key, n, dtype)
    return flat.reshape(shape)


_draw = _quick_program(_draw_fn, static_argnums=(0, 2, 3, 4, 5))


def _sample(kind: str, key: jax.Array, shape: Shape, dtype, a: float, b: float = 0.0) -> Array:
    return _draw(kind, key, tuple(int(d) for d in shape), jnp.dtype(dtype), float(a), float(b))


def _uniform(key: jax.Array, shape: Shape, dtype, variance: float) -> Array:
    limit = math.sqrt(3.0 * variance)  # U(-l, l) has variance l^2 / 3
    return _sample("uniform", key, shape, dtype, -limit, limit)


def _truncated_normal(key: jax.Array, shape: Shape, dtype, variance: float) -> Array:
    return _sample("truncated", key, shape, dtype, math.sqrt(variance) / _TRUNCATED_STD)


def glorot_uniform(key: jax.Array, shape: Shape, dtype=jnp.float32) -> Array:
    """Glorot/Xavier uniform: ``U(-l, l)``, ``l = sqrt(6 / (fan_in + fan_out))`` (Keras's Dense)."""
    fan_in, fan_out = _fans(shape)
    return _uniform(key, shape, dtype, 2.0 / (fan_in + fan_out))


def glorot_normal(key: jax.Array, shape: Shape, dtype=jnp.float32) -> Array:
    """Glorot/Xavier normal: truncated normal with variance ``2 / (fan_in + fan_out)``."""
    fan_in, fan_out = _fans(shape)
    return _truncated_normal(key, shape, dtype, 2.0 / (fan_in + fan_out))


def he_uniform(key: jax.Array, shape: Shape, dtype=jnp.float32) -> Array:
    """He/Kaiming uniform: ``U(-l, l)``, ``l = sqrt(6 / fan_in)``; for ReLU networks."""
    fan_in, _ = _fans(shape)
    return _uniform(key, shape, dtype, 2.0 / fan_in)


def he_normal(key: jax.Array, shape: Shape, dtype=jnp.float32) -> Array:
    """He/Kaiming normal: truncated normal with variance ``2 / fan_in``; for ReLU networks."""
    fan_in, _ = _fans(shape)
    return _truncated_normal(key, shape, dtype, 2.0 / fan_in)


def lecun_normal(key: jax.Array, shape: Shape, dtype=jnp.float32) -> Array:
    """LeCun normal: truncated normal with variance ``1 / fan_in``; for SELU/tanh networks."""
    fan_in, _ = _fans(shape)
    return _truncated_normal(key, shape, dtype, 1.0 / fan_in)


def normal(stddev: float = 1e-2) -> Initializer:
    """``N(0, stddev^2)``, untruncated (as ``jax.nn.initializers.normal``)."""
    if stddev < 0:
        raise ValueError(f"normal(stddev={stddev}): stddev must be >= 0.")

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> Array:
        return _sample("normal", key, shape, dtype, stddev)

    return init


def uniform(minval: float = -0.05, maxval: float = 0.05) -> Initializer:
    """``U(minval, maxval)``; the defaults are Keras's ``RandomUniform`` (Embedding's default)."""
    if not minval < maxval:
        raise ValueError(f"uniform({minval}, {maxval}): minval must be < maxval.")

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> Array:
        return _sample("uniform", key, shape, dtype, minval, maxval)

    return init


def orthogonal(gain: float = 1.0) -> Initializer:
    """A (semi-)orthogonal matrix times ``gain`` (Saxe et al., 2014), as Keras and JAX.

    ``shape`` (rank >= 2) is viewed as ``(rows, cols) = (prod(shape[:-1]), shape[-1])``: draw
    ``A ~ N(0, 1)`` of shape ``(max(rows, cols), min(rows, cols))``, take its reduced QR
    ``A = Q R`` and fix the signs, ``Q *= sign(diag(R))``, so that ``Q`` is uniformly (Haar)
    distributed rather than biased by the QR convention; transpose when ``rows < cols``. The
    result has orthonormal columns (rows >= cols) or orthonormal rows (rows < cols). Keras's
    default ``recurrent_initializer`` for SimpleRNN, LSTM and GRU.
    """

    def init(key: jax.Array, shape: Shape, dtype=jnp.float32) -> Array:
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            raise ValueError(f"orthogonal: needs a shape of rank >= 2, got {shape}.")
        return _orthogonal(key, shape, jnp.dtype(dtype), float(gain))

    return init


def _orthogonal_fn(key: jax.Array, shape: Shape, dtype, gain: float) -> Array:
    rows, cols = math.prod(shape[:-1]), shape[-1]
    a = jax.random.normal(key, (max(rows, cols), min(rows, cols)), dtype)
    q, r = jnp.linalg.qr(a)  # (max, min), (min, min)
    q = q * jnp.sign(jnp.diag(r))[None, :]  # the sign correction, column by column
    if rows < cols:
        q = q.T
    return (gain * q).reshape(shape).astype(dtype)


_orthogonal = _quick_program(_orthogonal_fn, static_argnums=(1, 2, 3))


def _constant(key: jax.Array | None, shape: Shape, dtype, value: float) -> Array:
    """Eagerly, a host array put on the device, which compiles nothing (``jnp.full`` compiles
    a broadcast per shape, ``jnp.asarray`` a copy); inside a trace (a traced key), a broadcast,
    not a literal in the program."""
    if isinstance(key, jax.core.Tracer):
        return jnp.full(shape, value, dtype)
    return jax.device_put(np.full(shape, value, jnp.dtype(dtype)))


def zeros(key: jax.Array, shape: Shape, dtype=jnp.float32) -> Array:
    """All zeros (Keras's default bias). ``key`` draws nothing (a traced key says that init
    is being traced)."""
    return _constant(key, shape, dtype, 0.0)


def ones(key: jax.Array, shape: Shape, dtype=jnp.float32) -> Array:
    """All ones (LayerNorm's default scale). ``key`` draws nothing, as for :func:`zeros`."""
    return _constant(key, shape, dtype, 1.0)


def _split_fn(key: jax.Array, n: int) -> tuple[jax.Array, ...]:
    return tuple(jax.random.split(key, n))


_split = _quick_program(_split_fn, static_argnums=(1,))


def split(key: jax.Array, n: int = 2) -> tuple[jax.Array, ...]:
    """``tuple(jax.random.split(key, n))``, the same keys, as one quickly compiled program per
    ``n`` (eagerly, a split and the unstacking of its result compile 0.15 s on a 2-core CPU).
    The layers' ``init`` functions split their keys with it."""
    return _split(key, int(n))

"""Tests for conv.py: every backward against jax.vjp (autodiff is the reference here, never in
the library) and against central finite differences, every forward against a NumPy loop.

Each layer case is compiled once (``_results``) and its numbers are shared by the tests that
check them: the forward against NumPy, the backward against jax.vjp, the backward against
finite differences. Shapes are tiny (batch 2, 5-9 pixels, 2-4 channels): the whole file
compiles ~80 small programs.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fbp.core import ParamsError, ShapeError
from fbp.nn.conv import (
    AvgPool1D,
    AvgPool2D,
    Conv1D,
    Conv2D,
    GlobalAvgPool,
    MaxPool1D,
    MaxPool2D,
)

F64 = jnp.float64
BATCH = 2
E = ((1, 2), (0, 1))  # the explicit, uneven padding of the grid: top 1, bottom 2, left 0, right 1


# --------------------------------------------------------------------------------------------
# The case tables
# --------------------------------------------------------------------------------------------


class ConvSpec(NamedTuple):
    size: tuple  # spatial input size: (H, W) for Conv2D, (L,) for Conv1D
    cin: int
    filters: int
    kernel: int | tuple
    strides: int | tuple = 1
    padding: str | tuple = "valid"
    dilation: int | tuple = 1
    groups: int = 1
    bias: bool = True

    def layer(self):
        make = Conv2D if len(self.size) == 2 else Conv1D
        return make(self.filters, self.kernel, self.strides, self.padding, self.dilation,
                    self.groups, self.bias, dtype=F64)  # fmt: skip

    @property
    def shape(self):
        return (BATCH, *self.size, self.cin)


class PoolSpec(NamedTuple):
    kind: str
    size: tuple
    channels: int
    pool: int | tuple = 2
    strides: int | tuple | None = None
    padding: str | tuple = "valid"

    def layer(self):
        if self.kind == "GlobalAvgPool":
            return GlobalAvgPool
        make = {"MaxPool2D": MaxPool2D, "AvgPool2D": AvgPool2D, "MaxPool1D": MaxPool1D,
                "AvgPool1D": AvgPool1D}[self.kind]  # fmt: skip
        return make(self.pool, self.strides, self.padding)

    @property
    def shape(self):
        return (BATCH, *self.size, self.channels)


def _id(spec) -> str:
    return f"{spec.layer().name}-{'x'.join(map(str, spec.shape))}"


# A covering set, not the Cartesian product: every kernel (1, 3, 5, 2x3), stride (1, 2, 3),
# padding (valid, same, E), dilation (1, 2) and groups value (1, 2, depthwise) appears; every
# stride x padding pair is run on sizes the stride divides and does not divide (n % s for
# "same", (n + lo + hi - k_eff) % s otherwise); every dilation x stride pair appears.
CONV2D = [
    # kernel 3: stride x padding x (size divisible or not), dilation rotating
    ConvSpec((5, 5), 3, 4, 3, 1, "valid"),
    ConvSpec((6, 6), 3, 4, 3, 1, "same"),
    ConvSpec((5, 6), 3, 4, 3, 1, E, 2),
    ConvSpec((6, 6), 2, 4, 3, 2, "valid"),  # (6 - 3) % 2 = 1: the last row is never read
    ConvSpec((7, 7), 2, 4, 3, 2, "valid"),  # (7 - 3) % 2 = 0
    ConvSpec((7, 8), 2, 4, 3, 2, "same"),  # 7 % 2 = 1, 8 % 2 = 0
    ConvSpec((8, 6), 2, 4, 3, 2, "same", 2),
    ConvSpec((7, 7), 2, 4, 3, 2, E),  # (7 + 3 - 3) % 2 = 1, (7 + 1 - 3) % 2 = 1
    ConvSpec((8, 9), 2, 4, 3, 2, E, 2),  # (8 + 3 - 5) % 2 = 0, (9 + 1 - 5) % 2 = 1
    ConvSpec((8, 8), 2, 4, 3, 3, "valid"),  # (8 - 3) % 3 = 2
    ConvSpec((9, 9), 2, 4, 3, 3, "valid"),  # 0
    ConvSpec((9, 7), 2, 4, 3, 3, "same"),  # 9 % 3 = 0, 7 % 3 = 1
    ConvSpec((8, 5), 2, 4, 3, 3, "same", 2),
    ConvSpec((9, 8), 2, 4, 3, 3, E),
    ConvSpec((7, 9), 2, 4, 3, 3, E, 2),
    ConvSpec((9, 9), 2, 4, 3, 3, "valid", 2),
    # kernel 1
    ConvSpec((5, 6), 3, 4, 1, 1, "valid"),
    ConvSpec((7, 6), 3, 4, 1, 2, "same"),
    ConvSpec((6, 7), 3, 2, 1, 3, E),
    ConvSpec((5, 5), 3, 4, 1, 2, "valid", 2),
    # kernel 5
    ConvSpec((5, 5), 2, 3, 5, 1, "valid"),  # a 1x1 output
    ConvSpec((6, 7), 2, 3, 5, 1, "same"),
    ConvSpec((9, 8), 2, 3, 5, 2, "same", 2),
    ConvSpec((7, 8), 2, 3, 5, 3, E),
    ConvSpec((9, 9), 2, 3, 5, 2, "valid", 2),  # dilated 9x9 window: a 1x1 output
    # kernel 2x3 (an even height: "same" splits unevenly)
    ConvSpec((5, 6), 3, 4, (2, 3), 1, "valid"),
    ConvSpec((6, 5), 3, 4, (2, 3), 2, "same"),
    ConvSpec((7, 7), 3, 4, (2, 3), 3, E, 2),
    ConvSpec((8, 7), 3, 4, (2, 3), 2, "valid", 2),
    # depthwise (groups = in channels) and grouped
    ConvSpec((6, 6), 3, 3, 3, 1, "same", 1, 3),
    ConvSpec((7, 7), 3, 6, 3, 2, "valid", 1, 3),  # channel multiplier 2
    ConvSpec((8, 7), 4, 4, 3, 2, E, 2, 4),
    ConvSpec((7, 8), 2, 4, 5, 3, "same", 1, 2),
    ConvSpec((6, 5), 3, 6, (2, 3), 1, "valid", 2, 3),
    ConvSpec((5, 5), 3, 3, 1, 2, "same", 1, 3),
    ConvSpec((6, 7), 4, 6, 3, 2, "same", 1, 2),  # 2 groups of 2 channels -> 2 x 3 filters
    ConvSpec((7, 6), 4, 4, (2, 3), 3, E, 2, 2),
    # no bias
    ConvSpec((6, 6), 3, 4, 3, 2, "same", bias=False),
    ConvSpec((7, 6), 3, 3, 3, 1, E, 2, 3, bias=False),
    # per-axis strides and dilations
    ConvSpec((8, 7), 2, 3, 3, (2, 1), "same", (1, 2)),
    ConvSpec((7, 9), 2, 3, (2, 3), (1, 3), "valid", (2, 1)),
    # padding wider than the kernel: the transposed convolution's padding goes negative (crops)
    ConvSpec((5, 5), 2, 3, 1, 2, ((2, 3), (3, 1))),
    ConvSpec((5, 6), 2, 3, 3, 1, ((3, 4), (0, 0))),
]
CONV1D = [
    ConvSpec((9,), 2, 4, 3, 1, "valid"),
    ConvSpec((8,), 2, 4, 3, 2, "same", 2),
    ConvSpec((7,), 4, 4, 5, 3, (1, 2), 1, 2),
    ConvSpec((9,), 3, 3, 2, 2, "same", 1, 3),
    ConvSpec((6,), 2, 3, 1, 1, 1, bias=False),
]
CONVS = CONV2D + CONV1D

POOL_GEOMETRIES = [  # (size, pool, strides, padding)
    ((5, 5), 2, None, "valid"),  # 5 % 2 = 1: the last row and column are never read
    ((6, 6), 2, None, "same"),
    ((5, 7), 2, None, "same"),
    ((7, 7), 3, 2, "valid"),  # overlapping windows
    ((6, 7), 3, 2, "same"),
    ((6, 5), 3, 1, "same"),  # every inner input is in 9 windows
    ((8, 7), 3, None, "same"),
    ((6, 7), (2, 3), (1, 2), ((1, 0), (1, 2))),
]
POOLS = [
    PoolSpec(kind, size, 3, pool, strides, padding)
    for kind in ("MaxPool2D", "AvgPool2D")
    for size, pool, strides, padding in POOL_GEOMETRIES
] + [
    PoolSpec("MaxPool1D", (9,), 2, 3, 2, "same"),
    PoolSpec("AvgPool1D", (9,), 2, 3, 2, "same"),
    PoolSpec("MaxPool1D", (8,), 2, 2),
    PoolSpec("GlobalAvgPool", (5, 6), 3),
    PoolSpec("GlobalAvgPool", (7,), 2),
]
LAYERS = CONVS + POOLS


# --------------------------------------------------------------------------------------------
# One compiled run per case
# --------------------------------------------------------------------------------------------


def _normal(rng, tree):
    """A standard-normal float64 tree shaped like ``tree`` (NumPy: nothing to compile)."""
    return jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape)), tree)


def _dot(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return sum(jnp.vdot(u, v) for u, v in pairs)


def _init_shapes(layer, input_shape):
    """``init``'s output shape and its params' shapes, traced abstractly (no compile)."""
    seen = {}

    def init(key):
        seen["out"], params, seen["state"] = layer.init(key, input_shape)
        return params

    params = jax.eval_shape(init, jax.random.PRNGKey(0))
    return seen["out"], params, seen["state"]


def _program(layer, state):
    """One jitted program: forward, the hand-written backward and jax.vjp's reference."""

    @jax.jit
    def run(params, x, dy):
        y, _, cache = layer.forward(params, state, x)
        dparams, dx = layer.backward(params, cache, dy)
        _, vjp = jax.vjp(lambda p, x: layer.apply(p, state, x), params, x)
        return y, (dparams, dx), vjp(dy)

    return run


@functools.cache
def _results(spec):
    """Forward, hand-written backward, jax.vjp and a finite difference, in one jitted program."""
    layer = spec.layer()
    rng = np.random.default_rng(zlib.crc32(repr(spec).encode()))
    out_shape, params, state = _init_shapes(layer, spec.shape[1:])
    params = _normal(rng, params)  # a random bias too, so the bias path is exercised
    x, dy = _normal(rng, (jnp.zeros(spec.shape), jnp.zeros((BATCH, *out_shape))))
    v, u = _normal(rng, (params, x))  # a direction in (params, x) for the finite difference
    h = 1e-6

    @jax.jit
    def run(params, x, dy, v, u):
        y, grads, ref_grads = _program(layer, state)(params, x, dy)
        norm = jnp.sqrt(_dot((v, u), (v, u)))
        v, u = jax.tree.map(lambda a: a / norm, (v, u))  # a unit direction

        def f(t):  # <dy, apply(p + t v, x + t u)>
            p_t = jax.tree.map(lambda a, b: a + t * b, params, v)
            return jnp.vdot(dy, layer.apply(p_t, state, x + t * u))

        fd = (f(h) - f(-h)) / (2 * h)
        return y, grads, ref_grads, fd, _dot(grads, (v, u)), jnp.sqrt(_dot(grads, grads))

    try:
        y, (dparams, dx), (ref_dparams, ref_dx), fd, analytic, grad_norm = run(params, x, dy, v, u)
    except Exception as error:  # a backward that fails to trace: still check the forward alone
        y = jax.jit(lambda p, x: layer.forward(p, state, x)[0])(params, x)
        return dict(params=params, x=x, y=y, error=error)
    assert y.shape == (BATCH, *out_shape), "init's output shape disagrees with forward's"
    return dict(params=params, x=x, y=y, dparams=dparams, dx=dx, ref_dparams=ref_dparams,
                ref_dx=ref_dx, fd=fd, analytic=analytic, grad_norm=grad_norm)  # fmt: skip


def _backward_results(spec):
    r = _results(spec)
    if "error" in r:
        raise r["error"]
    return r


def _rel_err(a, b) -> float:
    """Normwise: max|a - b| / max|b|."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("spec", LAYERS, ids=_id)
def test_backward_matches_vjp(spec):
    r = _backward_results(spec)
    assert jax.tree.structure(r["dparams"]) == jax.tree.structure(r["ref_dparams"])
    for mine, ref in zip(
        jax.tree.leaves(r["dparams"]), jax.tree.leaves(r["ref_dparams"]), strict=True
    ):
        assert _rel_err(mine, ref) <= 1e-10
    assert _rel_err(r["dx"], r["ref_dx"]) <= 1e-10


@pytest.mark.parametrize("spec", LAYERS, ids=_id)
def test_backward_matches_finite_differences(spec):
    """<dparams, v> + <dx, u> against (f(h) - f(-h)) / 2h, f(t) = <dy, apply(p + tv, x + tu)>."""
    r = _backward_results(spec)
    assert abs(float(r["fd"] - r["analytic"])) <= 1e-6 * float(r["grad_norm"])


# --------------------------------------------------------------------------------------------
# Forwards against NumPy loops
# --------------------------------------------------------------------------------------------


def _ref_pads(padding, sizes, kernel, strides, dilation):
    """TensorFlow's "same" split, written out again: ceil(n/s) outputs, the odd pixel after."""
    if padding == "valid":
        return [(0, 0)] * len(sizes)
    if padding == "same":
        pads = []
        for n, k, s, d in zip(sizes, kernel, strides, dilation, strict=True):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        return pads
    if isinstance(padding, int):
        return [(padding, padding)] * len(sizes)
    return [padding] if len(sizes) == 1 and isinstance(padding[0], int) else list(padding)


def _pair(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


def _conv_ref(x, w, b, strides, pads, dilation, groups):
    """2-D convolution by explicit loops over output pixels and groups (NHWC, HWIO)."""
    (sh, sw), (dh, dw) = strides, dilation
    kh, kw, per_group, filters = w.shape
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    oh = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    ow = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    y = np.zeros((x.shape[0], oh, ow, filters))
    f_per_group = filters // groups
    for p, q in itertools.product(range(oh), range(ow)):
        rows, cols = p * sh + np.arange(kh) * dh, q * sw + np.arange(kw) * dw
        patch = xp[:, rows][:, :, cols]  # (B, kh, kw, Cin)
        for g in range(groups):
            c, f = (
                slice(g * per_group, (g + 1) * per_group),
                slice(g * f_per_group, (g + 1) * f_per_group),
            )
            y[:, p, q, f] = np.einsum("bijc,ijcf->bf", patch[..., c], w[..., f])
    return y + (0 if b is None else b)


@pytest.mark.parametrize("spec", CONVS, ids=_id)
def test_conv_forward_matches_numpy(spec):
    r = _results(spec)
    n = len(spec.size)
    kernel, strides, dilation = (_pair(v, n) for v in (spec.kernel, spec.strides, spec.dilation))
    pads = _ref_pads(spec.padding, spec.size, kernel, strides, dilation)
    x, w = np.asarray(r["x"]), np.asarray(r["params"]["w"])
    b = np.asarray(r["params"]["b"]) if spec.bias else None
    if n == 1:  # a 1-D convolution is a 2-D one over a height of 1
        x, w, pads = x[:, None], w[None], [(0, 0), *pads]
        strides, dilation = (1, *strides), (1, *dilation)
    ref = _conv_ref(x, w, b, strides, pads, dilation, spec.groups).reshape(r["y"].shape)
    assert _rel_err(r["y"], ref) <= 1e-12


def _pool_ref(x, pool, strides, pads, kind, dy=None):
    """2-D pooling by loops over windows; padding excluded. With ``dy``, max pooling's dx by
    the first-maximum rule (np.argmax returns the first maximum, row-major)."""
    (ph, pw), (sh, sw) = pool, strides
    xp = np.pad(x, [(0, 0), *pads, (0, 0)], constant_values=np.nan)  # NaN marks padding
    oh, ow = (xp.shape[1] - ph) // sh + 1, (xp.shape[2] - pw) // sw + 1
    y = np.zeros((x.shape[0], oh, ow, x.shape[-1]))
    dxp = np.zeros_like(xp)
    for b, p, q, c in itertools.product(*map(range, (x.shape[0], oh, ow, x.shape[-1]))):
        window = xp[b, p * sh : p * sh + ph, q * sw : q * sw + pw, c]
        real = window[~np.isnan(window)]
        if kind == "avg":
            y[b, p, q, c] = real.sum() / real.size
            continue
        y[b, p, q, c] = real.max()
        if dy is not None:
            i, j = np.unravel_index(np.argmax(np.where(np.isnan(window), -np.inf, window)), pool)
            dxp[b, p * sh + i, q * sw + j, c] += dy[b, p, q, c]
    (top, _), (left, _) = pads
    return y, dxp[:, top : top + x.shape[1], left : left + x.shape[2]]


@pytest.mark.parametrize("spec", [s for s in POOLS if s.kind.endswith("2D")], ids=_id)
def test_pool_forward_matches_numpy(spec):
    """Max pooling ignores -inf padding; average pooling divides by the real inputs only."""
    r = _results(spec)
    pool = _pair(spec.pool, 2)
    strides = pool if spec.strides is None else _pair(spec.strides, 2)
    pads = _ref_pads(spec.padding, spec.size, pool, strides, (1, 1))
    ref, _ = _pool_ref(np.asarray(r["x"]), pool, strides, pads, spec.kind[:3].lower())
    assert _rel_err(r["y"], ref) <= 1e-14


def test_avg_pool_same_excludes_padding():
    """A 3x3 "same" average at a corner of a 4x4 input of ones plus one 9: four real inputs."""
    x = jnp.ones((1, 4, 4, 1), F64).at[0, 0, 0, 0].set(9.0)
    y = AvgPool2D(3, 1, "same").apply((), (), x)
    assert float(y[0, 0, 0, 0]) == (9 + 3) / 4  # TF: 3.0; counting the padding: 12 / 9
    assert float(y[0, 1, 1, 0]) == (9 + 8) / 9


# --------------------------------------------------------------------------------------------
# Max pooling: ties get exactly jax.grad's answer
# --------------------------------------------------------------------------------------------


def _tie_input(data, shape):
    rng = np.random.default_rng(7)
    make = {
        "zeros": lambda: np.zeros(shape),
        "three-values": lambda: rng.integers(0, 3, shape).astype(float),  # many ties
        "two-values": lambda: (rng.random(shape) < 0.2).astype(float),
        "constant-rows": lambda: np.broadcast_to(np.arange(shape[1])[:, None, None] % 2.0, shape),
        "-inf": lambda: np.where(rng.random(shape) < 0.3, 0.0, -np.inf),  # all -inf windows
    }
    return jnp.asarray(make[data]())


@functools.cache
def _max_pool_program(geometry):
    _, pool, strides, padding = geometry
    return _program(MaxPool2D(pool, strides, padding), ())


@pytest.mark.parametrize("data", ["zeros", "three-values", "two-values", "constant-rows", "-inf"])
@pytest.mark.parametrize(
    "geometry", POOL_GEOMETRIES, ids=lambda g: f"{g[0]}-pool{g[1]}-stride{g[2]}-{g[3]}"
)
def test_max_pool_ties_match_vjp_exactly(geometry, data):
    """dx == jax.vjp's dx bit for bit, and == the NumPy first-maximum rule."""
    size, pool, strides, padding = geometry
    pool = _pair(pool, 2)
    strides = pool if strides is None else _pair(strides, 2)
    pads = _ref_pads(padding, size, pool, strides, (1, 1))
    x = _tie_input(data, (BATCH, *size, 3))
    out = (BATCH, *((n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(
        size, pads, pool, strides, strict=True)), 3)  # fmt: skip
    dy = jnp.arange(1.0, 1.0 + math.prod(out), dtype=F64).reshape(out) / 7  # distinct, inexact
    y, (_, dx), (_, ref_dx) = _max_pool_program(geometry)((), x, dy)
    assert np.array_equal(dx, ref_dx)
    ref_y, ref_dx_np = _pool_ref(np.asarray(x), pool, strides, pads, "max", np.asarray(dy))
    assert np.array_equal(y, ref_y)
    assert np.array_equal(dx, ref_dx_np)


def test_max_pool_tie_goes_to_the_first_element():
    """All-zero 2x2 windows: the top-left element of each window gets its gradient."""
    _, (_, dx), _ = _program(MaxPool2D(2), ())((), jnp.zeros((1, 4, 4, 1)), jnp.ones((1, 2, 2, 1)))
    expected = np.zeros((4, 4))
    expected[::2, ::2] = 1
    assert np.array_equal(dx[0, :, :, 0], expected)


def test_max_pool_cache_is_small():
    """The cache holds int8 offsets (one per output) and a zero-size shape carrier."""
    _, _, cache = MaxPool2D(3, 2).forward((), (), jnp.zeros((2, 7, 7, 3)))
    assert cache.argmax.shape == (2, 3, 3, 3) and cache.argmax.dtype == jnp.int8
    assert cache.x_like.shape == (0, 7, 7, 3) and cache.x_like.size == 0


# --------------------------------------------------------------------------------------------
# Dtypes, transformations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: Conv2D(4, 3, 2, "same", dtype=jnp.float32),
        lambda: Conv2D(3, 3, groups=3),
        lambda: Conv1D(4, 3, dtype=jnp.float32),
        lambda: MaxPool2D(3, 2, "same"),
        lambda: AvgPool2D(2),
        lambda: GlobalAvgPool,
    ],
    ids=["conv", "depthwise", "conv1d", "max", "avg", "global"],
)
def test_float32_in_float32_out(make):
    layer = make()
    shape = (2, 7, 3) if "Conv1D" in layer.name else (2, 7, 6, 3)
    _, params, state = layer.init(jax.random.PRNGKey(0), shape[1:])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    out = jax.eval_shape(lambda x: layer.apply(params, state, x), x).shape
    dy = jnp.asarray(rng.standard_normal(out), jnp.float32)
    y, (dparams, dx), (ref_dparams, ref_dx) = _program(layer, state)(params, x, dy)
    assert y.dtype == dx.dtype == jnp.float32
    pairs = zip(jax.tree.leaves(dparams), jax.tree.leaves(ref_dparams), strict=True)
    for mine, ref in pairs:
        assert mine.dtype == jnp.float32 and _rel_err(mine, ref) <= 1e-5
    assert _rel_err(dx, ref_dx) <= 1e-5


def test_mixed_and_integer_inputs():
    """float64 params, float32 x: computed in float64, dx in float32; integer x: dx is None."""
    layer = Conv2D(2, 3, dtype=F64)
    _, params, _ = layer.init(jax.random.PRNGKey(0), (5, 5, 1))

    @jax.jit
    def run(x):
        y, _, cache = layer.forward(params, (), x)
        return y, layer.backward(params, cache, jnp.ones_like(y))

    x = jnp.arange(50, dtype=jnp.float32).reshape(2, 5, 5, 1)
    y, (dparams, dx) = run(x)
    assert y.dtype == dparams["w"].dtype == dparams["b"].dtype == F64 and dx.dtype == jnp.float32
    y_int, (dparams_int, dx_int) = run(x.astype(jnp.int32))
    assert dx_int is None and np.array_equal(y_int, y)
    assert np.array_equal(dparams_int["w"], dparams["w"])


@pytest.mark.parametrize(
    "layer",
    [Conv2D(3, 3, 2, "same", dtype=F64), MaxPool2D(3, 2, "same"), AvgPool2D(2)],
    ids=lambda layer: layer.name,
)
def test_caches_vmap_and_scan(layer):
    """Caches are plain arrays: forward and backward run under vmap and scan unchanged."""
    _, params, state = layer.init(jax.random.PRNGKey(0), (6, 5, 2))
    xs = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 6, 5, 2)))  # 3 batches

    def step(x):
        y, _, cache = layer.forward(params, state, x)
        return layer.backward(params, cache, y)  # dy = y: some upstream gradient

    @jax.jit
    def run(xs):
        return jax.vmap(step)(xs), lax.scan(lambda c, x: (c, step(x)), 0, xs)[1], step(xs[1])

    vmapped, scanned, one = run(xs)
    for got in (vmapped, scanned):
        pairs = zip(jax.tree.leaves(got), jax.tree.leaves(one), strict=True)
        for a, b in pairs:
            assert _rel_err(a[1], b) <= 1e-12


# --------------------------------------------------------------------------------------------
# Errors, names, init, the no-autodiff rule
# --------------------------------------------------------------------------------------------


def _conv_params(cin=3, filters=4, k=3, bias=True):
    p = {"w": jnp.zeros((k, k, cin, filters))}
    return {**p, "b": jnp.zeros((filters,))} if bias else p


BAD_CALLS = [
    # (id, layer, params, state, x, error, words the message must contain)
    ("channels", Conv2D(4, 3), _conv_params(), (), jnp.zeros((2, 5, 5, 2)), ShapeError,
     ["Conv2D(4, 3x3, valid)", "(batch, 5, 5, 3)", "(2, 5, 5, 2)", "3 input channels"]),
    ("rank", Conv2D(4, 3), _conv_params(), (), jnp.zeros((5, 5, 3)), ShapeError,
     ["Conv2D(4, 3x3, valid)", "rank 4", "(5, 5, 3)"]),
    ("kernel", Conv2D(4, 3), _conv_params(k=2), (), jnp.zeros((2, 5, 5, 3)), ParamsError,
     ["Conv2D(4, 3x3, valid)", "params['w']", "(3, 3, 3, 4)", "(2, 2, 3, 4)"]),
    ("filters", Conv2D(4, 3), _conv_params(filters=5), (), jnp.zeros((2, 5, 5, 3)), ParamsError,
     ["params['w']", "(3, 3, 3, 4)", "(3, 3, 3, 5)"]),
    ("no-b", Conv2D(4, 3), _conv_params(bias=False), (), jnp.zeros((2, 5, 5, 3)), ParamsError,
     ["Conv2D(4, 3x3, valid)", "['b', 'w']", "['w']"]),
    ("extra-b", Conv2D(4, 3, use_bias=False), _conv_params(), (), jnp.zeros((2, 5, 5, 3)),
     ParamsError, ["no bias", "['w']", "['b', 'w']"]),
    ("state", Conv2D(4, 3), _conv_params(), {"s": jnp.zeros(1)}, jnp.zeros((2, 5, 5, 3)),
     ParamsError, ["state", "pass ()"]),
    ("small", Conv2D(4, 3, dilation=2), _conv_params(), (), jnp.zeros((2, 4, 9, 3)), ShapeError,
     ["(4, 9)", "(5, 5)", "too small", "padding='same'"]),
    ("groups", Conv2D(4, 3, groups=2), _conv_params(cin=2), (), jnp.zeros((2, 5, 5, 3)),
     ShapeError, ["groups 2", "(batch, 5, 5, 4)", "(2, 5, 5, 3)"]),
    ("conv1d-rank", Conv1D(4, 3), {"w": jnp.zeros((3, 2, 4)), "b": jnp.zeros(4)}, (),
     jnp.zeros((2, 5, 5, 2)), ShapeError, ["Conv1D(4, 3, valid)", "rank 3", "(2, 5, 5, 2)"]),
    ("pool-rank", MaxPool2D(2), (), (), jnp.zeros((5, 5, 3)), ShapeError,
     ["MaxPool2D(2x2, valid)", "rank 4", "(5, 5, 3)"]),
    ("pool-params", AvgPool2D(2), {"w": jnp.zeros(1)}, (), jnp.zeros((2, 4, 4, 1)), ParamsError,
     ["AvgPool2D(2x2, valid)", "pass ()"]),
    ("pool-small", MaxPool2D(3), (), (), jnp.zeros((2, 2, 5, 1)), ShapeError,
     ["(2, 5)", "(3, 3)"]),
    ("global-rank", GlobalAvgPool, (), (), jnp.zeros((2, 3)), ShapeError,
     ["GlobalAvgPool", "rank 3", "(2, 3)"]),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_forward_calls_say_what_and_how(case):
    _, layer, params, state, x, error, words = case
    with pytest.raises(error) as info:
        layer.forward(params, state, x)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
    "layer",
    [Conv2D(4, 3, 2, "same", dtype=F64), MaxPool2D(3, 2), AvgPool2D(2), GlobalAvgPool],
    ids=lambda layer: layer.name,
)
def test_bad_dy_shape(layer):
    """Traced abstractly (jax.eval_shape): the check runs at trace time, nothing compiles."""
    _, params, state = _init_shapes(layer, (7, 7, 3))
    x = jax.ShapeDtypeStruct((2, 7, 7, 3), F64)
    y, _, cache = jax.eval_shape(lambda p, x: layer.forward(p, state, x), params, x)
    bad = jax.ShapeDtypeStruct((*y.shape[:-1], y.shape[-1] + 1), F64)
    with pytest.raises(ShapeError) as info:
        jax.eval_shape(layer.backward, params, cache, bad)
    assert layer.name in str(info.value) and "dy" in str(info.value)
    assert str(bad.shape) in str(info.value)
    assert ", ".join(map(str, y.shape[1:])) + ")" in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Conv2D(4, 3, groups=3),
        lambda: Conv2D(0, 3),
        lambda: Conv2D(4, (3, 0)),
        lambda: Conv2D(4, 3, padding="full"),
        lambda: Conv2D(4, 3, padding=((1, 2),)),
        lambda: Conv2D(4, 3, strides=True),
        lambda: MaxPool2D(2, padding=((2, 0), (0, 0))),
        lambda: Conv1D(4, 3, padding=(-1, 0)),
    ],
)
def test_bad_constructor_arguments(make):
    with pytest.raises(ValueError, match=r"Conv[12]D|MaxPool2D"):
        make()


def test_init_rejects_bad_input_shapes():
    with pytest.raises(ShapeError, match="divisible by groups=2"):
        Conv2D(4, 3, groups=2).init(jax.random.PRNGKey(0), (5, 5, 3))
    with pytest.raises(ShapeError, match="too small"):
        Conv2D(4, 5).init(jax.random.PRNGKey(0), (4, 9, 3))
    with pytest.raises(ShapeError, match="MaxPool2D"):
        MaxPool2D(2).init(jax.random.PRNGKey(0), (5, 3))


def test_names():
    assert Conv2D(8, 3, 2, "same").name == "Conv2D(8, 3x3, stride 2, same)"
    assert Conv2D(8, (2, 3), (1, 2), E, 2, 2, False).name == (
        "Conv2D(8, 2x3, stride 1x2, dilation 2, groups 2, pad ((1, 2), (0, 1)), no bias)"
    )
    assert Conv1D(4, 5, padding=(1, 2)).name == "Conv1D(4, 5, pad (1, 2))"
    assert MaxPool2D().name == "MaxPool2D(2x2, valid)"
    assert MaxPool2D(3, 2, "same").name == "MaxPool2D(3x3, stride 2, same)"
    assert AvgPool2D((2, 3), padding="same").name == "AvgPool2D(2x3, same)"
    assert GlobalAvgPool.name == "GlobalAvgPool"


def test_init_shapes_and_glorot_fans():
    out, params, state = Conv2D(6, (3, 5), 2, "same", groups=2).init(
        jax.random.PRNGKey(0), (9, 8, 4)
    )
    assert out == (5, 4, 6) and state == ()
    assert params["w"].shape == (3, 5, 2, 6) and params["w"].dtype == jnp.float32
    limit = math.sqrt(6 / (15 * 2 + 15 * 6))  # Keras fans: receptive field x in / out
    assert float(jnp.max(jnp.abs(params["w"]))) <= limit
    assert float(jnp.max(jnp.abs(params["w"]))) > 0.8 * limit
    assert np.array_equal(params["b"], np.zeros(6))
    assert MaxPool2D(3, 2, "same").init(None, (7, 6, 3))[0] == (4, 3, 3)
    assert GlobalAvgPool.init(None, (7, 6, 3))[0] == (3,)

"""Every layer's hand-written backward against jax.vjp (kinks included) and finite differences
(one table), forward values against independent references, and the layer contract."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import nn
from fbp.core import Layer, LayerError, ParamsError, ShapeError

KEY = jax.random.key(42)  # the layer key: Dropout's mask, fixed across every comparison

# (id, layer, per-example input shapes, train): odd widths, width 1, 3-D and image inputs.
LAYERS = [
    ("Dense", nn.Dense(3), [(1,), (7,), (2, 5)], True),
    ("Dense1", nn.Dense(1), [(4,)], True),
    ("Relu", nn.Relu, [(7,), (2, 3, 5)], True),
    ("LeakyRelu", nn.LeakyRelu(0.2), [(7,)], True),
    ("LeakyRelu0", nn.LeakyRelu(0.0), [(7,)], True),
    ("Elu", nn.Elu(1.5), [(7,)], True),
    ("Gelu", nn.Gelu, [(7,)], True),
    ("Sigmoid", nn.Sigmoid, [(7,)], True),
    ("Tanh", nn.Tanh, [(7,), (1,)], True),
    ("Softplus", nn.Softplus, [(7,)], True),
    ("Silu", nn.Silu, [(7,)], True),
    ("Softmax", nn.Softmax, [(7,), (1,), (2, 5)], True),
    ("LogSoftmax", nn.LogSoftmax, [(7,), (2, 5)], True),
    ("Identity", nn.Identity, [(7,)], True),
    ("Flatten", nn.Flatten, [(2, 3, 5), (7,), (1, 1)], True),
    ("Reshape", nn.Reshape((5, -1)), [(2, 3, 5), (15,)], True),
    ("LayerNorm", nn.LayerNorm(), [(7,), (2, 5)], True),
    ("BatchNorm-train", nn.BatchNorm(), [(7,), (3, 3, 2)], True),
    ("BatchNorm-eval", nn.BatchNorm(), [(7,), (3, 3, 2)], False),
    ("BatchNorm-axis1", nn.BatchNorm(momentum=0.9, axis=1), [(2, 3, 4)], True),
    ("Dropout-train", nn.Dropout(0.4), [(7,)], True),
    ("Dropout-eval", nn.Dropout(0.4), [(7,)], False),
    ("serial", nn.serial(nn.Dense(5), nn.Tanh, nn.LayerNorm(), nn.Dense(2)), [(3,)], True),
    (
        "serial-nested",
        nn.serial(nn.Flatten, nn.serial(nn.Dense(4), nn.Elu()), nn.Dense(3)),
        [(2, 3)],
        True,
    ),
    ("residual", nn.residual(nn.serial(nn.Dense(4), nn.BatchNorm(), nn.Tanh)), [(4,)], True),
    (
        "fanout-parallel-sum",
        nn.serial(nn.FanOut(3), nn.parallel(nn.Dense(4), nn.Identity, nn.Sigmoid), nn.FanInSum),
        [(4,)],
        True,
    ),
    (
        "fanout-concat",
        nn.serial(nn.FanOut(2), nn.parallel(nn.Dense(2), nn.Dense(3)), nn.FanInConcat()),
        [(4,), (2, 4)],
        True,
    ),
    (
        "residual-mlp-bn-dropout",
        nn.serial(
            nn.Dense(6),
            nn.BatchNorm(),
            nn.Relu,
            nn.residual(nn.serial(nn.Dense(6), nn.BatchNorm(), nn.Relu)),
            nn.Dropout(0.2),
            nn.Dense(3),
        ),
        [(5,)],
        True,
    ),
]
CASES = [
    pytest.param(layer, shape, batch, train, id=f"{name}-{shape}-b{batch}")
    for name, layer, shapes, train in LAYERS
    for shape in shapes
    for batch in (1, 3)
    if not (batch == 1 and name.startswith("BatchNorm-train"))  # a batch of one has var 0
]
SHAPE_CASES = [
    pytest.param(layer, shape, train, id=f"{name}-{shape}")
    for name, layer, shapes, train in LAYERS
    for shape in shapes
]
ONE_CASE_PER_LAYER = [
    pytest.param(layer, shapes[0], train, id=name) for name, layer, shapes, train in LAYERS
]


def with_kinks(x):
    """Put exact kinks into ``x``: zeros, negative zeros and ties (repeated values)."""
    flat = np.array(x, np.float64).reshape(-1)
    flat[0::4] = 0.0
    flat[1::7] = -0.0
    if flat.size > 3:
        flat[2::9] = flat[3]  # ties with another entry
    return jnp.asarray(flat.reshape(np.shape(x)))


def setup(layer, shape, batch, dtype=jnp.float64, seed=0, kinks=True):
    """float64 draws cast to ``dtype``: params, state, input and a cotangent for the output.
    ``kinks=True`` plants exact zeros, -0.0 and ties in the input; ``False`` keeps every entry
    at least 0.1 away from 0, where finite differences are valid for the ReLU family."""
    k_init, k_x, k_dy = jax.random.split(jax.random.key(seed), 3)
    out_shape, params, state = layer.init(k_init, shape)
    x = jax.random.normal(k_x, (batch, *shape), jnp.float64)
    x = with_kinks(x) if kinks else x + jnp.where(x >= 0, 0.1, -0.1)
    dy = jax.random.normal(k_dy, (batch, *out_shape), jnp.float64)
    cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)  # noqa: E731
    return out_shape, cast(params), cast(state), cast(x), cast(dy)


def tree_rel_err(got, want, floor=1e-3):
    """max over leaves of max|g - w| / max(max|w|, floor * the largest |w| of the tree): the
    rule of fbp.check, so that an exactly-zero gradient (a bias before BatchNorm) compares
    against the scale of the others."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    top = max([float(np.max(np.abs(w), initial=0.0)) for w in want] + [1e-300])
    errs = []
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape
        scale = max(float(np.max(np.abs(w), initial=0.0)), floor * top, 1e-300)
        errs.append(float(np.max(np.abs(g - w), initial=0.0)) / scale)
    return max(errs, default=0.0)


def run(layer, params, state, x, dy, train):
    y, new_state, cache = layer.forward(params, state, x, key=KEY, train=train)
    return y, new_state, layer.backward(params, cache, dy)


@pytest.mark.parametrize("layer,shape,batch,train", CASES)
def test_backward_matches_vjp_float64_at_kinks(layer: Layer, shape, batch, train):
    """Exact zeros, -0.0 and ties in the input: the hand-written derivative at each kink is the
    one autodiff takes of the layer's forward (which the kink tests below pin to JAX's)."""
    _, params, state, x, dy = setup(layer, shape, batch)
    y, _, (dparams, dx) = run(layer, params, state, x, dy, train)
    apply = lambda p, x: layer.apply(p, state, x, key=KEY, train=train)  # noqa: E731
    y_ref, vjp = jax.vjp(apply, params, x)
    dparams_ref, dx_ref = vjp(dy)
    assert tree_rel_err(y, y_ref) <= 1e-13  # one forward computation (up to rounding)
    assert tree_rel_err((dparams, dx), (dparams_ref, dx_ref)) <= 1e-10


@pytest.mark.parametrize("layer,shape,train", SHAPE_CASES)
def test_backward_matches_central_differences(layer: Layer, shape, train):
    """<dy, J v> by central differences of apply, against <backward(dy), v>, for params and x
    together, at a point away from kinks."""
    _, params, state, x, dy = setup(layer, shape, 3, seed=1, kinks=False)
    _, _, (dparams, dx) = run(layer, params, state, x, dy, train)
    vp = jax.tree.map(lambda p: jax.random.normal(jax.random.key(7), p.shape, p.dtype), params)
    vx = jax.random.normal(jax.random.key(8), x.shape, x.dtype)
    h = 1e-6

    def projected(t):
        p = jax.tree.map(lambda a, v: a + t * v, params, vp)
        return float(jnp.sum(dy * layer.apply(p, state, x + t * vx, key=KEY, train=train)))

    fd = (projected(h) - projected(-h)) / (2 * h)
    hand = float(
        sum(
            jnp.sum(g * v)
            for g, v in zip(jax.tree.leaves(dparams), jax.tree.leaves(vp), strict=True)
        )
    )
    hand += float(jnp.sum(dx * vx))
    scale = np.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves((dparams, dx))))
    assert abs(fd - hand) <= 1e-6 * max(scale, 1.0)


@pytest.mark.parametrize("layer,shape,batch,train", CASES)
def test_declared_output_shape_is_the_real_one(layer: Layer, shape, batch, train):
    out_shape, params, state, x, _ = setup(layer, shape, batch)
    assert layer.apply(params, state, x, key=KEY, train=train).shape == (batch, *out_shape)
    assert nn.output_shape(layer, shape) == out_shape


@pytest.mark.parametrize("layer,shape,train", ONE_CASE_PER_LAYER)
def test_float32_in_gives_float32_out_and_agrees_with_float64(layer: Layer, shape, train):
    _, p32, s32, x32, dy32 = setup(layer, shape, 3, jnp.float32, kinks=False)
    _, p64, s64, x64, dy64 = setup(layer, shape, 3, jnp.float64, kinks=False)
    y32, ns32, (dp32, dx32) = run(layer, p32, s32, x32, dy32, train)
    for leaf in jax.tree.leaves((y32, ns32, dp32, dx32)):
        assert leaf.dtype == jnp.float32
    y64, _, (dp64, dx64) = run(layer, p64, s64, x64, dy64, train)
    # Same draws in both precisions up to float32 rounding (BatchNorm amplifies it a little).
    assert tree_rel_err((y32, dp32, dx32), (y64, dp64, dx64)) <= 5e-4


@pytest.mark.parametrize("layer,shape,train", ONE_CASE_PER_LAYER)
def test_layers_run_under_jit_vmap_and_scan(layer: Layer, shape, train):
    """Caches and states are plain arrays: forward and backward run compiled, inside vmap and
    inside lax.scan, and give the eager results."""
    _, params, state, x, dy = setup(layer, shape, 3)

    def step(x, dy):
        return run(layer, params, state, x, dy, train)

    eager = step(x, dy)
    assert tree_rel_err(jax.jit(step)(x, dy), eager) <= 1e-12
    _, scanned = jax.lax.scan(lambda c, xs: (c, step(*xs)), 0, (x[None], dy[None]))
    assert tree_rel_err(jax.tree.map(lambda a: a[0], scanned), eager) <= 1e-12
    mapped = jax.vmap(step)(x[None], dy[None])
    assert tree_rel_err(jax.tree.map(lambda a: a[0], mapped), eager) <= 1e-12


@pytest.mark.parametrize("layer,shape,train", ONE_CASE_PER_LAYER)
def test_init_under_jit_and_vmap_gives_the_eager_params(layer: Layer, shape, train):
    """Eagerly, init's key splits and draws are programs of their own, compiled with quicker XLA
    options (fbp.initializers); traced, as a jitted init or an ensemble's vmap over keys, they
    are inlined. Both give the same params and state, bit for bit."""
    keys = jax.random.split(jax.random.key(3), 2)
    eager = [layer.init(k, shape)[1:] for k in keys]
    jitted = jax.jit(lambda k: layer.init(k, shape)[1:])(keys[0])
    closed = jax.jit(lambda: layer.init(keys[0], shape)[1:])()  # a concrete key, traced
    mapped = jax.vmap(lambda k: layer.init(k, shape)[1:])(keys)
    for traced in (jitted, closed):
        assert jax.tree.structure(traced) == jax.tree.structure(eager[0])
        for got, want in zip(jax.tree.leaves(traced), jax.tree.leaves(eager[0]), strict=True):
            np.testing.assert_array_equal(got, want)
    for i in range(2):
        got = jax.tree.map(lambda a, i=i: a[i], mapped)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(eager[i]), strict=True):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("layer,shape,train", ONE_CASE_PER_LAYER)
def test_evaluation_mode_returns_the_state_itself(layer: Layer, shape, train):
    _, params, state, x, _ = setup(layer, shape, 3)
    _, new_state, _ = layer.forward(params, state, x, key=KEY, train=False)
    assert new_state is state


# ---------------------------------------------------------------- kinks: the conventions


@pytest.mark.parametrize(
    "layer, expected",
    [
        (nn.Relu, float(jax.grad(jax.nn.relu)(0.0))),  # JAX's convention: 0
        (nn.Elu(1.5), float(jax.grad(lambda x: jax.nn.elu(x, 1.5))(0.0))),  # JAX's: alpha
        (nn.LeakyRelu(0.2), 0.2),  # PyTorch's leaky_relu_backward: x > 0 ? dy : slope * dy
        (nn.LeakyRelu(0.0), 0.0),
    ],
    ids=["Relu", "Elu", "LeakyRelu", "LeakyRelu0"],
)
def test_derivative_at_zero_and_minus_zero_is_the_documented_one(layer, expected):
    x = jnp.array([[0.0, -0.0]])
    y, _, cache = layer.forward((), (), x)
    _, dx = layer.backward((), cache, jnp.ones_like(y))
    np.testing.assert_array_equal(dx, [[expected, expected]])
    auto = jax.grad(lambda x: jnp.sum(layer.apply((), (), x)))(x)
    np.testing.assert_array_equal(auto, [[expected, expected]])
    assert expected == (1.5 if layer.name == "Elu(1.5)" else expected)


def test_softmax_with_tied_logits_splits_evenly_and_matches_vjp():
    x = jnp.array([[1.0, 1.0, 1.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    for layer in (nn.Softmax, nn.LogSoftmax):
        _, _, cache = layer.forward((), (), x)
        dy = jnp.arange(8.0).reshape(2, 4)
        _, dx = layer.backward((), cache, dy)
        _, vjp = jax.vjp(lambda x, layer=layer: layer.apply((), (), x), x)
        np.testing.assert_allclose(dx, vjp(dy)[0], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(nn.Softmax.apply((), (), x)[1], np.full(4, 0.25), rtol=1e-15)


# ---------------------------------------------------------------- forward values


def test_activation_values_against_jax_nn():
    x = jnp.linspace(-30.0, 30.0, 121).reshape(11, 11)
    table = [
        (nn.Relu, jax.nn.relu(x)),
        (nn.LeakyRelu(0.01), jax.nn.leaky_relu(x, 0.01)),
        (nn.Elu(), jax.nn.elu(x)),
        (nn.Gelu, jax.nn.gelu(x, approximate=False)),
        (nn.Sigmoid, jax.nn.sigmoid(x)),
        (nn.Tanh, jnp.tanh(x)),
        (nn.Softplus, jax.nn.softplus(x)),
        (nn.Silu, jax.nn.silu(x)),
        (nn.Softmax, jax.nn.softmax(x)),
        (nn.LogSoftmax, jax.nn.log_softmax(x)),
    ]
    for layer, want in table:
        np.testing.assert_allclose(layer.apply((), (), x), want, rtol=1e-12, atol=1e-300)


def test_dense_and_layernorm_values_against_numpy():
    x = np.random.default_rng(0).normal(size=(4, 6)) * 3 + 2
    _, p, s = nn.Dense(3, dtype=jnp.float64).init(jax.random.key(0), (6,))
    want = x @ np.asarray(p["w"]) + np.asarray(p["b"])
    np.testing.assert_allclose(nn.Dense(3).apply(p, s, jnp.asarray(x)), want, rtol=1e-13)
    layer = nn.LayerNorm(dtype=jnp.float64)
    _, p, s = layer.init(jax.random.key(0), (6,))
    p = {"scale": jnp.arange(1.0, 7.0), "bias": -jnp.arange(6.0)}
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    want = xhat * np.arange(1.0, 7.0) - np.arange(6.0)
    np.testing.assert_allclose(layer.apply(p, s, jnp.asarray(x)), want, rtol=1e-12)


def test_caches_hold_outputs_where_the_derivative_allows():
    x = jnp.linspace(-2.0, 2.0, 8).reshape(2, 4)
    for layer, f in [
        (nn.Sigmoid, jax.nn.sigmoid),
        (nn.Tanh, jnp.tanh),
        (nn.Relu, jax.nn.relu),
        (nn.Softmax, jax.nn.softmax),
    ]:
        _, _, cache = layer.forward((), (), x)
        np.testing.assert_allclose(cache, f(x), rtol=1e-14)
    _, _, cache = nn.Flatten.forward((), (), jnp.ones((2, 3, 5)))
    assert cache.size == 0  # only the shape travels


def test_extreme_inputs_give_finite_gradients():
    x = jnp.array([[-1e4, -50.0, 0.0, 50.0, 1e4]])
    for layer in [nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Silu, nn.Gelu, nn.Elu(), nn.Softmax,
                  nn.LogSoftmax]:  # fmt: skip
        y, _, cache = layer.forward((), (), x)
        _, dx = layer.backward((), cache, jnp.ones_like(y))
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)), layer.name


def test_reshape_and_flatten_shapes():
    assert nn.Flatten.init(None, (2, 3, 5))[0] == (30,)
    x = jnp.arange(60.0).reshape(2, 2, 3, 5)
    np.testing.assert_array_equal(nn.Flatten.apply((), (), x), np.arange(60.0).reshape(2, 30))
    assert nn.Reshape((5, -1)).init(None, (2, 3, 5))[0] == (5, 6)
    np.testing.assert_array_equal(
        nn.Reshape((5, -1)).apply((), (), x), np.arange(60.0).reshape(2, 5, 6)
    )
    with pytest.raises(ShapeError, match=r"Reshape\(\(4, -1\)\).*30 values"):
        nn.Reshape((4, -1)).apply((), (), x)
    for bad in [(2, -1, -1), (0, 3), (-2,)]:
        with pytest.raises(ValueError):
            nn.Reshape(bad)


def test_combinator_values_against_numpy():
    k = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (3, 4), jnp.float64)
    inner = nn.Dense(4, dtype=jnp.float64)
    _, p, s = inner.init(k, (4,))
    fx = np.asarray(x) @ np.asarray(p["w"]) + np.asarray(p["b"])
    np.testing.assert_allclose(nn.residual(inner).apply(p, s, x), np.asarray(x) + fx, rtol=1e-14)
    cat = nn.serial(nn.FanOut(2), nn.parallel(inner, nn.Identity), nn.FanInConcat())
    want = np.concatenate([fx, np.asarray(x)], axis=-1)
    np.testing.assert_allclose(cat.apply(((), (p, ()), ()), ((), (s, ()), ()), x), want, rtol=1e-14)
    add = nn.serial(nn.FanOut(3), nn.parallel(inner, nn.Identity, nn.Tanh), nn.FanInSum)
    want = fx + np.asarray(x) + np.tanh(np.asarray(x))
    params = ((), (p, (), ()), ())
    np.testing.assert_allclose(add.apply(params, ((), (s, (), ()), ()), x), want, rtol=1e-14)


def test_fanout_backward_is_the_sum_of_the_branch_gradients():
    """The multivariate chain rule at a fork, with hand-picked numbers."""
    _, _, cache = nn.FanOut(3).forward((), (), jnp.zeros((1, 2)))
    dys = (jnp.array([[1.0, 2.0]]), jnp.array([[10.0, 20.0]]), jnp.array([[100.0, 200.0]]))
    _, dx = nn.FanOut(3).backward((), cache, dys)
    np.testing.assert_array_equal(dx, [[111.0, 222.0]])


# ---------------------------------------------------------------- BatchNorm


def np_batchnorm_train(x, scale, bias, axis, eps, mask=None):
    """NumPy reference: statistics over every axis but ``axis``, over real entries only."""
    axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    if mask is not None:
        x_real = x[mask]  # the real rows (mask over the batch axis)
        mean, var = x_real.mean(axes, keepdims=True), x_real.var(axes, keepdims=True)
    else:
        mean, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    y = (x - mean) / np.sqrt(var + eps) * scale.reshape(shape) + bias.reshape(shape)
    return y, mean.reshape(-1), var.reshape(-1)


@pytest.mark.parametrize("shape, axis", [((8, 5), -1), ((4, 3, 3, 2), -1), ((4, 2, 3, 3), 1)])
def test_batchnorm_train_values_and_running_statistics_against_numpy(shape, axis):
    layer = nn.BatchNorm(momentum=0.9, epsilon=1e-3, axis=axis, dtype=jnp.float64)
    x = np.random.default_rng(0).normal(size=shape) * 2 + 1
    _, params, state = layer.init(jax.random.key(0), shape[1:])
    d = shape[axis]
    params = {"scale": jnp.linspace(0.5, 2.0, d), "bias": jnp.linspace(-1.0, 1.0, d)}
    state = {"mean": jnp.linspace(-0.1, 0.1, d), "var": jnp.linspace(0.5, 1.5, d)}
    y, new_state, _ = layer.forward(params, state, jnp.asarray(x), train=True)
    want, mean, var = np_batchnorm_train(
        x, np.asarray(params["scale"]), np.asarray(params["bias"]), axis, 1e-3
    )
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new_state["mean"], 0.9 * np.asarray(state["mean"]) + 0.1 * mean,
                               rtol=1e-13)  # fmt: skip
    np.testing.assert_allclose(new_state["var"], 0.9 * np.asarray(state["var"]) + 0.1 * var,
                               rtol=1e-13)  # fmt: skip


def test_batchnorm_eval_uses_the_running_statistics():
    layer = nn.BatchNorm(epsilon=1e-3, dtype=jnp.float64)
    x = np.random.default_rng(1).normal(size=(5, 3))
    params = {"scale": jnp.array([1.0, 2.0, 3.0]), "bias": jnp.array([0.0, -1.0, 1.0])}
    state = {"mean": jnp.array([0.5, -0.5, 0.0]), "var": jnp.array([1.0, 4.0, 0.25])}
    y = layer.apply(params, state, jnp.asarray(x), train=False)
    want = (x - [0.5, -0.5, 0.0]) / np.sqrt(np.array([1.0, 4.0, 0.25]) + 1e-3) * [1, 2, 3]
    np.testing.assert_allclose(y, want + np.array([0.0, -1.0, 1.0]), rtol=1e-13)


def test_batchnorm_with_a_mask_sees_only_the_real_rows():
    """A padded batch (mask False on the padding) gives the statistics, output rows and
    gradients of the unpadded batch; the padding gets no gradient from a zero dy."""
    layer = nn.BatchNorm(momentum=0.8, dtype=jnp.float64)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(7, 4)))
    mask = jnp.array([True] * 5 + [False] * 2)
    _, params, state = layer.init(jax.random.key(0), (4,))
    y, st, cache = layer.forward(params, state, x, train=True, mask=mask)
    y5, st5, cache5 = layer.forward(params, state, x[:5], train=True)
    np.testing.assert_allclose(y[:5], y5, rtol=1e-13)
    assert tree_rel_err(st, st5) <= 1e-12
    dy = jnp.asarray(rng.normal(size=(7, 4))).at[5:].set(0.0)
    (dp, dx), (dp5, dx5) = layer.backward(params, cache, dy), layer.backward(params, cache5, dy[:5])
    assert tree_rel_err((dp, dx[:5]), (dp5, dx5)) <= 1e-12
    np.testing.assert_array_equal(dx[5:], 0.0)
    # And with a non-zero dy on the padding, the masked forward's exact gradient:
    dy = jnp.asarray(rng.normal(size=(7, 4)))
    _, vjp = jax.vjp(lambda p, x: layer.apply(p, state, x, train=True, mask=mask), params, x)
    assert tree_rel_err(layer.backward(params, cache, dy), vjp(dy)) <= 1e-10


def test_batchnorm_rejects_a_mask_that_does_not_fit():
    layer = nn.BatchNorm()
    _, params, state = layer.init(jax.random.key(0), (4,))
    with pytest.raises(ShapeError, match="mask"):
        layer.forward(params, state, jnp.ones((3, 4)), train=True, mask=jnp.ones(2, bool))


# ---------------------------------------------------------------- Dropout


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_rate_is_the_drop_probability(rate):
    n = 200_000
    x = jnp.ones((1, n))
    y, _, mask = nn.Dropout(rate).forward((), (), x, key=jax.random.key(3), train=True)
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    # Survivors are scaled by 1 / (1 - rate): the expectation is preserved.
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / (1 - rate)], rtol=1e-12)
    _, dx = nn.Dropout(rate).backward((), mask, jnp.ones_like(y))
    np.testing.assert_array_equal(dx, y)  # same mask, same scale


def test_dropout_mode_is_train_not_the_key():
    layer = nn.Dropout(0.5)
    x = jax.random.normal(jax.random.key(0), (4, 9))
    np.testing.assert_array_equal(layer.apply((), (), x, key=jax.random.key(1)), x)  # eval
    with pytest.raises(LayerError, match=r"Dropout\(0.5\): train=True needs a PRNG key"):
        layer.apply((), (), x, train=True)
    net = nn.serial(nn.Dense(3, dtype=jnp.float64), nn.Dropout(0.5))
    _, p, s = net.init(jax.random.key(0), (9,))
    with pytest.raises(LayerError, match=r"layer 1 \(Dropout\(0.5\)\): train=True needs"):
        net.apply(p, s, x, train=True)


def test_serial_splits_keys_so_dropout_layers_draw_different_masks():
    net = nn.serial(nn.Dropout(0.5), nn.Identity, nn.Dropout(0.5))
    x = jnp.ones((1, 1000))
    _, p, s = net.init(jax.random.key(0), (1000,))
    _, _, (m1, _, m2) = net.forward(p, s, x, key=jax.random.key(1), train=True)
    assert not np.array_equal(m1, m2)


# ---------------------------------------------------------------- params that do not fit


def test_params_of_another_network_are_refused_naming_layer_and_leaf():
    x = jnp.zeros((2, 64), jnp.float32)
    _, p_small, s_small = nn.mlp([16, 5]).init(jax.random.key(0), (64,))
    with pytest.raises(
        ParamsError, match=r"layer 0 \(Dense\(32\)\): params\[0\]\['w'\] should have shape "
        r"\(64, 32\), got shape \(64, 16\)"
    ):  # fmt: skip
        nn.mlp([32, 10]).apply(p_small, s_small, x)
    _, p, s = nn.mlp([16, 10]).init(jax.random.key(0), (64,))
    wrong_out = (p[0], p[1], {"w": p[2]["w"][:, :5], "b": p[2]["b"][:5]})
    with pytest.raises(ParamsError, match=r"layer 2 \(Dense\(10\)\): params\[2\]\['w'\]"):
        nn.mlp([16, 10]).apply(wrong_out, s, x)
    with pytest.raises(ParamsError, match=r"params\[0\] should be a dict with keys \['b', 'w'\]"):
        nn.mlp([16, 10]).apply(({"W": p[0]["w"], "b": p[0]["b"]}, p[1], p[2]), s, x)
    with pytest.raises(ParamsError, match="tuple of 3 entries"):
        nn.mlp([16, 10]).apply(p[:2], s, x)


def test_state_that_does_not_fit_is_refused_inside_nested_combinators():
    net = nn.serial(nn.Dense(4), nn.residual(nn.serial(nn.Dense(4), nn.BatchNorm())))
    _, p, s = net.init(jax.random.key(0), (3,))
    bad = (s[0], ((), {"mean": jnp.zeros(3), "var": jnp.ones(4)}))
    with pytest.raises(ParamsError, match=r"layer 1\.1 \(BatchNorm\): state\[1\]\[1\]\['mean'\]"):
        net.apply(p, bad, jnp.zeros((2, 3), jnp.float32), train=True)


def test_dense_wrong_width_fails_at_trace_time_naming_layer_and_shapes():
    net = nn.serial(nn.Dense(8), nn.Relu, nn.Dense(3))
    _, params, state = net.init(jax.random.key(0), (64,))
    with pytest.raises(ShapeError, match=r"layer 0 \(Dense\(8\)\).*\(batch, 64\).*\(5, 60\)"):
        jax.jit(lambda p, x: net.apply(p, state, x)).lower(params, jnp.zeros((5, 60)))
    with pytest.raises(ShapeError, match=r"\(batch, 64\).*got \(60,\)"):
        net.apply(params, state, jnp.zeros(60))  # a forgotten batch axis is not broadcast


def test_non_layers_and_bad_options_are_refused():
    with pytest.raises(TypeError, match=r"forget to call a constructor"):
        nn.serial(nn.Dense, nn.Relu)
    for make in [
        lambda: nn.Dense(0),
        lambda: nn.Dense(2.5),
        lambda: nn.Dropout(1.0),
        lambda: nn.Dropout(-0.1),
        lambda: nn.LeakyRelu(-1.0),
        lambda: nn.Elu(0.0),
        lambda: nn.LayerNorm(0.0),
        lambda: nn.BatchNorm(momentum=1.0),
        lambda: nn.BatchNorm(axis=0),
        lambda: nn.FanOut(0),
        lambda: nn.mlp([]),
        lambda: nn.mlp([4], norm="group"),
    ]:
        with pytest.raises(ValueError):
            make()
    with pytest.raises(ShapeError, match="keep the input's shape"):
        nn.residual(nn.Dense(3)).init(jax.random.key(0), (4,))
    with pytest.raises(ShapeError, match="one shape to be added"):
        nn.serial(nn.FanOut(2), nn.parallel(nn.Dense(2), nn.Dense(3)), nn.FanInSum).init(
            jax.random.key(0), (4,)
        )


def test_backward_rejects_a_dy_of_the_wrong_shape():
    for layer, shape, cut in [
        (nn.Dense(3), (4,), lambda dy: dy[:1]),  # batch 1 against a batch-2 forward
        (nn.LayerNorm(), (4,), lambda dy: dy[:1]),
        (nn.BatchNorm(), (4,), lambda dy: dy[:1]),
        (nn.Relu, (4,), lambda dy: dy[:1]),
        (nn.Flatten, (2, 3), lambda dy: dy[:, :5]),  # 5 features where the output had 6
    ]:
        _, params, state, x, dy = setup(layer, shape, 2)
        _, _, cache = layer.forward(params, state, x, train=True)
        with pytest.raises(ShapeError, match=r"dy .*should have shape"):
            layer.backward(params, cache, cut(dy))


def test_shape_errors_for_flatten_and_layernorm_inputs():
    with pytest.raises(ShapeError, match=r"Flatten.*batch axis"):
        nn.Flatten.apply((), (), jnp.zeros(4))
    with pytest.raises(ShapeError, match=r"LayerNorm.*feature axis"):
        nn.LayerNorm().init(jax.random.key(0), ())
    _, params, state = nn.Dense(2).init(jax.random.key(0), (3, 4))
    with pytest.raises(ShapeError, match=r"\(batch, 3, 4\).*got \(2, 3, 5\)"):
        nn.Dense(2).apply(params, state, jnp.zeros((2, 3, 5)))


def test_float64_input_does_not_widen_float32_param_gradients():
    layer = nn.serial(nn.Dense(3), nn.LayerNorm(), nn.BatchNorm())
    _, params, state = layer.init(jax.random.key(0), (4,))  # float32
    x = jax.random.normal(jax.random.key(1), (2, 4), jnp.float64)
    with jax.numpy_dtype_promotion("standard"):  # a user's default promotion rules
        y, _, cache = layer.forward(params, state, x, train=True)
        dparams, _ = layer.backward(params, cache, jnp.ones_like(y))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(dparams))


# ---------------------------------------------------------------- mlp and summary


def test_mlp_builds_the_layers_it_says():
    net = nn.mlp([8, 4, 3], "tanh", norm="batch", dropout=0.1)
    assert net.name == (
        "serial(Dense(8), BatchNorm, Tanh, Dropout(0.1), Dense(4), BatchNorm, Tanh, Dropout(0.1), "
        "Dense(3))"
    )
    assert nn.mlp([10]).name == "serial(Dense(10))"
    assert nn.mlp([5, 2], nn.Gelu).name == "serial(Dense(5), Gelu, Dense(2))"


def test_summary_counts_every_param_and_state_value_and_nests_combinators():
    net = nn.serial(
        nn.Dense(16), nn.BatchNorm(), nn.Relu,
        nn.residual(nn.serial(nn.Dense(16), nn.BatchNorm(), nn.Relu)),
        nn.Dropout(0.2), nn.Dense(10),
    )  # fmt: skip
    s = nn.summary(net, (8,))
    _, params, state = net.init(jax.random.key(0), (8,))
    assert (
        s.total_params
        == sum(a.size for a in jax.tree.leaves(params))
        == 8 * 16 + 16 + 32 + (16 * 16 + 16 + 32) + 16 * 10 + 10
    )
    assert s.total_state == sum(a.size for a in jax.tree.leaves(state)) == 64
    rows = {r.index: r for r in s.rows}
    assert rows["0"].name == "Dense(16)" and rows["0"].params == 144
    assert rows["1"].state == 32 and rows["3"].name == "residual"
    assert rows["3.0.0"].name == "Dense(16)" and rows["3.0.0"].depth == 2
    assert rows["5"].output_shape == (10,)
    text = str(s)
    assert "total params: 650" in text and "3.0.1" in text and "BatchNorm" in text
    assert math.prod(rows["5"].output_shape) == 10

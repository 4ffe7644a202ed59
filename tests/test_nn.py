"""Every layer's hand-written backward against jax.vjp and finite differences (one table)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import nn
from fbp.core import Layer, ShapeError

# (id, layer, per-example input shapes): odd widths, width 1, and 3-D inputs where it matters.
LAYERS = [
    ("Dense", nn.Dense(3), [(1,), (7,), (2, 5)]),
    ("Dense1", nn.Dense(1), [(4,)]),
    ("Relu", nn.Relu, [(7,), (2, 3, 5)]),
    ("LeakyRelu", nn.LeakyRelu(0.2), [(7,)]),
    ("Elu", nn.Elu(1.5), [(7,)]),
    ("Gelu", nn.Gelu, [(7,)]),
    ("Sigmoid", nn.Sigmoid, [(7,)]),
    ("Tanh", nn.Tanh, [(7,), (1,)]),
    ("Softplus", nn.Softplus, [(7,)]),
    ("Silu", nn.Silu, [(7,)]),
    ("Softmax", nn.Softmax, [(7,), (1,), (2, 5)]),
    ("LogSoftmax", nn.LogSoftmax, [(7,), (2, 5)]),
    ("Identity", nn.Identity, [(7,)]),
    ("Flatten", nn.Flatten, [(2, 3, 5), (7,), (1, 1)]),
    ("LayerNorm", nn.LayerNorm(), [(7,), (2, 5)]),
    ("Dropout-eval", nn.Dropout(0.4), [(7,)]),
    ("serial", nn.serial(nn.Dense(5), nn.Tanh, nn.LayerNorm(), nn.Dense(2)), [(3,)]),
    (
        "serial-nested",
        nn.serial(nn.Flatten, nn.serial(nn.Dense(4), nn.Elu()), nn.Dense(3)),
        [(2, 3)],
    ),
]
CASES = [
    pytest.param(layer, shape, batch, id=f"{name}-{shape}-b{batch}")
    for name, layer, shapes in LAYERS
    for shape in shapes
    for batch in (1, 3)
]
SHAPE_CASES = [
    pytest.param(layer, shape, 2, id=f"{name}-{shape}")
    for name, layer, shapes in LAYERS
    for shape in shapes
]
ONE_CASE_PER_LAYER = [pytest.param(layer, shapes[0], id=name) for name, layer, shapes in LAYERS]


def setup(layer, shape, batch, dtype=jnp.float64, seed=0):
    k_init, k_x, k_dy = jax.random.split(jax.random.key(seed), 3)
    out_shape, params = layer.init(k_init, shape)
    # Draw in float64, then cast: both precisions see the same numbers up to rounding.
    x = jax.random.normal(k_x, (batch, *shape), jnp.float64)
    x = x + jnp.where(x >= 0, 0.1, -0.1)  # away from ReLU-type kinks, for finite differences
    dy = jax.random.normal(k_dy, (batch, *out_shape), jnp.float64)
    return (out_shape, *jax.tree.map(lambda a: a.astype(dtype), (params, x, dy)))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-300)


def assert_trees_close(got, want, rtol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(g, w) <= rtol, (rel_err(g, w), g, w)


@pytest.mark.parametrize("layer,shape,batch", CASES)
def test_backward_matches_vjp_float64(layer: Layer, shape, batch):
    _, params, x, dy = setup(layer, shape, batch)
    y, cache = layer.forward(params, x)
    dparams, dx = layer.backward(params, cache, dy)
    y_ref, vjp = jax.vjp(layer.apply, params, x)
    dparams_ref, dx_ref = vjp(dy)
    assert_trees_close(y, y_ref, 1e-14)
    assert_trees_close(dparams, dparams_ref, 1e-10)
    assert rel_err(dx, dx_ref) <= 1e-10


@pytest.mark.parametrize("layer,shape,batch", SHAPE_CASES)
def test_backward_matches_central_differences(layer: Layer, shape, batch):
    """<dy, J v> by central differences of apply, against <backward(dy), v>, for params and x."""
    _, params, x, dy = setup(layer, shape, batch, seed=1)
    dparams, dx = layer.backward(params, layer.forward(params, x)[1], dy)
    vp = jax.tree.map(lambda p: jax.random.normal(jax.random.key(7), p.shape, p.dtype), params)
    vx = jax.random.normal(jax.random.key(8), x.shape, x.dtype)
    h = 1e-6

    def projected(t):
        p = jax.tree.map(lambda a, v: a + t * v, params, vp)
        return float(jnp.sum(dy * layer.apply(p, x + t * vx)))

    fd = (projected(h) - projected(-h)) / (2 * h)
    hand = float(sum(jnp.sum(g * v) for g, v in zip(jax.tree.leaves(dparams), jax.tree.leaves(vp))))
    hand += float(jnp.sum(dx * vx))
    scale = np.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves((dparams, dx))))
    assert abs(fd - hand) <= 1e-6 * max(scale, 1.0)


@pytest.mark.parametrize("layer,shape,batch", CASES)
def test_declared_output_shape_is_the_real_one(layer: Layer, shape, batch):
    out_shape, params, x, _ = setup(layer, shape, batch)
    assert layer.apply(params, x).shape == (batch, *out_shape)
    assert jax.eval_shape(layer.apply, params, x).shape == (batch, *out_shape)


@pytest.mark.parametrize("layer,shape", ONE_CASE_PER_LAYER)
def test_float32_in_gives_float32_out_and_agrees_with_float64(layer: Layer, shape):
    _, p32, x32, dy32 = setup(layer, shape, 3, jnp.float32)
    _, p64, x64, dy64 = setup(layer, shape, 3, jnp.float64)
    y32, cache = layer.forward(p32, x32)
    dp32, dx32 = layer.backward(p32, cache, dy32)
    for leaf in jax.tree.leaves((y32, dp32, dx32)):
        assert leaf.dtype == jnp.float32
    y64, cache = layer.forward(p64, x64)
    dp64, dx64 = layer.backward(p64, cache, dy64)
    # Same draws in both precisions up to float32 rounding of the inputs.
    assert_trees_close((y32, dp32, dx32), (y64, dp64, dx64), 1e-4)


@pytest.mark.parametrize("layer,shape", ONE_CASE_PER_LAYER)
def test_jit_matches_eager(layer: Layer, shape):
    _, params, x, dy = setup(layer, shape, 3)

    def step(params, x, dy):
        y, cache = layer.forward(params, x)
        return y, layer.backward(params, cache, dy)

    assert_trees_close(jax.jit(step)(params, x, dy), step(params, x, dy), 1e-13)
    assert_trees_close(jax.jit(layer.apply)(params, x), layer.apply(params, x), 1e-13)


@pytest.mark.parametrize("layer,shape", ONE_CASE_PER_LAYER)
def test_layers_vmap_and_scan(layer: Layer, shape):
    """Caches are plain arrays: forward/backward run inside vmap and lax.scan."""
    _, params, x, dy = setup(layer, shape, 3)

    def step(carry, xs):
        x, dy = xs
        _y, cache = layer.forward(params, x)
        return carry, layer.backward(params, cache, dy)[1]

    _, dxs = jax.lax.scan(step, 0, (x[None], dy[None]))
    dx_vmapped = jax.vmap(lambda x, dy: step(0, (x, dy))[1])(x[None], dy[None])
    _, dx = step(0, (x, dy))
    assert rel_err(dxs[0], dx) <= 1e-13
    assert rel_err(dx_vmapped[0], dx) <= 1e-13


def test_caches_hold_outputs_where_the_derivative_allows():
    x = jnp.linspace(-2.0, 2.0, 8).reshape(2, 4)
    for layer, f in [
        (nn.Sigmoid, jax.nn.sigmoid),
        (nn.Tanh, jnp.tanh),
        (nn.Relu, jax.nn.relu),
        (nn.Softmax, jax.nn.softmax),
    ]:
        _y, cache = layer.forward((), x)
        np.testing.assert_allclose(cache, f(x), rtol=1e-14)
    _, cache = nn.Flatten.forward((), jnp.ones((2, 3, 5)))
    assert cache.size == 0  # only the shape travels


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
        np.testing.assert_allclose(layer.apply((), x), want, rtol=1e-12, atol=1e-300)


def test_extreme_inputs_give_finite_gradients():
    x = jnp.array([[-1e4, -50.0, 0.0, 50.0, 1e4]])
    for layer in [
        nn.Sigmoid,
        nn.Tanh,
        nn.Softplus,
        nn.Silu,
        nn.Gelu,
        nn.Elu(),
        nn.Softmax,
        nn.LogSoftmax,
    ]:
        y, cache = layer.forward((), x)
        _, dx = layer.backward((), cache, jnp.ones_like(y))
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx)), layer.name


# ---------------------------------------------------------------- Dense, LayerNorm, Flatten


def test_dense_init_is_keras_glorot_uniform_with_zero_bias():
    out_shape, params = nn.Dense(300).init(jax.random.key(0), (200,))
    assert out_shape == (300,)
    w, b = params["w"], params["b"]
    assert w.shape == (200, 300) and w.dtype == jnp.float32
    limit = np.sqrt(6 / (200 + 300))
    assert np.max(np.abs(w)) <= limit and np.max(np.abs(w)) > 0.99 * limit
    np.testing.assert_allclose(np.var(np.asarray(w, np.float64)), limit**2 / 3, rtol=0.03)
    np.testing.assert_array_equal(b, np.zeros(300, np.float32))


def test_dense_wrong_width_fails_at_trace_time_naming_layer_and_shapes():
    net = nn.serial(nn.Dense(8), nn.Relu, nn.Dense(3))
    _, params = net.init(jax.random.key(0), (64,))
    with pytest.raises(
        ShapeError, match=r"serial layer 0 \(Dense\(8\)\).*\(batch, 64\).*\(5, 60\)"
    ):
        jax.jit(net.apply).lower(params, jnp.zeros((5, 60)))
    with pytest.raises(ShapeError, match=r"\(batch, 64\).*got \(60,\)"):
        net.apply(params, jnp.zeros(60))  # a forgotten batch axis is not broadcast


def test_serial_rejects_params_of_the_wrong_length_and_non_layers():
    net = nn.serial(nn.Dense(8), nn.Relu)
    _, params = net.init(jax.random.key(0), (4,))
    with pytest.raises(TypeError, match="tuple of 2 entries"):
        net.apply(params[:1], jnp.zeros((1, 4)))
    with pytest.raises(TypeError, match=r"forget to call a constructor"):
        nn.serial(nn.Dense, nn.Relu)


def test_layernorm_normalizes_each_example():
    layer = nn.LayerNorm(dtype=jnp.float64)
    _, params = layer.init(jax.random.key(0), (6,))
    x = jax.random.normal(jax.random.key(1), (4, 6), jnp.float64) * 3 + 2
    y = layer.apply(params, x)
    np.testing.assert_allclose(np.mean(y, -1), 0, atol=1e-12)
    np.testing.assert_allclose(np.var(y, -1), np.var(x, -1) / (np.var(x, -1) + 1e-5), rtol=1e-12)


def test_flatten_shapes():
    out_shape, _ = nn.Flatten.init(None, (2, 3, 5))
    assert out_shape == (30,)
    x = jnp.arange(60.0).reshape(2, 2, 3, 5)
    np.testing.assert_array_equal(nn.Flatten.apply((), x), np.arange(60.0).reshape(2, 30))


def test_invalid_options_raise():
    for make in [
        lambda: nn.Dense(0),
        lambda: nn.Dense(2.5),
        lambda: nn.Dropout(1.0),
        lambda: nn.Dropout(-0.1),
        lambda: nn.LeakyRelu(-1.0),
        lambda: nn.Elu(0.0),
        lambda: nn.LayerNorm(0.0),
    ]:
        with pytest.raises(ValueError):
            make()


# ---------------------------------------------------------------- Dropout


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_rate_is_the_drop_probability(rate):
    n = 200_000
    x = jnp.ones((1, n))
    y, mask = nn.Dropout(rate).forward((), x, key=jax.random.key(3))
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    # Survivors are scaled by 1 / (1 - rate): the expectation is preserved.
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / (1 - rate)], rtol=1e-12)
    _, dx = nn.Dropout(rate).backward((), mask, jnp.ones_like(y))
    np.testing.assert_array_equal(dx, y)  # same mask, same scale


def test_dropout_without_key_is_identity_and_with_key_matches_vjp():
    layer = nn.Dropout(0.5)
    x = jax.random.normal(jax.random.key(0), (4, 9))
    np.testing.assert_array_equal(layer.apply((), x), x)
    key = jax.random.key(1)
    y, mask = layer.forward((), x, key=key)
    np.testing.assert_array_equal(y, layer.apply((), x, key=key))
    dy = jax.random.normal(jax.random.key(2), x.shape)
    _, vjp = jax.vjp(lambda x: layer.apply((), x, key=key), x)
    np.testing.assert_allclose(layer.backward((), mask, dy)[1], vjp(dy)[0], rtol=1e-14)


def test_serial_splits_keys_so_dropout_layers_draw_different_masks():
    net = nn.serial(nn.Dropout(0.5), nn.Identity, nn.Dropout(0.5))
    x = jnp.ones((1, 1000))
    _, (m1, _, m2) = net.forward(net.init(jax.random.key(0), (1000,))[1], x, key=jax.random.key(1))
    assert not np.array_equal(m1, m2)


def test_relu_backward_agrees_with_autodiff_at_exactly_zero():
    x = jnp.array([[-1.0, 0.0, 2.0], [0.0, 0.0, -0.0]])
    dy = jnp.ones_like(x)
    _, vjp = jax.vjp(lambda x: nn.Relu.apply((), x), x)
    np.testing.assert_array_equal(
        nn.Relu.backward((), nn.Relu.forward((), x)[1], dy)[1], vjp(dy)[0]
    )


def test_backward_rejects_a_dy_of_the_wrong_shape():
    for layer, shape, cut in [
        (nn.Dense(3), (4,), lambda dy: dy[:1]),  # batch 1 against a batch-2 forward
        (nn.LayerNorm(), (4,), lambda dy: dy[:1]),
        (nn.Relu, (4,), lambda dy: dy[:1]),
        (nn.Flatten, (2, 3), lambda dy: dy[:, :5]),  # 5 features where the output had 6
    ]:
        _, params, x, dy = setup(layer, shape, 2)
        _, cache = layer.forward(params, x)
        with pytest.raises(ShapeError, match=r"dy .*should have shape"):
            layer.backward(params, cache, cut(dy))


def test_shape_errors_for_flatten_and_layernorm_inputs():
    with pytest.raises(ShapeError, match=r"Flatten.*batch axis"):
        nn.Flatten.apply((), jnp.zeros(4))
    with pytest.raises(ShapeError, match=r"LayerNorm.*feature axis"):
        nn.LayerNorm().init(jax.random.key(0), ())
    _, params = nn.Dense(2).init(jax.random.key(0), (3, 4))
    with pytest.raises(ShapeError, match=r"\(batch, 3, 4\).*got \(2, 3, 5\)"):
        nn.Dense(2).apply(params, jnp.zeros((2, 3, 5)))


def test_float64_input_does_not_widen_float32_param_gradients():
    layer = nn.serial(nn.Dense(3), nn.LayerNorm())
    _, params = layer.init(jax.random.key(0), (4,))  # float32
    x = jax.random.normal(jax.random.key(1), (2, 4), jnp.float64)
    with jax.numpy_dtype_promotion("standard"):  # a user's default promotion rules
        y, cache = layer.forward(params, x)
        dparams, _ = layer.backward(params, cache, jnp.ones_like(y))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(dparams))

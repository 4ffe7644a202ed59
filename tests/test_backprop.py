"""value_and_grad and as_custom_vjp: whole networks against jax.grad, and the public surface."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import losses, nn
from fbp.core import Layer

KEY = jax.random.key(0)

# (id, network, input shape, loss, target maker(key, batch, out_shape))
NETS = [
    (
        "mlp-relu-softmax-ce",
        nn.serial(nn.Dense(16), nn.Relu, nn.Dense(10)),
        (13,),
        losses.softmax_cross_entropy,
        lambda k, n, out: jax.random.randint(k, (n,), 0, out[-1]),
    ),
    (
        "tanh-layernorm-mse",
        nn.serial(nn.Dense(9), nn.Tanh, nn.LayerNorm(), nn.Dense(3)),
        (5,),
        losses.mse,
        lambda k, n, out: jax.random.normal(k, (n, *out), jnp.float64),
    ),
    (
        "flatten-gelu-bce",
        nn.serial(nn.Flatten, nn.Dense(7), nn.Gelu, nn.Dense(1)),
        (2, 3, 2),
        losses.sigmoid_binary_cross_entropy,
        lambda k, n, out: jax.random.bernoulli(k, 0.5, (n, *out)).astype(jnp.float64),
    ),
    (
        "silu-softplus-huber",
        nn.serial(nn.Dense(8), nn.Silu, nn.Dense(8), nn.Softplus, nn.Dense(2)),
        (4,),
        losses.huber(0.5),
        lambda k, n, out: jax.random.normal(k, (n, *out), jnp.float64),
    ),
    (
        "residual-batchnorm-branches-ce",
        nn.serial(
            nn.Dense(6),
            nn.BatchNorm(),
            nn.Relu,
            nn.residual(nn.serial(nn.Dense(6), nn.BatchNorm(), nn.Elu())),
            nn.FanOut(2),
            nn.parallel(nn.Dense(3), nn.serial(nn.Dense(3), nn.Tanh)),
            nn.FanInSum,
        ),
        (4,),
        losses.softmax_cross_entropy,
        lambda k, n, out: jax.random.randint(k, (n,), 0, out[-1]),
    ),
    (
        "deep-sigmoid-elu-onehot",
        nn.serial(
            nn.Dense(6), nn.Sigmoid, nn.Dense(6), nn.Elu(), nn.Dense(6), nn.LeakyRelu(), nn.Dense(4)
        ),
        (3,),
        losses.softmax_cross_entropy,
        lambda k, n, out: jax.nn.one_hot(
            jax.random.randint(k, (n,), 0, out[-1]), out[-1], dtype=jnp.float64
        ),
    ),
]


def build(net, in_shape, target, batch, dtype=jnp.float64):
    k_init, k_x, k_y = jax.random.split(KEY, 3)
    out_shape, params, state = net.init(k_init, in_shape)
    params, state = jax.tree.map(lambda p: p.astype(dtype), (params, state))
    x = jax.random.normal(k_x, (batch, *in_shape), jnp.float64).astype(dtype)
    y = target(k_y, batch, out_shape)
    if jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(dtype)
    return params, state, x, y


def rel_err(a, b, floor=0.0):
    """max|a - b| / max(max|b|, floor): floor is the scale of the other gradients, for an
    array whose true gradient is 0 (a bias before BatchNorm)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor, 1e-300)


@pytest.mark.parametrize("name,net,in_shape,loss,target", NETS, ids=[n[0] for n in NETS])
@pytest.mark.parametrize("batch", [2, 5])
def test_value_and_grad_matches_jax_grad_float64(name, net, in_shape, loss, target, batch):
    params, state, x, y = build(net, in_shape, target, batch)
    (value, new_state), grads = jax.jit(fbp.value_and_grad(net, loss))(params, state, x, y)
    ref = jax.jit(jax.value_and_grad(lambda p, x, y: loss(net.apply(p, state, x, train=True), y)))
    ref_value, ref_grads = ref(params, x, y)
    assert abs(float(value) - float(ref_value)) <= 1e-12 * abs(float(ref_value))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    top = max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(ref_grads))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert g.shape == r.shape and rel_err(g, r, 1e-3 * top) <= 1e-10


@pytest.mark.parametrize("name,net,in_shape,loss,target", NETS, ids=[n[0] for n in NETS])
def test_value_and_grad_float32_dtypes(name, net, in_shape, loss, target):
    """float32 in, float32 out: loss, every gradient and the new state."""
    params, state, x, y = build(net, in_shape, target, 4, jnp.float32)
    (value, new_state), grads = jax.jit(fbp.value_and_grad(net, loss))(params, state, x, y)
    assert value.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves((grads, new_state)))


def test_value_and_grad_in_evaluation_mode_uses_and_keeps_the_running_statistics():
    net = nn.serial(nn.Dense(4), nn.BatchNorm(), nn.Dense(2))
    params, state, x, y = build(net, (3,), lambda k, n, out: jax.random.normal(k, (n, *out)), 5)
    state = (state[0], {"mean": jnp.full(4, 0.3), "var": jnp.full(4, 2.0)}, state[2])
    (_, new_state), grads = fbp.value_and_grad(net, losses.mse)(params, state, x, y, train=False)
    assert new_state is state
    ref = jax.grad(lambda p: losses.mse(net.apply(p, state, x), y))(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        assert rel_err(g, r) <= 1e-10


@pytest.mark.parametrize("name,net,in_shape,loss,target", NETS[:4], ids=[n[0] for n in NETS[:4]])
def test_as_custom_vjp_gives_jax_grad_the_hand_written_backward(name, net, in_shape, loss, target):
    params, state, x, y = build(net, in_shape, target, 3)
    f = fbp.as_custom_vjp(net)

    def through_fbp(p, x):
        return loss(f(p, state, x, train=True)[0], y)

    grads, dx = jax.jit(jax.grad(through_fbp, argnums=(0, 1)))(params, x)
    ref = jax.jit(
        jax.grad(lambda p, x: loss(net.apply(p, state, x, train=True), y), argnums=(0, 1))
    )
    ref_grads, ref_dx = ref(params, x)
    top = max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(ref_grads))
    for g, r in zip(
        jax.tree.leaves((grads, dx)), jax.tree.leaves((ref_grads, ref_dx)), strict=True
    ):
        assert rel_err(g, r, 1e-3 * top) <= 1e-10
    y_f, state_f = f(params, state, x, train=True)
    y_n, _, _ = net.forward(params, state, x, train=True)
    assert rel_err(y_f, y_n) <= 1e-13 and jax.tree.structure(state_f) == jax.tree.structure(state)


def _scale_layer(backward_factor: float) -> Layer:
    """y = a * x with a scalar parameter a; backward multiplies by ``backward_factor`` (1 = right)."""

    def init(key, shape):
        return shape, {"a": jnp.array(1.5)}, ()

    def forward(p, s, x, *, key=None, train=False, mask=None):
        return p["a"] * x, s, x

    def backward(p, x, dy):
        return {"a": backward_factor * jnp.sum(dy * x)}, backward_factor * p["a"] * dy

    return Layer(init, forward, backward, "Scale")


def test_as_custom_vjp_really_runs_fbp_backward():
    """A layer whose backward is deliberately doubled: jax.grad through as_custom_vjp sees it."""
    wrong = _scale_layer(2.0)
    _, params, state = wrong.init(KEY, (3,))
    x = jnp.arange(6.0).reshape(2, 3)
    g_custom = jax.grad(lambda p: jnp.sum(fbp.as_custom_vjp(wrong)(p, state, x)[0]))(params)
    g_plain = jax.grad(lambda p: jnp.sum(wrong.apply(p, state, x)))(params)
    np.testing.assert_allclose(g_custom["a"], 2 * g_plain["a"], rtol=1e-14)


def test_as_custom_vjp_with_dropout_key_matches_value_and_grad():
    net = nn.serial(nn.Dense(8), nn.Relu, nn.Dropout(0.5), nn.Dense(3))
    params, state, x, y = build(net, (5,), lambda k, n, out: jax.random.randint(k, (n,), 0, 3), 6)
    key = jax.random.key(42)
    f = fbp.as_custom_vjp(net)
    loss = losses.softmax_cross_entropy
    grads = jax.jit(jax.grad(lambda p: loss(f(p, state, x, key=key, train=True)[0], y)))(params)
    _, hand = jax.jit(fbp.value_and_grad(net, loss))(params, state, x, y, key=key)
    ref = jax.jit(jax.grad(lambda p: loss(net.apply(p, state, x, key=key, train=True), y)))(params)
    for g, h, r in zip(
        jax.tree.leaves(grads), jax.tree.leaves(hand), jax.tree.leaves(ref), strict=True
    ):
        assert rel_err(g, r) <= 1e-10 and rel_err(h, r) <= 1e-10


def test_forward_backward_returns_the_prediction_and_honours_a_mask():
    net, in_shape, loss = NETS[0][1], NETS[0][2], NETS[0][3]
    params, state, x, y = build(net, in_shape, NETS[0][4], 4)
    value, _, _, pred = fbp.forward_backward(net, loss, params, state, x, y)
    np.testing.assert_allclose(pred, net.apply(params, state, x), rtol=1e-14)
    np.testing.assert_allclose(value, loss(pred, y), rtol=1e-14)
    # A mask over the batch: exactly the step of the real rows alone.
    mask = jnp.array([True, True, True, False])
    value_m, grads_m, _, _ = fbp.forward_backward(net, loss, params, state, x, y, mask=mask)
    value_3, grads_3, _, _ = fbp.forward_backward(net, loss, params, state, x[:3], y[:3])
    np.testing.assert_allclose(value_m, value_3, rtol=1e-14)
    for a, b in zip(jax.tree.leaves(grads_m), jax.tree.leaves(grads_3), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-16)


# ---------------------------------------------------------------- the public surface and its rules


def test_public_names_exist():
    for name in fbp.__all__:
        assert hasattr(fbp, name), name
    for name in [
        "Dense",
        "Relu",
        "LeakyRelu",
        "Elu",
        "Gelu",
        "Sigmoid",
        "Tanh",
        "Softplus",
        "Silu",
    ]:
        assert hasattr(nn, name)
    for name in ["Softmax", "LogSoftmax", "Identity", "Flatten", "Dropout", "LayerNorm", "serial"]:
        assert hasattr(nn, name)
    for name in ["BatchNorm", "FanOut", "parallel", "FanInSum", "FanInConcat", "residual",
                 "Reshape", "mlp", "summary", "check_params"]:  # fmt: skip
        assert hasattr(nn, name)
    for name in nn.__all__:
        assert hasattr(nn, name), name
    for name in ["mse", "mae", "huber", "sigmoid_binary_cross_entropy", "softmax_cross_entropy"]:
        assert hasattr(losses, name)
    for name in ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal"]:
        assert hasattr(fbp.initializers, name)
    for name in ["sgd", "rmsprop", "adam", "adamw", "clip_by_global_norm"]:
        assert hasattr(fbp.optim, name)


def test_no_autodiff_outside_the_verification_module():
    """The backward passes are the product: only fbp/check.py may use JAX's autodiff."""
    banned = {"grad", "vjp", "jvp", "value_and_grad", "linearize", "jacrev", "jacfwd", "hessian"}
    offenders = []
    for path in pathlib.Path(fbp.__file__).parent.rglob("*.py"):
        if path.name == "check.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            uses = (
                isinstance(node, ast.Attribute)
                and node.attr in banned
                and isinstance(node.value, ast.Name)
                and node.value.id == "jax"
            ) or (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("jax")
                and any(alias.name in banned for alias in node.names)
            )
            if uses:
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders

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
    out_shape, params = net.init(k_init, in_shape)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    x = jax.random.normal(k_x, (batch, *in_shape), jnp.float64).astype(dtype)
    y = target(k_y, batch, out_shape)
    if jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(dtype)
    return params, x, y


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


@pytest.mark.parametrize("name,net,in_shape,loss,target", NETS, ids=[n[0] for n in NETS])
@pytest.mark.parametrize("batch", [1, 5])
def test_value_and_grad_matches_jax_grad_float64(name, net, in_shape, loss, target, batch):
    params, x, y = build(net, in_shape, target, batch)
    value, grads = jax.jit(fbp.value_and_grad(net, loss))(params, x, y)
    ref = jax.jit(jax.value_and_grad(lambda p, x, y: loss(net.apply(p, x), y)))
    ref_value, ref_grads = ref(params, x, y)
    assert abs(float(value) - float(ref_value)) <= 1e-12 * abs(float(ref_value))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert g.shape == r.shape and rel_err(g, r) <= 1e-10


@pytest.mark.parametrize("name,net,in_shape,loss,target", NETS, ids=[n[0] for n in NETS])
def test_value_and_grad_float32_and_jit(name, net, in_shape, loss, target):
    params, x, y = build(net, in_shape, target, 4, jnp.float32)
    f = fbp.value_and_grad(net, loss)
    value, grads = f(params, x, y)  # eager, op by op
    assert value.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    jit_value, jit_grads = jax.jit(f)(params, x, y)
    np.testing.assert_allclose(jit_value, value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jit_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,net,in_shape,loss,target", NETS[:3], ids=[n[0] for n in NETS[:3]])
def test_as_custom_vjp_gives_jax_grad_the_hand_written_backward(name, net, in_shape, loss, target):
    params, x, y = build(net, in_shape, target, 3)
    f = fbp.as_custom_vjp(net)
    grads, dx = jax.jit(jax.grad(lambda p, x: loss(f(p, x), y), argnums=(0, 1)))(params, x)
    ref = jax.jit(jax.grad(lambda p, x: loss(net.apply(p, x), y), argnums=(0, 1)))
    ref_grads, ref_dx = ref(params, x)
    for g, r in zip(
        jax.tree.leaves((grads, dx)), jax.tree.leaves((ref_grads, ref_dx)), strict=True
    ):
        assert rel_err(g, r) <= 1e-10
    eager = jax.grad(lambda p: loss(f(p, x), y))(params)
    for g, r in zip(jax.tree.leaves(eager), jax.tree.leaves(grads), strict=True):
        assert rel_err(g, r) <= 1e-12


def _scale_layer(backward_factor: float) -> Layer:
    """y = a * x with a scalar parameter a; backward multiplies by ``backward_factor`` (1 = right)."""

    def init(key, shape):
        return shape, {"a": jnp.array(1.5)}

    def apply(p, x, *, key=None):
        return p["a"] * x

    def forward(p, x, *, key=None):
        return apply(p, x), x

    def backward(p, x, dy):
        return {"a": backward_factor * jnp.sum(dy * x)}, backward_factor * p["a"] * dy

    return Layer(init, apply, forward, backward, "Scale")


def test_as_custom_vjp_really_runs_fbp_backward():
    """A layer whose backward is deliberately doubled: jax.grad through as_custom_vjp sees it."""
    wrong = _scale_layer(2.0)
    _, params = wrong.init(KEY, (3,))
    x = jnp.arange(6.0).reshape(2, 3)
    g_custom = jax.grad(lambda p: jnp.sum(fbp.as_custom_vjp(wrong)(p, x)))(params)
    g_plain = jax.grad(lambda p: jnp.sum(wrong.apply(p, x)))(params)
    np.testing.assert_allclose(g_custom["a"], 2 * g_plain["a"], rtol=1e-14)


def test_as_custom_vjp_with_dropout_key_matches_value_and_grad():
    net = nn.serial(nn.Dense(8), nn.Relu, nn.Dropout(0.5), nn.Dense(3))
    params, x, y = build(net, (5,), lambda k, n, out: jax.random.randint(k, (n,), 0, 3), 6)
    key = jax.random.key(42)
    f = fbp.as_custom_vjp(net)
    loss = losses.softmax_cross_entropy
    grads = jax.jit(jax.grad(lambda p: loss(f(p, x, key), y)))(params)
    _, hand = jax.jit(fbp.value_and_grad(net, loss))(params, x, y, key=key)
    ref = jax.jit(jax.grad(lambda p: loss(net.apply(p, x, key=key), y)))(params)
    for g, h, r in zip(
        jax.tree.leaves(grads), jax.tree.leaves(hand), jax.tree.leaves(ref), strict=True
    ):
        assert rel_err(g, r) <= 1e-10 and rel_err(h, r) <= 1e-10


def test_forward_backward_returns_the_prediction():
    net, in_shape, loss = NETS[0][1], NETS[0][2], NETS[0][3]
    params, x, y = build(net, in_shape, NETS[0][4], 4)
    value, _, pred = fbp.forward_backward(net, loss, params, x, y)
    np.testing.assert_allclose(pred, net.apply(params, x), rtol=1e-14)
    np.testing.assert_allclose(value, loss(pred, y), rtol=1e-14)


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

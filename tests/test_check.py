"""fbp.check catches planted bugs, passes correct code, and prints a readable report."""

import jax
import jax.numpy as jnp
import pytest

from fbp import losses, nn
from fbp.check import check_grads, check_layer
from fbp.core import Layer, Loss


def square_layer(bug: str = "") -> Layer:
    """A user's own layer: ``y = w * x**2`` elementwise, params ``{"w": (d,)}``.

    ``bug`` plants a classic mistake: "dx" forgets the factor 2, "dw" forgets to sum over the
    batch (takes example 0 only), "shape" declares the wrong output shape.
    """

    def init(key, shape):
        out = (shape[-1] + 1,) if bug == "shape" else shape
        return out, {"w": jax.random.normal(key, shape[-1:])}

    def apply(p, x, *, key=None):
        return p["w"][None, :] * x * x

    def forward(p, x, *, key=None):
        return apply(p, x), x

    def backward(p, x, dy):
        dw = (dy * x * x)[0] if bug == "dw" else jnp.sum(dy * x * x, axis=0)  # (d,)
        dx = (1 if bug == "dx" else 2) * p["w"][None, :] * x * dy  # (batch, d)
        return {"w": dw}, dx

    return Layer(init, apply, forward, backward, "Square")


def data(in_dim=4, out_dim=3, batch=5):
    k1, k2 = jax.random.split(jax.random.key(1))
    return (
        jax.random.normal(k1, (batch, in_dim), jnp.float64),
        jax.random.randint(k2, (batch,), 0, out_dim),
    )


def test_correct_network_passes_and_report_names_every_layer():
    net = nn.serial(nn.Dense(6), square_layer(), nn.Tanh, nn.Dense(3))
    _, params = net.init(jax.random.key(0), (4,))
    x, y = data()
    report = check_grads(net, losses.softmax_cross_entropy, params, x, y)
    assert report.ok, str(report)
    text = str(report)
    for expected in ["Dense(6)", "Square", "Dense(3)", "input", "max rel err", "fd rel err", "OK"]:
        assert expected in text
    layers = [(r.layer, r.name, r.param) for r in report.rows]
    assert ("1", "Square", "w") in layers and ("3", "Dense(3)", "w") in layers
    for row in report.rows:
        assert row.rel_err <= 1e-10 and row.fd_err <= 1e-6


@pytest.mark.parametrize("bug", ["dx", "dw"])
def test_planted_backward_bug_is_caught(bug):
    net = nn.serial(nn.Dense(6), square_layer(bug), nn.Dense(3))
    _, params = net.init(jax.random.key(0), (4,))
    x, y = data()
    report = check_grads(net, losses.softmax_cross_entropy, params, x, y)
    assert not report.ok
    assert "FAIL" in str(report)
    failed = {(r.layer, r.name) for r in report.rows if not r.ok}
    if bug == "dw":  # only the buggy layer's own parameter is wrong
        assert failed == {("1", "Square")}
    else:  # a wrong dx corrupts every gradient upstream of it, and dL/dx
        assert ("0", "Dense(6)") in failed and ("input", "x") in failed
        assert ("2", "Dense(3)") not in failed
    layer_report = check_layer(square_layer(bug), jax.random.key(2), (4,))
    assert not layer_report.ok


def test_check_layer_passes_every_builtin_layer_and_dropout_with_a_key():
    for layer, shape in [(square_layer(), (4,)), (nn.Dense(3), (5,)), (nn.Flatten, (2, 3))]:
        assert check_layer(layer, jax.random.key(0), shape).ok
    report = check_layer(nn.Dropout(0.5), jax.random.key(0), (50,), stochastic=True)
    assert report.ok, str(report)


def test_check_layer_catches_a_wrong_declared_shape():
    report = check_layer(square_layer("shape"), jax.random.key(0), (4,))
    assert not report.ok
    assert "declared output shape" in str(report)


def test_wrong_loss_gradient_is_caught():
    def value(p, t):
        return jnp.mean((p - t) ** 2)

    def value_and_grad(p, t):  # forgets the 2 in d(p-t)^2/dp
        return value(p, t), (p - t) / p.size

    bad_mse = Loss(value, value_and_grad, "bad_mse")
    net = nn.serial(nn.Dense(3))
    _, params = net.init(jax.random.key(0), (4,))
    x, _ = data()
    y = jax.random.normal(jax.random.key(3), (5, 3), jnp.float64)
    assert check_grads(net, losses.mse, params, x, y).ok
    assert not check_grads(net, bad_mse, params, x, y).ok


def test_check_grads_accepts_float32_inputs_and_checks_in_float64():
    net = nn.serial(nn.Dense(5), nn.Relu, nn.Dense(2))
    _, params = net.init(jax.random.key(0), (3,))  # float32 params
    x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float32)
    y = jax.random.normal(jax.random.key(2), (4, 2), jnp.float32)
    report = check_grads(net, losses.mse, params, x, y)
    assert report.ok and max(r.rel_err for r in report.rows) <= 1e-10

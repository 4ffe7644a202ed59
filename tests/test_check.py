"""fbp.check: correct networks pass (saturated, tiny-gradient and kink cases included), planted
bugs fail (the finite differences alone catch them), and the report reads well."""

import jax
import jax.numpy as jnp
import pytest

from fbp import initializers, losses, nn
from fbp.check import check_grads, check_layer
from fbp.core import Layer, Loss


def square_layer(bug: str = "") -> Layer:
    """A user's own layer: ``y = w * x**2`` elementwise, params ``{"w": (d,)}``.

    ``bug`` plants a classic mistake: "dx" forgets the factor 2, "dw" forgets to sum over the
    batch (takes example 0 only), "shape" declares the wrong output shape, "dw-tiny" is off by
    one part in 1e7 (a bug finite differences at fd_rtol=1e-6 must still see).
    """

    def init(key, shape):
        out = (shape[-1] + 1,) if bug == "shape" else shape
        return out, {"w": jax.random.normal(key, shape[-1:])}, ()

    def forward(p, s, x, *, key=None, train=False, mask=None):
        return p["w"][None, :] * x * x, s, x

    def backward(p, x, dy):
        dw = (dy * x * x)[0] if bug == "dw" else jnp.sum(dy * x * x, axis=0)  # (d,)
        if bug == "dw-tiny":
            dw = dw * (1 + 1e-5)
        dx = (1 if bug == "dx" else 2) * p["w"][None, :] * x * dy  # (batch, d)
        return {"w": dw}, dx

    return Layer(init, forward, backward, "Square")


def fooled_reference(layer: Layer) -> Layer:
    """``layer`` with a forward that JAX differentiates through ``layer.backward`` (a custom
    VJP): jax.grad then agrees with any bug in the backward, and only the finite differences
    can tell. This is how a check that ignored its finite-difference verdict would be fooled."""

    def forward(p, s, x, *, key=None, train=False, mask=None):
        @jax.custom_vjp
        def f(p, x):
            return layer.forward(p, s, x)[0]

        def f_fwd(p, x):
            y, _, cache = layer.forward(p, s, x)
            return y, (p, cache)

        def f_bwd(res, dy):
            return layer.backward(res[0], res[1], dy)

        f.defvjp(f_fwd, f_bwd)
        return f(p, x), s, layer.forward(p, s, x)[2]

    return layer._replace(forward=forward, name=layer.name + "*")


def data(in_dim=4, out_dim=3, batch=5):
    k1, k2 = jax.random.split(jax.random.key(1))
    return (
        jax.random.normal(k1, (batch, in_dim), jnp.float64),
        jax.random.randint(k2, (batch,), 0, out_dim),
    )


def init(net, shape, seed=0, dtype=jnp.float64):
    """Params and state in ``dtype`` (check_grads casts to float64 anyway)."""
    params, state = net.init(jax.random.key(seed), shape)[1:]
    return jax.tree.map(lambda a: a.astype(dtype), (params, state))


def test_correct_network_passes_and_report_names_every_layer():
    net = nn.serial(nn.Dense(6), square_layer(), nn.Tanh, nn.Dense(3))
    params, state = init(net, (4,))
    x, y = data()
    report = check_grads(net, losses.softmax_cross_entropy, params, state, x, y)
    assert report.ok, str(report)
    text = str(report)
    for expected in ["Dense(6)", "Square", "Dense(3)", "input", "rel err", "fd err", "OK"]:
        assert expected in text
    layers = [(r.layer, r.name, r.param) for r in report.rows]
    assert ("1", "Square", "w") in layers and ("3", "Dense(3)", "w") in layers
    for row in report.rows:
        assert row.rel_err <= 1e-10 and row.fd_err <= 1e-6


@pytest.mark.parametrize("bug", ["dx", "dw", "dw-tiny"])
def test_planted_backward_bug_is_caught(bug):
    net = nn.serial(nn.Dense(6), square_layer(bug), nn.Dense(3))
    params, state = init(net, (4,))
    x, y = data()
    report = check_grads(net, losses.softmax_cross_entropy, params, state, x, y)
    assert not report.ok
    assert "FAIL" in str(report)
    failed = {(r.layer, r.name) for r in report.rows if not r.ok}
    if bug.startswith("dw"):  # only the buggy layer's own parameter is wrong
        assert failed == {("1", "Square")}
    else:  # a wrong dx corrupts every gradient upstream of it, and dL/dx
        assert ("0", "Dense(6)") in failed and ("input", "x") in failed
        assert ("2", "Dense(3)") not in failed
    assert not check_layer(square_layer(bug), jax.random.key(2), (4,)).ok


@pytest.mark.parametrize("bug", ["dx", "dw", "dw-tiny"])
def test_finite_differences_alone_catch_a_bug_the_autodiff_reference_shares(bug):
    """Fool the jax.grad reference into agreeing with the bug: the verdict must still be FAIL,
    from the finite-difference column alone."""
    net = nn.serial(nn.Dense(6), fooled_reference(square_layer(bug)), nn.Dense(3))
    params, state = init(net, (4,))
    x, y = data()
    report = check_grads(net, losses.softmax_cross_entropy, params, state, x, y)
    assert all(r.rel_err <= 1e-10 for r in report.rows), str(report)  # the reference is fooled
    assert not report.ok, str(report)
    assert any(r.fd_err > 1e-6 for r in report.rows)
    layer_report = check_layer(fooled_reference(square_layer(bug)), jax.random.key(2), (4,))
    assert not layer_report.ok, str(layer_report)


def test_fooled_reference_of_a_correct_layer_passes():
    net = nn.serial(nn.Dense(6), fooled_reference(square_layer()), nn.Dense(3))
    params, state = init(net, (4,))
    x, y = data()
    assert check_grads(net, losses.softmax_cross_entropy, params, state, x, y).ok


# ------------------------------------------------- correct networks that used to report FAIL


def test_kinks_elu_at_zero_and_a_zero_initialised_logistic_regression_pass():
    net = nn.serial(nn.Elu(), nn.Dense(2))
    params, state = init(net, (4,))
    x = jnp.array([[0.0, 1.0, -1.0, 0.5], [0.0, -0.0, 2.0, -3.0]])
    y = jax.random.normal(jax.random.key(1), (2, 2), jnp.float64)
    report = check_grads(net, losses.mse, params, state, x, y)
    assert report.ok, str(report)
    # Logistic regression with zero weights: every logit is exactly 0 at the first step.
    net = nn.serial(nn.Dense(1, w_init=initializers.zeros))
    params, state = init(net, (3,))
    x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    y = jnp.array([[1.0], [0.0], [1.0], [1.0]])
    report = check_grads(net, losses.sigmoid_binary_cross_entropy, params, state, x, y)
    assert report.ok, str(report)


def test_saturated_tanh_with_tiny_input_gradients_passes():
    net = nn.serial(nn.Tanh, nn.Dense(1))
    params, state = init(net, (5,))
    k1, k2 = jax.random.split(jax.random.key(2))
    size = jax.random.uniform(k1, (4, 5), jnp.float64, 6.0, 15.0)
    x = size * jnp.where(jax.random.bernoulli(k2, 0.5, (4, 5)), 1.0, -1.0)
    report = check_grads(net, losses.mse, params, state, x, jnp.ones((4, 1)))
    assert report.ok, str(report)
    dx_row = report.rows[-1]
    assert dx_row.layer == "input"


def test_saturated_softmax_with_gradients_of_1e_minus_28_passes():
    net = nn.serial(nn.Dense(3), nn.Softmax)
    params, state = init(net, (4,))
    params = jax.tree.map(lambda a: 40.0 * a, params)
    x = 3.0 * jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(4), (5, 3), jnp.float64)
    report = check_grads(net, losses.mse, params, state, x, y)
    assert report.ok, str(report)
    assert min(r.abs_err for r in report.rows) >= 0.0


def test_a_parameter_with_zero_gradient_and_curvature_passes():
    """mse at a point where the bias gradient is exactly 0: the residuals of each output
    column sum to 0. The loss still curves in the bias."""
    net = nn.serial(nn.Dense(2))
    params, state = init(net, (4,))
    x = jax.random.normal(jax.random.key(1), (3, 4), jnp.float64)
    y = net.apply(params, state, x) + jnp.array([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]])
    report = check_grads(net, losses.mse, params, state, x, y)
    assert report.ok, str(report)
    # ... and a bias before BatchNorm, whose true gradient is 0 (the mean is removed).
    net = nn.serial(nn.Dense(5), nn.BatchNorm(), nn.Tanh, nn.Dense(3))
    params, state = init(net, (4,))
    x, y = data()
    assert check_grads(net, losses.softmax_cross_entropy, params, state, x, y).ok


def test_a_relu_at_exactly_zero_reports_the_kink_and_rests_on_autodiff():
    net = nn.serial(nn.Relu, nn.Dense(2))
    params, state = init(net, (4,))
    x = jnp.array([[0.0, 1.0, -1.0, 0.0], [0.0, 0.0, 2.0, -3.0]])
    y = jax.random.normal(jax.random.key(1), (2, 2), jnp.float64)
    report = check_grads(net, losses.mse, params, state, x, y)
    assert report.ok, str(report)
    assert report.rows[-1].note == "kink" and "crossed a kink" in str(report)


def test_a_reference_with_another_derivative_at_a_kink_is_reported_not_hidden():
    """A user's ELU (alpha 1: differentiable, slope 1 at 0) whose forward uses
    ``expm1(minimum(x, 0))``: autodiff splits the tie at 0 and takes slope 1/2 there, while
    the hand-written backward gives 1. The check fails, and says that the finite differences
    side with the hand-written gradient."""

    def init_fn(key, shape):
        return shape, (), ()

    def forward(p, s, x, *, key=None, train=False, mask=None):
        y = jnp.where(x > 0, x, jnp.expm1(jnp.minimum(x, 0.0)))
        return y, s, y

    def backward(p, y, dy):
        return (), jnp.where(y > 0, dy, (y + 1.0) * dy)

    elu = Layer(init_fn, forward, backward, "NaiveElu")
    net = nn.serial(elu, nn.Dense(2))
    params, state = init(net, (4,))
    x = jnp.array([[0.0, 1.0, -1.0, 0.5], [0.0, 0.0, 2.0, -3.0]])
    y = jax.random.normal(jax.random.key(1), (2, 2), jnp.float64)
    report = check_grads(net, losses.mse, params, state, x, y)
    assert not report.ok
    assert report.rows[-1].rel_err > 1e-10 and report.rows[-1].fd_err <= 1e-6
    assert "finite differences agree with the hand-written gradient" in str(report)


def test_wrong_loss_gradient_is_caught():
    def value(p, t, mask=None):
        return jnp.mean((p - t) ** 2)

    def value_and_grad(p, t, mask=None):  # forgets the 2 in d(p-t)^2/dp
        return value(p, t), (p - t) / p.size

    bad_mse = Loss(value, value_and_grad, "bad_mse")
    net = nn.serial(nn.Dense(3))
    params, state = init(net, (4,))
    x, _ = data()
    y = jax.random.normal(jax.random.key(3), (5, 3), jnp.float64)
    assert check_grads(net, losses.mse, params, state, x, y).ok
    assert not check_grads(net, bad_mse, params, state, x, y).ok


def test_check_grads_accepts_float32_inputs_and_checks_in_float64():
    net = nn.serial(nn.Dense(5), nn.Relu, nn.Dense(2))
    params, state = init(net, (3,), dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float32)
    y = jax.random.normal(jax.random.key(2), (4, 2), jnp.float32)
    report = check_grads(net, losses.mse, params, state, x, y)
    assert report.ok and max(r.rel_err for r in report.rows) <= 1e-10


# ------------------------------------------------- check_layer over every builtin layer

BUILTIN = [
    (nn.Dense(3), (5,)),
    (nn.Relu, (4,)),
    (nn.LeakyRelu(0.1), (4,)),
    (nn.Elu(), (4,)),
    (nn.Gelu, (4,)),
    (nn.Sigmoid, (4,)),
    (nn.Tanh, (4,)),
    (nn.Softplus, (4,)),
    (nn.Silu, (4,)),
    (nn.Softmax, (4,)),
    (nn.LogSoftmax, (4,)),
    (nn.Identity, (4,)),
    (nn.Flatten, (2, 3)),
    (nn.Reshape((3, 2)), (6,)),
    (nn.LayerNorm(), (5,)),
    (nn.BatchNorm(), (5,)),
    (nn.BatchNorm(), (3, 3, 2)),
    (nn.Dropout(0.5), (50,)),
    (nn.residual(nn.Dense(4)), (4,)),
    (nn.serial(nn.FanOut(2), nn.parallel(nn.Dense(2), nn.Tanh), nn.FanInConcat()), (3,)),
    (nn.serial(nn.FanOut(2), nn.parallel(nn.Dense(3), nn.Tanh), nn.FanInSum), (3,)),
]


@pytest.mark.parametrize("layer,shape", BUILTIN, ids=[str(layer) for layer, _ in BUILTIN])
def test_check_layer_passes_every_builtin_layer_in_both_modes(layer, shape):
    for train in (True, False):
        report = check_layer(layer, jax.random.key(0), shape, train=train)
        assert report.ok, str(report)


def test_check_layer_catches_a_wrong_declared_shape_and_a_state_changed_in_evaluation():
    report = check_layer(square_layer("shape"), jax.random.key(0), (4,))
    assert not report.ok
    assert "declared output shape" in str(report)
    bn = nn.BatchNorm()

    def forward(p, s, x, *, key=None, train=False, mask=None):  # forgets the mode
        return bn.forward(p, s, x, key=key, train=True, mask=mask)

    report = check_layer(bn._replace(forward=forward), jax.random.key(0), (3,), train=False)
    assert "train=False changed the state" in str(report) and not report.ok

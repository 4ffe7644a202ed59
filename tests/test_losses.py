"""Losses: one table, checked against jax.grad, finite differences and numpy formulas."""

import ast
import functools
import inspect
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import losses
from fbp.core import Loss, ShapeError

# ---------------------------------------------------------------------------------------------
# Independent numpy references (float64, the textbook formulas, not the stable forms)


def np_mse(p, t):
    return np.mean((p - t) ** 2)


def np_mae(p, t):
    return np.mean(np.abs(p - t))


def np_huber(delta):
    def f(p, t):
        d = np.abs(p - t)
        return np.mean(np.where(d <= delta, 0.5 * d**2, delta * (d - 0.5 * delta)))

    return f


def np_sigmoid_bce(x, t):
    s = 1.0 / (1.0 + np.exp(-x))
    return np.mean(-t * np.log(s) - (1.0 - t) * np.log(1.0 - s))


def np_softmax_ce(label_smoothing):
    def f(x, t):
        k = x.shape[-1]
        if t.dtype.kind in "iu":
            t = np.eye(k)[t]  # labels -> one-hot
        t = t * (1.0 - label_smoothing) + label_smoothing / k
        logp = x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))
        return np.mean(-np.sum(t * logp, axis=-1))

    return f


# ---------------------------------------------------------------------------------------------
# The table


class Case(NamedTuple):
    loss: Loss
    target: str  # "real" | "prob" | "labels" | "onehot" | "soft": how make_inputs builds it
    reference: Callable  # numpy (pred, target) -> loss value
    kink: float = 1.0  # "real" targets keep |pred - target| away from 0 and from this


ELEMENTWISE_SHAPES = [(1, 3), (4, 7), (5, 1), (2, 3, 5)]
CLASS_SHAPES = [(1, 3), (4, 7), (2, 3, 5)]  # softmax over the last axis

CASES = {
    "mse": Case(losses.mse, "real", np_mse),
    "mae": Case(losses.mae, "real", np_mae),
    "huber(0.5)": Case(losses.huber(0.5), "real", np_huber(0.5), kink=0.5),
    "huber()": Case(losses.huber(), "real", np_huber(1.0), kink=1.0),
    "huber(2.0)": Case(losses.huber(delta=2.0), "real", np_huber(2.0), kink=2.0),
    "sigmoid_bce": Case(losses.sigmoid_binary_cross_entropy, "prob", np_sigmoid_bce),
    "sce-labels": Case(losses.softmax_cross_entropy, "labels", np_softmax_ce(0.0)),
    "sce-onehot": Case(losses.softmax_cross_entropy, "onehot", np_softmax_ce(0.0)),
    "sce-soft": Case(losses.softmax_cross_entropy, "soft", np_softmax_ce(0.0)),
    "sce-smooth-labels": Case(
        losses.softmax_cross_entropy_smoothed(0.1), "labels", np_softmax_ce(0.1)
    ),
    "sce-smooth-soft": Case(losses.softmax_cross_entropy_smoothed(0.3), "soft", np_softmax_ce(0.3)),
}
CLASS_TARGETS = ("labels", "onehot", "soft")
LOGIT_CASES = [k for k, c in CASES.items() if c.target != "real"]


def shapes_of(case):
    return CLASS_SHAPES if case.target in CLASS_TARGETS else ELEMENTWISE_SHAPES


CASE_SHAPES = [
    pytest.param(name, shape, id=f"{name}-{shape}")
    for name, case in CASES.items()
    for shape in shapes_of(case)
]
CASE_IDS = list(CASES)
DTYPES = [jnp.float64, jnp.float32]
TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}


def make_inputs(case, shape, seed=0):
    """numpy float64 pred and a target (float64, or int64 labels) for ``case``."""
    rng = np.random.default_rng(seed)
    if case.target == "real":
        target = rng.normal(size=shape)
        far = rng.random(shape) < 0.5  # half inside (0.2, 0.8) kink, half in (1.25, 3) kink
        size = np.where(far, rng.uniform(1.25, 3.0, shape), rng.uniform(0.2, 0.8, shape))
        return target + case.kink * size * rng.choice([-1.0, 1.0], shape), target
    pred = 2.0 * rng.normal(size=shape)
    if case.target == "prob":  # probabilities, about a third exactly 0 or 1
        hard = rng.random(shape) < 0.3
        return pred, np.where(hard, rng.integers(0, 2, shape), rng.random(shape))
    labels = rng.integers(0, shape[-1], shape[:-1])
    if case.target == "labels":
        return pred, labels
    if case.target == "onehot":
        return pred, np.eye(shape[-1])[labels]
    soft = rng.random(shape)  # "soft": rows summing to 1, some entries exactly 0
    soft[soft < 0.25] = 0.0
    soft[..., 0] += 0.1
    return pred, soft / soft.sum(-1, keepdims=True)


def as_jax(pred, target, dtype):
    target = target if target.dtype.kind in "iu" else jnp.asarray(target, dtype)
    return jnp.asarray(pred, dtype), jnp.asarray(target)


def rel_err(a, b):
    """Normwise relative error max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


# ---------------------------------------------------------------------------------------------
# Gradient, value and dtype against the references


def fast_compile_options():
    """XLA options that compile the table's ~80 small programs about 2.5x faster on CPU (no
    LLVM optimisation, no fusion emitters; arithmetic unchanged up to rounding), or none where
    this jaxlib does not know them: compiling, not running, is most of this file's time."""
    options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    try:
        jax.jit(jnp.sin, compiler_options=options).lower(1.0).compile()
    except Exception:  # an option this jaxlib does not have
        return {}
    return options


jit = functools.partial(jax.jit, static_argnums=0, compiler_options=fast_compile_options())


@jit
def evaluate(loss, pred, target):
    """Hand-written value and grad, plain value, its jax.grad and (float64) central differences
    (f(p + eps e_i) - f(p - eps e_i)) / 2 eps, in one compiled call: compiling is most of a
    test's cost, and jit reuses it for the same loss, shapes and dtypes."""
    value, grad = loss.value_and_grad(pred, target)
    out = {"value": value, "grad": grad, "reference_value": loss.value(pred, target)}
    out["autodiff_grad"] = jax.grad(loss.value)(pred, target)
    if pred.dtype == jnp.float64:
        eps, n = 1e-6, pred.size
        steps = eps * jnp.eye(n, dtype=pred.dtype).reshape((n, *pred.shape))  # one per element
        f = jax.vmap(loss.value, in_axes=(0, None))
        fd = (f(pred[None] + steps, target) - f(pred[None] - steps, target)) / (2 * eps)
        out["fd_grad"] = fd.reshape(pred.shape)
    return out


@functools.cache
def results(name, shape, dtype):
    """Inputs (numpy) and :func:`evaluate`'s outputs for one row of the table."""
    pred, target = as_jax(*make_inputs(CASES[name], shape), dtype)
    return np.asarray(pred), np.asarray(target), evaluate(CASES[name].loss, pred, target)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "shape"), CASE_SHAPES)
def test_grad_matches_jax_grad(name, shape, dtype):
    _, _, r = results(name, shape, dtype)
    assert rel_err(r["grad"], r["autodiff_grad"]) < TOL[dtype]


@pytest.mark.parametrize(("name", "shape"), CASE_SHAPES)
def test_grad_matches_finite_differences(name, shape):
    _, _, r = results(name, shape, jnp.float64)
    assert rel_err(r["grad"], r["fd_grad"]) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "shape"), CASE_SHAPES)
def test_value_matches_numpy_reference(name, shape, dtype):
    pred, target, r = results(name, shape, dtype)
    expected = CASES[name].reference(pred.astype(np.float64), target)
    rtol = TOL[dtype] if dtype == jnp.float64 else 1e-6
    np.testing.assert_allclose(r["reference_value"], expected, rtol=rtol)
    np.testing.assert_allclose(r["value"], expected, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "shape"), CASE_SHAPES)
def test_value_and_grad_value_matches_value_and_keeps_dtype(name, shape, dtype):
    _, _, r = results(name, shape, dtype)
    assert r["value"].shape == r["reference_value"].shape == ()
    assert r["value"].dtype == r["reference_value"].dtype == dtype
    assert r["grad"].shape == shape and r["grad"].dtype == dtype
    rtol = 1e-13 if dtype == jnp.float64 else 1e-6
    np.testing.assert_allclose(r["value"], r["reference_value"], rtol=rtol)


@pytest.mark.parametrize("name", CASE_IDS)
def test_float32_pred_with_float64_target_stays_float32(name):
    case = CASES[name]
    pred, target = make_inputs(case, (2, 3, 5))
    pred = jnp.asarray(pred, jnp.float32)
    target = jnp.asarray(target)  # float64 targets, or int64 labels
    value, grad = case.loss.value_and_grad(pred, target)
    assert value.dtype == grad.dtype == case.loss.value(pred, target).dtype == jnp.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASE_IDS)
def test_jit_matches_eager(name, dtype):
    case = CASES[name]
    pred, target = as_jax(*make_inputs(case, (2, 3, 5)), dtype)
    value, grad = case.loss.value_and_grad(pred, target)  # eager, op by op
    _, _, r = results(name, (2, 3, 5), dtype)  # jit-compiled
    rtol = 1e-12 if dtype == jnp.float64 else 1e-6
    np.testing.assert_allclose(r["value"], value, rtol=rtol)
    np.testing.assert_allclose(r["reference_value"], case.loss.value(pred, target), rtol=rtol)
    np.testing.assert_allclose(r["grad"], grad, rtol=rtol, atol=rtol * np.max(np.abs(grad)))


# ---------------------------------------------------------------------------------------------
# Numerical stability: huge logits and -inf masks


def finite_results(loss, pred, target):
    """:func:`evaluate`'s outputs, after checking both values and both gradients are finite."""
    r = evaluate(loss, pred, target)
    assert np.isfinite(r["value"]) and np.isfinite(r["reference_value"])
    assert np.all(np.isfinite(r["grad"])) and np.all(np.isfinite(r["autodiff_grad"]))
    return r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LOGIT_CASES)
def test_huge_logits_give_finite_loss_and_grads(name, dtype):
    case = CASES[name]
    pred, target = make_inputs(case, (4, 7))
    pred = 1e4 * pred / np.max(np.abs(pred))  # magnitudes up to 1e4
    r = finite_results(case.loss, *as_jax(pred, target, dtype))
    assert rel_err(r["grad"], r["autodiff_grad"]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits_known_values(dtype):
    x, t = jnp.array([[1e4, -1e4, 1e4]], dtype), jnp.array([[0.0, 1.0, 1.0]], dtype)
    r = evaluate(losses.sigmoid_binary_cross_entropy, x, t)  # a wrong logit costs 1e4
    np.testing.assert_allclose(r["value"], 2e4 / 3, rtol=1e-6)
    np.testing.assert_allclose(r["grad"], [[1 / 3, -1 / 3, 0.0]], atol=1e-7)

    x, labels = jnp.array([[1e4, 0.0, -1e4]], dtype), jnp.array([2])
    r = evaluate(losses.softmax_cross_entropy, x, labels)  # -log p_2 = 2e4
    np.testing.assert_allclose(r["value"], 2e4, rtol=1e-6)
    np.testing.assert_allclose(r["grad"], [[1.0, 0.0, -1.0]], atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["sce-labels", "sce-onehot", "sce-soft"])
def test_masked_logits_equal_the_loss_without_those_classes(name, dtype):
    case = CASES[name]
    pred, target = make_inputs(case, (4, 7))
    masked, keep = [1, 4], [0, 2, 3, 5, 6]
    labels = np.array(keep)[np.arange(4) % len(keep)]  # no label on a masked class
    if case.target == "labels":
        target = labels
    elif case.target == "onehot":
        target = np.eye(7)[labels]
    else:
        target[:, masked] = 0.0
        target /= target.sum(-1, keepdims=True)
    pred[:, masked] = -np.inf
    pred = pred.astype(dtype)  # the numpy reference below sees the same (rounded) logits
    r = finite_results(case.loss, *as_jax(pred, target, dtype))

    # the loss of the same problem with the masked classes removed, and its gradient (p - t) / B
    one_hot = np.eye(7)[labels] if case.target == "labels" else target
    sub_pred, sub_target = pred[:, keep].astype(np.float64), one_hot[:, keep]
    sub_p = np.exp(sub_pred) / np.exp(sub_pred).sum(-1, keepdims=True)
    np.testing.assert_allclose(r["value"], np_softmax_ce(0.0)(sub_pred, sub_target), rtol=1e-6)
    assert np.all(r["grad"][:, masked] == 0.0) and np.all(r["autodiff_grad"][:, masked] == 0.0)
    np.testing.assert_allclose(r["grad"][:, keep], (sub_p - sub_target) / 4, rtol=1e-5, atol=1e-7)
    assert rel_err(r["grad"], r["autodiff_grad"]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_logits_sigmoid_bce(dtype):
    x = jnp.array([[0.5, -np.inf], [-np.inf, -1.0]], dtype)
    t = jnp.array([[1.0, 0.0], [0.0, 0.3]], dtype)
    r = finite_results(losses.sigmoid_binary_cross_entropy, x, t)
    expected = (np_sigmoid_bce(0.5, 1.0) + np_sigmoid_bce(-1.0, 0.3)) / 4  # masked ones cost 0
    np.testing.assert_allclose(r["value"], expected, rtol=TOL[dtype])
    assert r["grad"][0, 1] == r["grad"][1, 0] == 0.0
    assert rel_err(r["grad"], r["autodiff_grad"]) < TOL[dtype]


def test_label_smoothing_with_masked_logit_is_inf_with_finite_grads():
    loss = losses.softmax_cross_entropy_smoothed(0.1)
    x, labels = jnp.array([[1.0, -jnp.inf, 0.0]]), jnp.array([0])
    r = evaluate(loss, x, labels)  # the masked class has target 0.1 / 3 > 0
    assert r["value"] == r["reference_value"] == np.inf
    assert np.all(np.isfinite(r["grad"])) and np.all(np.isfinite(r["autodiff_grad"]))


# ---------------------------------------------------------------------------------------------
# Targets: label dtypes, label smoothing, subgradients


@pytest.mark.parametrize("label_dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.int32, jnp.int64])
def test_integer_labels_of_any_int_dtype_equal_one_hot(label_dtype):
    pred, labels = make_inputs(CASES["sce-labels"], (2, 3, 5))
    pred = jnp.asarray(pred, jnp.float32)
    one_hot = jnp.asarray(np.eye(5)[labels], jnp.float32)
    for loss in (losses.softmax_cross_entropy, losses.softmax_cross_entropy_smoothed(0.2)):
        value, grad = loss.value_and_grad(pred, jnp.asarray(labels, label_dtype))
        expected_value, expected_grad = loss.value_and_grad(pred, one_hot)
        np.testing.assert_allclose(value, expected_value, rtol=1e-6)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-8)


def test_label_smoothing_follows_optax_convention():
    pred, labels = make_inputs(CASES["sce-labels"], (2, 3, 5))
    a, k = 0.2, 5
    smoothed = jnp.asarray(np.eye(k)[labels] * (1 - a) + a / k)  # t' = t (1 - a) + a / K
    loss = losses.softmax_cross_entropy_smoothed(a)
    for got, want in zip(
        loss.value_and_grad(pred, labels),
        losses.softmax_cross_entropy.value_and_grad(pred, smoothed),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    no_smoothing = losses.softmax_cross_entropy_smoothed(0.0)
    assert no_smoothing.value(pred, labels) == losses.softmax_cross_entropy.value(pred, labels)


def test_targets_need_not_sum_to_one():
    pred, target = make_inputs(CASES["sce-soft"], (4, 7))
    target = target * np.array([[0.5], [1.0], [2.0], [0.0]])  # row sums 0.5, 1, 2, 0
    r = evaluate(losses.softmax_cross_entropy, jnp.asarray(pred), jnp.asarray(target))
    assert rel_err(r["grad"], r["autodiff_grad"]) < 1e-10  # dx = (p sum(t) - t) / B
    np.testing.assert_allclose(r["value"], np_softmax_ce(0.0)(pred, target), rtol=1e-10)


def test_mae_subgradient_is_zero_where_pred_equals_target():
    pred, target = jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 0.0, 5.0])
    np.testing.assert_array_equal(losses.mae.grad(pred, target), [0.0, 1 / 3, -1 / 3])


def test_huber_is_quadratic_inside_and_linear_outside():
    loss = losses.huber(delta=2.0)
    pred, target = jnp.array([1.0, 5.0, -3.0]), jnp.zeros(3)
    value, grad = loss.value_and_grad(pred, target)
    np.testing.assert_allclose(value, (0.5 + 2.0 * (5 - 1) + 2.0 * (3 - 1)) / 3)
    np.testing.assert_allclose(grad, [1 / 3, 2 / 3, -2 / 3])


# ---------------------------------------------------------------------------------------------
# Kinks, on purpose: the hand-written gradient and jax.grad of ``value`` both give the documented
# derivative, written out here by hand (mean over n = 6 elements, or over B = 3 rows).

KINKS = [
    # (loss, pred, target, expected gradient)
    (losses.mae, [[1.0, -0.0], [2.0, 0.0], [-3.0, 5.0]], [[1.0, 0.0], [0.0, -0.0], [-3.0, 4.0]],
     [[0.0, 0.0], [1 / 6, 0.0], [0.0, 1 / 6]]),  # p == t: the subgradient 0
    (losses.huber(0.5), [[0.5, -0.5], [1.5, 0.0], [2.0, 0.0]], [[0.0, 0.0], [1.0, -0.5], [2.0, 0.0]],
     [[0.5 / 6, -0.5 / 6], [0.5 / 6, 0.5 / 6], [0.0, 0.0]]),  # |d| == delta: +-delta / n
    (losses.huber(), [[1.0, -1.0], [0.0, -0.0], [3.0, 2.0]], [[0.0, 0.0], [0.0, 0.0], [2.0, 3.0]],
     [[1 / 6, -1 / 6], [0.0, 0.0], [1 / 6, -1 / 6]]),
    (losses.sigmoid_binary_cross_entropy, [[0.0, 0.0], [-0.0, 0.0], [0.0, 0.0]],
     [[1.0, 0.0], [0.5, 0.25], [1.0, 1.0]],
     [[-0.5 / 6, 0.5 / 6], [0.0, 0.25 / 6], [-0.5 / 6, -0.5 / 6]]),  # logit 0: (1/2 - t) / n
    (losses.softmax_cross_entropy, [[0.0, 0.0, 0.0], [1.0, 1.0, -1.0], [2.0, 2.0, 2.0]],
     np.array([0, 1, 2]),
     [[(1 / 3 - 1) / 3, 1 / 9, 1 / 9], None, [1 / 9, 1 / 9, (1 / 3 - 1) / 3]]),  # ties in max
]  # fmt: skip


@pytest.mark.parametrize("loss,pred,target,expected", KINKS, ids=[k[0].name for k in KINKS])
def test_gradient_at_kinks_is_the_documented_one_by_hand_and_by_autodiff(
    loss, pred, target, expected
):
    pred = jnp.asarray(pred, jnp.float64)
    target = (
        jnp.asarray(target)
        if np.asarray(target).dtype.kind in "iu"
        else jnp.asarray(target, jnp.float64)
    )
    _, grad = loss.value_and_grad(pred, target)
    autodiff = jax.grad(loss.value)(pred, target)
    np.testing.assert_allclose(grad, autodiff, rtol=1e-15, atol=1e-17)
    for row, want in enumerate(expected):
        if want is not None:
            np.testing.assert_allclose(grad[row], want, rtol=1e-14, atol=1e-17)


def test_a_zero_initialised_logistic_regression_gets_the_true_gradient_through_autodiff():
    """The audit's case: at logits of exactly 0, jax.grad of the plain loss must give
    (sigmoid(0) - t) / n = (1/2 - t) / n, as the hand-written gradient does."""
    g = jax.grad(losses.sigmoid_binary_cross_entropy)(jnp.zeros(2), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(g, [-0.25, 0.25], rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# Masks: padding out of the mean, zero gradient on it


@pytest.mark.parametrize("name", CASE_IDS)
def test_a_mask_gives_the_loss_and_gradient_of_the_real_rows_alone(name):
    case = CASES[name]
    pred, target = as_jax(*make_inputs(case, (5, 3)), jnp.float64)
    mask = jnp.array([True, False, True, True, False])
    value, grad = case.loss.value_and_grad(pred, target, mask)
    sub_value, sub_grad = case.loss.value_and_grad(pred[mask], target[mask])
    np.testing.assert_allclose(value, sub_value, rtol=1e-14)
    np.testing.assert_allclose(grad[np.asarray(mask)], sub_grad, rtol=1e-14, atol=1e-17)
    np.testing.assert_array_equal(grad[~np.asarray(mask)], 0.0)
    np.testing.assert_allclose(case.loss.value(pred, target, mask), sub_value, rtol=1e-14)
    autodiff = jax.grad(case.loss.value)(pred, target, mask)
    np.testing.assert_allclose(grad, autodiff, rtol=1e-13, atol=1e-17)


def test_sequence_logits_with_a_time_mask_average_over_real_tokens():
    """(batch, time, classes) logits with (batch, time) labels: the mean over real tokens."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 4, 5)))
    labels = jnp.asarray(rng.integers(0, 5, (2, 4)))
    mask = jnp.array([[True, True, True, False], [True, False, False, False]])
    value, grad = SCE.value_and_grad(logits, labels, mask)
    logp = np.asarray(jax.nn.log_softmax(logits))
    per_token = -np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]
    np.testing.assert_allclose(value, per_token[np.asarray(mask)].mean(), rtol=1e-14)
    np.testing.assert_allclose(grad, jax.grad(SCE.value)(logits, labels, mask), rtol=1e-13,
                               atol=1e-17)  # fmt: skip
    np.testing.assert_array_equal(grad[0, 3], 0.0)


def test_an_all_padding_batch_has_loss_zero_and_no_gradient():
    pred, target = jnp.ones((3, 2)), jnp.zeros((3, 2))
    value, grad = losses.mse.value_and_grad(pred, target, jnp.zeros(3, bool))
    assert float(value) == 0.0 and not np.any(grad)


def test_a_mask_that_does_not_fit_is_refused():
    with pytest.raises(ShapeError, match=r"mse: mask should be booleans over the leading axes"):
        losses.mse.value(jnp.ones((3, 2)), jnp.ones((3, 2)), jnp.ones(2, bool))
    with pytest.raises(ShapeError, match="mask"):
        SCE.value(jnp.ones((3, 2)), jnp.zeros(3, jnp.int32), jnp.ones(3))  # not booleans


# ---------------------------------------------------------------------------------------------
# Errors: shapes named, never broadcast; non-float pred; bad options

SCE = losses.softmax_cross_entropy
SHAPE_ERRORS = [
    (losses.mse, (4, 1), (4,), "float"),  # would broadcast to (4, 4)
    (losses.mse, (4,), (4, 1), "float"),
    (losses.mae, (3, 2), (2, 3), "float"),
    (losses.huber(), (4, 1), (4,), "float"),
    (losses.sigmoid_binary_cross_entropy, (4, 1), (4,), "float"),
    (losses.sigmoid_binary_cross_entropy, (2, 3, 5), (2, 3), "float"),
    (SCE, (4, 3), (5,), "int"),  # wrong label batch size
    (SCE, (4, 3), (4, 1), "int"),
    (SCE, (4, 3), (4, 3), "int"),  # integer one-hot: one-hot targets must be floating
    (SCE, (4, 3), (4,), "float"),  # float labels
    (SCE, (4, 3), (4, 4), "float"),
    (SCE, (2, 3, 5), (2, 5), "int"),
    (losses.softmax_cross_entropy_smoothed(0.1), (4, 3), (3,), "int"),
]


@pytest.mark.parametrize(
    ("loss", "pred_shape", "target_shape", "kind"),
    SHAPE_ERRORS,
    ids=[f"{c[0].name}-{c[1]}-{c[2]}-{c[3]}" for c in SHAPE_ERRORS],
)
def test_shape_mismatch_raises_naming_loss_and_both_shapes(loss, pred_shape, target_shape, kind):
    pred = jnp.zeros(pred_shape)
    target = jnp.zeros(target_shape, jnp.int32 if kind == "int" else jnp.float64)
    for fn in (loss.value, loss.value_and_grad, jax.jit(loss.value_and_grad)):
        with pytest.raises(ShapeError, match=re.escape(loss.name)) as info:
            fn(pred, target)
        message = str(info.value)
        assert str(pred_shape) in message and str(target_shape) in message
        if loss.name.startswith("softmax"):
            assert "integer labels" in message and "probability targets" in message


def test_softmax_cross_entropy_needs_a_class_axis():
    with pytest.raises(ShapeError, match=r"class \(last\) axis"):
        SCE.value(jnp.array(1.0), jnp.array(0))


@pytest.mark.parametrize("name", CASE_IDS)
def test_non_float_pred_raises(name):
    case = CASES[name]
    pred, target = make_inputs(case, (2, 3))
    pred, target = jnp.asarray(pred).astype(jnp.int32), jnp.asarray(target)
    for fn in (case.loss.value, case.loss.value_and_grad):
        with pytest.raises(TypeError, match=r"floating dtype, got int32"):
            fn(pred, target)


@pytest.mark.parametrize("delta", [0.0, -1.0])
def test_huber_rejects_nonpositive_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        losses.huber(delta)


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.0, 1.5])
def test_label_smoothing_out_of_range_raises(label_smoothing):
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.softmax_cross_entropy_smoothed(label_smoothing)


# ---------------------------------------------------------------------------------------------
# Surface


def test_names_and_public_surface():
    assert [repr(loss) for loss in (losses.mse, losses.huber(0.5), SCE)] == [
        "mse",
        "huber(delta=0.5)",
        "softmax_cross_entropy",
    ]
    for name in set(losses.__all__) - {"check_labels"}:  # check_labels is a host-side check
        obj = getattr(losses, name)
        assert isinstance(obj, Loss) or isinstance(obj(0.1), Loss)


def test_gradients_are_hand_written():
    autodiff = {"grad", "value_and_grad", "vjp", "jvp", "linearize", "custom_jvp", "custom_vjp"}
    for node in ast.walk(ast.parse(inspect.getsource(losses))):
        assert not (isinstance(node, ast.Attribute) and node.attr in autodiff), node.attr
        assert not (isinstance(node, ast.ImportFrom) and node.module.startswith("jax"))

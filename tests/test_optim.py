"""fbp.optim against NumPy float64 references written from each optimizer's formula (optax's),
against PyTorch's and Keras's update rules written out, on a quadratic and on Rosenbrock, under
jit and lax.scan, for dtypes, recompilation, clipping and bad input.

The references below are plain loops over lists of float64 arrays; they never call fbp.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import optim, schedules
from fbp.core import Optimizer, ShapeError

N_STEPS = 100
RTOL = 1e-10

# A nested params tree: dicts, a tuple and a scalar leaf.
SHAPES = {"dense": {"w": (4, 3), "b": (3,)}, "extra": ((2,), ())}


def is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def make_params(seed: int = 0, dtypes=(np.float64,)):
    """Random params with SHAPES; leaf i gets dtypes[i % len(dtypes)]."""
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=s) for s in jax.tree.leaves(SHAPES, is_leaf=is_shape)]
    arrays = [jnp.asarray(x, dtypes[i % len(dtypes)]) for i, x in enumerate(arrays)]
    return jax.tree.unflatten(jax.tree.structure(SHAPES, is_leaf=is_shape), arrays)


def make_grads(n: int, seed: int = 1) -> list:
    """n gradient trees (float64 numpy), with norms varying over a factor of ~30."""
    rng = np.random.default_rng(seed)
    grads = []
    for _ in range(n):
        scale = rng.uniform(0.1, 3.0)
        grads.append(
            jax.tree.map(
                lambda s, k=scale: k * rng.normal(size=s),
                SHAPES,
                is_leaf=is_shape,
            )
        )
    return grads


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def lr_schedule(count):
    """A test schedule: 0.05 * 0.98**count (jnp, so it works on a traced int32 count)."""
    return 0.05 * 0.98 ** jnp.asarray(count, float)


def lr_at(learning_rate, t: int) -> float:
    return float(learning_rate(t)) if callable(learning_rate) else learning_rate


# ---------------------------------------------------------------------------------------------
# References written from the formulas (optax's update rules), float64, one leaf at a time.


def ref_sgd(p, grads, learning_rate, momentum=0.0, nesterov=False):
    p = [x.copy() for x in p]
    m = [np.zeros_like(x) for x in p]
    for t, g in enumerate(grads):
        lr = lr_at(learning_rate, t)  # schedule at the count before the update
        for i in range(len(p)):
            if momentum:
                m[i] = g[i] + momentum * m[i]
                d = g[i] + momentum * m[i] if nesterov else m[i]
            else:
                d = g[i]
            p[i] = p[i] - lr * d
    return p, ({"trace": m} if momentum else {})


def ref_rmsprop(
    p,
    grads,
    learning_rate,
    decay=0.9,
    eps=1e-8,
    initial_scale=0.0,
    eps_in_sqrt=True,
    centered=False,
    momentum=0.0,
    nesterov=False,
    bias_correction=False,
):
    p = [x.copy() for x in p]
    nu = [np.full_like(x, initial_scale) for x in p]
    mu, m = ([np.zeros_like(x) for x in p] for _ in range(2))
    for t, g in enumerate(grads, start=1):
        lr = lr_at(learning_rate, t - 1)
        for i in range(len(p)):
            nu[i] = decay * nu[i] + (1 - decay) * g[i] ** 2
            correction = (1 - decay**t) if bias_correction else 1.0
            var = nu[i] / correction
            if centered:
                mu[i] = decay * mu[i] + (1 - decay) * g[i]
                var = var - (mu[i] / correction) ** 2
            if eps_in_sqrt:
                u = lr * g[i] / np.sqrt(var + eps)
            else:
                u = lr * g[i] / (np.sqrt(var) + eps)
            if momentum:  # optax: trace after scale_by_learning_rate
                m[i] = u + momentum * m[i]
                u = u + momentum * m[i] if nesterov else m[i]
            p[i] = p[i] - u
    bufs = {"nu": nu}
    if centered:
        bufs["mu"] = mu
    if momentum:
        bufs["trace"] = m
    return p, bufs


def ref_adam(
    p, grads, learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.0,
    eps_hat=False, nesterov=False, mask=None,
):  # fmt: skip
    p = [x.copy() for x in p]
    mu = [np.zeros_like(x) for x in p]
    nu = [np.zeros_like(x) for x in p]
    decayed = [True] * len(p) if mask is None else mask
    for t, g in enumerate(grads, start=1):  # bias correction counts from t = 1
        lr = lr_at(learning_rate, t - 1)
        for i in range(len(p)):
            mu[i] = b1 * mu[i] + (1 - b1) * g[i]
            nu[i] = b2 * nu[i] + (1 - b2) * g[i] ** 2
            if eps_hat:  # Kingma & Ba, just before section 2.1
                lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                step = lr_t * mu[i] / (np.sqrt(nu[i]) + eps)
            else:  # Algorithm 1; Dozat's NAdam as optax writes it
                if nesterov:
                    mhat = b1 * mu[i] / (1 - b1 ** (t + 1)) + (1 - b1) * g[i] / (1 - b1**t)
                else:
                    mhat = mu[i] / (1 - b1**t)
                vhat = nu[i] / (1 - b2**t)
                step = lr * mhat / (np.sqrt(vhat + eps_root) + eps)
            wd = weight_decay if decayed[i] else 0.0
            p[i] = p[i] - step - lr * wd * p[i]
    return p, {"mu": mu, "nu": nu}


def ref_adamw(p, grads, learning_rate=1e-3, weight_decay=1e-4, mask=None, **kw):
    if mask is not None:  # the test's mask: decay the leaves with more than one axis
        mask = [x.ndim > 1 for x in p]
    return ref_adam(p, grads, learning_rate, weight_decay=weight_decay, mask=mask, **kw)


REFERENCES = {"sgd": ref_sgd, "rmsprop": ref_rmsprop, "adam": ref_adam, "adamw": ref_adamw}

CASES = [
    ("sgd", dict(learning_rate=0.05)),
    ("sgd", dict(learning_rate=0.05, momentum=0.9)),
    ("sgd", dict(learning_rate=0.05, momentum=0.9, nesterov=True)),
    ("sgd", dict(learning_rate=lr_schedule, momentum=0.5)),
    ("rmsprop", dict(learning_rate=0.01)),
    ("rmsprop", dict(learning_rate=0.01, centered=True)),
    ("rmsprop", dict(learning_rate=0.01, momentum=0.9)),
    ("rmsprop", dict(learning_rate=0.01, momentum=0.9, nesterov=True)),
    ("rmsprop", dict(learning_rate=0.01, decay=0.99, eps=1e-3, eps_in_sqrt=False)),
    ("rmsprop", dict(learning_rate=0.01, initial_scale=1.0)),
    ("rmsprop", dict(learning_rate=0.01, eps=1e-3, bias_correction=True)),
    ("rmsprop", dict(learning_rate=0.01, eps=1e-1, centered=True, bias_correction=True)),
    (
        "rmsprop",
        dict(learning_rate=lr_schedule, eps=1e-3, centered=True, momentum=0.5, eps_in_sqrt=False),
    ),
    ("adam", dict()),
    ("adam", dict(learning_rate=0.01, b1=0.0, b2=0.9, eps=1e-3)),
    ("adam", dict(learning_rate=0.01, eps=1e-3, eps_hat=True)),
    ("adam", dict(learning_rate=lr_schedule)),
    ("adam", dict(learning_rate=0.01, eps=1e-3, eps_root=1e-4)),
    ("adam", dict(learning_rate=0.01, nesterov=True)),
    ("adamw", dict()),
    ("adamw", dict(learning_rate=0.01, weight_decay=0.1)),
    ("adamw", dict(learning_rate=lr_schedule, weight_decay=0.1, eps=1e-3, eps_hat=True)),
    (
        "adamw",
        dict(
            learning_rate=0.01,
            weight_decay=0.1,
            mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
        ),
    ),
]


def case_id(case) -> str:
    name, kw = case
    args = [f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items()]
    return "-".join([name, *args])


def make_opt(case) -> Optimizer:
    name, kw = case
    return getattr(optim, name)(**kw)


def run(opt: Optimizer, params, grads: list):
    """A Python loop of jitted updates; returns (params, state)."""
    step = jax.jit(opt.update)
    state = opt.init(params)
    for g in grads:
        params, state = step(g, params, state)
    return params, state


def assert_state_matches(state, bufs: dict, count: int) -> None:
    """Buffers the reference keeps must match; every other buffer must be None (not kept)."""
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    assert int(state.count) == count
    for field in state._fields:
        if field == "count":
            continue
        value = getattr(state, field)
        if field in bufs:
            for got, want in zip(leaves(value), bufs[field], strict=True):
                np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-14, err_msg=field)
        else:
            assert value is None, f"{field} is kept but unused"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_numpy_reference(case):
    name, kw = case
    params, grads = make_params(), make_grads(N_STEPS)
    got_p, state = run(make_opt(case), params, grads)
    want_p, bufs = REFERENCES[name](leaves(params), [leaves(g) for g in grads], **kw)
    for got, want in zip(leaves(got_p), want_p, strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-14)
    assert_state_matches(state, bufs, N_STEPS)


E = inspect.Parameter.empty
# optax's documented signatures (optax/_src/alias.py, optax 0.2.x), written out here: name,
# default, kind. "P" is positional-or-keyword, "K" keyword-only.
OPTAX_SIGNATURES = {
    "sgd": [("learning_rate", E, "P"), ("momentum", None, "P"), ("nesterov", False, "P"),
            ("accumulator_dtype", None, "P")],
    "rmsprop": [("learning_rate", E, "P"), ("decay", 0.9, "P"), ("eps", 1e-8, "P"),
                ("initial_scale", 0.0, "P"), ("eps_in_sqrt", True, "P"), ("centered", False, "P"),
                ("momentum", None, "P"), ("nesterov", False, "P"),
                ("bias_correction", False, "P")],
    "adam": [("learning_rate", E, "P"), ("b1", 0.9, "P"), ("b2", 0.999, "P"), ("eps", 1e-8, "P"),
             ("eps_root", 0.0, "P"), ("mu_dtype", None, "P"), ("nesterov", False, "K")],
    "adamw": [("learning_rate", E, "P"), ("b1", 0.9, "P"), ("b2", 0.999, "P"),
              ("eps", 1e-8, "P"), ("eps_root", 0.0, "P"), ("mu_dtype", None, "P"),
              ("weight_decay", 1e-4, "P"), ("mask", None, "P"), ("nesterov", False, "K")],
}  # fmt: skip
# Where fbp differs on purpose (README): adam and adamw default learning_rate to 1e-3.
FBP_DEFAULTS = {("adam", "learning_rate"): 1e-3, ("adamw", "learning_rate"): 1e-3}


@pytest.mark.parametrize("name", list(OPTAX_SIGNATURES))
def test_positional_order_and_defaults_are_optax(name):
    """optax's positional arguments, in optax's order and with its defaults; every option optax
    lacks is keyword-only, so an optax-style positional call builds the optax optimizer."""
    params = inspect.signature(getattr(optim, name)).parameters
    kind = {"P": inspect.Parameter.POSITIONAL_OR_KEYWORD, "K": inspect.Parameter.KEYWORD_ONLY}
    positional = [n for n, p in params.items() if p.kind == kind["P"]]
    assert positional == [n for n, _, k in OPTAX_SIGNATURES[name] if k == "P"]
    for arg, default, k in OPTAX_SIGNATURES[name]:
        assert params[arg].kind == kind[k], arg
        assert params[arg].default == FBP_DEFAULTS.get((name, arg), default), arg
    optax_names = {n for n, _, _ in OPTAX_SIGNATURES[name]}
    for arg, p in params.items():
        if arg not in optax_names:
            assert p.kind == kind["K"], f"{arg} is fbp's own option: it must be keyword-only"


def test_an_optax_style_positional_call_builds_the_optax_optimizer():
    """optax.rmsprop(lr, decay, eps, initial_scale) and optax.adamw(lr, b1, b2, eps, eps_root,
    mu_dtype, weight_decay): the same update as the keyword call."""
    params, grads = make_params(), make_grads(5)
    pairs = [
        (optim.rmsprop(0.01, 0.9, 1e-8, 1.0), optim.rmsprop(0.01, initial_scale=1.0)),
        (optim.adamw(0.01, 0.9, 0.999, 1e-8, 1e-4, None, 0.3),
         optim.adamw(0.01, eps_root=1e-4, weight_decay=0.3)),
    ]  # fmt: skip
    for positional, keyword in pairs:
        a, _ = run(positional, params, grads)
        b, _ = run(keyword, params, grads)
        for x, y in zip(leaves(a), leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "case",
    [("adam", {}), ("sgd", {"learning_rate": 0.1, "momentum": 0.9}),
     ("rmsprop", {"learning_rate": 0.01, "bias_correction": True})],
    ids=case_id,
)  # fmt: skip
def test_count_saturates_at_the_int32_maximum(case):
    """optax's safe_increment: the count stops at 2**31 - 1 instead of wrapping to -2**31."""
    opt = make_opt(case)
    params = make_params()
    state = opt.init(params)._replace(count=jnp.asarray(2**31 - 2, jnp.int32))
    g = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        params, state = jax.jit(opt.update)(g, params, state)
        assert int(state.count) == 2**31 - 1
    assert all(np.all(np.isfinite(x)) for x in leaves(params))


def test_the_obvious_jit_with_donation_updates_in_place_and_matches():
    """jax.jit(opt.update, donate_argnums=(1, 2)): update returns (params, state) in the order
    it takes them, so the donated buffers pair with the right outputs."""
    opt = optim.adam(0.01)
    params, grads = make_params(), make_grads(3)
    want, _ = run(opt, params, grads)
    step = jax.jit(opt.update, donate_argnums=(1, 2))
    p, s = jax.tree.map(jnp.array, params), opt.init(params)
    for g in grads:
        p, s = step(g, p, s)
    for x, y in zip(leaves(p), leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)
    text = step.lower(grads[0], p, s).as_text()
    assert "tf.aliasing_output" in text or "jax.buffer_donor" in text


def test_the_old_argument_order_is_refused_with_the_fix():
    opt = optim.adam()
    params = make_params()
    with pytest.raises(TypeError, match=r"update takes \(grads, params, opt_state\)"):
        opt.update(params, opt.init(params), params)


def test_mu_dtype_and_accumulator_dtype_set_the_buffer_dtypes():
    params = {"w": jnp.ones((3,), jnp.float32)}
    grads = {"w": jnp.full((3,), 0.5, jnp.float32)}
    opt = optim.adam(0.1, mu_dtype=jnp.bfloat16)
    state = opt.init(params)
    assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.float32
    p, state = opt.update(grads, params, state)
    assert state.mu["w"].dtype == jnp.bfloat16 and p["w"].dtype == jnp.float32
    sgd = optim.sgd(0.1, 0.9, False, jnp.bfloat16)
    assert sgd.init(params).trace["w"].dtype == jnp.bfloat16


def test_first_update_uses_lr_at_count_zero():
    """The schedule sees count 0, 1, 2, ... before each update (recorded in eager mode)."""
    seen = []

    def schedule(count):
        seen.append(int(count))
        return jnp.where(count == 0, 0.5, 0.0)  # only the first update moves

    opt = optim.sgd(schedule)
    p = {"w": jnp.asarray([1.0, -2.0])}
    g = {"w": jnp.asarray([0.2, 0.4])}
    state = opt.init(p)
    p1, state = opt.update(g, p, state)
    p2, state = opt.update(g, p1, state)
    p3, state = opt.update(g, p2, state)
    assert seen == [0, 1, 2]
    np.testing.assert_allclose(p1["w"], [0.9, -2.2], rtol=1e-15)
    np.testing.assert_array_equal(p3["w"], p1["w"])


def test_adam_bias_correction_counts_from_one():
    """With t = 1 on the first update, mhat = g and vhat = g**2: the step is lr * g/(|g|+eps)."""
    p = jnp.asarray([0.5, -1.0, 2.0])
    g = jnp.asarray([1e-3, -4.0, 30.0])
    opt = optim.adam(0.1, eps=0.0)
    new_p, state = opt.update(g, p, opt.init(p))
    np.testing.assert_allclose(new_p, p - 0.1 * np.sign(g), rtol=1e-14)
    assert int(state.count) == 1


# ---------------------------------------------------------------------------------------------
# Other frameworks' conventions, each written from that framework's documented algorithm.


def torch_rmsprop(p, grads, lr, alpha, eps, momentum, centered):
    """torch.optim.RMSprop (weight_decay=0): eps outside the root, momentum on g/avg."""
    p = [x.copy() for x in p]
    square_avg, grad_avg, buf = ([np.zeros_like(x) for x in p] for _ in range(3))
    for g in grads:
        for i in range(len(p)):
            square_avg[i] = alpha * square_avg[i] + (1 - alpha) * g[i] * g[i]
            if centered:
                grad_avg[i] = alpha * grad_avg[i] + (1 - alpha) * g[i]
                avg = np.sqrt(square_avg[i] - grad_avg[i] ** 2) + eps
            else:
                avg = np.sqrt(square_avg[i]) + eps
            if momentum > 0:
                buf[i] = momentum * buf[i] + g[i] / avg
                p[i] = p[i] - lr * buf[i]
            else:
                p[i] = p[i] - lr * g[i] / avg
    return p


def keras_rmsprop(p, grads, lr, rho, epsilon, momentum, centered):
    """keras.optimizers.RMSprop: eps inside the root, momentum on the lr-scaled increment."""
    p = [x.copy() for x in p]
    velocity, average_grad, mom = ([np.zeros_like(x) for x in p] for _ in range(3))
    for g in grads:
        for i in range(len(p)):
            velocity[i] = rho * velocity[i] + (1 - rho) * g[i] ** 2
            if centered:
                average_grad[i] = rho * average_grad[i] + (1 - rho) * g[i]
                denominator = velocity[i] - average_grad[i] ** 2 + epsilon
            else:
                denominator = velocity[i] + epsilon
            increment = lr * g[i] / np.sqrt(denominator)
            if momentum > 0:
                mom[i] = momentum * mom[i] + increment
                p[i] = p[i] - mom[i]
            else:
                p[i] = p[i] - increment
    return p


def keras_adam(p, grads, lr, beta_1, beta_2, epsilon, weight_decay=0.0):
    """keras.optimizers.Adam / AdamW: "epsilon hat"; AdamW first does p -= p * wd * lr."""
    p = [x.copy() for x in p]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for t, g in enumerate(grads, start=1):
        alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        for i in range(len(p)):
            p[i] = p[i] - p[i] * weight_decay * lr
            m[i] = m[i] + (g[i] - m[i]) * (1 - beta_1)
            v[i] = v[i] + (g[i] ** 2 - v[i]) * (1 - beta_2)
            p[i] = p[i] - alpha * m[i] / (np.sqrt(v[i]) + epsilon)
    return p


def torch_adam(p, grads, lr, beta1, beta2, eps, weight_decay=0.0):
    """torch.optim.Adam / AdamW (decoupled: p *= 1 - lr * wd first)."""
    p = [x.copy() for x in p]
    exp_avg = [np.zeros_like(x) for x in p]
    exp_avg_sq = [np.zeros_like(x) for x in p]
    for step, g in enumerate(grads, start=1):
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        for i in range(len(p)):
            p[i] = p[i] * (1 - lr * weight_decay)
            exp_avg[i] = beta1 * exp_avg[i] + (1 - beta1) * g[i]
            exp_avg_sq[i] = beta2 * exp_avg_sq[i] + (1 - beta2) * g[i] * g[i]
            denom = np.sqrt(exp_avg_sq[i]) / math.sqrt(bias_correction2) + eps
            p[i] = p[i] - (lr / bias_correction1) * exp_avg[i] / denom
    return p


def torch_sgd(p, grads, lr, momentum, nesterov):
    """torch.optim.SGD (dampening=0): buf = g on the first step, then momentum * buf + g."""
    p = [x.copy() for x in p]
    buf = [None] * len(p)
    for g in grads:
        for i in range(len(p)):
            d = g[i]
            if momentum != 0:
                buf[i] = d.copy() if buf[i] is None else momentum * buf[i] + d
                d = d + momentum * buf[i] if nesterov else buf[i]
            p[i] = p[i] - lr * d
    return p


def keras_sgd(p, grads, lr, momentum, nesterov):
    """keras.optimizers.SGD: v = momentum * v - lr * g; p += v (nesterov: momentum*v - lr*g)."""
    p = [x.copy() for x in p]
    v = [np.zeros_like(x) for x in p]
    for g in grads:
        for i in range(len(p)):
            v[i] = momentum * v[i] - lr * g[i]
            p[i] = p[i] + (momentum * v[i] - lr * g[i] if nesterov else v[i])
    return p


FRAMEWORK_CASES = [
    # (id, fbp optimizer, framework reference with its own argument names)
    *[
        (
            f"torch-rmsprop-a{a}-eps{e}-mom{m}-c{c}",
            optim.rmsprop(0.01, decay=a, eps=e, centered=c, momentum=m, eps_in_sqrt=False),
            lambda p, g, a=a, e=e, m=m, c=c: torch_rmsprop(p, g, 0.01, a, e, m, c),
        )
        for a, e, m, c in [
            (0.99, 1e-8, 0.0, False),
            (0.99, 1e-2, 0.9, False),
            (0.9, 1e-2, 0.0, True),
            (0.9, 1e-3, 0.9, True),
        ]
    ],
    *[
        (
            f"keras-rmsprop-mom{m}-c{c}",
            optim.rmsprop(0.01, decay=0.9, eps=1e-2, centered=c, momentum=m),
            lambda p, g, m=m, c=c: keras_rmsprop(p, g, 0.01, 0.9, 1e-2, m, c),
        )
        for m, c in [(0.0, False), (0.9, False), (0.9, True)]
    ],
    (
        "keras-adam",
        optim.adam(0.01, eps=1e-2, eps_hat=True),
        lambda p, g: keras_adam(p, g, 0.01, 0.9, 0.999, 1e-2),
    ),
    (
        "keras-adamw",
        optim.adamw(0.01, b1=0.8, eps=1e-2, weight_decay=0.05, eps_hat=True),
        lambda p, g: keras_adam(p, g, 0.01, 0.8, 0.999, 1e-2, weight_decay=0.05),
    ),
    (
        "torch-adam",
        optim.adam(0.01, eps=1e-2),
        lambda p, g: torch_adam(p, g, 0.01, 0.9, 0.999, 1e-2),
    ),
    (
        "torch-adamw",
        optim.adamw(0.01, eps=1e-2, weight_decay=0.05),
        lambda p, g: torch_adam(p, g, 0.01, 0.9, 0.999, 1e-2, weight_decay=0.05),
    ),
    *[
        (
            f"{fw}-sgd-nesterov{n}",
            optim.sgd(0.05, momentum=0.9, nesterov=n),
            lambda p, g, n=n, ref=ref: ref(p, g, 0.05, 0.9, n),
        )
        for n in (False, True)
        for fw, ref in [("torch", torch_sgd), ("keras", keras_sgd)]
    ],
]


@pytest.mark.parametrize(
    "opt, reference", [c[1:] for c in FRAMEWORK_CASES], ids=[c[0] for c in FRAMEWORK_CASES]
)
def test_framework_conventions(opt, reference):
    params, grads = make_params(), make_grads(N_STEPS)
    got, _ = run(opt, params, grads)
    want = reference(leaves(params), [leaves(g) for g in grads])
    for a, b in zip(leaves(got), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize(
    "opt, reference",
    [
        (
            optim.rmsprop(0.01, decay=0.99, eps=1e-2),  # default eps_in_sqrt=True is not PyTorch's
            lambda p, g: torch_rmsprop(p, g, 0.01, 0.99, 1e-2, 0.0, False),
        ),
        (
            optim.adam(0.01, eps=1e-2),  # default eps_hat=False is not Keras's
            lambda p, g: keras_adam(p, g, 0.01, 0.9, 0.999, 1e-2),
        ),
    ],
    ids=["rmsprop-default-vs-torch", "adam-default-vs-keras"],
)
def test_convention_options_matter(opt, reference):
    params, grads = make_params(), make_grads(10)
    got, _ = run(opt, params, grads)
    want = reference(leaves(params), [leaves(g) for g in grads])
    assert not all(np.allclose(a, b, rtol=1e-6) for a, b in zip(leaves(got), want, strict=True))


# ---------------------------------------------------------------------------------------------
# Convergence (lax.scan, float64).

A_DIAG = jnp.arange(1.0, 11.0)
B_VEC = jnp.ones(10)


def quadratic_grad(x):
    """f(x) = 0.5 x^T diag(A) x - b^T x; grad = A x - b; minimum at b / A."""
    return A_DIAG * x - B_VEC


def rosenbrock_grad(p):
    """f(x, y) = (1 - x)^2 + 100 (y - x^2)^2; minimum at (1, 1)."""
    x, y = p[0], p[1]
    return jnp.stack([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


def minimize(opt, grad_fn, x0, steps):
    def body(carry, _):
        x, state = carry
        return opt.update(grad_fn(x), x, state), None

    (x, _), _ = jax.lax.scan(body, (x0, opt.init(x0)), None, length=steps)
    return x


CONVERGENCE = [
    # (id, optimizer, rosenbrock tolerance on |p - (1, 1)|)
    ("sgd-momentum", optim.sgd(1e-3, momentum=0.9), 1e-6),
    ("sgd-nesterov", optim.sgd(1e-3, momentum=0.9, nesterov=True), 1e-6),
    ("sgd-warmup", optim.sgd(schedules.linear_schedule(1e-4, 2e-3, 1000), momentum=0.9), 1e-6),
    (
        "rmsprop-centered-momentum",
        optim.rmsprop(schedules.exponential_decay(1e-2, 200, 0.5), centered=True, momentum=0.9),
        1e-6,
    ),
    (
        "rmsprop-nesterov-torch-eps",
        optim.rmsprop(
            schedules.exponential_decay(1e-2, 200, 0.5),
            momentum=0.9,
            nesterov=True,
            eps_in_sqrt=False,
        ),
        1e-6,
    ),
    ("adam-cosine", optim.adam(schedules.cosine_decay_schedule(2e-2, 5000)), 5e-3),
    # A constant step makes Adam hover around the minimum; a decaying one lets it settle.
    ("adam-eps-hat", optim.adam(schedules.cosine_decay_schedule(2e-2, 5000), eps_hat=True), 5e-3),
    ("adamw", optim.adamw(schedules.cosine_decay_schedule(2e-2, 5000)), 5e-3),
    (
        "clipped-adam",
        optim.clip_by_global_norm(optim.adam(schedules.cosine_decay_schedule(2e-2, 5000)), 1.0),
        5e-3,
    ),
]


@pytest.mark.parametrize("opt, tol", [c[1:] for c in CONVERGENCE], ids=[c[0] for c in CONVERGENCE])
def test_converges(opt, tol):
    solve = jax.jit(minimize, static_argnums=(0, 1, 3))
    x = solve(opt, quadratic_grad, jnp.zeros(10), 3000)
    np.testing.assert_allclose(x, B_VEC / A_DIAG, atol=1e-4)
    x = solve(opt, rosenbrock_grad, jnp.asarray([-1.2, 1.0]), 5000)
    assert np.abs(np.asarray(x) - 1).max() < tol


# ---------------------------------------------------------------------------------------------
# jit, scan, dtypes, recompilation.


# The cases with a schedule (one per optimizer, with most options on), and one clipped.
SCAN_CASES = [(case_id(c), make_opt(c)) for c in CASES if c[1].get("learning_rate") is lr_schedule]
SCAN_CASES += [("clipped-rmsprop", optim.clip_by_global_norm(make_opt(CASES[9]), 6.0))]


@pytest.mark.parametrize("opt", [c[1] for c in SCAN_CASES], ids=[c[0] for c in SCAN_CASES])
def test_scan_equals_python_loop(opt):
    params, grads = make_params(), make_grads(20)
    loop_p, loop_s = run(opt, params, grads)

    def body(carry, g):
        p, state = carry
        return opt.update(g, p, state), None

    stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)
    (scan_p, scan_s), _ = jax.jit(lambda c: jax.lax.scan(body, c, stacked))(
        (params, opt.init(params))
    )
    np.testing.assert_allclose(
        np.concatenate([x.ravel() for x in leaves((scan_p, scan_s))]),
        np.concatenate([x.ravel() for x in leaves((loop_p, loop_s))]),
        rtol=1e-13,
        atol=1e-15,
    )


def test_eager_equals_jit():
    opt, params, grads = (
        optim.rmsprop(0.01, centered=True, momentum=0.9),
        make_params(),
        make_grads(3),
    )
    eager_p, state = params, opt.init(params)
    for g in grads:
        eager_p, state = opt.update(g, eager_p, state)
    jit_p, _ = run(opt, params, grads)
    for a, b in zip(leaves(eager_p), leaves(jit_p), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14)


def signature(tree):
    """Tree structure plus (shape, dtype, weak_type) of every leaf: what jit keys its cache on."""
    return jax.tree.structure(tree), [
        (jnp.shape(x), jnp.result_type(x), getattr(x, "weak_type", False))
        for x in jax.tree.leaves(tree)
    ]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_is_stable_and_keeps_dtypes(case):
    """float32 and bfloat16 leaves in one tree: three jitted steps compile once, and every
    state buffer and new param keeps its leaf's dtype."""
    opt, params = make_opt(case), make_params(dtypes=(jnp.float32, jnp.bfloat16))
    dtypes = jax.tree.map(lambda p: p.dtype, params)
    traces = []

    def step(g, p, state):
        traces.append(None)  # runs once per trace, i.e. once per compilation
        return opt.update(g, p, state)

    step = jax.jit(step)
    state = opt.init(params)
    first = signature((params, state))
    for g in make_grads(3):
        params, state = step(jax.tree.map(jnp.asarray, g, dtypes), params, state)
        assert signature((params, state)) == first
    assert len(traces) == 1 and step._cache_size() == 1
    assert jax.tree.map(lambda p: p.dtype, params) == dtypes
    for field in state._fields[1:]:
        buffer = getattr(state, field)
        assert buffer is None or jax.tree.map(lambda x: x.dtype, buffer) == dtypes, field
    assert state.count.dtype == jnp.int32 and state.count.shape == ()


@pytest.mark.parametrize("case", CASES[::4], ids=case_id)
def test_low_precision_tracks_float64(case):
    """bfloat16 params and float32 grads: state and params stay bfloat16, values stay close."""
    name, kw = case
    params, grads = make_params(dtypes=(jnp.bfloat16,)), make_grads(10)
    got, state = run(make_opt(case), params, [jax.tree.map(jnp.float32, g) for g in grads])
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((got, state._replace(count=None))))
    want, _ = REFERENCES[name](leaves(params), [leaves(g) for g in grads], **kw)
    for a, b in zip(leaves(got), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-2)


def test_mixed_dtypes_and_empty_subtrees():
    params = {
        "a": jnp.ones(3, jnp.float32),
        "b": jnp.ones(2, jnp.bfloat16),
        "c": jnp.ones((), jnp.float64),
        "empty": (),
        "none": None,
    }
    grads = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), params)
    opt = optim.clip_by_global_norm(optim.adamw(0.1, weight_decay=0.1), 1.0)
    new, state = jax.jit(opt.update)(grads, params, opt.init(params))
    assert jax.tree.structure(new) == jax.tree.structure(params)
    assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(lambda x: x.dtype, params)
    assert jax.tree.map(lambda x: x.dtype, state.mu) == jax.tree.map(lambda x: x.dtype, params)


def test_empty_params():
    opt = optim.adam()
    new, state = opt.update({}, {}, opt.init({}))
    assert new == {} and state.mu == {} and int(state.count) == 1


# ---------------------------------------------------------------------------------------------
# Gradient clipping.


def test_global_norm():
    tree = {"a": np.arange(6.0).reshape(2, 3), "b": (np.asarray(-2.0), np.ones(4))}
    want = np.sqrt(np.sum(np.arange(6.0) ** 2) + 4 + 4)
    np.testing.assert_allclose(optim.global_norm(tree), want, rtol=1e-15)
    assert optim.global_norm({}) == 0
    low = optim.global_norm({"x": jnp.full(4, 3.0, jnp.bfloat16)})
    assert low.dtype == jnp.float32 and low == 6.0


def clip_reference(grads: list, max_norm: float) -> tuple[list, int]:
    out, n_clipped = [], 0
    for g in grads:
        norm = np.sqrt(sum(np.sum(x**2) for x in g))
        n_clipped += norm > max_norm
        out.append([x * min(1.0, max_norm / norm) for x in g])
    return out, n_clipped


@pytest.mark.parametrize("case", CASES[::4], ids=case_id)
def test_clip_by_global_norm_matches_reference(case):
    name, kw = case
    params, grads = make_params(), make_grads(N_STEPS)
    max_norm = 6.0
    inner = make_opt(case)
    opt = optim.clip_by_global_norm(inner, max_norm)
    got, state = run(opt, params, grads)
    clipped, n_clipped = clip_reference([leaves(g) for g in grads], max_norm)
    assert 10 < n_clipped < N_STEPS - 10  # both branches are exercised
    want, bufs = REFERENCES[name](leaves(params), clipped, **kw)
    for a, b in zip(leaves(got), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-14)
    assert type(state) is type(inner.init(params))  # the state is the inner optimizer's
    assert_state_matches(state, bufs, N_STEPS)


def test_clip_passes_small_gradients_unchanged():
    params, grads = make_params(), make_grads(5)
    opt = optim.adam(0.01)
    got, _ = run(optim.clip_by_global_norm(opt, 1e6), params, grads)
    want, _ = run(opt, params, grads)
    for a, b in zip(leaves(got), leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("inner", [optim.sgd(0.1), optim.adam(0.1)], ids=["sgd", "adam"])
def test_clip_zero_gradient_is_finite(inner):
    params = make_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    opt = optim.clip_by_global_norm(inner, 1.0)
    new, state = jax.jit(opt.update)(zeros, params, opt.init(params))
    for a, b in zip(leaves(new), leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(x).all() for x in leaves(state))


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "grads, match",
    [
        ({"dense": {"w": np.zeros((4, 3))}, "extra": (np.zeros(2), np.zeros(()))}, r"\['b'\]"),
        (
            {"dense": {"w": np.zeros((4, 3)), "b": np.zeros(3), "c": np.zeros(3)}, "extra": ()},
            r"\['c'\]",
        ),
        (
            {"dense": {"w": np.zeros((4, 3)), "b": np.zeros(3)}, "extra": [np.zeros(2), 0.0]},
            "grads",
        ),
    ],
    ids=["missing-leaf", "extra-leaf", "list-for-tuple"],
)
def test_mismatched_tree_raises_type_error(grads, match):
    opt = optim.adam()
    params = make_params()
    with pytest.raises(TypeError, match=match) as info:
        opt.update(grads, params, opt.init(params))
    assert "params:" in str(info.value) and "grads:" in str(info.value)


def test_shape_mismatch_names_leaf_and_shapes():
    opt = optim.sgd(0.1)
    params = make_params()
    grads = jax.tree.map(np.zeros_like, params)
    grads["dense"]["w"] = np.zeros((3, 4))
    with pytest.raises(ShapeError, match=r"\['dense'\]\['w'\].*\(3, 4\).*\(4, 3\)"):
        opt.update(grads, params, opt.init(params))


def test_integer_params_raise_type_error():
    with pytest.raises(TypeError, match=r"\['n'\].*int"):
        optim.adam().init({"n": jnp.zeros(3, jnp.int32)})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: optim.sgd(-0.1), "learning_rate"),
        (lambda: optim.sgd(float("nan")), "learning_rate"),
        (lambda: optim.sgd(0.1, momentum=1.0), "momentum"),
        (lambda: optim.sgd(0.1, momentum=-0.5), "momentum"),
        (lambda: optim.sgd(0.1, nesterov=True), "nesterov"),
        (lambda: optim.rmsprop(-1.0), "learning_rate"),
        (lambda: optim.rmsprop(0.1, decay=1.0), "decay"),
        (lambda: optim.rmsprop(0.1, decay=-0.1), "decay"),
        (lambda: optim.rmsprop(0.1, eps=-1e-8), "eps"),
        (lambda: optim.rmsprop(0.1, momentum=1.5), "momentum"),
        (lambda: optim.adam(-1e-3), "learning_rate"),
        (lambda: optim.adam(b1=1.0), "b1"),
        (lambda: optim.adam(b1=-0.1), "b1"),
        (lambda: optim.adam(b2=1.0), "b2"),
        (lambda: optim.adam(eps=-1.0), "eps"),
        (lambda: optim.adamw(weight_decay=-1e-4), "weight_decay"),
        (lambda: optim.adamw(b2=2.0), "b2"),
        (lambda: optim.clip_by_global_norm(optim.adam(), 0.0), "max_norm"),
    ],
)
def test_invalid_hyperparameters_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_clip_without_optimizer_raises_type_error():
    with pytest.raises(TypeError, match="clip_by_global_norm"):
        optim.clip_by_global_norm(1.0, 1.0)

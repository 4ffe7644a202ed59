"""fbp.schedules against the formulas written out in plain Python (optax's definitions), at Python
int steps and at traced int32 steps under jit, plus optax's edge cases."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import optim, schedules

STEPS = [*range(40), 99, 100, 101, 1000, 2**31 - 1]


# ---------------------------------------------------------------------------------------------
# References: one step at a time, branches spelled out.


def ref_linear(t, init_value, end_value, transition_steps, transition_begin=0):
    if transition_steps <= 0:
        return init_value
    begin = max(transition_begin, 0)
    if t <= begin:
        return init_value
    if t >= begin + transition_steps:
        return end_value
    return init_value + (end_value - init_value) * (t - begin) / transition_steps


def ref_exponential(
    t, init_value, transition_steps, decay_rate, transition_begin=0, staircase=False, end_value=None
):
    if transition_steps <= 0 or decay_rate == 0:
        return init_value
    begin = max(transition_begin, 0)
    if t <= begin:
        value = init_value
    else:
        p = (t - begin) / transition_steps
        with np.errstate(over="ignore"):  # 1.5 ** (2**31 / 5) is inf, then bounded below
            value = init_value * np.float64(decay_rate) ** (math.floor(p) if staircase else p)
    if end_value is not None:
        value = max(value, end_value) if decay_rate < 1 else min(value, end_value)
    return value


def ref_cosine(t, init_value, decay_steps, alpha=0.0, exponent=1.0):
    t = min(t, decay_steps)
    return init_value * (
        (1 - alpha) * (0.5 * (1 + math.cos(math.pi * t / decay_steps))) ** exponent + alpha
    )


def ref_warmup_cosine(
    t, init_value, peak_value, warmup_steps, decay_steps, end_value=0.0, exponent=1.0
):
    if t < warmup_steps:
        return init_value + (peak_value - init_value) * t / warmup_steps
    if peak_value == 0:
        return 0.0  # optax: alpha = 0 when peak_value == 0
    tc = min(t - warmup_steps, decay_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * tc / (decay_steps - warmup_steps)))
    return end_value + (peak_value - end_value) * cosine**exponent


def ref_piecewise(t, init_value, boundaries_and_scales=None):
    value = init_value
    for boundary, scale in (boundaries_and_scales or {}).items():
        if t >= boundary:
            value *= scale
    return value


CASES = [
    # (schedule name, kwargs); the reference is REFERENCES[name]
    ("constant_schedule", dict(value=0.3)),
    ("linear_schedule", dict(init_value=1.0, end_value=0.01, transition_steps=20)),
    (
        "linear_schedule",
        dict(init_value=1e-4, end_value=1e-2, transition_steps=10, transition_begin=5),
    ),
    ("linear_schedule", dict(init_value=1.0, end_value=0.5, transition_steps=0)),
    (
        "linear_schedule",
        dict(init_value=1.0, end_value=0.5, transition_steps=10, transition_begin=-3),
    ),
    ("exponential_decay", dict(init_value=0.1, transition_steps=10, decay_rate=0.5)),
    ("exponential_decay", dict(init_value=0.1, transition_steps=7, decay_rate=0.5, staircase=True)),
    (
        "exponential_decay",
        dict(
            init_value=0.1, transition_steps=5, decay_rate=0.5, transition_begin=8, end_value=0.02
        ),
    ),
    ("exponential_decay", dict(init_value=0.1, transition_steps=5, decay_rate=1.5, end_value=0.4)),
    ("exponential_decay", dict(init_value=0.1, transition_steps=0, decay_rate=0.5)),
    ("exponential_decay", dict(init_value=0.1, transition_steps=5, decay_rate=0.0)),
    ("cosine_decay_schedule", dict(init_value=0.1, decay_steps=30)),
    ("cosine_decay_schedule", dict(init_value=0.1, decay_steps=25, alpha=0.1, exponent=2.0)),
    (
        "warmup_cosine_decay_schedule",
        dict(init_value=0.0, peak_value=1.0, warmup_steps=10, decay_steps=30),
    ),
    (
        "warmup_cosine_decay_schedule",
        dict(
            init_value=0.1,
            peak_value=0.5,
            warmup_steps=5,
            decay_steps=35,
            end_value=0.05,
            exponent=1.5,
        ),
    ),
    (
        "warmup_cosine_decay_schedule",
        dict(init_value=0.2, peak_value=0.7, warmup_steps=0, decay_steps=20, end_value=0.1),
    ),
    (
        "warmup_cosine_decay_schedule",
        dict(init_value=0.2, peak_value=0.0, warmup_steps=5, decay_steps=20, end_value=0.1),
    ),
    ("piecewise_constant_schedule", dict(init_value=0.5)),
    (
        "piecewise_constant_schedule",
        dict(init_value=0.5, boundaries_and_scales={20: 0.1, 7: 0.5, 30: 2.0}),
    ),
]

REFERENCES = {
    "constant_schedule": lambda t, value: value,
    "linear_schedule": ref_linear,
    "exponential_decay": ref_exponential,
    "cosine_decay_schedule": ref_cosine,
    "warmup_cosine_decay_schedule": ref_warmup_cosine,
    "piecewise_constant_schedule": ref_piecewise,
}


def case_id(case) -> str:
    name, kw = case
    return "-".join([name, *(f"{k}={v}" for k, v in kw.items())])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_formula(case):
    name, kw = case
    schedule = getattr(schedules, name)(**kw)
    want = np.array([REFERENCES[name](t, **kw) for t in STEPS])
    eager = np.array([float(schedule(t)) for t in STEPS])
    traced = jax.jit(jax.vmap(lambda t: jnp.asarray(schedule(t))))(jnp.asarray(STEPS, jnp.int32))
    np.testing.assert_allclose(eager, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(traced, want, rtol=1e-12, atol=1e-15)


def test_warmup_cosine_landmarks():
    s = schedules.warmup_cosine_decay_schedule(
        0.01, 1.0, warmup_steps=10, decay_steps=110, end_value=0.1
    )
    np.testing.assert_allclose(
        [s(0), s(10), s(60), s(110), s(500)], [0.01, 1.0, 0.55, 0.1, 0.1], rtol=1e-12
    )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: schedules.cosine_decay_schedule(0.1, decay_steps=0), "decay_steps"),
        (
            lambda: schedules.warmup_cosine_decay_schedule(0.0, 0.1, 10, decay_steps=10),
            "decay_steps",
        ),
        (lambda: schedules.piecewise_constant_schedule(0.1, {10: -0.5}), "non-negative"),
    ],
)
def test_invalid_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_optimizer_uses_schedule_at_count_before_update(name):
    """With a schedule that is 0 from step 1 on, only the first update moves the params; its
    size is schedule(0) (adam's first step is lr * g/|g|, sgd's lr * g)."""
    lr = schedules.piecewise_constant_schedule(0.25, {1: 0.0})
    opt = getattr(optim, name)(lr)
    p = jnp.asarray([1.0, 2.0])
    g = jnp.asarray([2.0, -4.0])
    step = jax.jit(opt.update)
    p1, state = step(g, p, opt.init(p))
    p2, state = step(g, p1, state)
    first_step = 0.25 * (np.sign(g) if name == "adam" else g)
    np.testing.assert_allclose(p1, p - first_step, rtol=1e-7)
    np.testing.assert_array_equal(p2, p1)
    assert int(state.count) == 2

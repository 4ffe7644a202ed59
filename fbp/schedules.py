"""Learning-rate schedules: pure functions ``step -> value``, with optax's names and formulas.

    schedule(step) -> value          step: int, or an int32 scalar array under ``jit``/``scan``

``step`` counts the updates already applied: :mod:`fbp.optim` evaluates ``schedule(state.count)``
*before* each update, so ``schedule(0)`` is the learning rate of the first update (as optax does).
Every schedule is plain ``jnp`` arithmetic on ``step`` (no Python branching on its value), so it
jits and scans. Edge cases follow optax: a non-positive ``transition_steps`` gives a constant
schedule, a negative ``transition_begin`` counts as 0, invalid ``decay_steps`` or negative scales
raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Schedule = Callable[[jax.typing.ArrayLike], jax.typing.ArrayLike]


def _as_float(step: jax.typing.ArrayLike) -> jax.Array:
    """``step`` as a float array (int32 and Python floats do not mix under strict promotion)."""
    return jnp.asarray(step, dtype=float)


def constant_schedule(value: float) -> Schedule:
    """``s(t) = value`` for every step ``t`` (optax.constant_schedule)."""
    return lambda step: value


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    r"""Linear ramp from ``init_value`` to ``end_value`` (optax.linear_schedule).

    With :math:`I, E, B, T` = ``init_value, end_value, transition_begin, transition_steps``:

    .. math::
        s(t) = (I - E)\,\bigl(1 - \tau/T\bigr) + E, \qquad \tau = \operatorname{clip}(t - B, 0, T)

    so ``s = I`` for ``t <= B`` and ``s = E`` for ``t >= B + T``. ``transition_steps <= 0`` gives
    the constant ``I``; a negative ``transition_begin`` counts as 0 (both as optax).
    """
    if transition_steps <= 0:
        return constant_schedule(init_value)
    transition_begin = max(transition_begin, 0)

    def schedule(step):
        tau = jnp.clip(_as_float(step) - transition_begin, 0, transition_steps)
        return (init_value - end_value) * (1 - tau / transition_steps) + end_value

    return schedule


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    r"""Exponential decay, continuous or staircase (optax.exponential_decay).

    .. math::
        s(t) = \begin{cases} I & t \le B \\ I\,r^{p} & t > B \end{cases}, \qquad
        p = \frac{t - B}{T}\ \ (\lfloor\cdot\rfloor \text{ if staircase})

    with :math:`I, r, B, T` = ``init_value, decay_rate, transition_begin, transition_steps``.
    ``end_value`` bounds the result: a floor when ``decay_rate < 1``, a ceiling otherwise.
    ``transition_steps <= 0`` or ``decay_rate == 0`` give the constant ``I``; a negative
    ``transition_begin`` counts as 0 (all as optax).
    """
    if transition_steps <= 0 or decay_rate == 0:
        return constant_schedule(init_value)
    transition_begin = max(transition_begin, 0)
    bound = jnp.maximum if decay_rate < 1 else jnp.minimum

    def schedule(step):
        since = _as_float(step) - transition_begin
        p = since / transition_steps
        if staircase:
            p = jnp.floor(p)
        value = jnp.where(since <= 0, init_value, init_value * jnp.power(decay_rate, p))
        return value if end_value is None else bound(value, end_value)

    return schedule


def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> Schedule:
    r"""Cosine decay from ``init_value`` to ``alpha * init_value`` (optax.cosine_decay_schedule).

    .. math::
        s(t) = I\left[(1 - \alpha)\left(\tfrac12\bigl(1 + \cos(\pi\,\min(t, T)/T)\bigr)\right)^{p}
               + \alpha\right]

    with :math:`I, T, p` = ``init_value, decay_steps, exponent``; constant ``alpha * I`` after
    ``T`` steps. ``decay_steps`` must be positive (``ValueError`` otherwise).
    Reference: Loshchilov & Hutter, SGDR, 2017 (arXiv:1608.03983).
    """
    if not decay_steps > 0:
        raise ValueError(f"cosine_decay_schedule: decay_steps must be positive, got {decay_steps}.")

    def schedule(step):
        t = jnp.minimum(_as_float(step), decay_steps)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * t / decay_steps))
        return init_value * ((1 - alpha) * cosine**exponent + alpha)

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    r"""Linear warmup to ``peak_value``, then cosine decay to ``end_value``.

    As optax.warmup_cosine_decay_schedule: ``decay_steps`` is the total length *including* the
    warmup, so the cosine part lasts ``decay_steps - warmup_steps`` (must be positive):

    .. math::
        s(t) = \begin{cases}
          \text{linear}(I \to P \text{ over } W)(t) & t < W \\
          \text{cosine}(P,\ T - W,\ \alpha = E/P,\ p)(t - W) & t \ge W
        \end{cases}

    with :math:`I, P, W, T, E, p` = ``init_value, peak_value, warmup_steps, decay_steps,
    end_value, exponent`` (``alpha = 0`` when ``P == 0``). ``s(0) = I``, ``s(W) = P``,
    ``s(t) = E`` for ``t >= T``.
    """
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    warmup = linear_schedule(init_value, peak_value, warmup_steps)
    decay = cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent)

    def schedule(step):
        return jnp.where(step < warmup_steps, warmup(step), decay(step - warmup_steps))

    return schedule


def piecewise_constant_schedule(
    init_value: float, boundaries_and_scales: dict[int, float] | None = None
) -> Schedule:
    r"""``init_value`` times every scale whose boundary has been reached (optax's).

    .. math:: s(t) = I \prod_{(b_i, f_i):\ t \ge b_i} f_i

    e.g. ``piecewise_constant_schedule(0.1, {1000: 0.1, 2000: 0.1})`` gives 0.1, then 0.01 from
    step 1000, then 0.001 from step 2000. Scales must be non-negative (``ValueError``).
    """
    items = sorted((boundaries_and_scales or {}).items())
    if any(not scale >= 0 for _, scale in items):
        raise ValueError(
            f"piecewise_constant_schedule: scales must be non-negative, got {dict(items)}."
        )

    def schedule(step):
        value = init_value
        for boundary, scale in items:
            value = value * jnp.where(step >= boundary, scale, 1.0)
        return value

    return schedule

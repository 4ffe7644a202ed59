"""Dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fbp.core import Layer, LayerError
from fbp.nn._base import check_dy, no_params


def Dropout(rate: float) -> Layer:
    """Inverted dropout: in training, each element is zeroed with probability ``rate``.

    ``rate`` is the probability of DROPPING (as Keras and PyTorch; stax's ``Dropout`` takes the
    keep probability). ``train=True`` needs a PRNG ``key``: ``y = x * m / (1 - rate)`` with
    ``m ~ Bernoulli(1 - rate)``, and ``dx = dy * m / (1 - rate)``; the cache is ``m``.
    ``train=False``: ``y = x`` and ``dx = dy`` (the cache is empty).
    """
    if not 0 <= rate < 1:
        raise ValueError(f"Dropout(rate={rate}): rate is the drop probability, in [0, 1).")
    keep = 1.0 - rate
    name = f"Dropout({rate})"

    def init(key, input_shape):
        return tuple(input_shape), (), ()

    def forward(params, state, x, *, key=None, train=False, mask=None):
        no_params(name, params, state)
        if not train or rate == 0:
            return x, state, ()
        if key is None:
            raise LayerError(
                "train=True needs a PRNG key to draw the dropout mask; pass "
                "key=jax.random.key(seed) (fit and make_step pass one), or train=False to "
                "evaluate.",
                layer=name,
            )
        m = jax.random.bernoulli(key, keep, x.shape)
        return jnp.where(m, x / keep, 0), state, m

    def backward(params, m, dy):
        if isinstance(m, tuple):  # evaluation mode: identity
            return (), dy
        check_dy(name, m.shape, dy)
        return (), jnp.where(m, dy / keep, 0)

    return Layer(init, forward, backward, name, config=("Dropout", rate))

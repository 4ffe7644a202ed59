"""Losses: each is a :class:`fbp.core.Loss` ``(value, value_and_grad, name)``.

    value(pred, target, mask=None)          -> scalar           plain JAX, the reference for JAX's grad
    value_and_grad(pred, target, mask=None) -> (scalar, dpred)  hand-written, dpred like pred

Parameter-free losses are values, losses with options are constructors returning a Loss:

    mse, mae, sigmoid_binary_cross_entropy, softmax_cross_entropy      # use as losses.mse
    huber(delta=1.0), softmax_cross_entropy_smoothed(label_smoothing)  # use as losses.huber(0.5)

Reductions (Keras-like): ``mse``, ``mae``, ``huber`` and ``sigmoid_binary_cross_entropy`` average
over every element; ``softmax_cross_entropy`` sums over the class (last) axis and averages over the
leading (batch) axes. ``pred`` must be floating point; targets are cast to ``pred``'s dtype, so the
value and ``dpred`` have ``pred``'s dtype. A target whose shape does not fit raises
:class:`fbp.core.ShapeError` at trace time; nothing is broadcast. For example::

    logits, _, cache = model.forward(params, state, x, train=True)               # (B, K)
    value, dlogits = losses.softmax_cross_entropy.value_and_grad(logits, labels)  # labels (B,)
    dparams, _ = model.backward(params, cache, dlogits)

``mask`` (optional) is a boolean array over ``pred``'s leading axes, ``(batch,)`` or
``(batch, time)``, False on padding: the mean is then taken over the real entries only, and
padding gets a zero gradient. With no real entry at all the loss is 0.

Each ``value`` is written so that JAX's autodiff gives the hand-written gradient everywhere,
at kinks too (``jnp.maximum(x, 0)`` and ``jnp.abs`` would let autodiff pick a slope at 0):
mae takes the subgradient 0 where ``pred == target``, huber is differentiable at ``+-delta``
and the sigmoid cross-entropy is written with ``logaddexp``, smooth at a logit of 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import Array, Loss, ShapeError, check_shape

# ---------------------------------------------------------------------------------------------
# Argument checks (trace time: shapes and dtypes are static)


def _check_pred(name: str, pred) -> Array:
    pred = jnp.asarray(pred)
    if not jnp.issubdtype(pred.dtype, jnp.floating):
        raise TypeError(
            f"{name}: pred should have a floating dtype, got {pred.dtype}. "
            "Cast it, e.g. pred.astype(jnp.float32)."
        )
    return pred


def _same_shape(name: str, pred, target) -> tuple[Array, Array]:
    """pred and target with exactly the same shape; target cast to pred's dtype."""
    pred, target = _check_pred(name, pred), jnp.asarray(target)
    fix = (
        f"pred has shape {pred.shape}; pass a target of exactly that shape "
        "(reshape it, e.g. target.reshape(pred.shape); targets are never broadcast)."
    )
    check_shape(name, "target", pred.shape, target.shape, fix)
    return pred, target.astype(pred.dtype)


def _class_targets(name: str, pred, target, label_smoothing: float) -> tuple[Array, Array]:
    """Logits (..., K) and target probabilities (..., K) from integer labels or float targets."""
    pred, target = _check_pred(name, pred), jnp.asarray(target)
    if pred.ndim == 0:
        raise ShapeError(
            f"{name}: pred should have a class (last) axis, shape (..., classes), got (). "
            "Pass logits of shape (batch, classes)."
        )
    fix = (
        f"pred has shape {pred.shape}; pass integer labels (any int dtype) of shape "
        f"{pred.shape[:-1]} or floating one-hot/probability targets of shape {pred.shape}."
    )
    classes = pred.shape[-1]
    if jnp.issubdtype(target.dtype, jnp.integer):
        check_shape(name, "integer labels", pred.shape[:-1], target.shape, fix)
        target = jax.nn.one_hot(target, classes, dtype=pred.dtype)  # (..., K)
    else:
        check_shape(name, "one-hot/probability targets", pred.shape, target.shape, fix)
        target = target.astype(pred.dtype)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / classes
    return pred, target


def _mask_weights(name: str, mask, shape: tuple, dtype) -> tuple[Array | None, Array]:
    """``(w, n)``: ``w`` the mask as 0/1 of ``dtype`` broadcastable against ``shape`` (None for
    no mask), and ``n`` the number of counted entries of ``shape`` (at least 1)."""
    size = math.prod(shape)
    if mask is None:
        return None, jnp.asarray(max(size, 1), dtype)
    mask = jnp.asarray(mask)
    k = mask.ndim
    if mask.dtype != jnp.bool_ or tuple(mask.shape) != tuple(shape[:k]):
        raise ShapeError(
            f"mask should be booleans over the leading axes of {tuple(shape)}, e.g. "
            f"{tuple(shape[:1])} or {tuple(shape[:2])}, got {mask.dtype} {tuple(mask.shape)}. "
            "Pass mask=(batch,) or (batch, time) booleans, True on real entries.",
            layer=name,
        )
    w = mask.astype(dtype).reshape(mask.shape + (1,) * (len(shape) - k))
    n = jnp.sum(w) * math.prod(shape[k:])
    return w, jnp.maximum(n, 1)


def _masked_mean(l: Array, w: Array | None, n: Array) -> Array:
    return jnp.sum(l if w is None else l * w) / n


def _mul_where_nonzero(t: Array, y: Array) -> Array:
    """t * y, but exactly 0 where t == 0, so a masked ``y = -inf`` gives 0 (not NaN) and a
    zero cotangent under jax.grad."""
    return jnp.where(t == 0, 0.0, t * y)


# ---------------------------------------------------------------------------------------------
# Elementwise losses: mean over every element of a per-element loss l(p, t)


def _elementwise(
    name: str,
    loss: Callable[[Array, Array], Array],
    loss_and_grad: Callable[[Array, Array], tuple[Array, Array]],
    doc: str,
    config=None,
) -> Loss:
    """A Loss ``mean(l(pred, target))`` from the per-element ``loss`` and ``loss_and_grad``
    (which returns ``l`` and ``dl/dp``, elementwise); ``dpred = dl/dp / n`` on the ``n``
    counted elements (all of them without a mask)."""

    def value(pred, target, mask=None):
        pred, target = _same_shape(name, pred, target)
        w, n = _mask_weights(name, mask, pred.shape, pred.dtype)
        return _masked_mean(loss(pred, target), w, n)

    def value_and_grad(pred, target, mask=None):
        pred, target = _same_shape(name, pred, target)
        w, n = _mask_weights(name, mask, pred.shape, pred.dtype)
        l, dl = loss_and_grad(pred, target)  # both like pred
        scale = 1.0 / n if w is None else w / n  # d mean / d l_i = 1/n on counted entries
        return _masked_mean(l, w, n), dl * scale

    value.__doc__ = value_and_grad.__doc__ = doc
    return Loss(value, value_and_grad, name, config)


_MSE_DOC = """Mean squared error, the mean over every element.

    loss  = 1/n sum_i (p_i - t_i)^2
    dp_i  = 2 (p_i - t_i) / n

``target`` has exactly ``pred``'s shape.
"""


def _mse(p, t):
    return jnp.square(p - t)


def _mse_vg(p, t):
    d = p - t
    return d * d, 2.0 * d  # d/dp (p - t)^2 = 2 (p - t)


mse = _elementwise("mse", _mse, _mse_vg, _MSE_DOC)


_MAE_DOC = """Mean absolute error, the mean over every element.

    loss  = 1/n sum_i |p_i - t_i|
    dp_i  = sign(p_i - t_i) / n

At ``p_i == t_i`` the gradient is the subgradient 0 (as PyTorch's ``L1Loss``), in the
hand-written gradient and under JAX's ``grad`` of ``value`` alike. ``target`` has exactly
``pred``'s shape.
"""


def _mae(p, t):
    d = p - t
    return d * jnp.sign(d)  # |d|, with autodiff derivative sign(d): 0 at d = 0 (jnp.abs gives 1)


def _mae_vg(p, t):
    d = p - t
    return jnp.abs(d), jnp.sign(d)  # d/dp |p - t| = sign(p - t)


mae = _elementwise("mae", _mae, _mae_vg, _MAE_DOC)


def huber(delta: float = 1.0) -> Loss:
    """Huber loss with threshold ``delta`` > 0, the mean over every element.

    With d_i = p_i - t_i:

        l_i   = d_i^2 / 2                  if |d_i| <= delta
              = delta (|d_i| - delta / 2)  otherwise
        loss  = 1/n sum_i l_i
        dp_i  = clip(d_i, -delta, delta) / n

    Quadratic near zero, linear (slope ``delta``) in the tails, as ``optax.huber_loss`` and
    Keras' ``Huber``. PyTorch's ``HuberLoss`` is the same; its ``SmoothL1Loss`` is this divided by
    ``delta``. The loss is differentiable at ``|d| = delta`` (both sides give ``+-delta``), and
    ``value`` is written ``c (d - c/2)`` with ``c = clip(d)``, whose autodiff derivative is
    ``c`` whichever side the clip's kink is taken from. ``target`` has exactly ``pred``'s shape.
    """
    if not delta > 0:
        raise ValueError(f"huber: delta should be > 0, got {delta}.")

    def loss(p, t):
        d = p - t
        c = jnp.clip(d, -delta, delta)
        return c * (
            d - 0.5 * c
        )  # d(c (d - c/2)) = dc (d - c) + c dd: = c dd since d = c at the kink

    def loss_and_grad(p, t):
        d = p - t
        clipped = jnp.clip(d, -delta, delta)
        l = clipped * (d - 0.5 * clipped)  # d^2/2 inside, delta (|d| - delta/2) outside
        return l, clipped  # dl/dp = d inside, delta sign(d) outside

    return _elementwise(f"huber(delta={delta})", loss, loss_and_grad, huber.__doc__,
                        ("huber", delta))  # fmt: skip


_SIGMOID_BCE_DOC = """Binary cross-entropy from logits, the mean over every element.

With x = pred (logits), t = target (probabilities in [0, 1], same shape as pred) and
s(x) = 1 / (1 + exp(-x)):

    l_i   = -t_i log s(x_i) - (1 - t_i) log(1 - s(x_i))
          = log(1 + exp(x_i)) - x_i t_i            (softplus by logaddexp(x, 0): stable)
    loss  = 1/n sum_i l_i
    dx_i  = (s(x_i) - t_i) / n

Stable for logits of any finite size; a logit of ``-inf`` with target 0 (a mask) contributes
0 to the loss and 0 to the gradient. Smooth everywhere, a logit of 0 included: ``logaddexp``
differentiates to the sigmoid, where the textbook's ``max(x, 0) + log1p(exp(-|x|))`` would let
autodiff pick slopes at its kinks. Keras' ``BinaryCrossentropy(from_logits=True)``,
``optax.sigmoid_binary_cross_entropy`` (then averaged) and PyTorch's ``BCEWithLogitsLoss``.
"""


def _sigmoid_bce(x, t):
    return jnp.logaddexp(x, 0.0) - _mul_where_nonzero(t, x)


def _sigmoid_bce_vg(x, t):
    e = jnp.exp(-jnp.abs(x))  # in (0, 1]: never overflows
    s = jnp.where(x >= 0, 1.0, e) / (1.0 + e)  # sigmoid(x), stable for both signs
    return _sigmoid_bce(x, t), s - t  # dl/dx = s(x) - t


sigmoid_binary_cross_entropy = _elementwise(
    "sigmoid_binary_cross_entropy", _sigmoid_bce, _sigmoid_bce_vg, _SIGMOID_BCE_DOC
)


# ---------------------------------------------------------------------------------------------
# Softmax cross-entropy: sum over the class (last) axis, mean over the leading (batch) axes


def softmax_cross_entropy_smoothed(label_smoothing: float) -> Loss:
    """Softmax cross-entropy from logits with label smoothing ``a`` in [0, 1).

    ``pred`` holds logits x of shape (..., K). ``target`` is either integer labels of shape
    (...,) (any int dtype, values in [0, K)) or floating one-hot/probability targets t of shape
    (..., K). Labels become one-hot rows, then targets are smoothed as in optax:

        t'       = t (1 - a) + a / K
        log p_k  = x_k - m - log sum_j exp(x_j - m),   m = max_j x_j    (log-softmax)
        l_b      = -sum_k t'_bk log p_bk                               (sum over classes)
        loss     = 1/B sum_b l_b                                       (mean over the B rows)
        dx_bk    = (p_bk sum_j t'_bj - t'_bk) / B         (= (p_bk - t'_bk) / B if rows sum to 1)

    B is the product of the leading (batch) axes (or the number of real rows under a mask).
    Logits of ``-inf`` (masked classes) give a finite loss and a zero gradient wherever the
    target is 0; with ``a > 0`` every class has target ``a / K > 0``, so a masked class makes
    the loss ``inf``.

    Labels out of range: under ``jit`` a loss cannot raise, and a label outside [0, K) gives an
    all-zero target row, which contributes 0 to the loss and to the gradient (with smoothing,
    only ``a / K`` per class). ``fit`` and ``evaluate`` check integer labels on the host first;
    for your own loops, call :func:`check_labels` on the host, or wrap the step with
    ``jax.experimental.checkify`` and a ``checkify.check(jnp.all((labels >= 0) & (labels <
    K)), ...)``.
    Keras' ``CategoricalCrossentropy(from_logits=True, label_smoothing=a)``; optax's
    ``softmax_cross_entropy`` with smoothed labels, averaged over the batch.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(
            f"softmax_cross_entropy_smoothed: label_smoothing should be in [0, 1), "
            f"got {label_smoothing}."
        )
    a = label_smoothing
    name = f"softmax_cross_entropy_smoothed(label_smoothing={a})" if a else "softmax_cross_entropy"

    def value(pred, target, mask=None):
        x, t = _class_targets(name, pred, target, a)
        w, n = _mask_weights(name, mask, x.shape[:-1], x.dtype)
        logp = jax.nn.log_softmax(x, axis=-1)  # (..., K)
        return _masked_mean(-jnp.sum(_mul_where_nonzero(t, logp), axis=-1), w, n)

    def value_and_grad(pred, target, mask=None):
        x, t = _class_targets(name, pred, target, a)
        w, n = _mask_weights(name, mask, x.shape[:-1], x.dtype)
        m = jnp.max(x, axis=-1, keepdims=True)  # (..., 1) subtracted for stability
        e = jnp.exp(x - m)  # (..., K) in [0, 1]
        s = jnp.sum(e, axis=-1, keepdims=True)  # (..., 1) >= 1
        logp = x - m - jnp.log(s)  # (..., K) log-softmax
        p = e / s  # (..., K) softmax
        l = -jnp.sum(_mul_where_nonzero(t, logp), axis=-1)  # (...,)
        scale = 1.0 / n if w is None else (w / n)[..., None]  # d mean / d l_b on counted rows
        dx = (p * jnp.sum(t, axis=-1, keepdims=True) - t) * scale  # (..., K)
        return _masked_mean(l, w, n), dx

    value.__doc__ = value_and_grad.__doc__ = softmax_cross_entropy_smoothed.__doc__
    return Loss(value, value_and_grad, name, ("softmax_cross_entropy", a))


softmax_cross_entropy = softmax_cross_entropy_smoothed(0.0)
"""Softmax cross-entropy from logits, without label smoothing; see
:func:`softmax_cross_entropy_smoothed` for the math. ``softmax_cross_entropy(logits, labels)``
takes integer labels of shape (...,) or one-hot/probability targets of shape (..., K)."""


def check_labels(labels, num_classes: int, where: str = "labels") -> None:
    """Raise ``ValueError`` unless every integer label is in ``[0, num_classes)``, naming the
    first bad row and its value. On the host (numpy), before anything is compiled: the
    checked counterpart of the losses, which cannot raise under ``jit``."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad.reshape(-1))), labels.shape)
        row = first[0] if len(first) == 1 else first
        raise ValueError(
            f"{where}: label {int(labels[first])} at row {row} is out of range for "
            f"{num_classes} classes (labels must be in [0, {num_classes})); "
            f"{int(bad.sum())} of {labels.size} labels are out of range. Check the data, or "
            "give the network as many outputs as there are classes."
        )


__all__ = [
    "check_labels",
    "huber",
    "mae",
    "mse",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_smoothed",
]

"""Optimizers and gradient clipping, each an ``Optimizer(init, update)`` (see :mod:`fbp.core`).

    opt = adam(1e-3)                                   # sgd, rmsprop, adam, adamw
    opt = clip_by_global_norm(opt, max_norm=1.0)       # optional; the state stays opt's own
    opt_state = opt.init(params)                       # NamedTuple, count == 0 (int32 scalar)
    params, opt_state = opt.update(grads, params, opt_state)  # pure; jit and lax.scan safe

- ``update`` takes params and state in the order it returns them, so the obvious
  ``jax.jit(opt.update, donate_argnums=(1, 2))`` updates both in place: JAX pairs donated
  buffers with outputs in order.
- ``grads`` has exactly the tree structure and leaf shapes of ``params`` (else ``TypeError`` /
  :class:`~fbp.core.ShapeError`); params may be any pytree of floating arrays.
- ``learning_rate`` is a float or a schedule ``count -> lr`` (:mod:`fbp.schedules`) evaluated at
  ``state.count`` *before* the update: the first update uses ``schedule(0)``. The count
  saturates at the int32 maximum instead of wrapping, as optax's ``safe_increment``.
- Names, positional order, defaults and update formulas are optax's optimizers of the same
  name; keyword-only options give PyTorch's or Keras's conventions where these differ (each
  docstring says which).
- Every state leaf has its param's dtype (unless a ``*_dtype`` option says otherwise) and new
  params keep theirs; the arithmetic runs in at least float32 (a bfloat16 leaf is upcast
  inside the update and stored back as bfloat16). As in optax, a float16 leaf keeps float16
  buffers, and Adam's ``nu`` underflows there for gradients below about 8e-3 (its first value
  ``(1 - b2) g**2`` falls under float16's smallest subnormal, 6e-8, when ``b2 = 0.999``): keep
  float32 master params for float16 models (bfloat16 has float32's range and does not have
  this problem).
- The new state has the old one's tree, shapes and dtypes, so a jitted step compiles once.
  Options are resolved in Python at construction, and no unused buffer is kept.
- Each leaf is updated by one elementwise function of its param, gradient and buffers (one pass
  over the tree), which XLA fuses under ``jit``: no array is materialised but the new ones.
  (XLA:CPU still splits Adam into three loops, mu, nu, then p, moving 40 bytes per float32
  param where 28 would do; see the README's performance section.)
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import Array, Optimizer, PyTree, ShapeError
from fbp.schedules import Schedule

ScalarOrSchedule = float | Schedule

_INT32_MAX = int(jnp.iinfo(jnp.int32).max)


# ---------------------------------------------------------------------------------------------
# States: one named tuple per optimizer; a buffer the options do not need is None.


class SgdState(NamedTuple):
    """State of :func:`sgd`."""

    count: Array  # int32 scalar: number of updates applied so far.
    trace: PyTree | None  # momentum buffer m, like params; None when momentum == 0.


class RmspropState(NamedTuple):
    """State of :func:`rmsprop`."""

    count: Array  # int32 scalar: number of updates applied so far.
    nu: PyTree  # EMA of g**2, like params.
    mu: PyTree | None  # EMA of g, like params; None unless centered.
    trace: PyTree | None  # momentum buffer of lr-scaled steps; None when momentum == 0.


class AdamState(NamedTuple):
    """State of :func:`adam` and :func:`adamw` (optax's ScaleByAdamState)."""

    count: Array  # int32 scalar: number of updates applied so far (bias correction uses count+1).
    mu: PyTree  # first moment, EMA of g, like params.
    nu: PyTree  # second moment, EMA of g**2, like params.


# ---------------------------------------------------------------------------------------------
# Shared plumbing: argument checks, tree checks, and one fused function per leaf.


def _check_in(name: str, arg: str, value: float, lo: float, hi: float | None) -> None:
    """Raise ValueError unless lo <= value (< hi); NaN fails too."""
    ok = value >= lo and (hi is None or value < hi)
    if not ok:
        where = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: {arg} must be in {where}, got {value!r}.")


def _check_momentum(name: str, momentum: float | None, nesterov: bool) -> float:
    """Momentum in [0, 1) (optax spells "no momentum" None); Nesterov needs momentum > 0."""
    momentum = 0.0 if momentum is None else momentum
    _check_in(name, "momentum", momentum, 0.0, 1.0)
    if nesterov and momentum == 0:
        raise ValueError(f"{name}: nesterov=True needs momentum > 0, got momentum={momentum!r}.")
    return momentum


def _as_schedule(name: str, value: ScalarOrSchedule, arg: str = "learning_rate") -> Schedule:
    """A number (checked finite and >= 0) as a constant schedule; a callable as it is; a 0-d
    array (maybe traced) as it is. Anything else raises TypeError now, not inside ``fit``."""
    if callable(value):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(
                f"{name}: {arg} must be a finite number >= 0, got {value!r}. "
                "fbp's optimizers step along -lr * direction; pass a positive step size."
            )
        return lambda count: v
    if (
        isinstance(value, (jax.Array, np.ndarray))
        and jnp.ndim(value) == 0
        and (jnp.issubdtype(jnp.result_type(value), jnp.floating))
    ):
        return lambda count: value  # an array (maybe traced): taken as it is
    raise TypeError(
        f"{name}: {arg} must be a float or a schedule (a function count -> value, e.g. "
        f"fbp.schedules.cosine_decay_schedule(...)), got {value!r}."
    )


def _show_lr(learning_rate) -> str:
    return f"{learning_rate:g}" if isinstance(learning_rate, numbers.Real) else "schedule"


def _compute_dtype(dtype) -> jnp.dtype:
    """Arithmetic dtype of a leaf: its own, but at least float32 (bf16/f16 are upcast)."""
    return jnp.dtype(dtype) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _check_params(name: str, params: PyTree) -> None:
    """Raise TypeError naming the first leaf that is not a floating-point array."""
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jnp.issubdtype(jnp.result_type(p), jnp.floating):
            raise TypeError(
                f"{name}: params{jax.tree_util.keystr(path)} has dtype {jnp.result_type(p)}; "
                "optimizers update floating-point leaves only. Keep integer buffers out of params."
            )


def _flatten(name: str, grads: PyTree, params: PyTree, state, state_type) -> tuple:
    """Check that ``grads`` fits ``params`` and ``state`` is this optimizer's; return
    (treedef, param leaves, grad leaves)."""
    if not isinstance(state, state_type) and hasattr(params, "_fields"):
        raise TypeError(
            f"{name}: update takes (grads, params, opt_state), in that order, and returns "
            f"(params, opt_state); got a {type(params).__name__} where the params go. Call "
            "opt.update(grads, params, opt_state)."
        )
    if not isinstance(state, state_type):
        raise TypeError(
            f"{name}: opt_state should be a {state_type.__name__} from this optimizer's init, "
            f"got {type(state).__name__}. update takes (grads, params, opt_state)."
        )
    treedef = jax.tree.structure(params)
    if jax.tree.structure(grads) != treedef:
        p_paths = [
            jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        ]
        g_paths = [
            jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(grads)[0]
        ]
        diff = next(((p, g) for p, g in itertools.zip_longest(p_paths, g_paths) if p != g), None)
        first = "" if diff is None else f" First difference: params{diff[0]} vs grads{diff[1]}."
        raise TypeError(
            f"{name}: the gradient tree does not match the params tree.{first}\n"
            f"  params: {treedef}\n  grads:  {jax.tree.structure(grads)}\n"
            "Pass the gradient of the loss with respect to exactly these params."
        )
    _check_params(name, params)
    p_leaves, g_leaves = treedef.flatten_up_to(params), treedef.flatten_up_to(grads)
    for i, (p, g) in enumerate(zip(p_leaves, g_leaves, strict=True)):
        if jnp.shape(g) != jnp.shape(p):
            path = jax.tree_util.tree_flatten_with_path(params)[0][i][0]
            raise ShapeError(
                f"{name}: grads{jax.tree_util.keystr(path)} has shape {jnp.shape(g)}, but the "
                f"param has shape {jnp.shape(p)}. Each gradient must have its param's shape."
            )
    return treedef, p_leaves, g_leaves


def _leafwise(fn: Callable, treedef, n_out: int, *columns) -> tuple:
    """Apply ``fn`` to matching leaves (one call per leaf) and regroup its outputs into trees.

    Each column is a list of leaves, a tree with ``treedef`` or None (passed as None to ``fn``);
    ``fn`` returns ``n_out`` values; output trees whose leaves are None are the caller's to drop.
    """
    n = treedef.num_leaves
    cols = [
        c if isinstance(c, list) else [None] * n if c is None else treedef.flatten_up_to(c)
        for c in columns
    ]
    outs = [fn(*xs) for xs in zip(*cols, strict=True)]
    return tuple(treedef.unflatten([o[i] for o in outs]) for i in range(n_out))


def _zeros_like(params: PyTree) -> PyTree:
    return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.result_type(p)), params)


def _zero_count() -> Array:
    return jnp.zeros([], jnp.int32)


def _increment(count: Array) -> Array:
    """count + 1, saturating at the int32 maximum instead of wrapping (optax's safe_increment)."""
    return jnp.where(count < _INT32_MAX, count + 1, count)


# ---------------------------------------------------------------------------------------------
# Optimizers.


def _dtype_or_none(name: str, arg: str, dtype):
    if dtype is None:
        return None
    dt = jnp.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name}: {arg} must be a floating dtype or None, got {dtype!r}.")
    return dt


def _full_like(params: PyTree, value: float, dtype=None) -> PyTree:
    return jax.tree.map(
        lambda p: jnp.full(jnp.shape(p), value, dtype or jnp.result_type(p)), params
    )


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype=None,
) -> Optimizer:
    r"""Stochastic gradient descent, with optional (Nesterov) momentum; as ``optax.sgd``.

    With learning rate :math:`\eta_t` (``learning_rate`` at count :math:`t`) and momentum
    :math:`\beta` (optax's ``trace``)::

        m <- g + beta * m                          (only with momentum; m_0 = 0)
        d  = g + beta * m   if nesterov   else  m  (d = g without momentum)
        p <- p - eta_t * d

    Signature, positional order and defaults are optax's: ``momentum=None`` (or 0) keeps no
    buffer, ``nesterov=False`` needs momentum when True, ``accumulator_dtype`` is the momentum
    buffer's dtype (default: the param's). ``momentum`` must be in [0, 1).

    PyTorch's ``torch.optim.SGD(lr, momentum, nesterov)`` (with ``dampening=0``) is the same
    rule. Keras's ``SGD`` keeps ``v <- beta v - eta g`` instead, which is the same sequence of
    params for a constant learning rate but applies a schedule inside the buffer.

    Reference: Sutskever, Martens, Dahl & Hinton, "On the importance of initialization and
    momentum in deep learning", ICML 2013.
    """
    name = "sgd"
    lr_fn = _as_schedule(name, learning_rate)
    momentum = _check_momentum(name, momentum, nesterov)
    acc_dtype = _dtype_or_none(name, "accumulator_dtype", accumulator_dtype)
    use_trace = momentum > 0

    def init(params: PyTree) -> SgdState:
        _check_params(name, params)
        trace = _full_like(params, 0.0, acc_dtype) if use_trace else None
        return SgdState(count=_zero_count(), trace=trace)

    def update(grads: PyTree, params: PyTree, state: SgdState) -> tuple[PyTree, SgdState]:
        treedef, p_leaves, g_leaves = _flatten(name, grads, params, state, SgdState)
        lr = lr_fn(state.count)

        def leaf(p, g, m):
            dt = _compute_dtype(p.dtype)
            g_ = jnp.asarray(g, dt)
            if m is None:
                return (jnp.asarray(p, dt) - jnp.asarray(lr, dt) * g_).astype(p.dtype), None
            m_ = g_ + momentum * jnp.asarray(m, dt)
            d = g_ + momentum * m_ if nesterov else m_
            new_p = jnp.asarray(p, dt) - jnp.asarray(lr, dt) * d
            return new_p.astype(p.dtype), m_.astype(m.dtype)

        new_params, trace = _leafwise(leaf, treedef, 2, p_leaves, g_leaves, state.trace)
        new_state = SgdState(count=_increment(state.count), trace=trace if use_trace else None)
        return new_params, new_state

    config = ("sgd", learning_rate, momentum, nesterov, acc_dtype)
    return Optimizer(init, update, f"sgd({_show_lr(learning_rate)})", config)


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> Optimizer:
    r"""RMSprop, optionally centered, bias-corrected and with momentum; as ``optax.rmsprop``.

    With learning rate :math:`\eta_t` at count :math:`t` (``nu`` starts at ``initial_scale``,
    ``mu`` and ``m`` at 0; ``t`` counts from 1 in the bias correction)::

        nu <- decay * nu + (1 - decay) * g**2
        mu <- decay * mu + (1 - decay) * g           (centered only)
        nû = nu / (1 - decay**t),  mû = mu / (1 - decay**t)   (bias_correction; else nû = nu)
        s   = nû - mû**2  if centered  else  nû
        u   = eta_t * g / sqrt(s + eps)              (eps_in_sqrt=True, optax's default)
        u   = eta_t * g / (sqrt(s) + eps)            (eps_in_sqrt=False: PyTorch's form)
        m  <- u + momentum * m                       (with momentum; optax's trace, so the
        u   = u + momentum * m  if nesterov  else m   momentum acts on the lr-scaled step)
        p  <- p - u

    Signature, positional order and defaults are optax's. ``decay`` and ``momentum`` must be in
    [0, 1), ``eps >= 0``; ``momentum=None`` (or 0) keeps no buffer.

    Other frameworks:

    - PyTorch ``torch.optim.RMSprop(lr, alpha, eps, momentum, centered)`` puts eps outside the
      root: use ``eps_in_sqrt=False`` and ``decay=alpha`` (PyTorch's default alpha is 0.99).
      Its momentum ``buf <- momentum*buf + g/(sqrt(s)+eps); p <- p - lr*buf`` is this rule
      divided by lr, so the two agree exactly for a constant learning rate (with a schedule,
      PyTorch rescales the whole buffer by the current lr, fbp/optax only the newest step).
    - Keras ``RMSprop(rho, epsilon, momentum, centered)`` is this default form (eps inside the
      root, momentum on the lr-scaled step), with ``decay=rho`` and Keras's ``epsilon=1e-7``.
    - TF1 started ``nu`` at 1: ``initial_scale=1.0``.

    References: Tieleman & Hinton, Coursera "Neural Networks for Machine Learning", lecture 6e,
    2012; Graves, "Generating sequences with recurrent neural networks", 2013 (centered form).
    """
    name = "rmsprop"
    lr_fn = _as_schedule(name, learning_rate)
    _check_in(name, "decay", decay, 0.0, 1.0)
    _check_in(name, "eps", eps, 0.0, None)
    _check_in(name, "initial_scale", initial_scale, 0.0, None)
    momentum = _check_momentum(name, momentum, nesterov)
    use_trace = momentum > 0

    def init(params: PyTree) -> RmspropState:
        _check_params(name, params)
        return RmspropState(
            count=_zero_count(),
            nu=_full_like(params, initial_scale),
            mu=_zeros_like(params) if centered else None,
            trace=_zeros_like(params) if use_trace else None,
        )

    def update(grads: PyTree, params: PyTree, state: RmspropState) -> tuple[PyTree, RmspropState]:
        treedef, p_leaves, g_leaves = _flatten(name, grads, params, state, RmspropState)
        lr = lr_fn(state.count)
        count = _increment(state.count)

        def leaf(p, g, nu, mu, m):
            dt = _compute_dtype(p.dtype)
            g_ = jnp.asarray(g, dt)
            nu_ = decay * jnp.asarray(nu, dt) + (1 - decay) * g_ * g_
            correction = 1 - decay ** jnp.asarray(count, dt) if bias_correction else None
            s = nu_ / correction if bias_correction else nu_
            if centered:
                mu_ = decay * jnp.asarray(mu, dt) + (1 - decay) * g_
                mu_hat = mu_ / correction if bias_correction else mu_
                s = s - mu_hat * mu_hat
            if eps_in_sqrt:
                u = jnp.asarray(lr, dt) * g_ * jax.lax.rsqrt(s + eps)
            else:
                u = jnp.asarray(lr, dt) * g_ / (jnp.sqrt(s) + eps)
            if use_trace:
                m_ = u + momentum * jnp.asarray(m, dt)
                u = u + momentum * m_ if nesterov else m_
            new_p = (jnp.asarray(p, dt) - u).astype(p.dtype)
            return (
                new_p,
                nu_.astype(nu.dtype),
                mu_.astype(mu.dtype) if centered else None,
                m_.astype(m.dtype) if use_trace else None,
            )

        new_params, nu, mu, trace = _leafwise(
            leaf, treedef, 4, p_leaves, g_leaves, state.nu, state.mu, state.trace
        )
        new_state = RmspropState(
            count=count,
            nu=nu,
            mu=mu if centered else None,
            trace=trace if use_trace else None,
        )
        return new_params, new_state

    config = ("rmsprop", learning_rate, decay, eps, initial_scale, eps_in_sqrt, centered,
              momentum, nesterov, bias_correction)  # fmt: skip
    return Optimizer(init, update, f"rmsprop({_show_lr(learning_rate)})", config)


def _decay_mask(name: str, mask, params: PyTree, treedef) -> list:
    """Per leaf, whether weight decay applies: ``mask`` is None (everywhere), a tree of bools
    like params, or a function ``params -> such a tree`` (optax's ``mask``)."""
    if mask is None:
        return [True] * treedef.num_leaves
    tree = mask(params) if callable(mask) else mask
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise TypeError(
            f"{name}: mask must be a tree of bools with the params' structure (or a function of "
            f"the params returning one): {e}"
        ) from None


def _adam(
    name, learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov, eps_hat
) -> Optimizer:
    """Adam with decoupled weight decay (0 for plain Adam): the body of adam and adamw."""
    lr_fn = _as_schedule(name, learning_rate)
    _check_in(name, "b1", b1, 0.0, 1.0)
    _check_in(name, "b2", b2, 0.0, 1.0)
    _check_in(name, "eps", eps, 0.0, None)
    _check_in(name, "eps_root", eps_root, 0.0, None)
    wd_fn = _as_schedule(name, weight_decay, "weight_decay")
    mu_dt = _dtype_or_none(name, "mu_dtype", mu_dtype)
    if eps_hat and (eps_root or nesterov):
        raise ValueError(f"{name}: eps_hat=True (Keras's form) has no eps_root and no nesterov.")
    decays = callable(weight_decay) or weight_decay != 0

    def init(params: PyTree) -> AdamState:
        _check_params(name, params)
        return AdamState(
            count=_zero_count(), mu=_full_like(params, 0.0, mu_dt), nu=_zeros_like(params)
        )

    def update(grads: PyTree, params: PyTree, state: AdamState) -> tuple[PyTree, AdamState]:
        treedef, p_leaves, g_leaves = _flatten(name, grads, params, state, AdamState)
        lr, wd = lr_fn(state.count), wd_fn(state.count)
        count = _increment(state.count)  # t = 1 on the first update
        decayed = _decay_mask(name, mask, params, treedef) if decays else None

        def leaf(p, g, mu, nu, use_decay):
            dt = _compute_dtype(p.dtype)
            p_, g_, lr_, t = (jnp.asarray(x, dt) for x in (p, g, lr, count))
            mu_ = b1 * jnp.asarray(mu, dt) + (1 - b1) * g_
            nu_ = b2 * jnp.asarray(nu, dt) + (1 - b2) * g_ * g_
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            if eps_hat:
                step = lr_ * jnp.sqrt(bc2) / bc1 * (mu_ / (jnp.sqrt(nu_) + eps))
            else:
                if nesterov:  # Dozat's NAdam, as optax: the next step's momentum, bias-corrected
                    mu_hat = b1 * mu_ / (1 - b1 ** (t + 1)) + (1 - b1) * g_ / bc1
                else:
                    mu_hat = mu_ / bc1
                step = lr_ * (mu_hat / (jnp.sqrt(nu_ / bc2 + eps_root) + eps))
            if use_decay is not None and use_decay is not False:
                decay = jnp.asarray(wd, dt) * p_
                if not isinstance(use_decay, bool):  # a traced mask leaf
                    decay = jnp.where(use_decay, decay, jnp.zeros_like(decay))
                step = step + lr_ * decay
            return (p_ - step).astype(p.dtype), mu_.astype(mu.dtype), nu_.astype(nu.dtype)

        new_params, mu, nu = _leafwise(
            leaf, treedef, 3, p_leaves, g_leaves, state.mu, state.nu, decayed
        )
        return new_params, AdamState(count=count, mu=mu, nu=nu)

    config = (name, learning_rate, b1, b2, eps, eps_root, mu_dt, weight_decay, mask, nesterov,
              eps_hat)  # fmt: skip
    return Optimizer(init, update, f"{name}({_show_lr(learning_rate)})", config)


def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype=None,
    *,
    nesterov: bool = False,
    eps_hat: bool = False,
) -> Optimizer:
    r"""Adam; as ``optax.adam`` (and ``torch.optim.Adam``).

    With learning rate :math:`\eta_t` at count :math:`t` (moments start at 0; the bias
    correction counts from 1, so the first update uses ``t = 1``)::

        mu <- b1 * mu + (1 - b1) * g
        nu <- b2 * nu + (1 - b2) * g**2
        p  <- p - eta * (mu / (1 - b1**t)) / (sqrt(nu / (1 - b2**t) + eps_root) + eps)

    eps sits outside the square root (Algorithm 1 of the paper); ``eps_root`` (optax's, 0 by
    default) inside it. ``nesterov=True`` is NAdam (Dozat, 2016), as optax: ``mu / (1 -
    b1**t)`` becomes ``b1 mu / (1 - b1**(t+1)) + (1 - b1) g / (1 - b1**t)``. ``mu_dtype`` is the
    first moment's dtype (e.g. ``jnp.bfloat16``; default: the param's).

    With ``eps_hat=True`` eps is the paper's "epsilon hat" (the form just before its section
    2.1), as in Keras/TensorFlow::

        p  <- p - eta * sqrt(1 - b2**t) / (1 - b1**t) * mu / (sqrt(nu) + eps)

    The two differ only through eps (eps_hat = eps * sqrt(1 - b2**t)). Keras's
    ``Adam(learning_rate, beta_1, beta_2, epsilon)`` is ``adam(..., eps_hat=True)`` with its
    default ``epsilon=1e-7``.

    Signature, positional order and defaults are optax's (options optax lacks are keyword-only;
    unlike optax, ``learning_rate`` defaults to 1e-3). ``b1`` and ``b2`` must be in [0, 1),
    ``eps, eps_root >= 0``.

    Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2014 (arXiv:1412.6980).
    """
    return _adam("adam", learning_rate, b1, b2, eps, eps_root, mu_dtype, 0.0, None, nesterov,
                 eps_hat)  # fmt: skip


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype=None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask=None,
    *,
    nesterov: bool = False,
    eps_hat: bool = False,
) -> Optimizer:
    r"""Adam with decoupled weight decay; as ``optax.adamw`` (and ``torch.optim.AdamW``).

    The Adam step of :func:`adam`, plus a weight decay multiplied by the learning rate::

        p <- p - eta * ( (mu / (1 - b1**t)) / (sqrt(nu / (1 - b2**t) + eps_root) + eps)
                         + weight_decay * p )

    (``p`` on the right is the param before the update). ``weight_decay`` is a float or a
    schedule of the count, as optax. ``mask`` (optax's) limits the decay to some params: a tree
    of bools with the params' structure, or a function of the params that returns one, e.g.
    ``lambda p: jax.tree.map(lambda x: x.ndim > 1, p)`` to decay weights but not biases or
    normalization scales. ``eps_hat=True`` swaps in Keras's Adam step as in :func:`adam`; the
    decay term stays ``eta * weight_decay * p``, which is what Keras's ``AdamW`` does. The paper
    multiplies the decay by the schedule multiplier only, not by the base learning rate; optax,
    PyTorch and Keras all multiply by the full learning rate.

    Signature, positional order and defaults are optax's: ``learning_rate=1e-3`` (fbp's),
    ``b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, mu_dtype=None, weight_decay=1e-4, mask=None``
    (PyTorch's default weight_decay is 1e-2, Keras's 4e-3). ``weight_decay >= 0``.

    Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019
    (arXiv:1711.05101).
    """
    return _adam("adamw", learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
                 nesterov, eps_hat)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Gradient clipping.


def global_norm(tree: PyTree) -> Array:
    r"""The L2 norm of all leaves together, :math:`\sqrt{\sum_i \sum x_i^2}` (0 for no leaves).

    Accumulated in float32, or float64 if any leaf is float64 (bfloat16 leaves are upcast).
    """
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    dt = jnp.float64 if any(x.dtype == jnp.float64 for x in leaves) else jnp.float32
    total = jnp.zeros([], dt)
    for x in leaves:
        x = x.astype(dt)
        total = total + jnp.sum(x * x)
    return jnp.sqrt(total)


def clip_by_global_norm(optimizer: Optimizer, max_norm: float) -> Optimizer:
    r"""``optimizer`` applied to gradients rescaled to a global norm of at most ``max_norm``.

    .. math::
        g \leftarrow g \cdot \frac{\text{max\_norm}}{\max(\lVert g\rVert, \text{max\_norm})}
          = g \cdot \min\Bigl(1, \frac{\text{max\_norm}}{\lVert g\rVert}\Bigr)

    with :math:`\lVert g\rVert` = :func:`global_norm` of the whole gradient tree. Gradients with
    a norm below ``max_norm`` pass unchanged; a zero gradient gives a factor of 1, never NaN.
    This is optax's ``clip_by_global_norm`` (and ``tf.clip_by_global_norm``, Keras's
    ``global_clipnorm``); PyTorch's ``clip_grad_norm_`` adds 1e-6 to the norm in the quotient.

    Design: clipping wraps an optimizer instead of chaining transformations as optax does, so
    the result is again a plain ``Optimizer`` whose ``init`` is ``optimizer.init``: the state is
    the inner optimizer's, unchanged (clipping keeps no state). It works with any ``Optimizer``,
    clips the raw gradients before any momentum or moment estimate sees them (as
    ``optax.chain(clip_by_global_norm(c), adam(...))`` and PyTorch's clip-then-step), and costs
    one extra read of the gradients for the norm. ``max_norm`` must be positive.

    Reference: Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013 (arXiv:1211.5063).
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            "clip_by_global_norm: first argument must be an fbp Optimizer, e.g. "
            f"clip_by_global_norm(adam(1e-3), max_norm=1.0); got {type(optimizer).__name__}."
        )
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be positive, got {max_norm!r}.")

    def update(grads: PyTree, params: PyTree, state: PyTree) -> tuple[PyTree, PyTree]:
        scale = max_norm / jnp.maximum(global_norm(grads), max_norm)

        def clip(g):
            dt = _compute_dtype(g.dtype)
            return (jnp.asarray(g, dt) * scale.astype(dt)).astype(g.dtype)

        return optimizer.update(jax.tree.map(clip, grads), params, state)

    name = f"clip_by_global_norm({optimizer.name}, {max_norm})"
    return Optimizer(optimizer.init, update, name, ("clip_by_global_norm", optimizer, max_norm))

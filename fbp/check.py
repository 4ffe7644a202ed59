"""Gradient verification: the one module of fbp that uses JAX's autodiff, as the reference.

``check_grads(net, loss, params, state, x, y)`` compares the hand-written gradients of
``loss(net(params, state, x), y)`` (``fbp.value_and_grad``) with two references, in float64:

* autodiff: ``jax.grad`` of ``loss.value(net.apply(params, state, x), y)``. It shares the
  forward computation but not the backward pass, which is what is checked; every fbp layer
  and loss writes its forward so that autodiff takes the same derivative at kinks.
* central finite differences of the loss along unit directions ``v``, one array at a time:
  ``D(h) = (L(p + h v) - L(p - h v)) / 2h``, extrapolated as ``2 D(h/2) - D(h)`` (which cancels
  the O(h) error a jump of the second derivative causes, e.g. Elu at 0, and keeps O(h^2)
  elsewhere), against ``<g, v>``. The directions are random, plus the
  direction of the disagreement ``g - r`` when the two gradients differ, so that the finite
  differences alone decide which one is right.

The rule (each array ``a`` is a parameter leaf, or the input ``x``; ``g`` hand-written, ``r``
autodiff)::

    S      = max(largest |r| over all arrays, |L|)            the scale of the whole problem
    err_a  = max_i |g_i - r_i| / max(max_i |r_i|, floor * S)              <= rtol     (1e-10)
    fd_a   = max_v |fd(v) - <g, v>| / max(||r||, floor * S')             <= fd_rtol  (1e-6)

with ``S'`` the same as ``S`` with the 2-norm, and ``floor = 1e-3``. An array's gradient is
measured against itself, or against a thousandth of the largest gradient (or of the loss)
when it is smaller than that: a gradient of 1e-28 next to gradients of 1e-1 (a saturated
Softmax or Tanh) is right if it is right to 1e-13 of them, which is all float64 can resolve.
A direction along which the loss has a kink at ``p`` (one-sided slopes that differ by more
than ``1e-6`` of the scale, and by as much at ``h/2`` as at ``h``, where a smooth function's
would halve) cannot be checked by finite differences; it is replaced by another, and a row
where every direction has a kink reports ``kink`` and rests on the autodiff comparison.
The step is ``h = fd_step * max(1, rms(a))``: with ``fd_step = 1e-5`` the rounding error of
the extrapolated difference is about ``5e-11 |L|``, and its truncation error ``1e-10`` times
the third derivative.

``check_layer(layer, key, input_shape)`` checks one layer's ``backward`` against ``jax.vjp``
of its ``apply`` with a random cotangent ``dy`` (the scalar is ``<dy, y>``, and ``|L|`` in the
rule is ``max|dy| max|y|``), its declared output shape, and that evaluation mode returns the
state unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import Array, Layer, Loss, PyTree, Shape, conform_mask

_TINY = 1e-300


def _x64():
    """A context with 64-bit types on (``jax.enable_x64``; older JAX: ``jax.experimental``)."""
    if callable(getattr(jax, "enable_x64", None)):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # JAX before the top-level context manager

    return enable_x64(True)


@dataclasses.dataclass(frozen=True)
class Row:
    """One parameter array (or the input) and its errors against the references."""

    layer: str  # index path in the network, e.g. "2" or "1.0"; "input" for dL/dx
    name: str  # layer name, e.g. "Dense(128)"
    param: str  # key inside the layer's params, e.g. "w"
    shape: Shape
    abs_err: float  # max |hand - jax.grad|
    rel_err: float  # abs_err / max(max |jax.grad|, floor * S): the error the verdict uses
    fd_err: float  # directional finite-difference error, scaled as above (nan: not computed)
    ok: bool
    note: str = ""  # "kink": every finite-difference direction crossed a kink


@dataclasses.dataclass(frozen=True)
class Report:
    """The result of a check: ``.ok`` and one :class:`Row` per array; ``print`` shows a table."""

    title: str
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()
    rtol: float = 0.0
    fd_rtol: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and not any(n.startswith("FAIL") for n in self.notes)

    def __str__(self) -> str:
        head = ("layer", "name", "param", "shape", "max abs err", "rel err", "fd err", "")
        body = [
            (
                r.layer,
                r.name,
                r.param,
                str(r.shape),
                f"{r.abs_err:.2e}",
                f"{r.rel_err:.2e}",
                r.note or ("-" if np.isnan(r.fd_err) else f"{r.fd_err:.2e}"),
                "ok" if r.ok else "FAIL",
            )
            for r in self.rows
        ]
        widths = [max(len(row[c]) for row in [head, *body]) for c in range(len(head))]
        lines = [self.title]
        for row in [head, *body]:
            lines.append(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
        lines.extend(self.notes)
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: tolerances rel {self.rtol:g} (jax.grad), {self.fd_rtol:g} (fd)")
        return "\n".join(lines)


def _to64(tree: PyTree) -> PyTree:
    def cast(a):
        a = jnp.asarray(a)
        return a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(cast, tree)


def _named_params(net: Layer, params: PyTree, prefix: str = "") -> list[tuple[str, str, str]]:
    """(layer index path, layer name, param key) for each leaf, in ``jax.tree.leaves`` order."""
    if net.layers and isinstance(params, tuple) and len(params) == len(net.layers):
        out = []
        for i, (layer, p) in enumerate(zip(net.layers, params, strict=True)):
            out += _named_params(layer, p, f"{prefix}{i}.")
        return out
    if net.layers and len(net.layers) == 1:  # residual: the child's params are its own
        return _named_params(net.layers[0], params, prefix)
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    index = prefix[:-1] or "0"
    return [(index, net.name, _path_str(path)) for path, _ in paths]


def _path_str(path) -> str:
    """``("w",)`` for ``{"w": ...}`` reads as ``w``; nested keys join with ``/``."""
    parts = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    return "/".join(str(p) for p in parts)


def _max_abs(a) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64)), initial=0.0))


@dataclasses.dataclass
class _Array:
    """One checked array: where it is, its value, and its two gradients."""

    index: str
    name: str
    param: str
    point: Array
    hand: Array
    ref: Array
    f: Callable[[Array], float]  # the scalar as a function of this array alone


def _fd_error(item: _Array, scale: float, key, directions: int, fd_step: float, floor: float):
    """Worst ``|fd(v) - <g, v>| / scale`` over unit directions that do not cross a kink, and
    whether every direction tried crossed one."""
    point = np.asarray(item.point, np.float64)
    g = np.asarray(item.hand, np.float64)
    h = fd_step * max(1.0, float(np.sqrt(np.mean(point * point))) if point.size else 1.0)
    f0 = float(item.f(item.point))
    diff = g - np.asarray(item.ref, np.float64)
    candidates = []
    if np.linalg.norm(diff) > 0:
        candidates.append(diff)  # the disagreement itself: fd decides who is right
    keys = jax.random.split(key, 3 * directions)
    candidates += [np.asarray(jax.random.normal(k, point.shape, jnp.float64)) for k in keys]
    worst, checked, kinked = 0.0, 0, 0
    for v in candidates:
        if checked >= directions + (1 if np.linalg.norm(diff) > 0 else 0):
            break
        v = v / max(np.linalg.norm(v), _TINY)
        vj = jnp.asarray(v, item.point.dtype)
        f = [float(item.f(item.point + t * h * vj)) for t in (1.0, -1.0, 0.5, -0.5)]
        # One-sided slopes differ by k(t) = |f(t) - 2 f(0) + f(-t)| / t: t times the curvature
        # where f is smooth (k halves with t), the jump of the slope at a kink (k stays).
        k_h, k_half = abs(f[0] - 2 * f0 + f[1]) / h, abs(f[2] - 2 * f0 + f[3]) / (h / 2)
        if k_h > 1e-6 * scale and k_half > 0.75 * k_h:
            kinked += 1
            continue
        fd_h, fd_half = (f[0] - f[1]) / (2 * h), (f[2] - f[3]) / h
        fd = 2 * fd_half - fd_h  # cancels an O(h) error where the 2nd derivative jumps (Elu at 0)
        worst = max(worst, abs(fd - float(np.sum(g * v))) / scale)
        checked += 1
    return (np.nan, True) if checked == 0 and kinked else (worst, False)


def _rows(items: list[_Array], loss_scale: float, key, rtol, fd_rtol, fd_step, fd_dirs, floor):
    """Apply the rule of the module docstring to every array."""
    s_max = max([loss_scale] + [_max_abs(it.ref) for it in items])
    s_norm = max([loss_scale] + [float(np.linalg.norm(np.asarray(it.ref))) for it in items])
    rows, notes = [], []
    for item, k in zip(items, jax.random.split(key, max(len(items), 1)), strict=True):
        hand, ref = np.asarray(item.hand, np.float64), np.asarray(item.ref, np.float64)
        if hand.shape != ref.shape:
            abs_err = rel_err = float("inf")
        else:
            abs_err = _max_abs(hand - ref)
            rel_err = abs_err / max(_max_abs(ref), floor * s_max, _TINY)
        fd_err, kink = np.nan, False
        if jnp.issubdtype(item.point.dtype, jnp.floating) and item.point.size:
            scale = max(float(np.linalg.norm(ref)), floor * s_norm, _TINY)
            fd_err, kink = _fd_error(item, scale, k, fd_dirs, fd_step, floor)
        grad_ok, fd_ok = rel_err <= rtol, not fd_err > fd_rtol
        rows.append(
            Row(item.index, item.name, item.param, tuple(item.point.shape), abs_err, rel_err,
                fd_err, grad_ok and fd_ok, "kink" if kink else "")
        )  # fmt: skip
        where = f"{item.index} {item.name} {item.param}".rstrip()
        if not grad_ok and fd_ok and not np.isnan(fd_err):
            notes.append(
                f"note: {where}: finite differences agree with the hand-written gradient where "
                "jax.grad differs; the plain-JAX forward may take another derivative at a kink "
                "(write it with jnp.where, jax.nn.relu or logaddexp, as fbp's layers do)."
            )
        if kink:
            notes.append(f"note: {where}: every finite-difference direction crossed a kink; "
                         "the row rests on the jax.grad comparison.")  # fmt: skip
    return rows, notes


def _leaf_items(names, params, hand_params, ref_params, scalar, x) -> list[_Array]:
    leaves, treedef = jax.tree.flatten(params)
    try:
        hand_leaves = treedef.flatten_up_to(hand_params)
    except (ValueError, TypeError) as e:
        raise TypeError(
            f"backward returned dparams whose tree does not match params: {e}"
        ) from None
    ref_leaves = treedef.flatten_up_to(ref_params)
    items = []
    for i, ((index, name, pkey), leaf, g, r) in enumerate(
        zip(names, leaves, hand_leaves, ref_leaves, strict=True)
    ):

        def at_leaf(v, i=i):
            new = list(leaves)
            new[i] = v
            return scalar(jax.tree.unflatten(treedef, new), x)

        items.append(_Array(index, name, pkey, leaf, g, r, at_leaf))
    return items


def check_grads(
    net: Layer,
    loss: Loss,
    params: PyTree,
    state: PyTree,
    x: Array,
    y: Array,
    *,
    key: jax.Array | None = None,
    train: bool = True,
    mask: Array | None = None,
    rtol: float = 1e-10,
    fd_rtol: float = 1e-6,
    fd_step: float = 1e-5,
    fd_directions: int = 3,
    floor: float = 1e-3,
    seed: int = 0,
) -> Report:
    """Check ``fbp.value_and_grad(net, loss)`` against ``jax.grad`` and finite differences.

    Everything is cast to float64 (x64 is switched on for the duration of the check) and the
    rule of the module docstring decides each row. ``key``, ``train`` and ``mask`` are passed
    to the network (and ``mask`` to the loss) in all three computations, so Dropout's mask is
    fixed. Returns a :class:`Report`: ``print(report)`` shows one row per parameter array, and a
    row ``input`` for ``dL/dx`` (absent for integer inputs).
    """
    with _x64():
        params, state, x, y = _to64(params), _to64(state), _to64(x), _to64(y)

        def ref_loss(p, xx):  # the reference: the plain forward and loss value, under jax.grad
            pred = net.apply(p, state, xx, key=key, train=train, mask=mask)
            return loss.value(pred, y, conform_mask(mask, pred))

        @jax.jit
        def hand(p, xx):
            pred, _, cache = net.forward(p, state, xx, key=key, train=train, mask=mask)
            value, dpred = loss.value_and_grad(pred, y, conform_mask(mask, pred))
            grads, dx = net.backward(p, cache, dpred)
            return value, grads, dx

        value, grads, dx = hand(params, x)
        ref_value = float(ref_loss(params, x))
        floating_x = jnp.issubdtype(x.dtype, jnp.floating)
        argnums = (0, 1) if floating_x else 0
        ref = jax.jit(jax.grad(ref_loss, argnums=argnums))(params, x)
        ref_params, ref_dx = ref if floating_x else (ref, None)
        scalar = jax.jit(ref_loss)  # compiled once: every perturbed point has the same shapes
        items = _leaf_items(_named_params(net, params), params, grads, ref_params, scalar, x)
        if floating_x and dx is not None:
            items.append(_Array("input", "x", "", x, dx, ref_dx, lambda xx: scalar(params, xx)))
        rows, notes = _rows(
            items, abs(ref_value), jax.random.key(seed), rtol, fd_rtol, fd_step, fd_directions,
            floor,
        )  # fmt: skip
        value_err = abs(float(value) - ref_value) / max(abs(ref_value), _TINY)
        if not value_err <= rtol:
            notes.insert(0, f"FAIL: loss value {float(value)!r} != reference {ref_value!r}")
        title = f"Gradient check of {net.name} with {loss.name}: loss = {float(value):.6g}"
        return Report(title, tuple(rows), tuple(notes), rtol, fd_rtol)


def check_layer(
    layer: Layer,
    key: jax.Array,
    input_shape: Sequence[int] | None = None,
    *,
    x: Array | None = None,
    batch_size: int = 3,
    train: bool = True,
    mask: Array | None = None,
    rtol: float = 1e-10,
    fd_rtol: float = 1e-6,
    fd_step: float = 1e-5,
    fd_directions: int = 3,
    floor: float = 1e-3,
) -> Report:
    """Check one layer: its declared output shape, that evaluation mode leaves the state as it
    is, and ``backward`` against ``jax.vjp`` of ``apply`` and finite differences.

    Initializes the layer for ``input_shape`` (no batch axis) and draws a float64 input of
    ``batch_size`` examples, or takes ``x`` as given (integer token ids, say), and a random
    cotangent ``dy``. ``key`` also seeds the layer's own key (Dropout's mask), fixed across the
    comparison; ``train`` and ``mask`` are passed to ``forward``.
    """
    k_init, k_x, k_dy, k_fd, k_layer = jax.random.split(key, 5)
    with _x64():
        if x is None:
            x = jax.random.normal(k_x, (batch_size, *input_shape), jnp.float64)
        x = _to64(x)
        out_shape, params, state = layer.init(k_init, tuple(x.shape[1:]))
        params, state = _to64(params), _to64(state)
        fwd = lambda p, xx: layer.forward(p, state, xx, key=k_layer, train=train, mask=mask)  # noqa: E731
        y, _, cache = fwd(params, x)
        notes = []
        if tuple(y.shape) != (x.shape[0], *out_shape):
            notes.append(
                f"FAIL: declared output shape {tuple(out_shape)} but forward gave "
                f"{tuple(y.shape[1:])} per example"
            )
        _, eval_state, _ = layer.forward(params, state, x, key=k_layer, train=False, mask=mask)
        if jax.tree.structure(eval_state) != jax.tree.structure(state) or not all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(eval_state), jax.tree.leaves(state), strict=True)
        ):
            notes.append("FAIL: forward with train=False changed the state")

        dy = jax.random.normal(k_dy, y.shape, jnp.float64)
        hand_params, hand_dx = layer.backward(params, cache, dy)
        floating_x = jnp.issubdtype(x.dtype, jnp.floating)
        apply = lambda p, xx: layer.apply(p, state, xx, key=k_layer, train=train, mask=mask)  # noqa: E731
        if floating_x:
            _, vjp = jax.vjp(apply, params, x)
            ref_params, ref_dx = vjp(dy)
        else:
            _, vjp = jax.vjp(lambda p: apply(p, x), params)
            (ref_params,), ref_dx = vjp(dy), None

        scalar = jax.jit(lambda p, xx: jnp.sum(dy * apply(p, xx)))  # its gradient is the VJP
        names = [
            ("0", layer.name, pkey)
            for _, _, pkey in _named_params(layer._replace(layers=()), params)
        ]
        items = _leaf_items(names, params, hand_params, ref_params, scalar, x)
        if floating_x:
            items.append(
                _Array("input", "x", "", x, hand_dx, ref_dx, lambda xx: scalar(params, xx))
            )
        elif hand_dx is not None:
            notes.append("FAIL: an integer input has no gradient, but backward returned one")
        loss_scale = _max_abs(dy) * _max_abs(y)
        rows, more = _rows(items, loss_scale, k_fd, rtol, fd_rtol, fd_step, fd_directions, floor)
        title = f"Layer check of {layer.name} on input {tuple(x.shape)}"
        return Report(title, tuple(rows), tuple(notes + more), rtol, fd_rtol)


__all__ = ["Report", "Row", "check_grads", "check_layer"]

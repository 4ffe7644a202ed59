"""Gradient verification: the one module of fbp that uses JAX's autodiff, as the reference.

``check_grads(net, loss, params, x, y)`` compares the hand-written gradients of
``loss(net(params, x), y)`` (``fbp.value_and_grad``) with two references, in float64:

* autodiff: ``jax.grad`` of ``loss.value(net.apply(params, x), y)``, a code path that shares
  nothing with ``forward``/``backward``/``loss.value_and_grad``;
* central finite differences along random directions ``v``, one parameter array at a time:
  ``(L(p + h v) - L(p - h v)) / 2h`` against ``<g, v>``.

Errors are normwise, so entries that are (nearly) zero do not blow them up:

    abs_err = max_i |g_i - r_i|
    rel_err = abs_err / max(max_i |r_i|, tiny)                  (against jax.grad)
    fd_err  = max_v |fd(v) - <g, v>| / (||g|| ||v|| + tiny)     (against finite differences)

``check_layer(layer, key, input_shape)`` checks one layer's ``backward`` against ``jax.vjp``
of its ``apply`` with a random cotangent, its ``forward`` against ``apply``, and its declared
output shape against the real one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fbp.backprop import value_and_grad
from fbp.core import Array, Layer, Loss, PyTree, Shape

_TINY = 1e-30


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
    param: str  # key inside the layer's params, e.g. "['w']"
    shape: Shape
    abs_err: float  # max |hand - jax.grad|
    rel_err: float  # abs_err / max |jax.grad|
    fd_err: float  # directional finite-difference error, normwise (nan if not computed)
    ok: bool


@dataclasses.dataclass(frozen=True)
class Report:
    """The result of a check: ``.ok`` and one :class:`Row` per parameter array; prints a table."""

    title: str
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()
    rtol: float = 0.0
    fd_rtol: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and not any(n.startswith("FAIL") for n in self.notes)

    def __str__(self) -> str:
        head = ("layer", "name", "param", "shape", "max abs err", "max rel err", "fd rel err", "")
        body = [
            (
                r.layer,
                r.name,
                r.param,
                str(r.shape),
                f"{r.abs_err:.2e}",
                f"{r.rel_err:.2e}",
                "-" if np.isnan(r.fd_err) else f"{r.fd_err:.2e}",
                "ok" if r.ok else "FAIL",
            )
            for r in self.rows
        ]
        widths = [max(len(row[c]) for row in [head, *body]) for c in range(len(head))]
        lines = [self.title]
        for row in [head, *body]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
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
    if net.layers:
        out = []
        for i, (layer, p) in enumerate(zip(net.layers, params)):
            out += _named_params(layer, p, f"{prefix}{i}.")
        return out
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    index = prefix[:-1] or "0"
    return [(index, net.name, _path_str(path)) for path, _ in paths]


def _path_str(path) -> str:
    """``("w",)`` for ``{"w": ...}`` reads as ``w``; nested keys join with ``/``."""
    parts = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    return "/".join(str(p) for p in parts)


def _errors(hand: Array, ref: Array) -> tuple[float, float]:
    hand, ref = np.asarray(hand, np.float64), np.asarray(ref, np.float64)
    if hand.shape != ref.shape:
        return float("inf"), float("inf")
    abs_err = float(np.max(np.abs(hand - ref), initial=0.0))
    return abs_err, abs_err / max(float(np.max(np.abs(ref), initial=0.0)), _TINY)


def _fd_error(f, point: Array, grad: Array, key: jax.Array, n_dirs: int, h: float) -> float:
    """Directional central differences of the scalar ``f`` at ``point`` against ``<grad, v>``."""
    grad = np.asarray(grad, np.float64)
    worst = 0.0
    for k in jax.random.split(key, n_dirs):
        v = jax.random.normal(k, point.shape, jnp.float64)
        fd = (float(f(point + h * v)) - float(f(point - h * v))) / (2 * h)
        v = np.asarray(v)
        denom = np.linalg.norm(grad) * np.linalg.norm(v) + _TINY
        worst = max(worst, abs(fd - float(np.sum(grad * v))) / denom)
    return worst


def _compare(scalar, params, x, hand, ref, names, key, directions, h, rtol, fd_rtol) -> list[Row]:
    """Rows comparing the hand-written gradients ``hand = (dparams, dx)`` of ``scalar(params, x)``
    with the autodiff ones ``ref``, and with central differences of ``scalar`` along random
    directions, one parameter array (then the input) at a time."""
    leaves, treedef = jax.tree.flatten(params)
    try:
        hand_leaves = treedef.flatten_up_to(hand[0])
    except (ValueError, TypeError) as e:
        raise TypeError(
            f"backward returned dparams whose tree does not match params: {e}"
        ) from None
    ref_leaves = treedef.flatten_up_to(ref[0])
    keys = jax.random.split(key, len(leaves) + 1)
    scalar = jax.jit(scalar)  # compiled once: every perturbed point has the same shapes
    rows = []
    for i, ((index, name, pkey), leaf, g, r) in enumerate(
        zip(names, leaves, hand_leaves, ref_leaves)
    ):

        def at_leaf(v, i=i):
            new = list(leaves)
            new[i] = v
            return scalar(jax.tree.unflatten(treedef, new), x)

        rows.append(
            _row(index, name, pkey, leaf, g, r, at_leaf, keys[i], directions, h, rtol, fd_rtol)
        )
    at_x = lambda xx: scalar(params, xx)  # noqa: E731
    rows.append(
        _row("input", "x", "", x, hand[1], ref[1], at_x, keys[-1], directions, h, rtol, fd_rtol)
    )
    return rows


def _row(index, name, pkey, point, g, r, f, key, directions, h, rtol, fd_rtol) -> Row:
    abs_err, rel_err = _errors(g, r)
    fd_err = np.nan
    if jnp.issubdtype(point.dtype, jnp.floating) and point.size:
        fd_err = _fd_error(f, point, g, key, directions, h)
    ok = rel_err <= rtol and not fd_err > fd_rtol
    return Row(index, name, pkey, tuple(point.shape), abs_err, rel_err, fd_err, ok)


def check_grads(
    net: Layer,
    loss: Loss,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    key: jax.Array | None = None,
    rtol: float = 1e-10,
    fd_rtol: float = 1e-6,
    fd_step: float = 1e-6,
    fd_directions: int = 3,
    seed: int = 0,
) -> Report:
    """Check ``fbp.value_and_grad(net, loss)`` against ``jax.grad`` and finite differences.

    Everything is cast to float64 (x64 is switched on for the duration of the check). ``key``
    is passed to stochastic layers, the same key for all three computations, so Dropout's mask
    is fixed. Returns a :class:`Report`: ``print(report)`` shows the per-parameter table, with
    a row ``input`` for ``dL/dx`` (hand-written via ``net.backward``, against ``jax.grad``).
    """
    with _x64():
        params, x, y = _to64(params), _to64(x), _to64(y)

        def ref_loss(p, xx):  # the reference: plain apply and loss value, differentiated by JAX
            return loss.value(net.apply(p, xx, key=key), y)

        @jax.jit
        def hand(p, xx):
            value, grads = value_and_grad(net, loss)(p, xx, y, key=key)
            pred, cache = net.forward(p, xx, key=key)  # again, for dL/dx (XLA shares the work)
            _, dx = net.backward(p, cache, loss.value_and_grad(pred, y)[1])
            return value, grads, dx

        value, grads, dx = hand(params, x)
        ref_value = ref_loss(params, x)
        ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(params, x)
        names = _named_params(net, params)
        key_fd = jax.random.key(seed)
        rows = _compare(
            ref_loss,
            params,
            x,
            (grads, dx),
            ref,
            names,
            key_fd,
            fd_directions,
            fd_step,
            rtol,
            fd_rtol,
        )
        notes = []
        value_err = abs(float(value) - float(ref_value)) / max(abs(float(ref_value)), _TINY)
        if not value_err <= rtol:
            notes.append(f"FAIL: loss value {float(value)!r} != reference {float(ref_value)!r}")
        title = f"Gradient check of {net.name} with {loss.name}: loss = {float(value):.6g}"
        return Report(title, tuple(rows), tuple(notes), rtol, fd_rtol)


def check_layer(
    layer: Layer,
    key: jax.Array,
    input_shape: Sequence[int],
    *,
    batch_size: int = 3,
    rtol: float = 1e-10,
    fd_rtol: float = 1e-6,
    fd_step: float = 1e-6,
    fd_directions: int = 3,
    stochastic: bool = False,
) -> Report:
    """Check one layer: declared shape, ``forward == apply``, and ``backward`` vs ``jax.vjp``.

    Initializes the layer for ``input_shape`` (no batch axis), draws a float64 input of batch
    ``batch_size`` and a random cotangent ``dy``, and compares ``backward(params, cache, dy)``
    with ``jax.vjp`` of ``apply`` at the same point, plus directional finite differences of
    ``<dy, apply(params, x)>``. ``stochastic=True`` passes a fixed key to ``forward`` and
    ``apply`` so a Dropout mask is exercised (and held fixed across the comparison).
    """
    k_init, k_x, k_dy, k_fd, k_layer = jax.random.split(key, 5)
    with _x64():
        out_shape, params = layer.init(k_init, tuple(input_shape))
        params = _to64(params)
        x = jax.random.normal(k_x, (batch_size, *input_shape), jnp.float64)
        lkey = k_layer if stochastic else None

        y, cache = layer.forward(params, x, key=lkey)
        y_apply = layer.apply(params, x, key=lkey)
        notes = []
        if tuple(y.shape) != (batch_size, *out_shape):
            notes.append(
                f"FAIL: declared output shape {tuple(out_shape)} but forward gave "
                f"{tuple(y.shape[1:])} per example"
            )
        if y.shape != y_apply.shape or not np.allclose(y, y_apply, rtol=rtol, atol=0):
            notes.append("FAIL: forward(params, x)[0] differs from apply(params, x)")

        dy = jax.random.normal(k_dy, y_apply.shape, jnp.float64)
        hand = layer.backward(params, cache, dy)
        _, vjp = jax.vjp(lambda p, xx: layer.apply(p, xx, key=lkey), params, x)

        def projected(p, xx):  # <dy, apply(p, x)>: its gradient is the VJP with dy
            return jnp.sum(dy * layer.apply(p, xx, key=lkey))

        names = [
            ("0", layer.name, pkey)
            for _, _, pkey in _named_params(layer._replace(layers=()), params)
        ]
        rows = _compare(
            projected, params, x, hand, vjp(dy), names, k_fd, fd_directions, fd_step, rtol, fd_rtol
        )
        title = f"Layer check of {layer.name} on input {(batch_size, *input_shape)}"
        return Report(title, tuple(rows), tuple(notes), rtol, fd_rtol)

"""Convolution and pooling layers, channels-last, with hand-written backward passes.

Layers (``init`` shapes exclude the batch axis; ``x`` has one)::

    Conv1D(filters, k, ...)     (batch, L, Cin)     -> (batch, L', filters)
    Conv2D(filters, k, ...)     (batch, H, W, Cin)  -> (batch, H', W', filters)
    MaxPool1D/2D, AvgPool1D/2D  (batch, *space, C)  -> (batch, *space', C)
    GlobalAvgPool               (batch, *space, C)  -> (batch, C)

with kernels ``w`` of shape ``(k, Cin/groups, filters)`` and ``(kh, kw, Cin/groups, filters)``.

Layout: NHWC inputs and HWIO kernels, the Keras and ``jax.lax`` defaults. Along every spatial
axis, with input size ``n``, window ``k``, dilation ``d``, stride ``s`` and padding ``(lo, hi)``::

    k_eff = (k - 1) * d + 1                          the dilated window
    m     = floor((n + lo + hi - k_eff) / s) + 1     the output size

``padding="valid"`` is ``(0, 0)``. ``"same"`` is TensorFlow's split, giving ``m = ceil(n / s)``:
``total = max((m - 1) * s + k_eff - n, 0)``, ``lo = total // 2``, ``hi = total - lo`` (the odd
pixel goes to the bottom / right). Explicit padding is one ``(lo, hi)`` pair per spatial axis,
``((top, bottom), (left, right))`` in 2-D, or an int for the same amount everywhere.

Every backward is written from ``jax.lax`` primitives, never autodiff; its docstring derives the
formula. A convolution's dx and dw are themselves convolutions, with the dimension numbers
autodiff uses (the kernel read as ``(*k, O, I)`` for dx, the batch axis contracted for dw): with
jax 0.10 on XLA:CPU, a jitted forward + backward compiled to the same program as ``jax.vjp``'s
for the plain, strided and grouped kernels compared. What each forward caches for backward::

    Conv1D / Conv2D           x                        the input (dw needs it; dx needs only w)
    MaxPool1D / MaxPool2D     PoolCache(argmax, x_like)
    AvgPool1D / AvgPool2D     x_like
    GlobalAvgPool             x_like

``argmax`` (batch, *out, C), int8 unless the window has over 127 elements, is the row-major
offset inside its window of the element that receives the window's gradient. ``x_like`` is a
zero-size array of shape ``(0, *space, C)`` and x's dtype: it carries the input's static shape
(which the output's shape does not determine) through jit, scan and vmap at no cost.

``mask`` is ignored, as Keras ignores it: a convolution mixes neighbouring steps, so zero the
padded steps of a sequence yourself if they must not leak into their neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fbp.core import Layer, ShapeError, check_shape, check_tree
from fbp.initializers import glorot_uniform, split, zeros
from fbp.nn._base import grad_sharding

__all__ = [
    "AvgPool1D",
    "AvgPool2D",
    "Conv1D",
    "Conv2D",
    "GlobalAvgPool",
    "MaxPool1D",
    "MaxPool2D",
    "PoolCache",
]

Array = jax.Array
Shape = tuple[int, ...]
Pads = tuple[tuple[int, int], ...]
IntOrTuple = int | Sequence[int]
Padding = str | int | Sequence[tuple[int, int]]
Initializer = Callable[[Array, Shape, Any], Array]

DY = "dy (the gradient of the output)"
DY_FIX = "Pass dL/dy with the shape forward's output had."


# --------------------------------------------------------------------------------------------
# Window geometry, shared by convolutions and pooling, for any number of spatial axes
# --------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _ints(where: str, arg: str, value: Any, n: int) -> Shape:
    """An int or ``n`` ints, all positive, as an ``n``-tuple."""
    items = (value,) * n if _is_int(value) else value
    if not (
        isinstance(items, (tuple, list))
        and len(items) == n
        and all(_is_int(v) and v > 0 for v in items)
    ):
        raise ValueError(f"{where}: {arg} must be a positive int or {n} of them, got {value!r}.")
    return tuple(int(v) for v in items)


def _padding(where: str, padding: Any, n: int) -> str | Pads:
    """``"valid"``, ``"same"``, or ``n`` explicit ``(lo, hi)`` pairs (an int ``p``: ``(p, p)``)."""
    if isinstance(padding, str) and padding.lower() in ("valid", "same"):
        return padding.lower()
    if _is_int(padding) and padding >= 0:
        return ((int(padding), int(padding)),) * n
    pairs = padding
    if n == 1 and isinstance(pairs, (tuple, list)) and len(pairs) == 2 and all(map(_is_int, pairs)):
        pairs = (pairs,)  # Conv1D(padding=(lo, hi))
    if (
        isinstance(pairs, (tuple, list))
        and len(pairs) == n
        and all(
            isinstance(p, (tuple, list)) and len(p) == 2 and all(_is_int(v) and v >= 0 for v in p)
            for p in pairs
        )
    ):
        return tuple((int(lo), int(hi)) for lo, hi in pairs)
    raise ValueError(
        f"{where}: padding must be 'valid', 'same', a non-negative int or {n} (lo, hi) pairs of "
        f"non-negative ints, got {padding!r}."
    )


def _size_text(t: Shape) -> str:
    """``(3, 3)`` -> ``"3x3"``."""
    return "x".join(map(str, t))


def _scalar_text(t: Shape) -> str:
    """``(2, 2)`` -> ``"2"``, ``(2, 1)`` -> ``"2x1"``."""
    return str(t[0]) if len(set(t)) == 1 else _size_text(t)


class _Axis(NamedTuple):
    """One spatial axis of a window sliding over an input: sizes, stride, dilation, padding."""

    n: int  # input size
    k: int  # window size
    s: int  # stride
    d: int  # dilation
    lo: int  # padding before
    hi: int  # padding after

    @property
    def k_eff(self) -> int:
        """The dilated window, ``(k - 1) * d + 1``."""
        return (self.k - 1) * self.d + 1

    @property
    def m(self) -> int:
        """The output size, ``floor((n + lo + hi - k_eff) / s) + 1`` (below 1: input too small)."""
        return (self.n + self.lo + self.hi - self.k_eff) // self.s + 1

    @property
    def transpose_pad(self) -> tuple[int, int]:
        """The padding that turns ``dilate(dy, s)`` back into an input-sized correlation.

        ``dilate(dy, s)`` (``s - 1`` zeros between entries) has ``(m - 1) * s + 1`` entries;
        padded by ``(k_eff - 1 - lo, n + lo - (m - 1) * s - 1)`` it has ``n + k_eff - 1``, so a
        stride-1 window of ``k_eff`` over it gives exactly ``n`` outputs. The second term holds
        the bottom/right inputs that no window read (when the stride does not divide ``n + lo +
        hi - k_eff``): they get a zero gradient. Negative entries crop: padding wider than the
        window.
        """
        return (self.k_eff - 1 - self.lo, self.n + self.lo - (self.m - 1) * self.s - 1)

    @property
    def read_pad(self) -> tuple[int, int]:
        """The forward padding cut to what the windows read: ``(lo, (m-1)*s + k_eff - n - lo)``.

        Then ``n + lo + hi' = (m - 1) * s + k_eff`` exactly, so the correlation of ``x`` with
        ``dilate(dy, s)`` that gives ``dw`` has exactly ``k`` outputs (window stride ``d``).
        """
        return (self.lo, (self.m - 1) * self.s + self.k_eff - self.n - self.lo)


class _Window(NamedTuple):
    """The static geometry of a sliding window: size, strides, dilation and padding spec."""

    size: Shape
    strides: Shape
    dilation: Shape
    padding: str | Pads

    def axes(self, sizes: Sequence[int]) -> tuple[_Axis, ...]:
        """The window over an input of spatial shape ``sizes``, one :class:`_Axis` per axis.

        ``"same"``: ``total = max((ceil(n / s) - 1) * s + k_eff - n, 0)``, ``lo = total // 2``.
        """
        geometry = zip(sizes, self.size, self.strides, self.dilation, strict=True)
        axes = [_Axis(int(n), k, s, d, 0, 0) for n, k, s, d in geometry]
        if self.padding == "same":
            totals = [max((-(-a.n // a.s) - 1) * a.s + a.k_eff - a.n, 0) for a in axes]
            pads = [(t // 2, t - t // 2) for t in totals]
        elif self.padding == "valid":
            return tuple(axes)
        else:
            pads = self.padding
        return tuple(a._replace(lo=lo, hi=hi) for a, (lo, hi) in zip(axes, pads, strict=True))

    def padding_text(self) -> str:
        if isinstance(self.padding, str):
            return self.padding
        return "pad " + (str(self.padding[0]) if len(self.padding) == 1 else str(self.padding))


def _pads(axes: Sequence[_Axis]) -> Pads:
    return tuple((a.lo, a.hi) for a in axes)


def _out(axes: Sequence[_Axis]) -> Shape:
    return tuple(a.m for a in axes)


def _spatial_letters(n: int) -> str:
    if not 1 <= n <= 3:
        raise ValueError(f"1 to 3 spatial axes are supported, got {n}.")
    return "DHW"[-n:]


def _layout(n: int, channels: str, batch: bool = True) -> str:
    """``(batch, height, width, 3 channels)``: the layout in words, for error messages."""
    space = "length" if n == 1 else "height, width"
    return f"({'batch, ' if batch else ''}{space}, {channels})"


def _check_rank(name: str, n: int, x: Array, layout: str) -> None:
    if x.ndim != n + 2:
        raise ShapeError(
            f"the input should have rank {n + 2}, {layout}, got shape {tuple(x.shape)}. Pass a "
            "batch of examples (x[None] makes a batch of one).",
            layer=name,
        )


def _fit(name: str, win: _Window, x: Array, what: str) -> tuple[_Axis, ...]:
    """The window over x's spatial axes; raise if it does not fit into the padded input."""
    axes = win.axes(x.shape[1:-1])
    if min(_out(axes)) < 1:
        raise ShapeError(
            f"the input's spatial shape {tuple(x.shape[1:-1])}, padded by {_pads(axes)}, is "
            f"too small for the {what} {tuple(a.k_eff for a in axes)}: no window fits along "
            "some axis. Pass a larger input, or use padding='same'.",
            layer=name,
        )
    return axes


def _as(a: Array, dtype: Any) -> Array:
    return a if a.dtype == dtype else a.astype(dtype)


def _grad_for(x: Array, dx: Array) -> Array | None:
    """``dx`` in x's dtype; ``None`` for an integer input (it has no gradient)."""
    return _as(dx, x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else None


def _x_like(x: Array) -> Array:
    """A zero-size array ``(0, *x.shape[1:])`` of x's dtype: x's static shape, as a pytree leaf."""
    return jnp.zeros((0, *x.shape[1:]), x.dtype)


# --------------------------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------------------------


def _conv(
    n: int,
    kind: str,
    filters: int,
    kernel_size: IntOrTuple,
    strides: IntOrTuple,
    padding: Padding,
    dilation: IntOrTuple,
    groups: int,
    use_bias: bool,
    w_init: Initializer,
    b_init: Initializer,
    dtype: Any,
) -> Layer:
    """The N-d convolution behind :func:`Conv1D` and :func:`Conv2D` (``n`` spatial axes)."""
    where = f"{kind}({filters!r}, {kernel_size!r})"
    if not (_is_int(filters) and filters > 0):
        raise ValueError(f"{where}: filters must be a positive int, got {filters!r}.")
    if not (_is_int(groups) and groups > 0 and filters % groups == 0):
        raise ValueError(
            f"{where}: groups must be a positive int dividing filters={filters}, got {groups!r}."
        )
    win = _Window(
        _ints(where, "kernel_size", kernel_size, n),
        _ints(where, "strides", strides, n),
        _ints(where, "dilation", dilation, n),
        _padding(where, padding, n),
    )
    words = [f"{kind}({filters}", _size_text(win.size)]
    if max(win.strides) > 1:
        words.append(f"stride {_scalar_text(win.strides)}")
    if max(win.dilation) > 1:
        words.append(f"dilation {_scalar_text(win.dilation)}")
    if groups > 1:
        words.append(f"groups {groups}")
    words.append(win.padding_text())
    if not use_bias:
        words.append("no bias")
    name = ", ".join(words) + ")"

    sp = _spatial_letters(n)
    # y  = x * w    : x (N, *sp, C) contracts C with w's I axis; filters are w's O axis.
    fwd_dims = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
    # dx = dy * w^T : the flipped w with its channel axes swapped, (*sp, F, Cin), so that dy's
    #                 filters contract with its input axis. The swap is materialised (the kernel
    #                 is small): read in place as (*sp, O, I), XLA:CPU runs the convolution
    #                 several times slower inside fit's scan, where it does not relayout it.
    dx_dims = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
    # dw = x * dy   : x's batch axis is the contracted "feature" axis, its channels the
    #                 "batch"; dy is the kernel (I = batch, O = filters). Both are transposed
    #                 to the canonical layouts first, x to (Cin, *space, B) and dy to (*space,
    #                 B, F), out (Cin, *k, F) -> (*k, Cin/G, F): inside a loop (fit's scan),
    #                 XLA:CPU does not reorder a convolution's operands itself, and runs one in
    #                 non-canonical layouts several times slower.
    dw_dims = ("N" + sp + "C", sp + "IO", "N" + sp + "C")

    channels = "channels" if groups == 1 else f"channels divisible by groups={groups}"

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != n + 1 or input_shape[-1] % groups:
            raise ShapeError(
                f"init needs the input shape without the batch axis, "
                f"{_layout(n, channels, batch=False)}, got {input_shape}.",
                layer=name,
            )
        out = _out(win.axes(input_shape[:-1]))
        if min(out) < 1:
            raise ShapeError(
                f"the input shape {input_shape} is too small for the kernel (its output would "
                f"have spatial shape {out}). Use a larger input or padding='same'.",
                layer=name,
            )
        k_w, k_b = split(key)
        params = {"w": w_init(k_w, (*win.size, input_shape[-1] // groups, filters), dtype)}
        if use_bias:
            params["b"] = b_init(k_b, (filters,), dtype)
        return (*out, filters), params, ()

    def check(params, state, x) -> tuple[_Axis, ...]:
        w = params.get("w") if isinstance(params, dict) else None
        per_group = w.shape[-2] if getattr(w, "ndim", 0) == n + 2 else x.shape[-1] // groups
        want = {"w": (*win.size, per_group, filters)}
        if use_bias:
            want["b"] = (filters,)
        check_tree(name, "params", params, want)
        check_tree(name, "state", state, (), f"{kind} has no state: pass ().")
        cin = per_group * groups
        _check_rank(name, n, x, _layout(n, f"{cin} channels"))
        check_shape(
            name,
            "the input",
            (None, *x.shape[1:-1], cin),
            x.shape,
            f"These params were made for {cin} input channels (the last axis); pass x with "
            f"{cin} channels, or re-run init with the input shape {tuple(x.shape[1:])}.",
        )
        return _fit(name, win, x, "dilated kernel")

    def forward(params, state, x, *, key=None, train=False, mask=None):
        axes = check(params, state, x)
        w = params["w"]  # (*k, Cin/G, F)
        y = lax.conv_general_dilated(
            _as(x, w.dtype),
            w,
            window_strides=win.strides,
            padding=_pads(axes),
            rhs_dilation=win.dilation,
            dimension_numbers=fwd_dims,
            feature_group_count=groups,
        )  # (B, *m, F)
        if use_bias:
            y = y + params["b"].reshape((1,) * (n + 1) + (filters,))
        return y, state, x

    def backward(params, cache, dy):
        """Per spatial axis, with ``xp`` = x padded by ``(lo, hi)`` and ``j`` = kernel index::

            y[o] = sum_j xp[o*s + j*d] w[j] + b

        dx: ``x[i]`` meets ``w[j]`` in output ``o`` when ``o*s + j*d = i + lo``. With ``dyd =
        dilate(dy, s)`` (``s - 1`` zeros between entries: ``dyd[o*s] = dy[o]``) and the
        flipped kernel ``wf[j] = w[k-1-j]``::

            dx[i] = sum_j dyd[i + lo - j*d] w[j] = sum_j dydp[i + j*d] wf[j]

        with ``dydp = pad(dyd, (k_eff-1-lo, n+lo-(m-1)s-1))`` (see ``_Axis.transpose_pad``): a
        stride-1 convolution of the dilated, padded dy with the flipped kernel whose in/out
        channel axes swap roles. One conv: ``lhs_dilation=s``, ``rhs_dilation=d``, the kernel
        transposed to ``(*k, F, Cin)`` (small; materialised so that XLA:CPU sees canonical
        layouts, also inside fit's scan). Groups: the filter axis ``F = (G, F/G)`` moves its
        group factor into the channel axis, ``(*k, F/G, G*Cin/G)``, and
        ``feature_group_count=G`` pairs the groups again.

        dw: ``dw[j] = sum_{b,o} xp[b, o*s + j*d] dy[b, o]``, a correlation of x (batch as the
        contracted axis, channels as the "batch", transposed to ``(Cin, *n, B)``) with dy as
        the kernel (``(*m, B, F)``). Stride and dilation
        swap roles: window stride ``d``, kernel dilation ``s``; padding ``(lo, (m-1)s + k_eff -
        n - lo)`` (``_Axis.read_pad``: the tail no window read is cut) gives exactly ``k``
        outputs. Groups: ``batch_group_count=G`` pairs channel group g of x with filter group
        g of dy.

        Terms and shapes::

            dx = conv(pad(dilate(dy, s)), flip(w)^T, dilation d)   # (B, *n, Cin)
            dw = conv(pad(x)^T, dilate(dy, s), stride d)            # (*k, Cin/G, F)
            db = sum_{b, space} dy                                  # (F,)
        """
        x, w = cache, params["w"]  # (B, *n, Cin), (*k, Cin/G, F)
        axes = win.axes(x.shape[1:-1])
        check_shape(name, DY, (x.shape[0], *_out(axes), filters), dy.shape, DY_FIX)
        dy, x = _as(dy, w.dtype), _as(x, w.dtype)  # (B, *m, F), (B, *n, Cin)
        w_t = lax.rev(w, tuple(range(n)))  # (*k, Cin/G, F): flipped in space
        if groups > 1:  # -> (*k, Cin/G, G, F/G) -> (*k, G, Cin/G, F/G) -> (*k, Cin, F/G)
            w_t = w_t.reshape((*win.size, w.shape[-2], groups, filters // groups))
            w_t = jnp.moveaxis(w_t, n + 1, n).reshape((*win.size, -1, filters // groups))
        w_t = jnp.swapaxes(w_t, -1, -2)  # (*k, F/G, Cin): dy's filters in, x's channels out
        dx = lax.conv_general_dilated(
            dy,
            w_t,
            window_strides=(1,) * n,
            padding=[a.transpose_pad for a in axes],
            lhs_dilation=win.strides,
            rhs_dilation=win.dilation,
            dimension_numbers=dx_dims,
            feature_group_count=groups,
        )  # (B, *n, Cin)
        x_t = jnp.moveaxis(x, (0, n + 1), (n + 1, 0))  # (Cin, *n, B)
        dy_t = jnp.moveaxis(dy, 0, n)  # (*m, B, F)
        dw = lax.conv_general_dilated(
            x_t,
            dy_t,
            window_strides=win.dilation,
            padding=[a.read_pad for a in axes],
            rhs_dilation=win.strides,
            dimension_numbers=dw_dims,
            batch_group_count=groups,
            out_sharding=grad_sharding(w, (n, *range(n), n + 1)),  # w's, in this layout
        )  # (Cin/G, *k, F): x's channels were the batch axis
        dw = jnp.moveaxis(dw, 0, n)  # (*k, Cin/G, F)
        grads = {"w": _as(dw, w.dtype)}
        if use_bias:
            grads["b"] = _as(jnp.sum(dy, axis=tuple(range(n + 1))), params["b"].dtype)  # (F,)
        return grads, _grad_for(cache, dx)

    config = (kind, filters, win, groups, use_bias, w_init, b_init, jnp.dtype(dtype))
    return Layer(init, forward, backward, name, config=config)


def Conv2D(
    filters: int,
    kernel_size: IntOrTuple,
    strides: IntOrTuple = 1,
    padding: Padding = "valid",
    dilation: IntOrTuple = 1,
    groups: int = 1,
    use_bias: bool = True,
    w_init: Initializer = glorot_uniform,
    b_init: Initializer = zeros,
    dtype: Any = jnp.float32,
) -> Layer:
    """2-D convolution (a cross-correlation, as in every DL library): NHWC in, NHWC out.

    ``y[b, p, q, f] = b[f] + sum_{i, j, c} xp[b, p*sh + i*dh, q*sw + j*dw, g(f)*Cin/G + c]
    * w[i, j, c, f]``, with ``xp`` the padded input and ``g(f) = f // (filters/G)`` the group
    of filter f. Params ``{"w": (kh, kw, Cin/groups, filters), "b": (filters,)}`` (no ``"b"``
    with ``use_bias=False``); glorot-uniform ``w`` and zero ``b``, as in Keras.

    kernel_size, strides and dilation take an int or a pair. padding: ``"valid"``, ``"same"``
    (TensorFlow's split: the odd pixel at the bottom/right), ``((top, bottom), (left,
    right))`` or an int. ``groups`` splits the input channels and the filters into ``groups``
    groups convolved separately (``groups = Cin``: depthwise). An input of another dtype than
    the params is cast to theirs (dx comes back in the input's dtype; ``None`` for integers).

    Backward (derived in the docstring of the layer's ``backward``)::

        dx = conv(pad(dilate(dy, s)), flip(w)^T, dilation d)   # (B, H, W, Cin)
        dw = conv(pad(x)^T, dilate(dy, s), stride d)            # (kh, kw, Cin/G, F)
        db = sum_{b, h, w} dy                                   # (F,)
    """
    return _conv(
        2, "Conv2D", filters, kernel_size, strides, padding, dilation, groups, use_bias,
        w_init, b_init, dtype,
    )  # fmt: skip


def Conv1D(
    filters: int,
    kernel_size: IntOrTuple,
    strides: IntOrTuple = 1,
    padding: Padding = "valid",
    dilation: IntOrTuple = 1,
    groups: int = 1,
    use_bias: bool = True,
    w_init: Initializer = glorot_uniform,
    b_init: Initializer = zeros,
    dtype: Any = jnp.float32,
) -> Layer:
    """1-D convolution over ``(batch, length, channels)``: :func:`Conv2D` with one spatial axis.

    Params ``{"w": (k, Cin/groups, filters), "b": (filters,)}``; padding ``"valid"``,
    ``"same"``, ``(left, right)`` or an int. The same code as Conv2D (see there).
    """
    return _conv(
        1, "Conv1D", filters, kernel_size, strides, padding, dilation, groups, use_bias,
        w_init, b_init, dtype,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------


class PoolCache(NamedTuple):
    """What max pooling's backward needs."""

    argmax: Array  # (B, *m, C) int: row-major offset, in its window, of the element chosen
    x_like: Array  # (0, *n, C): the input's shape and dtype, at no cost


def _pool(
    n: int,
    kind: str,
    pool_size: IntOrTuple,
    strides: IntOrTuple | None,
    padding: Padding,
    fwd: Callable[[tuple[_Axis, ...], Array], tuple[Array, Any]],
    bwd: Callable[[_Window, Any, Array], Array],
) -> Layer:
    """A pooling layer over ``n`` spatial axes from ``fwd(axes, x) -> (y, cache)`` and
    ``bwd(win, cache, dy) -> dx``; the cache's ``x_like`` gives x's shape."""
    where = f"{kind}({pool_size!r})"
    size = _ints(where, "pool_size", pool_size, n)
    win = _Window(
        size,
        size if strides is None else _ints(where, "strides", strides, n),
        (1,) * n,
        _padding(where, padding, n),
    )
    if not isinstance(win.padding, str) and any(
        max(lo, hi) >= k for (lo, hi), k in zip(win.padding, size, strict=True)
    ):
        raise ValueError(
            f"{where}: explicit padding must be smaller than the pool on each side (a window "
            f"of padding alone has no maximum or mean), got {padding!r}."
        )
    words = [f"{kind}({_size_text(size)}"]
    if win.strides != size:
        words.append(f"stride {_scalar_text(win.strides)}")
    name = ", ".join([*words, win.padding_text()]) + ")"

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != n + 1 or min(_out(win.axes(input_shape[:-1]))) < 1:
            raise ShapeError(
                f"init needs an input shape {_layout(n, 'channels', batch=False)} (without the "
                f"batch axis) that fits a {_size_text(size)} pool with padding "
                f"{win.padding_text()}, got {input_shape}.",
                layer=name,
            )
        return (*_out(win.axes(input_shape[:-1])), input_shape[-1]), (), ()

    def forward(params, state, x, *, key=None, train=False, mask=None):
        check_tree(name, "params", params, (), f"{kind} has no params: pass ().")
        check_tree(name, "state", state, (), f"{kind} has no state: pass ().")
        _check_rank(name, n, x, _layout(n, "channels"))
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name}: needs a floating-point input, got {x.dtype}. Cast it first.")
        y, cache = fwd(_fit(name, win, x, "pool"), x)
        return y, state, cache

    def backward(params, cache, dy):
        x_like = cache.x_like if isinstance(cache, PoolCache) else cache
        out = _out(win.axes(x_like.shape[1:-1]))
        check_shape(name, DY, (None, *out, x_like.shape[-1]), dy.shape, DY_FIX)
        return (), bwd(win, cache, dy)

    return Layer(init, forward, backward, name, config=(kind, win))


def _pool_dims(axes: Sequence[_Axis]) -> dict:
    """reduce_window's window, strides and padding, with unit batch and channel axes."""
    return {
        "window_dimensions": (1, *(a.k for a in axes), 1),
        "window_strides": (1, *(a.s for a in axes), 1),
        "padding": ((0, 0), *_pads(axes), (0, 0)),
    }


def _max_fwd(axes: tuple[_Axis, ...], x: Array) -> tuple[Array, PoolCache]:
    # A NumPy init value is concrete even under jit, so lax.reduce_window recognises the max
    # monoid and emits reduce_window_max, the primitive jax.grad can differentiate.
    lowest = np.array(-np.inf, x.dtype)
    y = lax.reduce_window(x, lowest, lax.max, **_pool_dims(axes))  # (B, *m, C)
    # Beside y, not part of it: backward's routing. Element o (row-major) of every window is a
    # strided slice of the padded input; each window keeps the first o whose element equals
    # its max. Padding counts, as -inf elements.
    xp = lax.pad(x, lowest, [(0, 0, 0), *((a.lo, a.hi, 0) for a in axes), (0, 0, 0)])
    size = tuple(a.k for a in axes)
    count = math.prod(size)
    argmax = jnp.full(y.shape, count - 1, jnp.int8 if count <= 127 else jnp.int32)
    for o in reversed(range(count - 1)):
        lead = np.unravel_index(o, size)
        stop = [i + (a.m - 1) * a.s + 1 for i, a in zip(lead, axes, strict=True)]
        steps = (1, *(a.s for a in axes), 1)
        at_o = lax.slice(xp, (0, *lead, 0), (x.shape[0], *stop, x.shape[-1]), steps)  # (B,*m,C)
        argmax = jnp.where(at_o == y, o, argmax)
    return y, PoolCache(argmax, _x_like(x))


def _max_bwd(win: _Window, cache: PoolCache, dy: Array) -> Array:
    """``dx[i] = sum of dy[w] over the windows w whose chosen element is i``.

    For every offset ``o`` of the window, ``where(argmax == o, dy, 0)`` (B, *m, C) goes back
    to input positions ``p*s + o - lo``: one ``lax.pad`` with interior padding ``s - 1`` (the
    stride), edge padding ``o - lo`` before and ``n + lo - o - (m-1)*s - 1`` after (negative:
    a crop of the forward padding), so the term is input-sized, (B, *n, C)::

        dx = sum_o pad(where(argmax == o, dy, 0), (o - lo, n + lo - o - (m-1)s - 1, s - 1))

    The terms are added from the last offset to the first: overlapping windows then add into an
    input in row-major window order, the order of XLA's SelectAndScatter, so dx equals
    jax.grad's bit for bit.
    """
    axes = win.axes(cache.x_like.shape[1:-1])
    dx = None
    for o in reversed(range(math.prod(win.size))):
        lead = np.unravel_index(o, win.size)
        chosen = jnp.where(cache.argmax == o, dy, np.zeros((), dy.dtype))  # (B, *m, C)
        edges = [
            (int(i) - a.lo, a.n + a.lo - int(i) - (a.m - 1) * a.s - 1, a.s - 1)
            for i, a in zip(lead, axes, strict=True)
        ]
        term = lax.pad(chosen, np.zeros((), dy.dtype), [(0, 0, 0), *edges, (0, 0, 0)])
        dx = term if dx is None else dx + term  # (B, *n, C)
    return _as(dx, cache.x_like.dtype)


def _window_counts(axes: Sequence[_Axis], dtype: Any) -> Array:
    """How many real (unpadded) inputs each window holds: ``(1, *m, 1)``, a trace-time constant.

    Along one axis, window p covers padded positions ``[p*s, p*s + k)`` and the input sits at
    ``[lo, lo + n)``; a window's count is the product of its per-axis overlaps.
    """
    counts = np.ones((), np.int64)
    for a in axes:
        starts = np.arange(a.m) * a.s
        overlap = np.minimum(starts + a.k, a.lo + a.n) - np.maximum(starts, a.lo)
        counts = np.multiply.outer(counts, overlap)
    return jnp.asarray(counts.reshape(1, *counts.shape, 1), dtype)


def _avg_fwd(axes: tuple[_Axis, ...], x: Array) -> tuple[Array, Array]:
    # A concrete (NumPy) zero makes this reduce_window_sum, as for max pooling above.
    total = lax.reduce_window(x, np.zeros((), x.dtype), lax.add, **_pool_dims(axes))
    return total / _window_counts(axes, x.dtype), _x_like(x)  # (B, *m, C)


def _avg_bwd(win: _Window, x_like: Array, dy: Array) -> Array:
    """``y = window_sum(x) / count``, so ``dx = window_sum^T(dy / count)``.

    ``window_sum^T`` spreads each output over its window: with ``g = dy / count`` (B, *m, C),
    ``dx[i] = sum_{o : o*s <= i + lo < o*s + k} g[o]``, a stride-1 window sum over ``pad(
    dilate(g, s), (k-1-lo, n+lo-(m-1)s-1))`` (``_Axis.transpose_pad``), which is input-sized::

        dx = reduce_window_sum(pad(dilate(dy / count, s)), k, stride 1)   # (B, *n, C)
    """
    axes = win.axes(x_like.shape[1:-1])
    g = dy / _window_counts(axes, dy.dtype)  # (B, *m, C)
    spread = [(*a.transpose_pad, a.s - 1) for a in axes]
    g = lax.pad(g, np.zeros((), g.dtype), [(0, 0, 0), *spread, (0, 0, 0)])  # (B, *n+k-1, C)
    ones = (1,) * g.ndim
    dx = lax.reduce_window(g, np.zeros((), g.dtype), lax.add, (1, *win.size, 1), ones, "VALID")
    return _as(dx, x_like.dtype)  # (B, *n, C)


def MaxPool2D(
    pool_size: IntOrTuple = 2, strides: IntOrTuple | None = None, padding: Padding = "valid"
) -> Layer:
    """Max over each ``pool_size`` window: (B, H, W, C) -> (B, H', W', C); no params.

    ``strides=None`` means ``pool_size`` (non-overlapping windows). ``"same"`` (and explicit)
    padding pads with -inf, so padding never wins a window that holds a number. Overlapping
    windows (pool 3, stride 2) are fine: an input that is the max of several windows gets the
    sum of their gradients.

    Ties: a window's gradient goes to exactly one element, its FIRST maximum in row-major
    order (the top-most, then left-most), the element that ``jax.grad`` of
    ``lax.reduce_window(x, -inf, lax.max, ...)`` picks: JAX differentiates reduce_window_max
    through ``select_and_gather_add(select=ge)``, whose transpose is XLA's SelectAndScatter
    with ``select = GE``; that walks each window in row-major order and keeps its current pick
    unless a later element is strictly greater. Padding is an element too: a window holding
    only -inf picks its first element, which may be padding, and then passes no gradient on,
    as with jax.grad. The backward equals jax.grad's bit for bit.

    Forward caches :class:`PoolCache`: the chosen element's offset in its window (int8) and
    x's shape. Backward (see ``_max_bwd``)::

        dx = sum_o pad(where(argmax == o, dy, 0), (o - lo, n + lo - o - (m-1)s - 1, s - 1))
    """
    return _pool(2, "MaxPool2D", pool_size, strides, padding, _max_fwd, _max_bwd)


def MaxPool1D(
    pool_size: IntOrTuple = 2, strides: IntOrTuple | None = None, padding: Padding = "valid"
) -> Layer:
    """:func:`MaxPool2D` over ``(batch, length, channels)``."""
    return _pool(1, "MaxPool1D", pool_size, strides, padding, _max_fwd, _max_bwd)


def AvgPool2D(
    pool_size: IntOrTuple = 2, strides: IntOrTuple | None = None, padding: Padding = "valid"
) -> Layer:
    """Mean over each ``pool_size`` window: (B, H, W, C) -> (B, H', W', C); no params.

    ``strides=None`` means ``pool_size``. Padding (``"same"`` or explicit) is EXCLUDED from the
    count, TensorFlow's convention: a 3x3 window with one row of padding averages its 6 real
    inputs (PyTorch's default, ``count_include_pad=True``, would divide by 9). Forward caches
    only x's shape (a zero-size array). Backward (see ``_avg_bwd``)::

        dx = reduce_window_sum(pad(dilate(dy / count, s), (k-1-lo, n+lo-(m-1)s-1)), k)
    """
    return _pool(2, "AvgPool2D", pool_size, strides, padding, _avg_fwd, _avg_bwd)


def AvgPool1D(
    pool_size: IntOrTuple = 2, strides: IntOrTuple | None = None, padding: Padding = "valid"
) -> Layer:
    """:func:`AvgPool2D` over ``(batch, length, channels)``."""
    return _pool(1, "AvgPool1D", pool_size, strides, padding, _avg_fwd, _avg_bwd)


def _global_avg_pool() -> Layer:
    name = "GlobalAvgPool"

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2:
            raise ShapeError(
                f"init needs an input shape (*space, channels) without the batch axis, got "
                f"{input_shape}.",
                layer=name,
            )
        return (input_shape[-1],), (), ()

    def forward(params, state, x, *, key=None, train=False, mask=None):
        check_tree(name, "params", params, (), "GlobalAvgPool has no params: pass ().")
        check_tree(name, "state", state, (), "GlobalAvgPool has no state: pass ().")
        if x.ndim < 3:
            raise ShapeError(
                f"the input should have rank 3 or more, (batch, *space, channels), got shape "
                f"{tuple(x.shape)}. Pass a batch of examples with their spatial axes.",
                layer=name,
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name}: needs a floating-point input, got {x.dtype}. Cast it first.")
        y = jnp.sum(x, axis=tuple(range(1, x.ndim - 1))) / math.prod(x.shape[1:-1])  # (B, C)
        return y, state, _x_like(x)

    def backward(params, x_like, dy):
        """``y = sum_space x / N``, so every input gets ``dy / N``::

        dx = broadcast(dy / N)   # (B, *space, C), N = prod(space)
        """
        space = x_like.shape[1:-1]
        check_shape(name, DY, (None, x_like.shape[-1]), dy.shape, DY_FIX)
        g = (dy / math.prod(space)).reshape((dy.shape[0], *(1,) * len(space), dy.shape[-1]))
        return (), _as(jnp.broadcast_to(g, (dy.shape[0], *x_like.shape[1:])), x_like.dtype)

    return Layer(init, forward, backward, name)


GlobalAvgPool: Layer = _global_avg_pool()
"""Mean over every spatial axis: (B, *space, C) -> (B, C). A layer, not a constructor."""

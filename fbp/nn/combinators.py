"""Combinators: networks from layers, with stax's names and meaning.

    serial(*layers)          x -> layers[-1](... layers[0](x))
    FanOut(n)                x -> (x, x, ..., x)                  n copies
    parallel(*layers)        (x_1, ..., x_n) -> (layers[0](x_1), ..., layers[n-1](x_n))
    FanInSum                 (x_1, ..., x_n) -> x_1 + ... + x_n
    FanInConcat(axis=-1)     (x_1, ..., x_n) -> concatenate along axis
    residual(layer)          x -> x + layer(x)

Backward runs the graph in reverse. Where a value feeds several layers (``FanOut``, the skip
path of ``residual``), the gradients of its uses are summed: the multivariate chain rule.
Params and states of a combinator are tuples with one entry per child (``residual`` has its
layer's). A key is split into one key per child, as stax does; ``train`` reaches every child,
and so does ``mask``, reduced (:func:`fbp.core.conform_mask`) once a layer has reduced an axis
it covers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fbp import initializers
from fbp.core import Layer, LayerError, ParamsError, ShapeError, conform_mask
from fbp.nn._base import check_dy, no_params, output_shape


def _as_layers(where: str, layers) -> tuple[Layer, ...]:
    if not layers:
        raise ValueError(f"{where}() needs at least one layer.")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            hint = (
                " Did you forget to call a constructor, e.g. nn.Dense(128)?"
                if callable(layer)
                else ""
            )
            raise TypeError(f"{where}: argument {i} is {layer!r}, not a Layer.{hint}")
    return tuple(layers)


def _split(key, n: int) -> tuple:
    return (None,) * n if key is None else tuple(jax.random.split(key, n))


def _at(layers, i: int, fn, *args, **kwargs):
    """Call ``fn`` for child ``i``; an error it raises names the child's index."""
    try:
        return fn(*args, **kwargs)
    except LayerError as e:
        raise e.within(i, layers[i].name) from None


def _per_child(name: str, what: str, tree, n: int) -> None:
    if not isinstance(tree, (tuple, list)) or len(tree) != n:
        raise ParamsError(
            f"should be a tuple of {n} entries, one per layer, got "
            + (f"a {type(tree).__name__} of length {len(tree)}" if isinstance(tree, (tuple, list))
               else type(tree).__name__)
            + ". Pass the params and state that this network's init returned.",
            layer=name,
            what=what,
        )  # fmt: skip


def _as_list(input_shape) -> list:
    return list(input_shape)


def _alone(input_shape) -> list:
    return [input_shape]


def serial(*layers: Layer) -> Layer:
    """Compose layers: forward in order, backward in reverse (the chain rule, layer by layer).

    Params, states and caches are tuples with one entry per layer. In evaluation mode the
    state comes back as the very object passed in.
    """
    layers = _as_layers("serial", layers)
    n = len(layers)
    name = "serial(" + ", ".join(layer.name for layer in layers) + ")"

    def init(key, input_shape):
        params, states, shape = [], [], input_shape
        for i, (layer, k) in enumerate(zip(layers, initializers.split(key, n), strict=True)):
            shape, p, s = _at(layers, i, layer.init, k, shape)
            params.append(p)
            states.append(s)
        return shape, tuple(params), tuple(states)

    def forward(params, state, x, *, key=None, train=False, mask=None):
        _per_child(name, "params", params, n)
        _per_child(name, "state", state, n)
        caches, states = [], []
        for i, (layer, p, s, k) in enumerate(
            zip(layers, params, state, _split(key, n), strict=True)
        ):
            x, s, cache = _at(layers, i, layer.forward, p, s, x, key=k, train=train, mask=mask)
            mask = conform_mask(mask, x)  # (batch, time) -> (batch,) once time is reduced
            caches.append(cache)
            states.append(s)
        return x, (tuple(states) if train else state), tuple(caches)

    def backward(params, caches, dy):
        grads = [None] * n
        for i in reversed(range(n)):
            grads[i], dy = _at(layers, i, layers[i].backward, params[i], caches[i], dy)
        return tuple(grads), dy

    def child_shapes(input_shape):
        shapes = []
        for layer in layers:
            shapes.append(input_shape)
            input_shape = output_shape(layer, input_shape)
        return shapes

    return Layer(init, forward, backward, name, layers, child_shapes, ("serial", layers))


def FanOut(n: int) -> Layer:
    """``x -> (x,) * n``. Backward sums the ``n`` incoming gradients, ``dx = sum_i dy_i``.

    Why a sum: with ``y_i = x`` for every branch, ``L = L(y_1, ..., y_n)`` depends on ``x``
    through each copy, and the multivariate chain rule adds the paths,
    ``dL/dx = sum_i dL/dy_i * dy_i/dx = sum_i dL/dy_i``. Backpropagation over any graph does
    this at every value used more than once.
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"FanOut(n={n!r}): n must be a positive int.")
    name = f"FanOut({n})"

    def init(key, input_shape):
        return (tuple(input_shape),) * n, (), ()

    def forward(params, state, x, *, key=None, train=False, mask=None):
        no_params(name, params, state)
        return (x,) * n, state, jnp.zeros((0, *x.shape[1:]), x.dtype)

    def backward(params, like, dys):
        if not isinstance(dys, (tuple, list)) or len(dys) != n:
            raise ShapeError(f"dy should be a tuple of {n} gradients, one per copy.", layer=name)
        for dy in dys:
            check_dy(name, (None, *like.shape[1:]), dy)
        dx = dys[0]
        for dy in dys[1:]:
            dx = dx + dy  # the fork: gradients of every use add up
        return (), dx

    return Layer(init, forward, backward, name, config=("FanOut", n))


def parallel(*layers: Layer) -> Layer:
    """``(x_1, ..., x_n) -> (layers[0](x_1), ..., layers[n-1](x_n))``: one layer per branch."""
    layers = _as_layers("parallel", layers)
    n = len(layers)
    name = "parallel(" + ", ".join(layer.name for layer in layers) + ")"

    def check_input(x):
        if not isinstance(x, (tuple, list)) or len(x) != n:
            raise ShapeError(
                f"the input should be a tuple of {n} arrays, one per branch, got "
                f"{type(x).__name__}. Put a FanOut({n}) before it.",
                layer=name,
            )

    def init(key, input_shape):
        check_input(input_shape)
        out = [
            _at(layers, i, layer.init, k, s)
            for i, (layer, k, s) in enumerate(
                zip(layers, initializers.split(key, n), input_shape, strict=True)
            )
        ]
        return tuple(o[0] for o in out), tuple(o[1] for o in out), tuple(o[2] for o in out)

    def forward(params, state, x, *, key=None, train=False, mask=None):
        _per_child(name, "params", params, n)
        _per_child(name, "state", state, n)
        check_input(x)
        out = [
            _at(layers, i, layer.forward, p, s, xi, key=k, train=train, mask=mask)
            for i, (layer, p, s, xi, k) in enumerate(
                zip(layers, params, state, x, _split(key, n), strict=True)
            )
        ]
        new_state = tuple(o[1] for o in out) if train else state
        return tuple(o[0] for o in out), new_state, tuple(o[2] for o in out)

    def backward(params, caches, dys):
        if not isinstance(dys, (tuple, list)) or len(dys) != n:
            raise ShapeError(f"dy should be a tuple of {n} gradients, one per branch.", layer=name)
        out = [_at(layers, i, layers[i].backward, params[i], caches[i], dys[i]) for i in range(n)]
        return tuple(o[0] for o in out), tuple(o[1] for o in out)

    return Layer(init, forward, backward, name, layers, _as_list, ("parallel", layers))


def _fan_in(name: str, x) -> None:
    if not isinstance(x, (tuple, list)) or len(x) < 1:
        raise ShapeError(
            f"the input should be a tuple of arrays (from FanOut and parallel), got "
            f"{type(x).__name__}.",
            layer=name,
        )


def _fan_in_init(name: str, input_shape) -> list[tuple]:
    shapes = [tuple(s) for s in input_shape] if isinstance(input_shape, (tuple, list)) else []
    if not shapes or not all(isinstance(s, tuple) for s in input_shape):
        raise ShapeError(
            f"needs a tuple of input shapes (from FanOut and parallel), got {input_shape}.",
            layer=name,
        )
    return shapes


def _fan_in_sum_init(key, input_shape):
    shapes = _fan_in_init("FanInSum", input_shape)
    if len(set(shapes)) != 1:
        raise ShapeError(f"the branches must have one shape to be added, got {shapes}.",
                         layer="FanInSum")  # fmt: skip
    return shapes[0], (), ()


def _fan_in_sum_forward(params, state, xs, *, key=None, train=False, mask=None):
    no_params("FanInSum", params, state)
    _fan_in("FanInSum", xs)
    if len({x.shape for x in xs}) != 1:
        raise ShapeError(
            f"the branches must have one shape to be added, got {[x.shape for x in xs]}. "
            "Give the branches matching output shapes.",
            layer="FanInSum",
        )
    y = xs[0]
    for x in xs[1:]:
        y = y + x
    return y, state, tuple(jnp.zeros((0, *x.shape[1:]), x.dtype) for x in xs)


def _fan_in_sum_backward(params, likes, dy):
    check_dy("FanInSum", (None, *likes[0].shape[1:]), dy)
    return (), tuple(dy for _ in likes)  # d(x_1 + ... + x_n)/dx_i = 1


FanInSum = Layer(_fan_in_sum_init, _fan_in_sum_forward, _fan_in_sum_backward, "FanInSum")
"""``(x_1, ..., x_n) -> x_1 + ... + x_n``; backward gives every branch ``dy``."""


def FanInConcat(axis: int = -1) -> Layer:
    """``(x_1, ..., x_n) -> concatenate(x, axis)``; backward splits ``dy`` at the same sizes.

    ``axis`` counts the batch axis (-1, the last, by default); it cannot be the batch axis.
    """
    if not isinstance(axis, int) or axis == 0:
        raise ValueError(f"FanInConcat(axis={axis!r}): axis must be an int other than 0 (batch).")
    name = "FanInConcat" if axis == -1 else f"FanInConcat(axis={axis})"

    def normalized(ndim: int) -> int:
        a = axis if axis >= 0 else ndim + axis
        if not 1 <= a < ndim:
            raise ShapeError(f"axis {axis} does not exist in inputs with {ndim} axes.", layer=name)
        return a

    def init(key, input_shape):
        shapes = _fan_in_init(name, input_shape)
        a = normalized(len(shapes[0]) + 1) - 1
        rest = {s[:a] + s[a + 1 :] for s in shapes}
        if len(rest) != 1 or len({len(s) for s in shapes}) != 1:
            raise ShapeError(f"the branches differ off the concatenation axis: {shapes}.",
                             layer=name)  # fmt: skip
        out = list(shapes[0])
        out[a] = sum(s[a] for s in shapes)
        return tuple(out), (), ()

    def forward(params, state, xs, *, key=None, train=False, mask=None):
        no_params(name, params, state)
        _fan_in(name, xs)
        a = normalized(xs[0].ndim)
        try:
            y = jnp.concatenate(xs, axis=a)
        except (TypeError, ValueError) as e:
            raise ShapeError(
                f"cannot concatenate branches of shapes {[x.shape for x in xs]} on axis "
                f"{axis}: {e}",
                layer=name,
            ) from None
        return y, state, tuple(jnp.zeros((0, *x.shape[1:]), x.dtype) for x in xs)

    def backward(params, likes, dy):
        a = normalized(dy.ndim)
        sizes = [like.shape[a] for like in likes]
        expected = list((None, *likes[0].shape[1:]))
        expected[a] = sum(sizes)
        check_dy(name, tuple(expected), dy)
        cuts, total = [], 0
        for s in sizes[:-1]:
            total += s
            cuts.append(total)
        return (), tuple(jnp.split(dy, cuts, axis=a))  # each branch gets its own slice

    return Layer(init, forward, backward, name, config=("FanInConcat", axis))


def residual(layer: Layer) -> Layer:
    """``x -> x + layer(x)`` (He et al., 2016); params and state are ``layer``'s own.

    Backward: ``dx = dy + dx_layer``, the skip path's gradient plus the layer's, summed at the
    fork (see :func:`FanOut`). ``layer`` must keep the shape of its input.
    """
    (layer,) = _as_layers("residual", (layer,))
    name = f"residual({layer.name})"

    def init(key, input_shape):
        shape, params, state = layer.init(key, input_shape)
        if tuple(shape) != tuple(input_shape):
            raise ShapeError(
                f"the layer must keep the input's shape to be added to it: {tuple(input_shape)} "
                f"-> {tuple(shape)}. End the branch with a layer that maps back, e.g. "
                f"Dense({input_shape[-1]}).",
                layer=name,
            )
        return shape, params, state

    def forward(params, state, x, *, key=None, train=False, mask=None):
        fx, new_state, cache = layer.forward(params, state, x, key=key, train=train, mask=mask)
        if fx.shape != x.shape:
            raise ShapeError(f"the layer changed the shape {x.shape} -> {fx.shape}.", layer=name)
        return x + fx, new_state, cache

    def backward(params, cache, dy):
        dparams, dx_layer = layer.backward(params, cache, dy)
        return dparams, dy + dx_layer  # skip path + layer path

    return Layer(init, forward, backward, name, (layer,), _alone, ("residual", layer))

"""The three contracts of fbp: ``Layer``, ``Loss`` and ``Optimizer``.

Layer(init, forward, backward, name, layers, child_shapes)
    init(key, input_shape)                            -> (output_shape, params, state)
    forward(params, state, x, *, key, train, mask)    -> (y, new_state, cache)
    backward(params, cache, dy)                       -> (dparams, dx)
    apply(params, state, x, *, key, train, mask)      -> y      a method: forward(...)[0]
  Shapes exclude the batch axis; x has one. ``state`` holds non-trainable arrays (BatchNorm's
  running statistics), ``()`` for most layers: no gradient is computed for it and no optimizer
  sees it. ``train`` (default False) is the mode, independent of ``key`` (a PRNG key for
  Dropout). With ``train=False``, ``new_state is state``. ``mask`` (default None) is a boolean
  array over x's leading axes, ``(batch,)`` or ``(batch, time)``, False on padding: layers that
  mix positions (BatchNorm's statistics, recurrences, attention) leave padding out, the others
  ignore it. ``cache`` holds only what backward needs; ``dparams`` has params' tree. Integer
  inputs (token ids) have no gradient: their ``dx`` is ``None``.
Loss(value, value_and_grad, name)
    value(pred, target, mask=None)          -> scalar    plain JAX: the autodiff reference
    value_and_grad(pred, target, mask=None) -> (scalar, dpred)   hand-written, dpred like pred
  The mean over examples (and positions); ``mask`` over pred's leading axes drops padding.
Optimizer(init, update)
    init(params)                  -> opt_state                 a NamedTuple with a ``count``
    update(grads, params, opt_state) -> (params, opt_state)    pure; same trees, shapes, dtypes
  Arguments and results in the same order, so ``jax.jit(opt.update, donate_argnums=(1, 2))``
  updates in place.

Params, states and caches are plain pytrees (dicts, tuples, NamedTuples of arrays), so ``jit``,
``scan``, ``vmap``, sharding and :mod:`fbp.io` checkpoints work on them unchanged.

Equality is structural: each of the three types may carry a ``config``, the hashable recipe
its constructor was called with (``("Dense", 128, ...)``, ``("adam", 1e-3, 0.9, ...)``), and
two objects with equal configs (and the same function code) are equal and hash alike, so
``optim.adam(1e-3)`` built twice is one optimizer to ``jax.jit``'s cache and ``fit`` compiles
once. Without a config, or with one that does not hash (a dict, an array), equality falls back
to the identity of the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

Array = jax.Array
PyTree = Any
Shape = tuple[int, ...]


def _identity(obj: tuple) -> tuple:
    """What equality and hashing compare. With a config that hashes: the config, and the code
    (not the closure) of each function, so that two constructions of the same recipe are
    equal while a copy with a function replaced (``layer._replace(forward=...)``) is not.
    Otherwise: the identity of each function and the other fields."""
    config = obj.config
    if config is not None:
        try:
            hash(config)
        except TypeError:
            config = None
    if config is not None:
        code = tuple(getattr(f, "__code__", id(f)) if callable(f) else f for f in obj[:-1])
        return (type(obj).__name__, config, code)
    return (type(obj).__name__, *(id(f) if callable(f) else f for f in obj[:-1]))


class _Structural:
    """Equality and hashing by :func:`_identity` (mixed into the NamedTuples below)."""

    def __eq__(self, other):
        return type(other) is type(self) and _identity(self) == _identity(other)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(_identity(self))


class Layer(NamedTuple):
    """A layer: three pure functions (see the module docstring), a name and its children.

    ``layers`` lists a combinator's children and ``child_shapes(input_shape)`` the input shape
    each child sees (used by :func:`fbp.nn.summary`); both are empty for a plain layer.
    ``config`` is the constructor's recipe (see the module docstring on equality).
    """

    init: Callable[..., tuple[Any, PyTree, PyTree]]
    forward: Callable[..., tuple[Any, PyTree, PyTree]]
    backward: Callable[[PyTree, PyTree, Any], tuple[PyTree, Any]]
    name: str = "Layer"
    layers: tuple[Layer, ...] = ()
    child_shapes: Callable[[Any], Sequence[Any]] | None = None
    config: Hashable | None = None

    __eq__, __ne__, __hash__ = _Structural.__eq__, _Structural.__ne__, _Structural.__hash__

    def apply(
        self,
        params: PyTree,
        state: PyTree,
        x: Any,
        *,
        key: jax.Array | None = None,
        train: bool = False,
        mask: Array | None = None,
    ) -> Any:
        """The output alone, ``forward(...)[0]``: the one forward computation of every layer."""
        return self.forward(params, state, x, key=key, train=train, mask=mask)[0]

    def __repr__(self) -> str:
        return self.name


class Loss(NamedTuple):
    """A loss: ``value`` in plain JAX (the autodiff reference) and its hand-written gradient."""

    value: Callable[..., Array]
    value_and_grad: Callable[..., tuple[Array, Array]]
    name: str = "loss"
    config: Hashable | None = None

    __eq__, __ne__, __hash__ = _Structural.__eq__, _Structural.__ne__, _Structural.__hash__

    def __call__(self, pred: Array, target: Array, mask: Array | None = None) -> Array:
        return self.value(pred, target, mask)

    def grad(self, pred: Array, target: Array, mask: Array | None = None) -> Array:
        """dloss/dpred, hand-written; same shape and dtype as ``pred``."""
        return self.value_and_grad(pred, target, mask)[1]

    def __repr__(self) -> str:
        return self.name


class Optimizer(NamedTuple):
    """An optimizer: ``init(params) -> state``, ``update(grads, params, state) -> (params, state)``."""

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]]
    name: str = "optimizer"
    config: Hashable | None = None

    __eq__, __ne__, __hash__ = _Structural.__eq__, _Structural.__ne__, _Structural.__hash__

    def __repr__(self) -> str:
        return self.name


class LayerError(ValueError):
    """An input, params or state that does not fit a layer; raised at trace time.

    The message names the layer, its index path inside combinators (``layer 2.0`` is child 0
    of child 2), the leaf path for params and state (``params[2][0]['w']``), what was expected,
    what was given, and how to fix the call. Combinators add their index with :meth:`within`.
    """

    def __init__(
        self,
        message: str,
        *,
        layer: str | None = None,
        what: str | None = None,
        leaf: str = "",
        path: tuple[int, ...] = (),
    ):
        self.message, self.layer, self.what, self.leaf, self.path = message, layer, what, leaf, path
        super().__init__(str(self))

    def __str__(self) -> str:
        dotted = ".".join(str(i) for i in self.path)
        where = f"layer {dotted} ({self.layer})" if self.path else (self.layer or "")
        subject = ""
        if self.what is not None:
            subject = self.what + "".join(f"[{i}]" for i in self.path) + self.leaf + " "
        return f"{where}: {subject}{self.message}" if where else subject + self.message

    def within(self, index: int, child_name: str) -> LayerError:
        """The same error seen from a combinator whose child ``index`` raised it."""
        return type(self)(
            self.message,
            layer=self.layer or child_name,
            what=self.what,
            leaf=self.leaf,
            path=(index, *self.path),
        )


class ShapeError(LayerError):
    """An input (or dy) whose shape does not fit the layer or loss."""


class ParamsError(LayerError):
    """Params or state that do not fit the network: a different structure or leaf shape."""


def check_shape(where: str, what: str, expected: tuple, got: tuple, fix: str) -> None:
    """Raise :class:`ShapeError` unless ``got`` matches ``expected`` (``None`` matches any size).

    ``where`` names the layer or loss, ``what`` the argument, ``fix`` says how to fix the call.
    """
    got = tuple(got)
    ok = len(expected) == len(got) and all(
        e is None or e == g for e, g in zip(expected, got, strict=True)
    )
    if not ok:
        sizes = ["batch" if e is None else str(e) for e in expected]
        shown = f"({sizes[0]},)" if len(sizes) == 1 else "(" + ", ".join(sizes) + ")"
        raise ShapeError(f"{what} should have shape {shown}, got {got}. {fix}", layer=where)


def conform_mask(mask: Array | None, y: Any) -> Array | None:
    """The mask for a value ``y`` computed from masked inputs: ``mask`` itself while it covers
    ``y``'s leading axes; once a layer has reduced an axis the mask covers (an RNN without
    ``return_sequences`` reduces time), the trailing mask axes are reduced by ``any`` (an
    example counts if any of its steps does) until the mask fits, down to ``(batch,)``.
    Tuples (branches) keep the mask as it is."""
    if mask is None or not hasattr(y, "shape"):
        return mask
    while mask.ndim > 1 and tuple(y.shape[: mask.ndim]) != tuple(mask.shape):
        mask = mask.any(axis=-1)
    return mask


def _describe(tree: PyTree) -> str:
    if isinstance(tree, dict):
        return f"a dict with keys {sorted(tree)}"
    if isinstance(tree, (tuple, list)):
        return f"a {type(tree).__name__} of length {len(tree)}"
    shape = getattr(tree, "shape", None)
    return f"an array of shape {tuple(shape)}" if shape is not None else repr(tree)


def check_tree(where: str, what: str, got: PyTree, want: PyTree, fix: str = "") -> None:
    """Raise :class:`ParamsError` unless ``got`` has ``want``'s structure and leaf shapes.

    ``want`` is a tree whose leaves are non-empty shapes (tuples of ints) or arrays and
    ``jax.ShapeDtypeStruct``\\ s (their shape is taken); ``()`` is an empty container. The
    message names the first leaf path that differs, e.g. ``params['w']``, with both shapes.
    It runs at trace time, so it costs nothing inside a compiled program.
    """
    fix = fix or "Pass the params and state that this network's init returned."

    def fail(path, problem):
        raise ParamsError(f"{problem}. {fix}", layer=where, what=what, leaf=path)

    def walk(g, w, path):
        if isinstance(w, tuple) and w and all(isinstance(d, (int, np.integer)) for d in w):
            shape = getattr(g, "shape", None)
            if shape is None or tuple(shape) != w:
                got_text = f"shape {tuple(shape)}" if shape is not None else _describe(g)
                fail(path, f"should have shape {w}, got {got_text}")
            return
        if hasattr(w, "shape") and not isinstance(w, (dict, tuple, list)):
            return walk(g, tuple(w.shape), path)
        if isinstance(w, dict):
            if not isinstance(g, dict) or set(g) != set(w):
                fail(path, f"should be {_describe(w)}, got {_describe(g)}")
            for k in w:
                walk(g[k], w[k], f"{path}[{k!r}]")
            return
        if isinstance(w, (tuple, list)):
            if not isinstance(g, (tuple, list)) or len(g) != len(w):
                fail(path, f"should be {_describe(w)}, got {_describe(g)}")
            for i, (gi, wi) in enumerate(zip(g, w, strict=True)):
                walk(gi, wi, f"{path}[{i}]")
            return
        raise TypeError(f"check_tree: cannot describe {w!r}")

    walk(got, want, "")

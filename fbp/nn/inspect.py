"""Looking at a network without running it: ``summary`` and ``check_params``."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fbp.core import Layer, PyTree
from fbp.nn._base import output_shape


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    index: str  # "2" or "3.0.1" inside combinators
    depth: int
    name: str
    output_shape: tuple
    params: int  # trainable values
    state: int  # non-trainable values (BatchNorm's running statistics)


@dataclasses.dataclass(frozen=True)
class Summary:
    """``nn.summary``'s result: rows and totals; ``print`` shows the table."""

    title: str
    rows: tuple[SummaryRow, ...]
    total_params: int
    total_state: int

    def __str__(self) -> str:
        head = ("#", "layer", "output shape", "params", "state")
        body = [
            (r.index, "  " * r.depth + r.name, str(r.output_shape), f"{r.params:,}", f"{r.state:,}")
            for r in self.rows
        ]
        widths = [max(len(row[c]) for row in [head, *body]) for c in range(len(head))]
        align = [str.ljust, str.ljust, str.ljust, str.rjust, str.rjust]

        def line(row):
            cells = zip(align, row, widths, strict=True)
            return "  ".join(a(c, w) for a, c, w in cells).rstrip()

        rule = "-" * len(line(head))
        return "\n".join(
            [self.title, rule, line(head), rule, *map(line, body), rule,
             f"total params: {self.total_params:,}",
             f"total state values: {self.total_state:,}"]
        )  # fmt: skip


def _count(tree: PyTree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _sizes(layer: Layer, input_shape) -> tuple:
    shapes = {}

    def f(key):
        out, params, state = layer.init(key, input_shape)
        shapes["out"] = out
        return params, state

    params, state = jax.eval_shape(f, jax.random.key(0))
    return shapes["out"], _count(params), _count(state)


def _short(layer: Layer) -> str:
    return layer.name.split("(")[0] if layer.layers else layer.name


def summary(net: Layer, input_shape) -> Summary:
    """A table in the spirit of Keras's ``model.summary()``: one row per layer (index, name,
    output shape, number of params, number of state values), combinators with their children
    nested below them, and the totals. Nothing is allocated: shapes come from
    ``jax.eval_shape`` of ``init``. ``input_shape`` excludes the batch axis."""
    rows: list[SummaryRow] = []

    def visit(layer: Layer, shape, index: str, depth: int) -> None:
        out, n_params, n_state = _sizes(layer, shape)
        rows.append(SummaryRow(index, depth, _short(layer), out, n_params, n_state))
        if layer.layers:
            for i, (child, s) in enumerate(
                zip(layer.layers, layer.child_shapes(shape), strict=True)
            ):
                visit(child, s, f"{index}.{i}", depth + 1)

    out, total_params, total_state = _sizes(net, tuple(input_shape))
    if net.layers:  # the top combinator's children are the rows
        for i, (child, s) in enumerate(
            zip(net.layers, net.child_shapes(tuple(input_shape)), strict=True)
        ):
            visit(child, s, str(i), 0)
    else:
        visit(net, tuple(input_shape), "0", 0)
    title = f"{_short(net)}: input {tuple(input_shape)} -> output {out}"
    return Summary(title, tuple(rows), total_params, total_state)


def check_params(net: Layer, params: PyTree, state: PyTree, input_shape, dtype=jnp.float32) -> None:
    """Raise :class:`fbp.core.ParamsError` (or :class:`~fbp.core.ShapeError`) unless ``params``
    and ``state`` fit ``net`` for inputs of shape ``(batch, *input_shape)``, naming the layer and
    the leaf path. Runs ``net.forward`` abstractly (``jax.eval_shape``): nothing is computed."""
    x = jax.ShapeDtypeStruct((1, *input_shape), dtype)
    jax.eval_shape(lambda p, s, x: net.forward(p, s, x)[0], params, state, x)


__all__ = ["Summary", "SummaryRow", "check_params", "output_shape", "summary"]

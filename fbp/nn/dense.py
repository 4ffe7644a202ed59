"""The fully connected layer."""

from __future__ import annotations

import jax.numpy as jnp

from fbp import initializers
from fbp.core import Layer, ShapeError, check_shape, check_tree
from fbp.nn._base import check_dy, grad_sharding, lead


def Dense(
    out_dim: int,
    *,
    w_init: initializers.Initializer = initializers.glorot_uniform,
    b_init: initializers.Initializer = initializers.zeros,
    dtype=jnp.float32,
) -> Layer:
    """Fully connected: ``y = x @ w + b`` over the last axis; params ``{"w": (in, out), "b": (out,)}``.

    Backward, with ``x`` viewed as ``(n, in)`` (``n`` = all leading axes)::

        dw = x^T dy      # (in, out)
        db = sum_n dy    # (out,)
        dx = dy w^T      # (n, in)

    With the batch split over devices (``fit(..., mesh=...)``), ``dw`` and ``db`` are sums over
    it that XLA completes with an all-reduce; ``dw`` is given ``w``'s sharding, which a mesh
    with Explicit axes requires of a contraction over a sharded axis.

    Defaults as Keras: glorot-uniform ``w`` and zero ``b``. Params of another width, and an
    input whose last axis is not ``in``, raise at trace time, naming both shapes.
    """
    if not (isinstance(out_dim, int) and out_dim > 0):
        raise ValueError(f"Dense(out_dim={out_dim!r}): out_dim must be a positive int.")
    name = f"Dense({out_dim})"

    def init(key, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 1:
            raise ShapeError(f"needs an input with a feature axis, got {input_shape}.", layer=name)
        k_w, k_b = initializers.split(key)
        params = {
            "w": w_init(k_w, (input_shape[-1], out_dim), dtype),
            "b": b_init(k_b, (out_dim,), dtype),
        }
        return (*input_shape[:-1], out_dim), params, ()

    def check(params, state, x):
        w = params.get("w") if isinstance(params, dict) else None
        in_dim = w.shape[0] if getattr(w, "ndim", 0) == 2 else x.shape[-1]
        check_tree(name, "params", params, {"w": (in_dim, out_dim), "b": (out_dim,)})
        check_tree(name, "state", state, (), "Dense has no state: pass ().")
        if x.ndim < 2 or x.shape[-1] != in_dim:
            lead_axes = (None, *x.shape[1:-1]) if x.ndim >= 2 else (None,)
            check_shape(
                name,
                "the input",
                (*lead_axes, in_dim),
                x.shape,
                f"This layer was initialized for {in_dim} input features (its last axis); pass "
                f"x of shape (batch, ..., {in_dim}), or re-run init with the input shape "
                f"{tuple(x.shape[1:])}.",
            )

    def forward(params, state, x, *, key=None, train=False, mask=None):
        check(params, state, x)
        return x @ params["w"] + lead(params["b"], x.ndim), state, x

    def backward(params, x, dy):
        w = params["w"]
        check_dy(name, (*x.shape[:-1], w.shape[1]), dy)
        x2 = x.reshape(-1, x.shape[-1])  # (n, in)
        dy2 = dy.reshape(-1, dy.shape[-1])  # (n, out)
        dw = jnp.matmul(x2.T, dy2, out_sharding=grad_sharding(w))  # (in, out)
        db = dy2.sum(0)  # (out,)
        dx = dy @ w.T  # (..., in)
        # In the params' dtype, as autodiff gives it (a float64 x must not widen float32 grads).
        return {"w": dw.astype(w.dtype), "b": db.astype(params["b"].dtype)}, dx

    return Layer(init, forward, backward, name,
                 config=("Dense", out_dim, w_init, b_init, jnp.dtype(dtype)))  # fmt: skip

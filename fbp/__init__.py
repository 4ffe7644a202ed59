"""fbp: functional backpropagation in JAX.

A network is a pure function over a parameter pytree; every layer's and every loss's backward
pass is written by hand from the chain rule, and verified against JAX's autodiff (``grad``) and finite
differences (:mod:`fbp.check`).

    from fbp import nn, losses, optim
    net = nn.serial(nn.Dense(128), nn.BatchNorm(), nn.Relu, nn.Dense(10))
    out_shape, params, state = net.init(jax.random.key(0), (64,))
    (loss, state), grads = fbp.value_and_grad(net, losses.softmax_cross_entropy)(
        params, state, x, y)
"""

from fbp import (
    check,
    checkpoint,
    datasets,
    initializers,
    io,
    losses,
    metrics,
    nn,
    optim,
    schedules,
    train,
)
from fbp.backprop import as_custom_vjp, forward_backward, value_and_grad
from fbp.core import Layer, LayerError, Loss, Optimizer, ParamsError, ShapeError

__version__ = "0.2.0"

__all__ = [
    "Layer",
    "LayerError",
    "Loss",
    "Optimizer",
    "ParamsError",
    "ShapeError",
    "__version__",
    "as_custom_vjp",
    "check",
    "checkpoint",
    "datasets",
    "forward_backward",
    "initializers",
    "io",
    "losses",
    "metrics",
    "nn",
    "optim",
    "schedules",
    "train",
    "value_and_grad",
]

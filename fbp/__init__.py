"""fbp: functional backpropagation in JAX.

A network is a pure function over a parameter pytree; every layer's and every loss's backward
pass is written by hand from the chain rule, and verified against JAX's autodiff (``grad``) and finite
differences (:mod:`fbp.check`).

    from fbp import nn, losses, optim
    net = nn.serial(nn.Dense(128), nn.Relu, nn.Dense(10))
    out_shape, params = net.init(jax.random.key(0), (64,))
    loss, grads = fbp.value_and_grad(net, losses.softmax_cross_entropy)(params, x, y)
"""

from fbp import (
    check,
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
from fbp.core import Layer, Loss, Optimizer, ShapeError

__version__ = "0.1.0"

__all__ = [
    "Layer",
    "Loss",
    "Optimizer",
    "ShapeError",
    "__version__",
    "as_custom_vjp",
    "check",
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

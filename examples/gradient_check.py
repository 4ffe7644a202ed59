"""Verify hand-written backward passes with ``fbp.check``, and watch it catch a bug.

Every layer and loss in fbp computes its gradient by hand. ``fbp.check`` compares them, in
float64, with two references that share no code with them:

* ``jax.grad`` of the plain forward computation (``loss.value(net.apply(params, state, x),
  y)``), which shares the forward but not the backward pass;
* central finite differences ``(L(p + h v) - L(p - h v)) / 2h`` along random directions ``v``.

What it teaches: how to read the report (one row per parameter array, plus ``dL/dx``; relative
errors near 1e-16 mean "exact up to rounding", finite-difference errors near 1e-10 are the
truncation and rounding floor of the method), how to check a single layer with
``check_layer`` (its backward against ``jax.vjp`` of its apply), and what a wrong derivative
looks like: a Tanh whose backward uses ``1 - y`` instead of ``1 - y**2`` fails loudly.

Run: ``python examples/gradient_check.py`` (``--fast`` is accepted and changes nothing; the
check takes a few seconds either way).
"""

import argparse

import jax
import jax.numpy as jnp

from fbp import check, losses, nn
from fbp.core import Layer

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--fast", action="store_true", help="accepted for uniformity; no effect")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
k_init, k_x, k_y, k_drop, k_layer = jax.random.split(jax.random.key(args.seed), 5)

# 1. A whole network and loss. Dropout gets a fixed key, so all three computations share a mask.
net = nn.serial(
    nn.Dense(16), nn.LayerNorm(), nn.Gelu, nn.Dropout(0.2), nn.Dense(8), nn.Tanh, nn.Dense(3)
)
_, params, state = net.init(k_init, (5,))
x = jax.random.normal(k_x, (4, 5))  # (batch, features)
y = jax.random.randint(k_y, (4,), 0, 3)  # integer class labels
report = check.check_grads(net, losses.softmax_cross_entropy, params, state, x, y, key=k_drop)
print(report)
print(f"network ok: {report.ok}\n")

# 2. One layer on its own: backward(params, cache, dy) against jax.vjp of apply.
layer_report = check.check_layer(nn.LayerNorm(), k_layer, (6,))
print(layer_report)
print(f"LayerNorm ok: {layer_report.ok}\n")


# 3. A layer with a wrong derivative: d tanh(x)/dx is 1 - y**2, not 1 - y.
def _tanh_forward(params, state, x, *, key=None, train=False, mask=None):
    y = jnp.tanh(x)
    return y, state, y  # cache the output, which is all the derivative needs


def _buggy_backward(params, y, dy):
    return (), (1 - y) * dy  # BUG: should be (1 - y * y) * dy


buggy_tanh = Layer(
    init=lambda key, shape: (tuple(shape), (), ()),  # output shape, no params, no state
    forward=_tanh_forward,
    backward=_buggy_backward,
    name="BuggyTanh",
)
bug_report = check.check_layer(buggy_tanh, k_layer, (6,))
print(bug_report)
print(f"BuggyTanh ok: {bug_report.ok} (the check caught the bug: {not bug_report.ok})")

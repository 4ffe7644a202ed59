"""Vanishing and exploding gradients through time, measured with the hand-written BPTT.

A loss on the LAST output of a recurrent layer, ``L = sum(y_T)``, and the norm of its gradient
with respect to each input step, ``||dL/dx_t||``, against how many steps back ``t`` lies
(``nn.grad_norm_over_time``, which runs the layer's forward and its hand-written backward).
Backpropagation through time multiplies the gradient at every step by the step's Jacobian:

    SimpleRNN  dL/dh_{t-1} = (dL/dh_t * (1 - h_t^2)) U^T     a product of T - t such factors
    LSTM       dL/dc_{t-1} = dL/dc_t * f_t  + (paths through h)   the forget gate f_t

With Keras's initialization (orthogonal U, tanh' <= 1) the SimpleRNN's factor has norm below 1
and its gradient vanishes geometrically. The LSTM's cell path is scaled by the forget gate alone
(about 0.73 at the start: the sigmoid of the forget bias 1), so its gradient vanishes more
slowly and reaches further back. The GRU, with zero biases, starts with an update gate near 0.5
on its direct path and vanishes fastest here. A linear recurrence whose U is 1.2 times
orthogonal multiplies the gradient by 1.2 per step: it explodes. The layers are untrained: this
is the situation at the start of training, which decides what can be learned at all.

Prints the table; writes ``--out`` (default ``gradient_norms.png``) when matplotlib is installed
(``pip install 'fbp[plot]'``). ``--fast``: 30 steps instead of 100.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fbp import nn

jax.config.update("jax_enable_x64", True)  # norms down to 1e-30 and below, without underflow
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--fast", action="store_true", help="30 steps instead of 100")
parser.add_argument("--out", default="gradient_norms.png", help="where to write the PNG")
args = parser.parse_args()
T, B, F, U = (30 if args.fast else 100), 4, 8, 32

x = jax.random.normal(jax.random.key(0), (B, T, F), jnp.float64)  # (batch, time, features)
LAYERS = {
    "SimpleRNN": nn.SimpleRNN(U),
    "GRU": nn.GRU(U),
    "LSTM": nn.LSTM(U),
    "linear, U x 1.2": nn.SimpleRNN(U, activation="linear"),
}
norms = {}
for label, layer in LAYERS.items():
    _, params, _ = layer.init(jax.random.key(1), (T, F))  # Keras's initializers
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    if label.startswith("linear"):
        params["recurrent_kernel"] = 1.2 * params["recurrent_kernel"]  # 1.2 x orthogonal
    per_step = jax.jit(lambda p, x, layer=layer: nn.grad_norm_over_time(layer, p, x))(params, x)
    norms[label] = np.asarray(per_step)[::-1]  # index: steps back from the last one

print("||dL/dx_t||, L = sum of the last output; rows: steps back from the end (T - 1 - t)")
print(f"{'back':>6}" + "".join(f"{label:>17}" for label in norms))
for back in [b for b in (0, 1, 2, 5, 10, 20, 30, 50, 75, 99) if b < T]:
    print(f"{back:6d}" + "".join(f"{v[back]:17.3e}" for v in norms.values()))
print(
    f"{'factor':>6}" + "".join(f"{(v[-1] / v[1]) ** (1 / (T - 2)):17.3f}" for v in norms.values())
)
print("(factor: the geometric mean of the per-step ratio)")

try:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib not installed; pip install 'fbp[plot]' to get the PNG")
else:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, v in norms.items():
        ax.plot(np.arange(T), v, label=label)
    ax.set(xlabel="steps back from the last input", ylabel="||dL/dx_t||", yscale="log")
    ax.set_title(f"gradient norm through time, {U} units, Keras's initialization")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")

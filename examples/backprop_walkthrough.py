"""Backpropagation by hand, step by step, for x -> Dense -> Tanh (or Sigmoid) -> Dense -> MSE.

Forward pass, with a batch of B examples, D inputs, H hidden units and K outputs:

    h     = x W1 + b1        (B, H)    pre-activation
    a     = tanh(h)          (B, H)    activation (or sigmoid(h))
    y_hat = a W2 + b2        (B, K)    prediction
    L     = mean((y_hat - y)**2)       scalar, the mean over all B*K elements

Backward pass: the chain rule, from the loss back to each weight, one local derivative at a time:

    dL/dy_hat = 2 (y_hat - y) / (B K)                       (B, K)
    dL/dW2    = a^T dL/dy_hat       [dy_hat/dW2 is a]       (H, K)
    dL/db2    = sum over the batch of dL/dy_hat             (K,)
    dL/da     = dL/dy_hat W2^T      [dy_hat/da is W2]       (B, H)
    dL/dh     = dL/da * (1 - a**2)  [da/dh, elementwise; sigmoid: a (1 - a)]
    dL/dW1    = x^T dL/dh           [dh/dW1 is x]           (D, H)
    dL/db1    = sum over the batch of dL/dh                 (H,)

Each hand-computed gradient is printed beside ``jax.grad``'s (used here only to verify), then
``fbp.value_and_grad`` on the same weights gives the same numbers, and a few steps of gradient
descent ``W <- W - lr dL/dW`` make the loss go down. Runs in float64 so the differences are
rounding only (~1e-16). ``--fast`` is accepted and changes nothing (the script takes seconds).
"""

import argparse

import jax

jax.config.update("jax_enable_x64", True)  # float64: hand and autodiff agree to ~1e-16
import jax.numpy as jnp

import fbp
from fbp import losses, nn

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--activation", choices=["tanh", "sigmoid"], default="tanh")
parser.add_argument("--fast", action="store_true", help="accepted for uniformity; no effect")
args = parser.parse_args()
B, D, H, K, lr = 8, 3, 4, 2, 0.5
kx, ky, k1, k2 = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(kx, (B, D))
y = jax.random.normal(ky, (B, K))
p = {"W1": 0.5 * jax.random.normal(k1, (D, H)), "b1": jnp.zeros(H),
     "W2": 0.5 * jax.random.normal(k2, (H, K)), "b2": jnp.zeros(K)}  # fmt: skip
act = jnp.tanh if args.activation == "tanh" else jax.nn.sigmoid


def loss_fn(p):  # the forward pass as one formula: what jax.grad differentiates
    return jnp.mean((act(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"] - y) ** 2)


print("1. forward pass")
h = x @ p["W1"] + p["b1"]
a = act(h)
y_hat = a @ p["W2"] + p["b2"]
L = jnp.mean((y_hat - y) ** 2)
print(f"   x {x.shape} -> h {h.shape} -> a {a.shape} -> y_hat {y_hat.shape};  L = {L:.6f}")

print("2. backward pass, one chain-rule factor at a time")
dL_dyhat = 2 * (y_hat - y) / y_hat.size  # (B, K)
da_dh = 1 - a**2 if args.activation == "tanh" else a * (1 - a)  # (B, H), elementwise
dL_da = dL_dyhat @ p["W2"].T  # (B, H)
dL_dh = dL_da * da_dh  # (B, H)
hand = {"W1": x.T @ dL_dh, "b1": dL_dh.sum(0), "W2": a.T @ dL_dyhat, "b2": dL_dyhat.sum(0)}
for name, value in [("dL/dy_hat", dL_dyhat), ("dy_hat/dW2 = a", a), ("dy_hat/da = W2", p["W2"]),
                    ("dL/da", dL_da), ("da/dh", da_dh), ("dL/dh", dL_dh), ("dh/dW1 = x", x)]:  # fmt: skip
    first_row = value.reshape(-1, value.shape[-1])[0]
    print(f"   {name:<15} shape {value.shape!s:<7} first row {first_row}")

print("3. the gradients, by hand and by jax.grad")
auto = jax.grad(loss_fn)(p)
for name in hand:
    diff = float(jnp.max(jnp.abs(hand[name] - auto[name])))
    print(f"   dL/d{name:<3} {hand[name].shape!s:<7} hand {hand[name].ravel()[:3]}  "
          f"jax.grad {auto[name].ravel()[:3]}  max |diff| {diff:.1e}")  # fmt: skip

print("4. the same network in fbp: value_and_grad runs forward, loss gradient, backward")
net = nn.serial(nn.Dense(H), nn.Tanh if args.activation == "tanh" else nn.Sigmoid, nn.Dense(K))
fbp_params = ({"w": p["W1"], "b": p["b1"]}, (), {"w": p["W2"], "b": p["b2"]})
state = ((), (), ())  # no layer here keeps state
(L_fbp, _), g = fbp.value_and_grad(net, losses.mse)(fbp_params, state, x, y)  # like fbp_params
fbp_grads = {"W1": g[0]["w"], "b1": g[0]["b"], "W2": g[2]["w"], "b2": g[2]["b"]}
diff = max(float(jnp.max(jnp.abs(fbp_grads[k] - hand[k]))) for k in hand)
print(f"   fbp loss {L_fbp:.6f} (by hand {L:.6f}), max |fbp grad - hand grad| {diff:.1e}")

print(f"5. one gradient-descent step with the hand gradients: W <- W - {lr} dL/dW")
p_new = {k: p[k] - lr * hand[k] for k in p}
print(f"   loss {L:.6f} -> {loss_fn(p_new):.6f}")
print("   four more steps with fbp: value_and_grad, then the same update on its params")
fbp_params = ({"w": p_new["W1"], "b": p_new["b1"]}, (), {"w": p_new["W2"], "b": p_new["b2"]})
vg = fbp.value_and_grad(net, losses.mse)
for step in range(2, 6):
    fbp_params = jax.tree.map(lambda w, dw: w - lr * dw, fbp_params, vg(fbp_params, state, x, y)[1])
    print(f"   after step {step}: loss {vg(fbp_params, state, x, y)[0][0]:.6f}")
final = vg(fbp_params, state, x, y)[0][0]
print(f"   the loss went down from {L:.6f} to {final:.6f}: {bool(final < L)}")

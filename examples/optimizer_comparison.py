"""SGD, SGD with momentum, RMSprop and Adam on the same network, data and initial weights.

An MLP on the digits data set is trained four times from the SAME initial params and the same
shuffling key, so only the update rule differs. What it teaches:

* an optimizer is a pair of pure functions, ``init(params) -> state`` and
  ``update(grads, params, opt_state) -> (params, opt_state)``; swapping it changes nothing else;
* the state is a NamedTuple you can inspect (``SgdState``, ``RmspropState``, ``AdamState``);
* momentum's effective step is about ``lr / (1 - momentum)``, so SGD with momentum 0.9 and
  lr 0.01 takes steps about as long as plain SGD with lr 0.1, but smoother ones;
* the adaptive methods (RMSprop, Adam) rescale each weight's step by a running RMS of its
  gradients, and are far less sensitive to the learning rate.

Writes the loss curves to ``--out`` (default ``optimizer_comparison.png``) when matplotlib is
installed (``pip install 'fbp[plot]'``). Run with ``--fast`` for 3 epochs.
"""

import argparse

import jax

from fbp import datasets, losses, nn, optim, train

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--fast", action="store_true", help="3 epochs instead of 20 (a smoke test)")
parser.add_argument("--out", default="optimizer_comparison.png", help="where to write the PNG")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

X, y = datasets.load_digits(scale=True)
X_train, X_test, y_train, y_test = datasets.train_test_split(X, y, seed=args.seed, stratify=y)
net = nn.serial(nn.Dense(64), nn.Relu, nn.Dense(10))
loss = losses.softmax_cross_entropy
_, init_params, init_state = net.init(jax.random.key(args.seed), (64,))  # shared by every run

OPTIMIZERS = {
    "sgd(0.1)": optim.sgd(0.1),
    "sgd(0.01, momentum=0.9)": optim.sgd(0.01, momentum=0.9),
    "rmsprop(1e-3)": optim.rmsprop(1e-3),
    "adam(1e-3)": optim.adam(1e-3),
}
epochs = 3 if args.fast else 20
curves = {}
print(f"{'optimizer':<24} {'train loss':>10} {'test loss':>10} {'test accuracy':>14}  state")
for name, opt in OPTIMIZERS.items():
    params, state, opt_state, history = train.fit(
        net,
        loss,
        opt,
        init_params,  # fit does not modify it: every run starts from the same weights
        init_state,
        (X_train, y_train),
        epochs=epochs,
        batch_size=32,
        key=jax.random.key(args.seed + 1),  # the same minibatch order for every optimizer
        verbose=0,
    )
    curves[name] = history["loss"]
    test = train.evaluate(net, loss, params, state, (X_test, y_test), metrics=["accuracy"])
    print(
        f"{name:<24} {history['loss'][-1]:>10.4f} {test['loss']:>10.4f} "
        f"{test['accuracy']:>14.4f}  {type(opt_state).__name__}{opt_state._fields}"
    )

try:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib not installed; pip install 'fbp[plot]' to get the PNG")
else:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=name)
    ax.set(xlabel="epoch", ylabel="training loss (mean over the epoch)", yscale="log")
    ax.set_title("digits: one MLP, four optimizers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")

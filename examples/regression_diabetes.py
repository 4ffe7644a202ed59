"""Regression with mean squared error and plain SGD on the diabetes data set.

442 patients, 10 baseline features (age, sex, bmi, blood pressure, six serum measurements), and a
target: disease progression one year later (25..346). What it teaches:

* standardize features AND target with statistics of the training split only: SGD's step size
  then means the same thing for every weight, and the loss starts near 1;
* the network ends in ``Dense(1)`` with no activation, and the target has the prediction's
  shape ``(N, 1)``: fbp's losses never broadcast, so ``y[:, None]`` is required;
* ``losses.mse``'s hand-written gradient is ``2 (pred - target) / n``;
* report errors in the target's original units, and beside a baseline (always predict the
  training mean): a model is only useful if it beats that.

Run: ``python examples/regression_diabetes.py`` (200 epochs), ``--fast`` for 10 epochs.
"""

import argparse

import jax
import numpy as np

from fbp import datasets, losses, nn, optim, train

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--fast", action="store_true", help="10 epochs instead of 200 (a smoke test)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

X, y = datasets.load_diabetes()  # (442, 10) float32, (442,) float32
X_train, X_test, y_train, y_test = datasets.train_test_split(X, y, seed=args.seed)
X_train, X_test = datasets.standardize(X_train, X_test)
y_mean, y_std = y_train.mean(), y_train.std()
t_train = ((y_train - y_mean) / y_std)[:, None]  # (N, 1), like the prediction
t_test = ((y_test - y_mean) / y_std)[:, None]

net = nn.serial(nn.Dense(32), nn.Tanh, nn.Dense(1))
_, params, state = net.init(jax.random.key(args.seed), (10,))
params, state, _, history = train.fit(
    net,
    losses.mse,
    optim.sgd(0.01),
    params,
    state,
    (X_train, t_train),
    epochs=10 if args.fast else 200,
    batch_size=32,
    key=jax.random.key(args.seed + 1),
    validation_data=(X_test, t_test),
    verbose=0,
)
n = len(history["loss"])
for e in [*range(0, n - 1, max(n // 5, 1)), n - 1]:
    train_mse, test_mse = history["loss"][e], history["val_loss"][e]
    print(f"epoch {e + 1:4d}: train mse {train_mse:.4f}, test mse {test_mse:.4f} (standardized)")

pred = np.asarray(train.predict(net, params, state, X_test))[:, 0] * y_std + y_mean  # in units
mse = float(np.mean((pred - y_test) ** 2))
mae = float(np.mean(np.abs(pred - y_test)))
base_mse = float(np.mean((y_mean - y_test) ** 2))
r2 = 1.0 - mse / float(np.var(y_test))
print(f"baseline (predict the training mean): test mse {base_mse:.1f}")
print(f"test mse: {mse:.1f} - test mae: {mae:.2f} - test R^2: {r2:.3f}")

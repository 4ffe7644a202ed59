"""Binary classification with sigmoid cross-entropy on the breast cancer data set.

569 tumours, 30 features computed from cell-nucleus images, labelled malignant (0) or benign (1).
What it teaches:

* one output unit holding a logit, and ``losses.sigmoid_binary_cross_entropy`` on it: the
  sigmoid lives inside the loss (stable for any logit) and the gradient is ``(sigmoid(x) - t)/n``;
* targets are floats of the prediction's shape ``(N, 1)``; nothing is broadcast;
* features whose scales differ by orders of magnitude must be standardized (train statistics);
* a stratified split keeps the class balance (63% benign) equal in train and test;
* accuracy alone hides which mistakes are made: print the confusion matrix, and turn logits
  into probabilities with ``nn.Sigmoid`` when you need them.

Run: ``python examples/binary_breast_cancer.py`` (50 epochs), ``--fast`` for 5 epochs.
"""

import argparse

import jax
import numpy as np

from fbp import datasets, losses, nn, optim, train

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--fast", action="store_true", help="5 epochs instead of 50 (a smoke test)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

X, y = datasets.load_breast_cancer()  # (569, 30) float32, (569,) int32
X_train, X_test, y_train, y_test = datasets.train_test_split(X, y, seed=args.seed, stratify=y)
X_train, X_test = datasets.standardize(X_train, X_test)
t_train = y_train.astype(np.float32)[:, None]  # (N, 1) float targets, like the logits
t_test = y_test.astype(np.float32)[:, None]
print(f"train: {len(y_train)} ({y_train.mean():.0%} benign), test: {len(y_test)}")

net = nn.serial(nn.Dense(16), nn.Relu, nn.Dense(1))  # one logit per example
loss = losses.sigmoid_binary_cross_entropy
_, params, state = net.init(jax.random.key(args.seed), (30,))
params, state, _, history = train.fit(
    net,
    loss,
    optim.adam(1e-3),
    params,
    state,
    (X_train, t_train),
    epochs=5 if args.fast else 50,
    batch_size=32,
    key=jax.random.key(args.seed + 1),
    metrics=["accuracy"],  # logits > 0  <=>  probability > 0.5
    verbose=0,
)
print(
    f"train loss {history['loss'][0]:.4f} -> {history['loss'][-1]:.4f} after {len(history['loss'])} epochs"
)

result = train.evaluate(net, loss, params, state, (X_test, t_test), metrics=["accuracy"])
print(f"test loss: {result['loss']:.4f} - test accuracy: {result['accuracy']:.4f}")

logits = train.predict(net, params, state, X_test)  # (N, 1)
prob = np.asarray(nn.Sigmoid.apply((), (), logits))[:, 0]  # P(benign)
pred = (prob > 0.5).astype(np.int32)
print("confusion matrix (rows: true, columns: predicted)")
print("              malignant  benign")
for label, name in enumerate(["malignant", "benign"]):
    row = [int(np.sum((y_test == label) & (pred == p))) for p in (0, 1)]
    print(f"  {name:>9}   {row[0]:9d}  {row[1]:6d}")
unsure = np.argsort(np.abs(prob - 0.5))[:3]
print(
    "least certain test cases: "
    + ", ".join(f"P(benign)={prob[i]:.2f} (true {y_test[i]})" for i in unsure)
)

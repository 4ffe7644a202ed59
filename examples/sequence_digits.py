"""An LSTM reads each digit image row by row: sequential digits, a small classic RNN benchmark.

Each 8x8 image of the bundled digits data set becomes a sequence of 8 steps, one row of 8 grey
levels per step; ``--mnist`` takes MNIST-5k instead, 28 steps of 28 pixels (4000 training and
1000 test images). The network is Keras's

    # keras.Sequential([keras.layers.LSTM(64), keras.layers.Dense(10)])

in fbp: ``nn.serial(nn.LSTM(64), nn.Dense(10))``. The LSTM keeps Keras's defaults (gates i, f,
c, o; glorot-uniform kernel, orthogonal recurrent kernel, forget bias 1) and returns its last
state; the Dense layer gives logits for ``softmax_cross_entropy``. Training backpropagates
through time: the LSTM's backward is a reverse ``lax.scan`` that carries dL/dh and dL/dc from
the last row to the first, written by hand (``fbp/nn/sequence.py``) and checked against
``jax.grad`` in the tests. ``train.fit`` compiles each epoch into one program.

Run: ``python examples/sequence_digits.py`` (30 epochs), ``--mnist`` for MNIST-5k, ``--fast``
for 3 epochs on digits (a smoke test).
"""

import argparse
import time

import jax
import numpy as np

from fbp import datasets, losses, nn, optim, train

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--fast", action="store_true", help="3 epochs (a smoke test)")
parser.add_argument("--mnist", action="store_true", help="MNIST-5k, 28 steps of 28 pixels")
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
start = time.perf_counter()

if args.mnist:  # 5000 images: 4000 train, 1000 test
    X, y = datasets.load_mnist_5k(scale=True)  # (5000, 784) float32 in 0..1
    side = 28
    split = dict(test_size=1000)
else:  # 1797 images: 1437 train, 360 test
    X, y = datasets.load_digits(scale=True)  # (1797, 64) float32 in 0..1
    side = 8
    split = dict(test_size=0.2)
X = X.reshape(-1, side, side)  # (n, time = rows, features = pixels of a row)
X_train, X_test, y_train, y_test = datasets.train_test_split(
    X, y, seed=args.seed, stratify=y, **split
)
print(f"{len(X_train)} train, {len(X_test)} test sequences of {side} steps x {side} pixels")

model = nn.serial(nn.LSTM(64), nn.Dense(10))  # (batch, side, side) -> (batch, 10) logits
_, params, state = model.init(jax.random.key(args.seed), (side, side))
print(nn.summary(model, (side, side)))

params, state, _, history = train.fit(
    model,
    losses.softmax_cross_entropy,
    optim.adam(3e-3),
    params,
    state,
    (X_train, y_train),
    epochs=3 if args.fast else args.epochs,
    batch_size=32,
    key=jax.random.key(args.seed + 1),
    metrics=["accuracy"],
    verbose=1,
)
result = train.evaluate(
    model, losses.softmax_cross_entropy, params, state, (X_test, y_test), metrics=["accuracy"]
)
print(f"test loss: {result['loss']:.4f} - test accuracy: {result['accuracy']:.4f}")

read = np.argmax(train.predict(model, params, state, X_test), axis=-1)  # (n_test,)
wrong = np.flatnonzero(read != y_test)
print(
    f"{len(wrong)} of {len(y_test)} test digits misread; the first (label -> read as): "
    + ", ".join(f"{y_test[i]} -> {read[i]}" for i in wrong[:5])
)
print(f"total time: {time.perf_counter() - start:.1f}s")

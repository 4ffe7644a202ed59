"""A small convolutional network on MNIST-5k: 4000 images to train on, 1000 held out.

    Conv2D(16, 3x3, same) - BatchNorm - Relu - MaxPool2D(2)     (28, 28, 1) -> (14, 14, 16)
    Conv2D(32, 3x3, same) - BatchNorm - Relu - MaxPool2D(2)                  -> (7, 7, 32)
    Flatten - Dense(10)                                                      -> 10 logits

What it teaches: images go in channels-last, ``(batch, height, width, channels)``
(``load_mnist_5k(as_images=True)``); a convolution shares its 3x3 weights over every position,
so 20k parameters do better than the 100k of the MLP of ``python -m fbp train --data mnist5k``
(0.945); BatchNorm keeps running statistics in the network's *state*, which ``fit`` returns
and ``evaluate`` uses (evaluation mode). Every backward pass is hand-written: dx of a
convolution is a transposed convolution of dy with the flipped kernel, dw correlates the input
with dy, and max pooling routes each gradient to the first maximum of its window.

Run: ``python examples/cnn_mnist.py`` (10 epochs), ``--fast`` for 2 epochs on 1000 images.
"""

import argparse
import time

import jax

from fbp import datasets, losses, nn, optim, train

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--fast", action="store_true", help="2 epochs on 1000 images (a smoke test)")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

X, y = datasets.load_mnist_5k(scale=True, as_images=True)  # (5000, 28, 28, 1), (5000,)
X_train, X_test, y_train, y_test = datasets.train_test_split(
    X, y, test_size=1000, seed=args.seed, stratify=y
)
if args.fast:
    X_train, y_train = X_train[:1000], y_train[:1000]

net = nn.cnn([16, 32], 10)  # the network drawn above (BatchNorm with momentum 0.9)
print(nn.summary(net, (28, 28, 1)))
_, params, state = net.init(jax.random.key(args.seed), (28, 28, 1))
loss = losses.softmax_cross_entropy

t0 = time.perf_counter()
params, state, _, history = train.fit(
    net,
    loss,
    optim.adam(1e-3),
    params,
    state,
    (X_train, y_train),
    epochs=2 if args.fast else args.epochs,
    batch_size=64,
    key=jax.random.key(args.seed + 1),
    metrics=["accuracy"],
    verbose=1,
)
took = time.perf_counter() - t0
result = train.evaluate(net, loss, params, state, (X_test, y_test), metrics=["accuracy"])
print(f"training: {took:.1f}s (compilation included) for {len(history['loss'])} epochs")
print(f"test loss: {result['loss']:.4f} - test accuracy: {result['accuracy']:.4f}")

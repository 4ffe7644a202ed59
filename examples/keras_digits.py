"""The Keras digits example, rewritten in fbp.

The Keras original, line by line beside its fbp translation below:

    # model = keras.Sequential([
    #     keras.layers.Dense(64, activation="relu"),
    #     keras.layers.Dense(10, activation="softmax"),
    # ])
    # model.compile(optimizer=keras.optimizers.Adam(),
    #               loss="categorical_crossentropy", metrics=["accuracy"])
    # model.fit(X_train, keras.utils.to_categorical(y_train), epochs=30, batch_size=32)
    # model.evaluate(X_test, keras.utils.to_categorical(y_test))

What it teaches:

* a network is a value: ``nn.serial(...)`` gives ``init``, ``forward`` and ``backward``
  functions, and the params (and the state, empty here) are plain tuples of dicts that you hold
  and pass around (no hidden state);
* activations are layers of their own (``nn.Relu``), not a keyword of ``Dense``;
* the final softmax moves into the loss: ``softmax_cross_entropy`` takes logits, which is
  stable and makes its hand-written gradient simply ``(softmax(logits) - one_hot) / batch``;
  integer labels are accepted, so ``to_categorical`` is not needed;
* Keras's Adam folds the bias correction into the step size, ``lr sqrt(1 - b2^t) / (1 - b1^t)``,
  and adds epsilon (1e-7) to the uncorrected ``sqrt(nu)`` ("epsilon hat");
  ``optim.adam(1e-3, eps=1e-7, eps_hat=True)`` is exactly that update.

Run: ``python examples/keras_digits.py`` (30 epochs, a few seconds), ``--fast`` for 3 epochs.
"""

import argparse

import jax
import numpy as np

from fbp import datasets, losses, nn, optim, train

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--fast", action="store_true", help="3 epochs instead of 30 (a smoke test)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# Data: 1797 8x8 digit images as 64 grey levels in 0..1, a stratified 80/20 split.
X, y = datasets.load_digits(scale=True)  # (1797, 64) float32, (1797,) int32
X_train, X_test, y_train, y_test = datasets.train_test_split(X, y, seed=args.seed, stratify=y)

# keras.Sequential([Dense(64, activation="relu"), Dense(10, activation="softmax")])
model = nn.serial(nn.Dense(64), nn.Relu, nn.Dense(10))  # outputs logits; softmax is in the loss
_, params, state = model.init(jax.random.key(args.seed), (64,))  # Keras: on the first batch

# model.compile(optimizer=Adam(), loss="categorical_crossentropy", metrics=["accuracy"])
loss = losses.softmax_cross_entropy
optimizer = optim.adam(1e-3, eps=1e-7, eps_hat=True)  # Keras's Adam, exactly

# model.fit(X_train, y_train, epochs=30, batch_size=32)
params, state, opt_state, history = train.fit(
    model,
    loss,
    optimizer,
    params,
    state,
    (X_train, y_train),
    epochs=3 if args.fast else 30,
    batch_size=32,
    key=jax.random.key(args.seed + 1),  # shuffling (and Dropout, if there were any)
    metrics=["accuracy"],
    verbose=1,
)

# model.evaluate(X_test, y_test)
result = train.evaluate(model, loss, params, state, (X_test, y_test), metrics=["accuracy"])
print(f"test loss: {result['loss']:.4f} - test accuracy: {result['accuracy']:.4f}")

# model.predict(X_test[:5]) would give softmax probabilities; here the softmax is explicit.
probs = nn.Softmax.apply((), (), train.predict(model, params, state, X_test[:5]))  # (5, 10)
for p, label in zip(np.asarray(probs), y_test[:5], strict=True):
    print(f"label {label}: predicted {p.argmax()} with probability {p.max():.3f}")

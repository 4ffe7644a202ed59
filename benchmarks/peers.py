"""fbp's ``fit`` against the tools a user would pick instead, on the same problem.

    python benchmarks/peers.py                # 5 rounds, about 3 minutes on 2 cores
    python benchmarks/peers.py --quick        # 1 round
    python benchmarks/peers.py --model cnn    # the small CNN of examples/cnn_mnist.py instead
    python benchmarks/peers.py --cache DIR    # JAX's persistent compilation cache in DIR, warm

The problem is the seed's example: MNIST-5k, 4000 examples to train on and 1000 to test, an MLP
784-256-10 with ReLU (``--model cnn``: Conv2D 16 and 32 with BatchNorm and max pooling), Adam
with learning rate 1e-3, batch 64, 10 epochs, softmax cross-entropy. The competitors:

    fbp      fbp.train.fit
    keras    Keras 3 model.fit on the JAX backend (KERAS_BACKEND=jax)
    torch    PyTorch, the standard loop: randperm, slices, zero_grad/backward/step
    jax      a Python loop of jitted steps, jax.value_and_grad + the same Adam (fbp.optim),
             donated (bench.py's jax_grad_step)

Each run is a fresh process (so compilation is paid every time, as a user pays it), timed from
building the model to the end of training, imports excluded ("end to end"); then the same
process trains 10 more epochs with everything compiled ("per epoch, steady"). Rounds are
interleaved, the order of the competitors reversed every round, and each figure is the median
over rounds. Keras and PyTorch come from the ``bench`` extra (``pip install -e '.[bench]'``); a
competitor whose package is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np

EPOCHS, BATCH, LR = 10, 64, 1e-3
TAG = "PEER_RESULT "


def data():
    from fbp import datasets

    X, y = datasets.load_mnist_5k(scale=True)
    Xtr, Xte, ytr, yte = datasets.train_test_split(X, y, test_size=1000, seed=0, stratify=y)
    return Xtr.astype(np.float32), Xte.astype(np.float32), ytr, yte


def run_fbp(model: str) -> dict:
    import jax

    from fbp import losses, nn, optim, train

    Xtr, Xte, ytr, yte = data()
    if model == "cnn":
        Xtr, Xte = Xtr.reshape(-1, 28, 28, 1), Xte.reshape(-1, 28, 28, 1)
    t0 = time.perf_counter()
    net = nn.mlp([256, 10]) if model == "mlp" else nn.cnn([16, 32], 10)
    _, params, state = net.init(jax.random.key(0), Xtr.shape[1:])
    loss, opt = losses.softmax_cross_entropy, optim.adam(LR)
    kw = dict(batch_size=BATCH, key=jax.random.key(1), verbose=0)
    params, state, opt_state, _ = train.fit(
        net, loss, opt, params, state, (Xtr, ytr), epochs=EPOCHS, **kw
    )
    jax.block_until_ready(params)
    cold = time.perf_counter() - t0
    acc = train.evaluate(net, loss, params, state, (Xte, yte), metrics=["accuracy"])["accuracy"]
    t0 = time.perf_counter()
    out = train.fit(net, loss, opt, params, state, (Xtr, ytr), epochs=2 * EPOCHS,
                    initial_epoch=EPOCHS, opt_state=opt_state, **kw)  # fmt: skip
    jax.block_until_ready(out[0])
    return {"cold_s": cold, "epoch_s": (time.perf_counter() - t0) / EPOCHS, "accuracy": acc}


def run_jax(model: str) -> dict:
    """The loop a JAX user writes: numpy permutation, host slices, one jitted step per batch."""
    import jax
    import jax.numpy as jnp
    from bench import jax_grad_step  # the same reference step as bench.py's

    from fbp import losses, nn, optim

    Xtr, Xte, ytr, yte = data()
    if model == "cnn":
        Xtr, Xte = Xtr.reshape(-1, 28, 28, 1), Xte.reshape(-1, 28, 28, 1)
    loss = losses.softmax_cross_entropy
    t0 = time.perf_counter()
    net = nn.mlp([256, 10]) if model == "mlp" else nn.cnn([16, 32], 10)
    _, params, state = net.init(jax.random.key(0), Xtr.shape[1:])
    opt = optim.adam(LR)
    opt_state = opt.init(params)
    step = jax_grad_step(net, loss, opt)  # value_and_grad + update, jitted and donated

    rng = np.random.default_rng(0)

    def epochs(n, params, state, opt_state):
        for _ in range(n):
            perm = rng.permutation(len(Xtr))
            for i in range(0, len(Xtr), BATCH):
                idx = perm[i : i + BATCH]
                params, state, opt_state, value = step(
                    params, state, opt_state, jnp.asarray(Xtr[idx]), jnp.asarray(ytr[idx])
                )
            float(value)  # the epoch's end: fetch a number, as a user printing the loss does
        return params, state, opt_state

    params, state, opt_state = epochs(EPOCHS, params, state, opt_state)
    cold = time.perf_counter() - t0
    pred = net.apply(params, state, jnp.asarray(Xte))
    acc = float(jnp.mean(jnp.argmax(pred, -1) == jnp.asarray(yte)))
    t0 = time.perf_counter()
    epochs(EPOCHS, params, state, opt_state)
    return {"cold_s": cold, "epoch_s": (time.perf_counter() - t0) / EPOCHS, "accuracy": acc}


def run_keras(model: str) -> dict:
    os.environ["KERAS_BACKEND"] = "jax"
    import keras

    Xtr, Xte, ytr, yte = data()
    if model == "cnn":
        Xtr, Xte = Xtr.reshape(-1, 28, 28, 1), Xte.reshape(-1, 28, 28, 1)
    keras.utils.set_random_seed(0)
    t0 = time.perf_counter()
    if model == "mlp":
        layers = [keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                  keras.layers.Dense(10)]  # fmt: skip
    else:
        layers = [keras.Input((28, 28, 1))]
        for c in (16, 32):
            layers += [keras.layers.Conv2D(c, 3, padding="same"),
                       keras.layers.BatchNormalization(momentum=0.9), keras.layers.ReLU(),
                       keras.layers.MaxPooling2D(2)]  # fmt: skip
        layers += [keras.layers.Flatten(), keras.layers.Dense(10)]
    net = keras.Sequential(layers)
    net.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    net.fit(Xtr, ytr, epochs=EPOCHS, batch_size=BATCH, verbose=0)
    cold = time.perf_counter() - t0
    acc = float(net.evaluate(Xte, yte, verbose=0)[1])
    t0 = time.perf_counter()
    net.fit(Xtr, ytr, epochs=EPOCHS, batch_size=BATCH, verbose=0)
    return {"cold_s": cold, "epoch_s": (time.perf_counter() - t0) / EPOCHS, "accuracy": acc}


def run_torch(model: str) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    Xtr, Xte, ytr, yte = data()
    Xtr, Xte = torch.from_numpy(Xtr), torch.from_numpy(Xte)
    ytr, yte = torch.from_numpy(ytr.astype(np.int64)), torch.from_numpy(yte.astype(np.int64))
    if model == "cnn":  # NCHW
        Xtr, Xte = Xtr.reshape(-1, 1, 28, 28), Xte.reshape(-1, 1, 28, 28)
    nn = torch.nn
    t0 = time.perf_counter()
    if model == "mlp":
        net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    else:
        blocks = []
        for cin, c in ((1, 16), (16, 32)):
            blocks += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c, momentum=0.1),
                       nn.ReLU(), nn.MaxPool2d(2)]  # fmt: skip
        net = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()

    def epochs(n):
        net.train()
        for _ in range(n):
            perm = torch.randperm(len(Xtr))
            for i in range(0, len(Xtr), BATCH):
                idx = perm[i : i + BATCH]
                opt.zero_grad()
                loss = loss_fn(net(Xtr[idx]), ytr[idx])
                loss.backward()
                opt.step()
            float(loss)

    epochs(EPOCHS)
    cold = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        acc = float((net(Xte).argmax(-1) == yte).float().mean())
    t0 = time.perf_counter()
    epochs(EPOCHS)
    return {"cold_s": cold, "epoch_s": (time.perf_counter() - t0) / EPOCHS, "accuracy": acc}


RUNNERS = {"fbp": run_fbp, "keras": run_keras, "torch": run_torch, "jax": run_jax}
NEEDS = {"keras": "keras", "torch": "torch"}


def child(name: str, model: str, cache: str | None) -> None:
    if cache and name != "torch":  # JAX's persistent cache: Keras 3 on JAX uses it too
        import jax

        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    print(TAG + json.dumps(RUNNERS[name](model)), flush=True)


def run_child(name: str, model: str, cache: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--model", model]
    cmd += ["--cache", cache] if cache else []
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG) :])
    raise RuntimeError(f"{name} failed:\n{proc.stdout}\n{proc.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round instead of 5")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="give the JAX-based competitors JAX's persistent compilation cache in DIR (a "
        "warm-up run per competitor fills it first): a second run of the same script",
    )
    parser.add_argument("--json", default=None, help="write the raw results here")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.cache)
        return
    names = [n for n in RUNNERS if n not in NEEDS or importlib.util.find_spec(NEEDS[n])]
    for n in RUNNERS:
        if n not in names:
            print(f"note: {n} skipped ({NEEDS[n]} is not installed; pip install -e '.[bench]')")
    rounds = 1 if args.quick else args.rounds
    results = {n: [] for n in names}
    if args.cache:
        for n in names:
            run_child(n, args.model, args.cache)  # fill the cache
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            results[n].append(run_child(n, args.model, args.cache))
            print(f"round {r + 1} {n}: {results[n][-1]}", flush=True)
    med = {n: {k: float(np.median([x[k] for x in v])) for k in v[0]} for n, v in results.items()}
    cached = ", JAX's persistent compilation cache warm" if args.cache else ""
    print(f"\n{args.model}, MNIST-5k 4000/1000, batch {BATCH}, Adam {LR}, {EPOCHS} epochs, "
          f"median of {rounds} rounds{cached}")  # fmt: skip
    print(f"{'':8} {'end to end':>11} {'fit / this':>11} {'per epoch':>10} {'accuracy':>9}")
    for n, m in med.items():
        ratio = m["cold_s"] / med["fbp"]["cold_s"]
        print(f"{n:8} {m['cold_s']:10.2f}s {ratio:10.2f}x {1e3 * m['epoch_s']:8.1f}ms "
              f"{m['accuracy']:9.4f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "median": med, "model": args.model}, f, indent=1)


if __name__ == "__main__":
    main()

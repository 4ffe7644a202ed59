"""The command line: ``python -m fbp train`` and ``python -m fbp check``.

    main(argv=None) -> exit status        argv as sys.argv[1:]; prints to stdout

``train`` fits an MLP (:func:`fbp.nn.mlp`) or a small CNN (:func:`fbp.nn.cnn`) on a bundled
data set, with the loss, preprocessing and metrics the data set calls for, prints the network's
summary, and reports the test-split numbers; ``--output PATH`` writes a :mod:`fbp.checkpoint`,
``--backup-dir DIR`` makes a killed run resume where it stopped. ``check`` builds a network on
random data and prints :func:`fbp.check.check_grads`'s table.

Exit status: 0 done; 1 ``check`` found a gradient that disagrees; 2 a bad argument (one line on
stderr, no traceback); 3 the training diverged (non-finite loss or params: no checkpoint is
written, an existing one is left as it was).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from fbp import check, checkpoint, datasets, losses, nn, optim, train
from fbp.core import Loss, Optimizer

ACTIVATIONS = nn.ACTIVATIONS

# name -> (constructor from the learning rate, default learning rate)
OPTIMIZERS: dict[str, tuple[Callable[[float], Optimizer], float]] = {
    "sgd": (optim.sgd, 0.1),
    "momentum": (lambda lr: optim.sgd(lr, momentum=0.9), 0.01),  # step ~ lr / (1 - 0.9) = 0.1
    "rmsprop": (optim.rmsprop, 1e-3),
    "adam": (optim.adam, 1e-3),
    "adamw": (optim.adamw, 1e-3),
}

LOSSES: dict[str, Loss] = {
    "softmax_cross_entropy": losses.softmax_cross_entropy,
    "mse": losses.mse,
    "mae": losses.mae,
    "huber": losses.huber(1.0),
    "sigmoid_binary_cross_entropy": losses.sigmoid_binary_cross_entropy,
}

SEED_MAX = 2**32 - 1


class DataSpec(NamedTuple):
    """How ``train`` treats one bundled data set."""

    load: Callable[[], tuple[np.ndarray, np.ndarray]]  # raw features, as fbp.datasets gives them
    task: str  # "multiclass" (softmax CE), "binary" (sigmoid BCE) or "regression" (MSE)
    pixel_max: float | None  # images: divide by this; None: standardize the features
    summary: str
    image_shape: tuple[int, ...] | None = None  # (height, width, channels) for --model cnn


DATA: dict[str, DataSpec] = {
    "digits": DataSpec(
        datasets.load_digits, "multiclass", 16.0, "8x8 digit images, 10 classes", (8, 8, 1)
    ),
    "mnist5k": DataSpec(
        datasets.load_mnist_5k,
        "multiclass",
        255.0,
        "5000 28x28 MNIST images, 10 classes",
        (28, 28, 1),
    ),
    "breast_cancer": DataSpec(
        datasets.load_breast_cancer, "binary", None, "30 features, malignant (0) / benign (1)"
    ),
    "diabetes": DataSpec(
        datasets.load_diabetes, "regression", None, "10 features, disease progression target"
    ),
}


# ------------------------------------------------------------------------------ argument types


def _sizes(text: str) -> tuple[int, ...]:
    """``"128,64"`` -> ``(128, 64)``; ``""`` -> ``()`` (no hidden layer: a linear model)."""
    try:
        sizes = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        sizes = (0,)
    if any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive layer widths such as 128 or 128,64, got {text!r}"
        )
    return sizes


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an int in [0, 2**32 - 1], got {text!r}")
    return value


def _test_size(text: str) -> float | int:
    """A fraction in (0, 1), written with a point (``0.2``), or a count (``300``), as
    ``train_test_split`` takes them; ``1.0`` is neither."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is not None and 0 < value < 1:
            return value
    else:
        if value >= 1:
            return value
    raise argparse.ArgumentTypeError(
        f"expected a fraction in (0, 1) such as 0.2, or a whole count such as 300, got {text!r}"
    )


def _output_path(text: str) -> str:
    """A path ``train`` can write a checkpoint to, checked before training starts."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got an empty string")
    directory = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path")
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"the directory {directory!r} does not exist")
    try:  # a real write: os.access says yes to root on read-only file systems
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".fbp-write-test-"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write into {directory!r}: {e.strerror}") from None
    if os.path.exists(text) and not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: permission denied")
    return text


def _backup_dir(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a directory path, got an empty string")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    parent = text if os.path.isdir(text) else os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create or write the directory {text!r}")
    return text


# ------------------------------------------------------------------------------ building blocks


def _count(params) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


def _affine_stats(X: np.ndarray, pixel_max: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``(shift, scale)`` per feature, from the training split only (as datasets.standardize)."""
    if pixel_max is not None:
        return np.zeros(X.shape[1]), np.full(X.shape[1], pixel_max)
    shift, scale = X.mean(axis=0, dtype=np.float64), X.std(axis=0, dtype=np.float64)
    scale[scale == 0] = 1.0  # constant columns are only centred
    return shift, scale


def _apply(X: np.ndarray, shift, scale) -> np.ndarray:
    return ((X - shift) / scale).astype(np.float32)


def _prepare(spec: DataSpec, test_size, seed: int, images: bool) -> dict:
    """Split, preprocess and shape the data for ``spec.task``; returns arrays and statistics.
    ``images``: the features come back as ``(n, *spec.image_shape)``, for a CNN."""
    X, y = spec.load()
    stratify = None if spec.task == "regression" else y
    X_tr, X_te, y_tr, y_te = datasets.train_test_split(
        X, y, test_size=test_size, seed=seed, stratify=stratify
    )
    y_te_raw = y_te
    x_shift, x_scale = _affine_stats(X_tr, spec.pixel_max)
    pre = {"x_shift": x_shift, "x_scale": x_scale}
    if spec.task == "multiclass":
        outputs, loss, metrics = int(y.max()) + 1, losses.softmax_cross_entropy, ["accuracy"]
    elif spec.task == "binary":  # one logit; float targets (N, 1) like the prediction
        outputs, loss, metrics = 1, losses.sigmoid_binary_cross_entropy, ["accuracy"]
        y_tr, y_te = (t.astype(np.float32)[:, None] for t in (y_tr, y_te))
    else:  # regression on a standardized target; reported back in the original units
        outputs, loss, metrics = 1, losses.mse, ["mae"]
        pre["y_shift"], pre["y_scale"] = np.float64(y_tr.mean()), np.float64(y_tr.std())
        y_tr, y_te = (_apply(t[:, None], pre["y_shift"], pre["y_scale"]) for t in (y_tr, y_te))
    X_tr, X_te = _apply(X_tr, x_shift, x_scale), _apply(X_te, x_shift, x_scale)
    if images:  # (n, h*w) -> (n, h, w, 1), channels last
        X_tr, X_te = (a.reshape(-1, *spec.image_shape) for a in (X_tr, X_te))
    return {
        "train": (X_tr, y_tr),
        "test": (X_te, y_te),
        "outputs": outputs,
        "loss": loss,
        "metrics": metrics,
        "preprocess": pre,
        "y_test_raw": y_te_raw,  # the regression report is in these units
    }


def _test_report(net, params, state, data, task: str) -> tuple[dict, str]:
    """Test metrics (a dict of floats) and the line that shows them."""
    X_te, y_te = data["test"]
    result = train.evaluate(net, data["loss"], params, state, (X_te, y_te), metrics=data["metrics"])
    if task != "regression":
        result = {"loss": result["loss"], "accuracy": result["accuracy"]}
        return result, f"test loss: {result['loss']:.4f} - test accuracy: {result['accuracy']:.4f}"
    pre = data["preprocess"]
    pred = np.asarray(train.predict(net, params, state, X_te), np.float64)[:, 0]  # (N,)
    err = pred * pre["y_scale"] + pre["y_shift"] - data["y_test_raw"]  # (N,) original units
    result = {
        "loss": result["loss"],
        "mse": float(np.mean(err**2)),
        "mae": float(np.mean(np.abs(err))),
    }
    line = (
        f"test loss: {result['loss']:.4f} (mse, standardized target) - test mse: "
        f"{result['mse']:.1f} - test mae: {result['mae']:.2f} (original units)"
    )
    return result, line


def compile_cache_dir() -> str:
    """Where ``train`` keeps JAX's persistent compilation cache: ``$XDG_CACHE_HOME/fbp/jax``,
    else ``~/.cache/fbp/jax``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fbp", "jax")


def enable_compile_cache(directory: str) -> None:
    """Turn on JAX's persistent compilation cache in ``directory``, for every program (also the
    ones that compile in well under a second, which are most of fbp's). A second identical run
    then loads its compiled programs instead of compiling them. Changes JAX's global
    configuration: the command line does this, the library never does."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _network_config(args: argparse.Namespace, spec: DataSpec, outputs: int, input_shape) -> dict:
    config = {"model": args.model, "activation": args.activation, "outputs": outputs}
    if args.model == "cnn":
        config["channels"] = list(args.channels)
    else:
        config["hidden"] = list(args.hidden)
    config["input_shape"] = list(input_shape)
    return config


def cmd_train(args: argparse.Namespace) -> int:
    spec = DATA[args.data]
    if args.model == "cnn" and spec.image_shape is None:
        raise _UsageError(f"--model cnn needs images: --data digits or mnist5k, not {args.data}")
    if not args.no_compile_cache:
        enable_compile_cache(compile_cache_dir())
    data = _prepare(spec, args.test_size, args.seed, images=args.model == "cnn")
    X_tr, y_tr = data["train"]
    make_opt, default_lr = OPTIMIZERS[args.optimizer]
    lr = default_lr if args.lr is None else args.lr
    opt = make_opt(lr)
    config = _network_config(args, spec, data["outputs"], X_tr.shape[1:])
    net = checkpoint.network(config)
    k_init, k_fit = jax.random.split(jax.random.key(args.seed))
    _, params, state = net.init(k_init, X_tr.shape[1:])
    if not args.quiet:
        print(f"data: {args.data} ({spec.summary}): {len(X_tr)} train, {len(data['test'][0])} test")
        print(f"model: {net.name}, {_count(params):,} params")
        print(nn.summary(net, X_tr.shape[1:]))
        print(f"loss: {data['loss'].name}, optimizer: {args.optimizer}(lr={lr:g})")
        if spec.task == "regression":
            print("(training losses are on the standardized target)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        params, state, opt_state, history = train.fit(
            net,
            data["loss"],
            opt,
            params,
            state,
            (X_tr, y_tr),
            epochs=args.epochs,
            batch_size=args.batch_size,
            key=k_fit,
            metrics=data["metrics"],
            verbose=0 if args.quiet else 1,
            backup_dir=args.backup_dir,
        )
    diverged = [w for w in caught if "fit: the training" in str(w.message)]
    for w in caught:
        if w not in diverged:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if diverged:
        kept = f"; {args.output} was not written" if args.output else ""
        print(f"training diverged: {diverged[0].message}{kept}", file=sys.stderr)
        return 3
    result, line = _test_report(net, params, state, data, spec.task)
    print(line)
    if args.output:
        config.update(
            data=args.data,
            optimizer=args.optimizer,
            lr=lr,
            epochs=args.epochs,
            batch_size=args.batch_size,
            test_size=args.test_size,
            seed=args.seed,
            task=spec.task,
            loss=data["loss"].name,
            epochs_run=len(history.get("loss", [])),
            test=result,
        )
        ckpt = checkpoint.Checkpoint(config, params, state, opt_state, data["preprocess"])
        checkpoint.save(args.output, ckpt)
        print(f"saved checkpoint to {args.output}")
    return 0


# ------------------------------------------------------------------------------ check


def cmd_check(args: argparse.Namespace) -> int:
    loss = LOSSES[args.loss]
    k_init, k_x, k_y, k_drop = jax.random.split(jax.random.key(args.seed), 4)
    if args.model == "cnn":  # Conv, BatchNorm, activation, MaxPool, ..., GlobalAvgPool, Dense
        net = nn.cnn(args.hidden, args.outputs, head="global", activation=args.activation)
        input_shape = (args.image_size, args.image_size, args.inputs)
    else:
        norm = "batch" if args.batchnorm else "layer" if args.layernorm else None
        net = nn.mlp([*args.hidden, args.outputs], args.activation, norm=norm, dropout=args.dropout)
        input_shape = (args.inputs,)
    _, params, state = net.init(k_init, input_shape)
    x = jax.random.normal(k_x, (args.batch, *input_shape))
    if args.loss == "softmax_cross_entropy":  # integer labels
        y = jax.random.randint(k_y, (args.batch,), 0, args.outputs)
    elif args.loss == "sigmoid_binary_cross_entropy":  # 0/1 targets
        y = jax.random.bernoulli(k_y, 0.5, (args.batch, args.outputs)).astype(x.dtype)
    else:
        y = jax.random.normal(k_y, (args.batch, args.outputs))
    # A fixed Dropout mask, the same for all references; train mode (BatchNorm's batch statistics).
    report = check.check_grads(net, loss, params, state, x, y, key=k_drop, seed=args.seed)
    print(report)
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------ parser

_TRAIN_EPILOG = """\
per data set:
  digits, mnist5k   pixels divided by 16 / 255; softmax cross-entropy; accuracy;
                    --model cnn sees them as (8, 8, 1) / (28, 28, 1) images
  breast_cancer     features standardized (train statistics); one logit, sigmoid binary
                    cross-entropy on float targets (N, 1); accuracy
  diabetes          features and target standardized; MSE; the test MSE and MAE are also
                    reported in the target's original units
  Classification splits are stratified; --seed sets the split, the init and the shuffling.

models: mlp is Dense(h), activation, ..., Dense(outputs) (--hidden); cnn is, per entry of
--channels, Conv2D(c, 3, same), BatchNorm, activation, MaxPool2D(2), then Flatten and
Dense(outputs).

default learning rates: sgd 0.1, momentum 0.01 (SGD with momentum 0.9), rmsprop, adam and
adamw 1e-3.

checkpoint (--output PATH): an fbp.checkpoint file {config, params, state, opt_state,
preprocess}; fbp.checkpoint.load(PATH) returns (net, ckpt) with the network rebuilt from the
config (these settings, the input shape, the loss and the test metrics) and the params checked
against it; the network sees (X - ckpt.preprocess["x_shift"]) / ckpt.preprocess["x_scale"].
PATH's directory must exist and be writable (checked before training). A run that diverges
exits with status 3 and writes nothing.

backup (--backup-dir DIR): fit writes DIR/backup.npz after every epoch; rerun the same
command after a crash or a kill and training resumes from the last epoch written, with the same
final params as an uninterrupted run. The backup is removed when training ends.

compile cache: compiled programs are kept in JAX's persistent cache, in
$XDG_CACHE_HOME/fbp/jax (default ~/.cache/fbp/jax), so a second identical run does not compile
them again; --no-compile-cache turns it off.

examples:
  python -m fbp train                                   # digits, 128 relu, adam, 30 epochs
  python -m fbp train --hidden 256,128 --activation gelu --epochs 10 --output digits.npz
  python -m fbp train --data mnist5k --model cnn --epochs 10 --batch-size 64
  python -m fbp train --data breast_cancer --optimizer momentum --quiet
  python -m fbp train --data diabetes --hidden 32 --optimizer sgd --lr 0.01 --epochs 100
  python -m fbp train --epochs 200 --backup-dir runs/digits   # resumable
"""

_CHECK_EPILOG = """\
mlp: Dense(h), [LayerNorm or BatchNorm], activation, [Dropout], ..., Dense(outputs) on random
float inputs of shape (batch, inputs). cnn: per entry of --hidden (default 4,6) Conv2D(c, 3,
same), BatchNorm, activation, MaxPool2D(2), the last block ending in GlobalAvgPool, then
Dense(outputs), on random images (batch, size, size, inputs). In training mode (BatchNorm uses
the batch's statistics); targets fit the loss (integer labels for softmax cross-entropy, 0/1
floats for sigmoid BCE, normal floats otherwise). A fixed key gives one Dropout mask shared by
all three computations. Everything runs in float64. Columns: max abs err against JAX's
autodiff, rel err (that error scaled as fbp.check's docstring says), fd err against central
finite differences along random directions ("kink" where every direction crossed one).
Exit status 0 when all rows are ok, 1 otherwise.

examples:
  python -m fbp check
  python -m fbp check --hidden 32,16 --activation gelu --loss mse --layernorm
  python -m fbp check --activation elu --loss sigmoid_binary_cross_entropy --dropout 0.3
  python -m fbp check --batchnorm --loss huber
  python -m fbp check --model cnn
"""


class _UsageError(Exception):
    """A bad combination of arguments found after parsing: exit 2 with one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, with every error on one line (no usage block, no traceback), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m fbp",
        description="fbp: backpropagation with hand-written backward passes in JAX.",
        epilog="Run `python -m fbp COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser(
        "train",
        help="train an MLP or a CNN on a bundled data set and report test metrics",
        description="Train an MLP or a small CNN on a bundled data set (default: digits) with\n"
        "fbp.train.fit, then report the loss and accuracy (or MSE/MAE) on the test split.",
        epilog=_TRAIN_EPILOG,
        formatter_class=fmt,
    )
    t.add_argument("--data", choices=list(DATA), default="digits", help="default: digits")
    t.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="default: mlp")
    t.add_argument(
        "--hidden",
        type=_sizes,
        default=(128,),
        metavar="SIZES",
        help="mlp: hidden layer widths, comma-separated, e.g. 128,64; '' for none (default: 128)",
    )
    t.add_argument(
        "--channels",
        type=_sizes,
        default=(16, 32),
        metavar="SIZES",
        help="cnn: channels of the conv blocks, comma-separated (default: 16,32)",
    )
    t.add_argument("--activation", choices=list(ACTIVATIONS), default="relu")
    t.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam")
    t.add_argument(
        "--lr",
        type=_positive(float),
        default=None,
        help="learning rate (default: per optimizer, see below)",
    )
    t.add_argument("--epochs", type=_positive(int), default=30, help="default: 30")
    t.add_argument("--batch-size", type=_positive(int), default=32, help="default: 32")
    t.add_argument(
        "--test-size",
        type=_test_size,
        default=0.2,
        help="test fraction in (0, 1) or a whole count (default: 0.2)",
    )
    t.add_argument("--seed", type=_seed, default=0, help="in [0, 2**32 - 1] (default: 0)")
    t.add_argument(
        "--output", type=_output_path, metavar="PATH", help="save a checkpoint here (see below)"
    )
    t.add_argument(
        "--backup-dir",
        type=_backup_dir,
        metavar="DIR",
        help="back up every epoch here and resume from it when rerun (see below)",
    )
    t.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (see below)",
    )
    t.add_argument(
        "--quiet", action="store_true", help="print only the test line (and the checkpoint path)"
    )
    t.set_defaults(func=cmd_train, parser=t)

    c = sub.add_parser(
        "check",
        help="verify the hand-written gradients of a network against JAX's autodiff",
        description="Build an MLP or a CNN on random data and compare fbp's hand-written\n"
        "gradients with JAX's autodiff and finite differences (fbp.check.check_grads); print\n"
        "the per-layer table.",
        epilog=_CHECK_EPILOG,
        formatter_class=fmt,
    )
    c.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="default: mlp")
    c.add_argument(
        "--hidden",
        type=_sizes,
        default=None,
        metavar="SIZES",
        help="mlp: hidden widths (default: 16); cnn: channels (default: 4,6)",
    )
    c.add_argument(
        "--activation",
        choices=list(ACTIVATIONS),
        default="tanh",
        help="default: tanh (smooth; with relu a finite difference could straddle the kink)",
    )
    c.add_argument("--loss", choices=list(LOSSES), default="softmax_cross_entropy")
    c.add_argument(
        "--inputs",
        type=_positive(int),
        default=None,
        help="input features (mlp, default: 5) or channels (cnn, default: 2)",
    )
    c.add_argument(
        "--image-size", type=_positive(int), default=6, help="cnn: image side (default: 6)"
    )
    c.add_argument("--outputs", type=_positive(int), default=3, help="output units (default: 3)")
    c.add_argument("--batch", type=_positive(int), default=8, help="batch size (default: 8)")
    c.add_argument("--seed", type=_seed, default=0, help="default: 0")
    c.add_argument("--layernorm", action="store_true", help="mlp: LayerNorm after each Dense")
    c.add_argument("--batchnorm", action="store_true", help="mlp: BatchNorm after each Dense")
    c.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        metavar="RATE",
        help="mlp: Dropout(RATE) after each activation, RATE the drop probability (default: 0)",
    )
    c.set_defaults(func=cmd_check, parser=c)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        if not 0 <= args.dropout < 1:
            args.parser.error(f"--dropout is a drop probability in [0, 1), got {args.dropout}")
        if args.inputs is None:
            args.inputs = 2 if args.model == "cnn" else 5
        if args.hidden is None:
            args.hidden = (4, 6) if args.model == "cnn" else (16,)
        if args.model == "cnn" and not args.hidden:
            args.parser.error("--model cnn needs at least one conv block in --hidden")
    try:
        return args.func(args)
    except _UsageError as e:
        args.parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())

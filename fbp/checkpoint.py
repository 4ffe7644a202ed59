"""Training checkpoints: one :mod:`fbp.io` file with everything needed to use or resume a model.

    save(path, ckpt)         ckpt a Checkpoint; written atomically by fbp.io.save
    load(path) -> (net, ckpt)    the network rebuilt from ckpt.config, params and state checked

A checkpoint is the dict ``{"config", "params", "state", "opt_state", "preprocess"}``:

    config      uint8 array of UTF-8 JSON: the settings that built the network (``model``
                "mlp" or "cnn", ``input_shape``, ``outputs``, ``activation``, and ``hidden``
                or ``channels``), the data set, the optimizer and the test metrics
    params      the network's params
    state       the network's state (BatchNorm's running statistics), ``()`` entries elsewhere
    opt_state   the optimizer state, to resume training
    preprocess  arrays: the model sees ``(X - x_shift) / x_scale``; for regression the target
                is ``pred * y_scale + y_shift``

``load`` rebuilds the network from the config and checks the stored params and state against
it (structure and every leaf shape), so a config that disagrees with the arrays is refused
with :class:`fbp.io.CheckpointError` instead of building the wrong network.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

from fbp import io, nn
from fbp.core import Layer, LayerError, PyTree

FORMAT = "fbp.checkpoint"
VERSION = 2


class Checkpoint(NamedTuple):
    config: dict[str, Any]
    params: PyTree
    state: PyTree
    opt_state: PyTree
    preprocess: dict[str, Any]


def network(config: dict[str, Any]) -> Layer:
    """The network a config describes (raises ``ValueError`` for an unknown or bad config)."""
    model = config.get("model", "mlp")
    if model == "mlp":
        sizes = [int(h) for h in config["hidden"]] + [int(config["outputs"])]
        return nn.mlp(sizes, config["activation"])
    if model == "cnn":
        channels = [int(c) for c in config["channels"]]
        return nn.cnn(channels, int(config["outputs"]), activation=config["activation"])
    raise ValueError(f"unknown model {model!r}")


def save(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically (through :func:`fbp.io.save`)."""
    config = {"format": FORMAT, "version": VERSION, **ckpt.config}
    encoded = np.frombuffer(json.dumps(config).encode("utf-8"), dtype=np.uint8)
    io.save(
        path,
        {
            "config": encoded,
            "params": ckpt.params,
            "state": ckpt.state,
            "opt_state": ckpt.opt_state,
            "preprocess": ckpt.preprocess,
        },
    )


def load(path: str | os.PathLike) -> tuple[Layer, Checkpoint]:
    """Read a checkpoint written by :func:`save`: ``(net, ckpt)``, with ``ckpt.config`` a dict.

    ``net.apply(ckpt.params, ckpt.state, (X - p["x_shift"]) / p["x_scale"])``, with ``p =
    ckpt.preprocess``, predicts from raw features ``X``. Every problem (not an fbp checkpoint,
    damaged, a config that does not build a network, params or state that do not fit it) is a
    :class:`fbp.io.CheckpointError` naming the path.
    """
    where = os.fspath(path)
    tree = io.load(path)
    if not isinstance(tree, dict) or "config" not in tree:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise io.CheckpointError(
            f"{where}: not a training checkpoint (an fbp.io file with {keys}, no 'config'); "
            "read it with fbp.io.load instead."
        )
    try:
        config = json.loads(bytes(np.asarray(tree["config"], np.uint8)).decode("utf-8"))
    except (ValueError, TypeError) as e:
        raise io.CheckpointError(f"{where}: the config is not valid UTF-8 JSON ({e}).") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise io.CheckpointError(
            f"{where}: not a checkpoint written by fbp.checkpoint.save (format "
            f"{config.get('format') if isinstance(config, dict) else None!r})."
        )
    if config.get("version") != VERSION:
        raise io.CheckpointError(
            f"{where}: checkpoint version {config.get('version')!r}; this fbp reads {VERSION}."
        )
    missing = {"params", "state", "opt_state", "preprocess"} - set(tree)
    if missing:
        raise io.CheckpointError(f"{where}: the checkpoint lacks {sorted(missing)}.")
    try:
        net = network(config)
        input_shape = tuple(int(d) for d in config["input_shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise io.CheckpointError(
            f"{where}: the config does not describe a network ({e!r})."
        ) from None
    try:
        nn.check_params(net, tree["params"], tree["state"], input_shape)
    except LayerError as e:
        raise io.CheckpointError(
            f"{where}: the stored params do not fit the network its config describes "
            f"({net.name}): {e}"
        ) from None
    ckpt = Checkpoint(config, tree["params"], tree["state"], tree["opt_state"], tree["preprocess"])
    return net, ckpt

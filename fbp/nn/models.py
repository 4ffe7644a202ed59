"""Builders for common networks: what ``fit``'s users, the command line and the benchmarks
would otherwise each write for themselves."""

from __future__ import annotations

from collections.abc import Sequence

from fbp.core import Layer
from fbp.nn.activations import ACTIVATIONS
from fbp.nn.combinators import serial
from fbp.nn.conv import Conv2D, GlobalAvgPool, MaxPool2D
from fbp.nn.dense import Dense
from fbp.nn.normalization import BatchNorm, LayerNorm
from fbp.nn.regularization import Dropout
from fbp.nn.shape import Flatten


def activation_layer(activation: Layer | str) -> Layer:
    """A Layer given as itself or by name (``"relu"``, ``"gelu"``, ...: ``nn.ACTIVATIONS``)."""
    if isinstance(activation, Layer):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[activation]


def mlp(
    sizes: Sequence[int],
    activation: Layer | str = "relu",
    *,
    norm: str | None = None,
    dropout: float = 0.0,
) -> Layer:
    """A multilayer perceptron: ``Dense(sizes[0]), [norm], activation, [Dropout], ...,
    Dense(sizes[-1])``. The last layer has no activation: its outputs are logits.

    ``mlp([128, 10])`` is ``serial(Dense(128), Relu, Dense(10))``. ``norm`` is None,
    ``"layer"`` (LayerNorm) or ``"batch"`` (BatchNorm), after each hidden Dense; ``dropout`` is
    the drop probability of a Dropout after each hidden activation (0: none).
    """
    sizes = list(sizes)
    if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(
            f"mlp: sizes must be positive ints, the last the output width, got {sizes}."
        )
    if norm not in (None, "layer", "batch"):
        raise ValueError(f"mlp: norm must be None, 'layer' or 'batch', got {norm!r}.")
    act = activation_layer(activation)
    layers = []
    for width in sizes[:-1]:
        layers.append(Dense(width))
        if norm == "layer":
            layers.append(LayerNorm())
        elif norm == "batch":
            layers.append(BatchNorm())
        layers.append(act)
        if dropout:
            layers.append(Dropout(dropout))
    return serial(*layers, Dense(sizes[-1]))


def cnn(
    channels: Sequence[int],
    outputs: int,
    *,
    head: str = "flatten",
    dense: int = 0,
    dropout: float = 0.0,
    activation: Layer | str = "relu",
) -> Layer:
    """A small convolutional network for ``(batch, height, width, channels)`` images.

    Per entry ``c`` of ``channels``: ``Conv2D(c, 3, padding="same"), BatchNorm(momentum=0.9),
    activation, MaxPool2D(2)``. Then ``head="flatten"``: ``Flatten``; or ``head="global"``: the
    last block's pooling is replaced by ``GlobalAvgPool``. Then, if ``dense``, ``Dense(dense),
    activation, [Dropout(dropout)]``, and ``Dense(outputs)`` (logits).

    BatchNorm's momentum is 0.9 rather than Keras's 0.99: on the small bundled data sets an
    epoch is tens of steps, and the running statistics should settle within the first epochs.
    """
    channels = list(channels)
    if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
        raise ValueError(f"cnn: channels must be positive ints, got {channels}.")
    if head not in ("flatten", "global"):
        raise ValueError(f"cnn: head must be 'flatten' or 'global', got {head!r}.")
    act = activation_layer(activation)
    layers = []
    for i, c in enumerate(channels):
        layers += [Conv2D(c, 3, padding="same"), BatchNorm(momentum=0.9), act]
        if head == "flatten" or i < len(channels) - 1:
            layers.append(MaxPool2D(2))
    layers.append(Flatten if head == "flatten" else GlobalAvgPool)
    if dense:
        layers += [Dense(dense), act]
        if dropout:
            layers.append(Dropout(dropout))
    return serial(*layers, Dense(outputs))

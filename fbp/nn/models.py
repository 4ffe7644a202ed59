"""Builders for common networks: what ``fit``'s users, the command line and the benchmarks
would otherwise each write for themselves."""

from __future__ import annotations

from collections.abc import Sequence

from fbp.core import Layer, ShapeError
from fbp.nn.activations import ACTIVATIONS, Gelu
from fbp.nn.attention import MultiHeadSelfAttention
from fbp.nn.combinators import residual, serial
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


def TransformerBlock(
    d_model: int,
    num_heads: int,
    ff_dim: int,
    *,
    head_dim: int | None = None,
    causal: bool = False,
    dropout: float = 0.0,
) -> Layer:
    """A pre-LayerNorm transformer block on ``(batch, time, d_model)``, from existing layers::

        x = x + Attention(LayerNorm(x))                  residual(serial(LayerNorm, MHSA))
        x = x + Dense(d_model)(Gelu(Dense(ff_dim)(LayerNorm(x))))

    (Xiong et al., 2020; GPT-2's arrangement). It has no backward of its own: ``serial`` and
    ``residual`` chain the layers' hand-written ones. ``dropout`` is the drop probability of the
    attention weights and of a Dropout at the end of each residual branch (none when 0).
    ``mask`` reaches the attention (padded keys are not attended to); ``causal`` lets each step
    attend only to itself and earlier steps. A stack of pre-LN blocks wants a final
    ``LayerNorm()`` before the output layer.

    ``d_model`` is the width of the input and output (the MLP ends in ``Dense(d_model)``), as
    in PyTorch's ``TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
    activation="gelu", norm_first=True)``. Params: the tuple ``((ln1, attention), (ln2, dense1,
    (), dense2))``, plus ``()`` for each Dropout.
    """
    if not all(isinstance(n, int) and n > 0 for n in (d_model, num_heads, ff_dim)):
        raise ValueError(
            f"TransformerBlock({d_model!r}, {num_heads!r}, {ff_dim!r}): d_model, num_heads "
            "and ff_dim must be positive ints."
        )
    drop = [Dropout(dropout)] if dropout else []
    attention = MultiHeadSelfAttention(num_heads, head_dim, causal, dropout)
    block = serial(
        residual(serial(LayerNorm(), attention, *drop)),
        residual(serial(LayerNorm(), Dense(ff_dim), Gelu, Dense(d_model), *drop)),
    )
    flags = (", causal" if causal else "") + (f", dropout={dropout}" if dropout else "")
    name = f"TransformerBlock({d_model}, {num_heads}, {ff_dim}{flags})"

    def init(key, input_shape):
        if len(input_shape) != 2 or input_shape[-1] != d_model:
            raise ShapeError(
                f"input_shape should be (time, {d_model}) (d_model={d_model}), got "
                f"{tuple(input_shape)}. Project the input to d_model first, e.g. with "
                f"Dense({d_model}) or Embedding(vocab_size, {d_model}).",
                layer=name,
            )
        return block.init(key, input_shape)

    config = ("TransformerBlock", d_model, num_heads, ff_dim, head_dim, causal, dropout)
    return block._replace(init=init, name=name, config=config)

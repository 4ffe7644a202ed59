"""Layers with hand-written backward passes (the ``Layer`` contract is in :mod:`fbp.core`).

Layers without options are ``Layer`` values (``nn.Relu``); layers with options are
constructors (``nn.Dense(128)``), as in stax. Every backward reads like micrograd: local
derivative times upstream gradient, one line per input, shapes in a comment. One file per
family:

    activations     Relu, LeakyRelu, Elu, Gelu, Sigmoid, Tanh, Softplus, Silu, Softmax,
                    LogSoftmax, Identity
    dense           Dense
    normalization   LayerNorm, BatchNorm
    regularization  Dropout
    shape           Flatten, Reshape
    conv            Conv1D, Conv2D, MaxPool1D/2D, AvgPool1D/2D, GlobalAvgPool
    sequence        Embedding, PositionalEmbedding, SimpleRNN, LSTM, GRU (BPTT by hand);
                    check_ids, padding_mask, grad_norm_over_time, lstm_from_torch,
                    lstm_to_torch, gru_from_torch, gru_to_torch
    attention       MultiHeadSelfAttention, masked_softmax
    combinators     serial, FanOut, parallel, FanInSum, FanInConcat, residual
    models          mlp, cnn, TransformerBlock
    inspect         summary, check_params, output_shape
"""

from fbp.nn.activations import (
    ACTIVATIONS,
    Elu,
    Gelu,
    Identity,
    LeakyRelu,
    LogSoftmax,
    Relu,
    Sigmoid,
    Silu,
    Softmax,
    Softplus,
    Tanh,
)
from fbp.nn.attention import MultiHeadSelfAttention, masked_softmax
from fbp.nn.combinators import FanInConcat, FanInSum, FanOut, parallel, residual, serial
from fbp.nn.conv import (
    AvgPool1D,
    AvgPool2D,
    Conv1D,
    Conv2D,
    GlobalAvgPool,
    MaxPool1D,
    MaxPool2D,
)
from fbp.nn.dense import Dense
from fbp.nn.inspect import Summary, check_params, output_shape, summary
from fbp.nn.models import TransformerBlock, activation_layer, cnn, mlp
from fbp.nn.normalization import BatchNorm, LayerNorm
from fbp.nn.regularization import Dropout
from fbp.nn.sequence import (
    GRU,
    LSTM,
    Embedding,
    PositionalEmbedding,
    SimpleRNN,
    check_ids,
    grad_norm_over_time,
    gru_from_torch,
    gru_to_torch,
    lstm_from_torch,
    lstm_to_torch,
    padding_mask,
)
from fbp.nn.shape import Flatten, Reshape

__all__ = [
    "ACTIVATIONS",
    "GRU",
    "LSTM",
    "AvgPool1D",
    "AvgPool2D",
    "BatchNorm",
    "Conv1D",
    "Conv2D",
    "Dense",
    "Dropout",
    "Elu",
    "Embedding",
    "FanInConcat",
    "FanInSum",
    "FanOut",
    "Flatten",
    "Gelu",
    "GlobalAvgPool",
    "Identity",
    "LayerNorm",
    "LeakyRelu",
    "LogSoftmax",
    "MaxPool1D",
    "MaxPool2D",
    "MultiHeadSelfAttention",
    "PositionalEmbedding",
    "Relu",
    "Reshape",
    "Sigmoid",
    "Silu",
    "SimpleRNN",
    "Softmax",
    "Softplus",
    "Summary",
    "Tanh",
    "TransformerBlock",
    "activation_layer",
    "check_ids",
    "check_params",
    "cnn",
    "grad_norm_over_time",
    "gru_from_torch",
    "gru_to_torch",
    "lstm_from_torch",
    "lstm_to_torch",
    "masked_softmax",
    "mlp",
    "output_shape",
    "padding_mask",
    "parallel",
    "residual",
    "serial",
    "summary",
]

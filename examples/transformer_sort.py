"""A two-block causal transformer learns to sort 8 digits, then sorts unseen ones greedily.

The format (one token per position, vocabulary 0-9 and SEP = 10)::

    full sequence   x_1 .. x_8  SEP  y_1 .. y_8        y = sorted(x), 17 tokens
    input           x_1 .. x_8  SEP  y_1 .. y_7        full[:-1], 16 tokens
    target          x_2 .. x_8  SEP  y_1 .. y_8        full[1:]: the next token everywhere

Next-token prediction under a causal mask (position t sees tokens 0..t); only the last 8
targets, the sorted digits, are learned: the loss gets a mask that is True there, combined with
the one ``fit`` passes for the padding of its last batch. The network is ``Embedding(11, 64),
PositionalEmbedding(16)``, two causal ``TransformerBlock(64, 4 heads, MLP 128)`` (``residual``
and ``serial`` over existing layers; the attention's backward is written by hand), then
``LayerNorm, Dense(11)``. Decoding is greedy: from ``x, SEP`` take the argmax at the last
position as ``y_1``, append it, and so on, 8 times; a held-out sequence (another seed) counts as
sorted only if all 8 outputs are right.

Run: ``python examples/transformer_sort.py`` (20000 sequences, 5 epochs), ``--fast`` for a
smoke test (2000 sequences, 2 epochs).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fbp import losses, nn, optim, schedules, train
from fbp.core import Loss

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--fast", action="store_true", help="2000 sequences, 2 epochs (a smoke test)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
start = time.perf_counter()
L, SEP, T = 8, 10, 16  # digits per sequence, the separator token, the input length


def sequences(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (n, 16) int32, from n random sequences of 8 digits."""
    x = np.random.default_rng(seed).integers(0, 10, (n, L))
    full = np.concatenate([x, np.full((n, 1), SEP), np.sort(x, axis=1)], axis=1)  # (n, 17)
    return full[:, :-1].astype(np.int32), full[:, 1:].astype(np.int32)


n_train, epochs = (2000, 2) if args.fast else (20000, 5)
X_train, y_train = sequences(n_train, seed=2 * args.seed)
X_test, y_test = sequences(1000, seed=2 * args.seed + 1)

ON_OUTPUTS = jnp.arange(T) >= L  # (16,): the positions whose target is a sorted digit


def on_outputs(loss: Loss) -> Loss:
    """``loss`` over the output positions only: its mask, and fit's (batch,) mask, combined."""

    def mask_for(pred, mask):  # pred (batch, 16, 11), mask None or (batch,) -> (batch, 16)
        keep = jnp.broadcast_to(ON_OUTPUTS, pred.shape[:2])
        return keep if mask is None else keep & mask[:, None]

    return Loss(lambda p, t, mask=None: loss.value(p, t, mask_for(p, mask)),
                lambda p, t, mask=None: loss.value_and_grad(p, t, mask_for(p, mask)),
                f"{loss.name} on the outputs")  # fmt: skip


block = nn.TransformerBlock(64, 4, 128, causal=True)  # a value: twice in serial, two param sets
net = nn.serial(nn.Embedding(11, 64), nn.PositionalEmbedding(T), block, block, nn.LayerNorm(),
                nn.Dense(11))  # (batch, 16) token ids -> (batch, 16, 11) logits  # fmt: skip
_, params, state = net.init(jax.random.key(args.seed), (T,))
steps = epochs * -(-n_train // 128)
lr = schedules.warmup_cosine_decay_schedule(0.0, 3e-3, warmup_steps=steps // 10, decay_steps=steps)
params, state, _, _ = train.fit(
    net, on_outputs(losses.softmax_cross_entropy), optim.adam(lr), params, state,
    (X_train, y_train), epochs=epochs, batch_size=128, key=jax.random.key(args.seed + 1),
)  # fmt: skip

apply = jax.jit(net.apply)


def sort_greedily(x: np.ndarray) -> np.ndarray:
    """(n, 8) digits -> (n, 8) outputs, each chosen by argmax given x, SEP and those before."""
    seq = np.zeros((len(x), T + 1), np.int32)  # positions after the current one do not matter
    seq[:, :L], seq[:, L] = x, SEP
    for k in range(L):
        logits = apply(params, state, seq[:, :T])  # (n, 16, 11)
        seq[:, L + 1 + k] = np.asarray(jnp.argmax(logits[:, L + k], axis=-1))
    return seq[:, L + 1 :]


out = sort_greedily(X_test[:, :L])
want = y_test[:, L:]  # (n, 8): the sorted digits, the targets at positions 8..15
print(f"held-out sequences: {len(out)}, sorted exactly: {np.mean(np.all(out == want, 1)):.4f}, "
      f"digits right: {np.mean(out == want):.4f}")  # fmt: skip
for x, o in zip(X_test[:3, :L], out[:3], strict=True):
    print(f"  {''.join(map(str, x))} -> {''.join(map(str, o))}")
print(f"total time: {time.perf_counter() - start:.1f}s")

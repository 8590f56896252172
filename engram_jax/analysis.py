"""What the layers compute: LogitLens and linear CKA (paper section 6.1, Fig. 4).

LogitLens reads each layer's residual stream through the model's own final norm and
output head, as if the network ended there, and compares that distribution with the
final one: KL(final || layer) per token, and whether the two agree on the top-1 token.
A model that reaches its prediction in fewer layers has lower KL in early layers.

Linear CKA (Kornblith et al., 2019) compares two sets of representations of the same
n tokens, X [n, d1] and Y [n, d2], column-centred:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

1 for representations equal up to an orthogonal transform and an isotropic scale, 0
for orthogonal ones. Between every layer of an Engram model and of its baseline it
gives a [L, L] matrix; the soft alignment index of Engram layer j is the baseline layer
its similarity peaks at, as the similarity-weighted mean index of the `k` most similar
baseline layers (our reading of the paper's soft argmax; `k` is a parameter here).
Above the diagonal (index > j) means Engram's layer j computes what the baseline
reaches only deeper.

Shapes: L layers, B batch, T time, G branches, D width, V vocabulary, n = B x T tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import mhc
from engram_jax.model import DTYPES, Block, Model, ModelConfig, logits_of


def layer_streams(config: ModelConfig, variables: Mapping, tokens: jax.Array,
                  memory: Mapping[int, jax.Array] | None = None, segment_ids: jax.Array | None = None,
                  positions: jax.Array | None = None, engram_off: tuple[int, ...] = ()
                  ) -> tuple[jax.Array, jax.Array]:
    """Each block's output residual stream, branches summed, and the final logits.

    Args:
      variables: the model's `{"params", "moe_bias"}`.
      tokens: [B, T]; memory: `{layer: [B, T, d_mem]}`; segment_ids, positions: [B, T] or None.

    Returns:
      (streams [L, B, T, D] after each block (mHC's branches summed, as the final norm
      reads them), logits [B, T, V] float32).
    """
    from engram_jax.training import _per_layer  # the unstacking of nn.scan'd blocks

    logits, state = Model(config, engram_off=engram_off).apply(
        variables, tokens, memory, segment_ids, positions, mutable=["intermediates"],
        capture_intermediates=lambda module, method: isinstance(module, Block) and method == "__call__")
    outputs = _per_layer(state["intermediates"], "__call__")  # {layer: [B, T, G, D]}
    chex.assert_equal(sorted(outputs), list(range(config.num_layers)))
    streams = jnp.stack([mhc.reduce(outputs[i]) for i in range(config.num_layers)])  # [L, B, T, D]
    return streams, logits


def lens_logits(config: ModelConfig, params: Mapping, stream: jax.Array) -> jax.Array:
    """Logits [..., V] of a residual stream [..., D] through the final norm and the head."""
    norm = nn.RMSNorm(epsilon=config.norm_eps, dtype=DTYPES[config.dtype], param_dtype=DTYPES[config.param_dtype])
    h = norm.apply({"params": params["final_norm"]}, stream)
    if config.tie_embeddings:
        kernel = params["embed"]["embedding"].T  # [D, V]
        h = h.astype(kernel.dtype)
    else:
        kernel = params["lm_head"]["kernel"].astype(DTYPES[config.dtype])  # [D, V]
        h = h.astype(DTYPES[config.dtype])
    return logits_of(h, kernel)


def logit_lens(config: ModelConfig, params: Mapping, streams: jax.Array, logits: jax.Array,
               mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per layer: summed KL(final || layer) in nats, summed top-1 agreement, and the token count.

    Args:
      streams: [L, B, T, D] (`layer_streams`); logits: [B, T, V] the final logits.
      mask: [B, T] which tokens count (None: all).

    Returns:
      {"kl_sum": [L], "top1_sum": [L], "tokens": []}: sums, so that batches add up.
    """
    chex.assert_rank(streams, 4)
    chex.assert_shape(logits, (*streams.shape[1:3], None))
    mask = jnp.ones(logits.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
    final = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
    top = jnp.argmax(logits, axis=-1)  # [B, T]

    def one(stream):  # [B, T, D] -> KL and agreement sums of one layer
        lens = jax.nn.log_softmax(lens_logits(config, params, stream), axis=-1)  # [B, T, V]
        kl = jnp.sum(jnp.exp(final) * (final - lens), axis=-1)  # [B, T]
        agree = (jnp.argmax(lens, axis=-1) == top).astype(jnp.float32)  # [B, T]
        return jnp.sum(kl * mask), jnp.sum(agree * mask)

    kl_sum, top1_sum = jax.lax.map(one, streams)  # [L], [L]: one layer's logits at a time
    return {"kl_sum": kl_sum, "top1_sum": top1_sum, "tokens": jnp.sum(mask)}


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
    """Linear CKA of x [n, d1] and y [n, d2] (the module docstring), a float32 scalar in [0, 1]."""
    chex.assert_rank([x, y], 2)
    chex.assert_equal(x.shape[0], y.shape[0])
    x = x.astype(jnp.float32) - x.mean(axis=0, dtype=jnp.float32)
    y = y.astype(jnp.float32) - y.mean(axis=0, dtype=jnp.float32)
    cross = jnp.sum(jnp.square(y.T @ x))  # ||Y^T X||_F^2
    return cross / (jnp.linalg.norm(x.T @ x) * jnp.linalg.norm(y.T @ y))


def cka_matrix(xs: jax.Array, ys: jax.Array) -> jax.Array:
    """CKA between every layer of xs [L1, n, d1] and of ys [L2, n, d2]: [L1, L2]."""
    return jax.vmap(lambda x: jax.vmap(lambda y: linear_cka(x, y))(ys))(xs)


def soft_alignment(similarity: jax.Array, k: int = 3) -> jax.Array:
    """For each row j of similarity [L1, L2], the similarity-weighted mean column index of
    its `k` largest entries: [L1] (see the module docstring)."""
    chex.assert_rank(similarity, 2)
    k = min(k, similarity.shape[1])
    values, index = jax.lax.top_k(similarity, k)  # [L1, k]
    return jnp.sum(values * index, axis=-1) / jnp.sum(values, axis=-1)

"""Causal self-attention of the backbone: MHA / GQA, or DeepSeek's Multi-head Latent
Attention (MLA: DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1).

Shapes: B batch, T time, D model width, H query heads, Hkv key/value heads. R is the
rotary embedding (`apply_rope`) at each token's position: 0..T-1, or, for windows that
pack several documents, its position within its document. No biases anywhere (DeepSeek
has none).

MHA / GQA, head width d; query head h reads key/value head j = h // (H / Hkv):

    q_h = R(x W_q^h)    k_j = R(x W_k^j)    v_j = x W_v^j       W_q [D, H, d]; W_k, W_v [D, Hkv, d]
    o_h = softmax(q_h k_j^T / sqrt(d) + mask) v_j
    y   = sum_h o_h W_o^h                                        W_o [H, d, D]

MLA, widths d_n (no rotary), d_r (rotary), d_v (value), ranks r_q, r_kv:

    [q_nope_h, q_rope_h] = RMSNorm(x W_dq) W_uq^h    (r_q > 0; else x W_q^h)
    [c_kv, k_rope]       = x W_dkv                    W_dkv [D, r_kv + d_r]
    [k_nope_h, v_h]      = RMSNorm(c_kv) W_ukv^h      W_ukv [r_kv, H, d_n + d_v]
    q_h = [q_nope_h, R(q_rope_h)]    k_h = [k_nope_h, R(k_rope)]  (one rotary key for all heads)
    o_h = softmax(q_h k_h^T / sqrt(d_n + d_r) + mask) v_h
    y   = sum_h o_h W_o^h                             W_o [H, d_v, D]

The mask lets query t see key s iff s <= t and, given segment ids, seg_s = seg_t: a
token of a packed window attends only to earlier tokens of its own document.

The keys and values are expanded per head (the training form). Given a cache
(decoding, `engram_jax.decode`), each call writes its tokens' keys into the cache at
their positions and attends over the cache: MHA/GQA cache the rotated keys and the
values [B, S, Hkv, d]; MLA caches only the normalised latent c_kv [B, S, r_kv] and the
shared rotary key [B, S, d_r] (DeepSeek-V2 section 2.1.3) and attends against the latent
directly, with W_uk absorbed into the query and W_uv applied after the weighted sum:

    score_h(s) = (q_nope_h W_uk^h^T) . c_kv(s) + R(q_rope_h) . k_rope(s)
    o_h        = (sum_s softmax(score_h)(s) c_kv(s)) W_uv^h         (W_ukv = [W_uk | W_uv])
"""

from __future__ import annotations

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax.config_base import Config

# Logical axis names of the attention parameters (mapped to mesh axes in sharding.py).
EMBED, HEADS, KV_HEADS, HEAD_DIM, Q_LORA, KV_LORA = "embed", "heads", "kv_heads", "head_dim", "q_lora", "kv_lora"


@dataclasses.dataclass(frozen=True)
class AttentionConfig(Config):
    """Sizes of one attention layer; the model width D comes from the input.

    Attributes:
      kind: "mha" (multi-head; grouped-query when num_kv_heads < num_heads) or "mla".
      num_heads: H, query heads.
      num_kv_heads: Hkv, key/value heads of MHA/GQA; 0 means H. Must divide H.
      head_dim: d, the MHA/GQA head width (even: rotary pairs).
      rope_theta: base of the rotary frequencies.
      q_lora_rank: MLA r_q; 0 is a full-rank query projection.
      kv_lora_rank: MLA r_kv, width of the compressed key/value latent c_kv.
      qk_nope_dim: MLA d_n, per-head query/key width without rotary.
      qk_rope_dim: MLA d_r, per-head rotary width (even); the rotary key is shared.
      v_head_dim: MLA d_v, per-head value width.
      norm_eps: epsilon of MLA's two RMSNorms.
    """

    kind: str = "mha"
    num_heads: int = 4
    num_kv_heads: int = 0
    head_dim: int = 32
    rope_theta: float = 10000.0
    q_lora_rank: int = 0
    kv_lora_rank: int = 64
    qk_nope_dim: int = 32
    qk_rope_dim: int = 16
    v_head_dim: int = 32
    norm_eps: float = 1e-6

    def validate(self) -> None:
        self.check(self.kind in ("mha", "mla"), "kind", 'must be "mha" or "mla"')
        for name in ("num_heads", "head_dim", "kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim"):
            self.check(getattr(self, name) >= 1, name, "must be >= 1")
        self.check(self.num_kv_heads >= 0, "num_kv_heads", "must be >= 0 (0 means num_heads)")
        self.check(self.q_lora_rank >= 0, "q_lora_rank", "must be >= 0 (0 means a full-rank query)")
        self.check(self.rope_theta > 0, "rope_theta", "must be > 0")
        self.check(self.norm_eps > 0, "norm_eps", "must be > 0")
        if self.kind == "mha":
            self.check(self.num_heads % self.kv_heads == 0, "num_kv_heads",
                       f"must divide num_heads = {self.num_heads}")
            self.check(self.head_dim % 2 == 0, "head_dim", "must be even (rotary rotates pairs)")
        else:
            self.check(self.qk_rope_dim % 2 == 0, "qk_rope_dim", "must be even (rotary rotates pairs)")

    @property
    def kv_heads(self) -> int:
        """Hkv: key/value heads (MLA expands keys and values to all H heads)."""
        return (self.num_kv_heads or self.num_heads) if self.kind == "mha" else self.num_heads

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of queries and keys."""
        return self.head_dim if self.kind == "mha" else self.qk_nope_dim + self.qk_rope_dim

    @property
    def value_head_dim(self) -> int:
        """Per-head width of values (and of each head's output)."""
        return self.head_dim if self.kind == "mha" else self.v_head_dim

    def _norm_params(self) -> int:
        """RMSNorm scales (MLA only): parameters that are not matmul weights."""
        return 0 if self.kind == "mha" else self.q_lora_rank + self.kv_lora_rank

    def num_params(self, hidden_size: int) -> int:
        """Exact parameter count of one `Attention` layer at model width D = hidden_size."""
        d, h = hidden_size, self.num_heads
        out = h * self.value_head_dim * d
        if self.kind == "mha":
            return d * h * self.head_dim + 2 * d * self.kv_heads * self.head_dim + out
        q_rank = self.q_lora_rank
        query = d * h * self.qk_head_dim if q_rank == 0 else d * q_rank + q_rank * h * self.qk_head_dim
        kv = d * (self.kv_lora_rank + self.qk_rope_dim) + self.kv_lora_rank * h * (self.qk_nope_dim + self.v_head_dim)
        return query + kv + out + self._norm_params()

    def flops_per_token(self, hidden_size: int, seq_len: int) -> int:
        """Forward FLOPs per token of causal self-attention over sequences of seq_len.

        2 * (matmul parameters) for the projections, plus the score and value products:
        2 FLOPs per multiply-add * (seq_len + 1) / 2 keys per query on average (causal)
        * H * (qk_head_dim + value_head_dim). Softmax, rotary and norms are left out,
        as is the zero padding that MLA's value may get (see `_causal_attention`).
        """
        matmul = 2 * (self.num_params(hidden_size) - self._norm_params())
        return matmul + (seq_len + 1) * self.num_heads * (self.qk_head_dim + self.value_head_dim)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, theta: float) -> jnp.ndarray:
    """Rotary position embedding, interleaved pairs (as DeepSeek's reference code).

    Pair i = (x[2i], x[2i+1]) of a token at position p is rotated by the angle
    p * theta^(-2i / d), so <R(q, m), R(k, n)> depends on m - n only. (The interleaved
    layout is DeepSeek-V3's `apply_rotary_emb`; the rotate-half layout of other code
    differs by a fixed permutation of the projection columns.)

    Args:
      x: [..., T, H, d] with d even.
      positions: [T] or [..., T], broadcastable against x's leading axes.
      theta: frequency base.

    Returns:
      The rotated x, with x's shape and dtype (computed in float32 or wider).
    """
    d = x.shape[-1]
    wide = jnp.promote_types(x.dtype, jnp.float32)
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=wide) / d)  # [d/2]
    angle = positions.astype(wide)[..., None, None] * inv_freq  # [..., T, 1, d/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    pairs = x.astype(wide).reshape(*x.shape[:-1], d // 2, 2)  # [..., T, H, d/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)  # [..., T, H, d/2, 2]
    return rotated.reshape(x.shape).astype(x.dtype)


def cache_shapes(config: AttentionConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """The decoding cache of one attention layer for `batch` sequences of `length` slots.

    Returns:
      MHA/GQA `{"key": [B, S, Hkv, d], "value": [B, S, Hkv, d]}` (keys rotated);
      MLA `{"latent": [B, S, r_kv], "rope_key": [B, S, d_r]}`, as ShapeDtypeStructs.
    """
    if config.kind == "mha":
        kv = jax.ShapeDtypeStruct((batch, length, config.kv_heads, config.head_dim), dtype)
        return {"key": kv, "value": kv}
    return {"latent": jax.ShapeDtypeStruct((batch, length, config.kv_lora_rank), dtype),
            "rope_key": jax.ShapeDtypeStruct((batch, length, config.qk_rope_dim), dtype)}


def write_cache(cache: jnp.ndarray, new: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """cache [B, S, ...] with new [B, T, ...] written at slots positions [B, T] (a slot
    past the end is dropped)."""
    rows = jnp.arange(cache.shape[0])[:, None]  # [B, 1]
    return cache.at[rows, positions].set(new.astype(cache.dtype), mode="drop")


def _visible(positions: jnp.ndarray, length: int) -> jnp.ndarray:
    """bool [B, T, S]: cache slot s is visible to the query at positions[b, t] iff s <= it."""
    return jnp.arange(length)[None, None, :] <= positions[:, :, None]


def _masked_softmax(scores: jnp.ndarray, visible: jnp.ndarray) -> jnp.ndarray:
    """softmax over the last axis (slots) of float32 scores [B, T, ..., S], visible [B, T, S]."""
    mask = visible.reshape(visible.shape[:2] + (1,) * (scores.ndim - 3) + visible.shape[2:])
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)


def _causal_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float,
                      segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """softmax(q k^T * scale + mask) v through `jax.nn.dot_product_attention`.

    The mask is causal and, with segment ids, also keeps each query to the keys of its
    own segment (its document). A query always sees itself, so no row is fully masked.

    GQA needs nothing here: with Hkv < H key/value heads it groups query heads
    h = j * (H / Hkv) + g onto head j. But the value must have the key's shape
    [B, T, Hkv, d] (checked in JAX 0.10.2), and MLA's d_v differs from d_n + d_r: so
    all three are zero-padded to the larger width. Zero columns of q and k leave the
    scores unchanged (the scale is passed explicitly) and zero columns of v give zero
    outputs, which are sliced off.

    Args:
      q: [B, T, H, d_qk]; k: [B, T, Hkv, d_qk]; v: [B, T, Hkv, d_v].
      scale: multiplier of the scores.
      segment_ids: [B, T] integer document of each token, or None for one document.

    Returns:
      [B, T, H, d_v].
    """
    d_v = v.shape[-1]
    width = max(q.shape[-1], d_v)

    def pad(a):
        return a if a.shape[-1] == width else jnp.pad(a, [(0, 0)] * 3 + [(0, width - a.shape[-1])])

    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, T]: ANDed with causal
    out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), mask=mask, scale=scale,
                                       is_causal=True)  # [B, T, H, width]
    return out[..., :d_v]


class Attention(nn.Module):
    """Causal self-attention, [B, T, D] -> [B, T, D]; MHA/GQA or MLA by `config.kind`.

    Attributes:
      config: the attention config.
      dtype: compute dtype (float32 or bfloat16); rotary, norms and softmax run in
        float32 or wider.
      param_dtype: parameter dtype.
    """

    config: AttentionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _kernel(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...], n_in: int = 1) -> jnp.ndarray:
        """A fan-in scaled weight whose first n_in axes are contracted, cast to dtype."""
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
                                                out_axis=tuple(range(n_in, len(shape))))
        kernel = self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
        return kernel.astype(self.dtype)

    def _rms_norm(self, x: jnp.ndarray, axis: str, name: str) -> jnp.ndarray:
        wide = jnp.promote_types(self.dtype, jnp.float32)
        norm = nn.RMSNorm(epsilon=self.config.norm_eps, dtype=wide, param_dtype=self.param_dtype,
                          scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis,)), name=name)
        return norm(x.astype(wide)).astype(self.dtype)

    def _mha_qkv(self, x: jnp.ndarray, positions: jnp.ndarray):
        cfg = self.config
        d = x.shape[-1]
        q = jnp.einsum("btd,dhk->bthk", x, self._kernel("query", (d, cfg.num_heads, cfg.head_dim),
                                                        (EMBED, HEADS, HEAD_DIM)))  # [B, T, H, d]
        kv_shape, kv_axes = (d, cfg.kv_heads, cfg.head_dim), (EMBED, KV_HEADS, HEAD_DIM)
        k = jnp.einsum("btd,dhk->bthk", x, self._kernel("key", kv_shape, kv_axes))  # [B, T, Hkv, d]
        v = jnp.einsum("btd,dhk->bthk", x, self._kernel("value", kv_shape, kv_axes))  # [B, T, Hkv, d]
        rope = lambda a: apply_rope(a, positions, cfg.rope_theta)  # noqa: E731
        return rope(q), rope(k), v, 1 / math.sqrt(cfg.head_dim)

    def _mla_parts(self, x: jnp.ndarray, positions: jnp.ndarray):
        """MLA's query [B, T, H, d_n + d_r] (rotary part rotated), latent c_kv [B, T, r_kv],
        rotated shared key [B, T, 1, d_r] and the up-projection W_ukv [r_kv, H, d_n + d_v]."""
        cfg = self.config
        d, h, n, r = x.shape[-1], cfg.num_heads, cfg.qk_nope_dim, cfg.qk_rope_dim
        if cfg.q_lora_rank == 0:
            q = jnp.einsum("btd,dhk->bthk", x, self._kernel("query", (d, h, n + r),
                                                            (EMBED, HEADS, HEAD_DIM)))  # [B, T, H, d_n + d_r]
        else:
            c_q = x @ self._kernel("q_down", (d, cfg.q_lora_rank), (EMBED, Q_LORA))  # [B, T, r_q]
            c_q = self._rms_norm(c_q, Q_LORA, "q_norm")
            q = jnp.einsum("btr,rhk->bthk", c_q, self._kernel("q_up", (cfg.q_lora_rank, h, n + r),
                                                              (Q_LORA, HEADS, HEAD_DIM)))  # [B, T, H, d_n + d_r]
        down = x @ self._kernel("kv_down", (d, cfg.kv_lora_rank + r), (EMBED, KV_LORA))  # [B, T, r_kv + d_r]
        c_kv = self._rms_norm(down[..., :cfg.kv_lora_rank], KV_LORA, "kv_norm")  # [B, T, r_kv]
        k_rope = apply_rope(down[..., None, cfg.kv_lora_rank:], positions, cfg.rope_theta)  # [B, T, 1, d_r]
        w_ukv = self._kernel("kv_up", (cfg.kv_lora_rank, h, n + cfg.v_head_dim), (KV_LORA, HEADS, HEAD_DIM))
        q = jnp.concatenate([q[..., :n], apply_rope(q[..., n:], positions, cfg.rope_theta)], -1)
        return q, c_kv, k_rope, w_ukv

    def _mla_qkv(self, x: jnp.ndarray, positions: jnp.ndarray):
        cfg = self.config
        n, r = cfg.qk_nope_dim, cfg.qk_rope_dim
        q, c_kv, k_rope, w_ukv = self._mla_parts(x, positions)
        kv = jnp.einsum("btr,rhk->bthk", c_kv, w_ukv)  # [B, T, H, d_n + d_v]
        k = jnp.concatenate([kv[..., :n], jnp.broadcast_to(k_rope, (*kv.shape[:3], r))], -1)  # [B, T, H, d_n + d_r]
        return q, k, kv[..., n:], 1 / math.sqrt(n + r)

    def _mha_cached(self, x: jnp.ndarray, positions: jnp.ndarray, cache: dict):
        """Writes this chunk's keys and values at their positions, attends over the cache."""
        q, k, v, scale = self._mha_qkv(x, positions)  # [B, T, H, d], [B, T, Hkv, d] x2
        cache = {"key": write_cache(cache["key"], k, positions), "value": write_cache(cache["value"], v, positions)}
        b, t, h, d = q.shape
        hkv = cache["key"].shape[2]
        wide = jnp.promote_types(self.dtype, jnp.float32)
        q = q.reshape(b, t, hkv, h // hkv, d)  # [B, T, Hkv, H/Hkv, d]: head h = j * (H/Hkv) + g
        scores = jnp.einsum("btjgd,bsjd->btjgs", q, cache["key"].astype(q.dtype),
                            preferred_element_type=wide) * scale  # [B, T, Hkv, H/Hkv, S]
        p = _masked_softmax(scores, _visible(positions, cache["key"].shape[1]))
        out = jnp.einsum("btjgs,bsjd->btjgd", p.astype(self.dtype), cache["value"].astype(self.dtype))
        return out.reshape(b, t, h, d), cache  # [B, T, H, d]

    def _mla_cached(self, x: jnp.ndarray, positions: jnp.ndarray, cache: dict):
        """Writes this chunk's latent and rotary key, attends against the latent (absorbed)."""
        cfg = self.config
        n = cfg.qk_nope_dim
        q, c_kv, k_rope, w_ukv = self._mla_parts(x, positions)
        cache = {"latent": write_cache(cache["latent"], c_kv, positions),
                 "rope_key": write_cache(cache["rope_key"], k_rope[:, :, 0], positions)}
        latent, rope_key = cache["latent"].astype(self.dtype), cache["rope_key"].astype(self.dtype)
        wide = jnp.promote_types(self.dtype, jnp.float32)
        q_latent = jnp.einsum("bthn,rhn->bthr", q[..., :n], w_ukv[..., :n])  # [B, T, H, r_kv]: W_uk absorbed
        scores = (jnp.einsum("bthr,bsr->bths", q_latent, latent, preferred_element_type=wide)
                  + jnp.einsum("bthk,bsk->bths", q[..., n:], rope_key, preferred_element_type=wide))  # [B, T, H, S]
        p = _masked_softmax(scores / math.sqrt(n + cfg.qk_rope_dim), _visible(positions, latent.shape[1]))
        o_latent = jnp.einsum("bths,bsr->bthr", p.astype(self.dtype), latent)  # [B, T, H, r_kv]
        return jnp.einsum("bthr,rhv->bthv", o_latent, w_ukv[..., n:]), cache  # [B, T, H, d_v]: W_uv after

    @nn.compact
    def __call__(self, x: jnp.ndarray, segment_ids: jnp.ndarray | None = None,
                 positions: jnp.ndarray | None = None, cache: dict | None = None):
        """Attends each position to itself and the positions before it (in its segment).

        Args:
          x: [B, T, D] hidden states.
          segment_ids: [B, T] integer document of each token; None: the row is one
            document. Not with a cache.
          positions: [B, T] integer rotary position of each token (its index within its
            document, for packed windows); None: 0..T-1. With a cache, also the slot
            each token's key is written to.
          cache: the decoding cache (`cache_shapes`), or None. With it, a query at
            position p attends to every slot s <= p of its row.

        Returns:
          [B, T, D] in `dtype`; with a cache, ([B, T, D], the updated cache).
        """
        if x.ndim != 3:
            raise ValueError(f"Attention: x must be [B, T, D], got shape {x.shape}")
        chex.assert_type(x, float)
        for name, ids in (("segment_ids", segment_ids), ("positions", positions)):
            if ids is not None:
                chex.assert_shape(ids, x.shape[:2], custom_message=f"Attention: {name} must be [B, T]")
                chex.assert_type(ids, int, custom_message=f"Attention: {name} must be integers")
        cfg = self.config
        x = x.astype(self.dtype)
        w_o_shape = (cfg.num_heads, cfg.value_head_dim, x.shape[-1])
        if cache is not None:
            if positions is None or segment_ids is not None:
                raise ValueError("Attention: a cache needs positions [B, T] and no segment_ids")
            cached = self._mha_cached if cfg.kind == "mha" else self._mla_cached
            out, cache = cached(x, positions, cache)  # [B, T, H, d_v]
            w_o = self._kernel("out", w_o_shape, (HEADS, HEAD_DIM, EMBED), n_in=2)
            return jnp.einsum("bthk,hkd->btd", out, w_o), cache  # [B, T, D]
        if positions is None:
            positions = jnp.arange(x.shape[1])  # [T]
        qkv = self._mha_qkv if cfg.kind == "mha" else self._mla_qkv
        q, k, v, scale = qkv(x, positions)
        out = _causal_attention(q, k, v, scale, segment_ids)  # [B, T, H, d_v]
        w_o = self._kernel("out", w_o_shape, (HEADS, HEAD_DIM, EMBED), n_in=2)
        return jnp.einsum("bthk,hkd->btd", out, w_o)  # [B, T, D]

"""The Engram layer: memory lookup, context-aware gating, short conv (paper section 2).

For memory vectors e = concat of the hashed N-gram rows (looked up by `table.py`,
which keeps the tables as their own sharded state) and a residual
stream of G branches h[g] (G = 1 for a plain residual, G = 4 with mHC):

    v     = W_V e + b_V                                   one value, shared   (eq. 3)
    k_g   = W_K^g e + b_K^g                               one key per branch  (eq. 6)
    s_g   = <RMSNorm_k^g(k_g), RMSNorm_q^g(h_g)> / sqrt(D)                    (eq. 4)
    a_g   = sigmoid(sign(s_g) sqrt(max(|s_g|, 1e-6)))     signed sqrt: reference demo
    u_g   = a_g v
    Y     = u + SiLU(CausalDepthwiseConv(RMSNorm(u)))     kernel w, dilation N (eq. 5)

W_V and the G keys are one fused matmul, [d_mem] -> [1 + G, D]. The caller adds Y to
the residual stream before the block's attention (paper section 2.4).

Everything after the matmul (its bias, gate, gated value, conv) is one function, `_mix`, with a
hand-written backward (a custom_vjp): autodiff's backward of the same forward wrote
about 38 [B, T, G, D] buffers at G = 4 on XLA:CPU and cost 4-5x the forward; see
benchmarks/RESULTS.md, issue 20. Its forward is the plain one, op for op.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import hashing
from engram_jax.config_base import Config

# Logical axis names of Engram's parameters (mapped to mesh axes in sharding.py).
EMBED, BRANCH, MEMORY, SLOT, TAPS = "embed", "branch", "engram_memory", "engram_slot", "conv_taps"
# Reference section 4: |s| is clamped at 1e-6 before the signed square root.
_GATE_CLAMP = 1e-6


@dataclasses.dataclass(frozen=True)
class EngramConfig(Config):
    """What an Engram layer needs; backbone sizes (D, G) come from the hidden state.

    Attributes:
      layer_ids: 0-based ids of the blocks that carry Engram (paper "layers 2 and 15"
        are [1, 15]).
      max_ngram_size: N; orders 2..N are hashed.
      heads_per_ngram: K hash heads per order.
      embed_per_ngram: width of one order's K heads together; d_mem = (N - 1) * this.
      table_sizes: base rows per head for each order 2..N (each head takes its own
        prime above it; `hashing.head_primes`).
      kernel_size: taps of the short causal conv (paper: 4).
      conv_dilation: dilation of the conv; None means N (reference section 5).
      seed: seed of the hash multipliers.
      pad_id: raw id read before the start of a sequence.
      gating: context-aware gating; False (ablation "w/o gating") fixes a_g = 1.
      signed_sqrt: the reference's signed square root before the sigmoid (not in the
        paper's eq. 4).
      short_conv: the conv branch of eq. 5; False is the ablation "w/o short conv".
      conv_zero_init: start the conv kernel at zero (paper: Y starts as the gated value).
      compress_tokens: hash compressed ids; False is "w/o token compress".
      multi_branch: branch-specific gating over all G branches. False is the ablation
        "w/o multi branch": one gate on the single stream read by mHC's H_pre, which
        the backbone passes as [B, T, D].
      table_init_std: standard deviation of the table's normal initialisation (the
        reference's PyTorch embedding uses 1).
      conv_norm_eps: epsilon of the conv's RMSNorm (reference: 1e-5).
      gate_norm_eps: epsilon of the key and query RMSNorms; None is the machine epsilon
        of the float32-or-wider type they are computed in (PyTorch's default, as the
        reference).
      placement: where the tables live: "device" (rows sharded over the devices'
        memory) or "host" (the same shards in pinned host memory; see `table.py`).
      table_dtype: storage dtype of the table rows and their Adam moments, "float32"
        or "bfloat16" (update math is float32 either way).
      lookup_capacity_factor: size of the lookup's all-to-all buckets relative to an
        even split of a device's ids over the shards; 0 sizes them so that no id can
        ever be dropped (see `table.py`).
      hash_on_device: hash inside the jitted step (`NgramHasher.on_device`, bit-equal
        to the host hasher) instead of in the input pipeline; batches then carry only
        tokens.
    """

    layer_ids: tuple[int, ...] = (1, 15)
    max_ngram_size: int = 3
    heads_per_ngram: int = 8
    embed_per_ngram: int = 640
    table_sizes: tuple[int, ...] = (2_262_400, 2_262_400)
    kernel_size: int = 4
    conv_dilation: int | None = None
    seed: int = 0
    pad_id: int = 2
    gating: bool = True
    signed_sqrt: bool = True
    short_conv: bool = True
    conv_zero_init: bool = True
    compress_tokens: bool = True
    multi_branch: bool = True
    table_init_std: float = 1.0
    conv_norm_eps: float = 1e-5
    gate_norm_eps: float | None = None
    placement: str = "device"
    table_dtype: str = "float32"
    lookup_capacity_factor: float = 2.0
    hash_on_device: bool = False

    def validate(self) -> None:
        self.check(len(self.layer_ids) > 0, "layer_ids", "needs at least one layer")
        self.check(len(set(self.layer_ids)) == len(self.layer_ids), "layer_ids", "ids must be distinct")
        self.check(min(self.layer_ids, default=0) >= 0, "layer_ids", "ids are 0-based, >= 0")
        self.check(self.max_ngram_size >= 2, "max_ngram_size", "must be >= 2 (orders 2..N)")
        self.check(self.heads_per_ngram >= 1, "heads_per_ngram", "must be >= 1")
        self.check(self.embed_per_ngram >= 1, "embed_per_ngram", "must be >= 1")
        self.check(self.embed_per_ngram % self.heads_per_ngram == 0, "embed_per_ngram",
                   f"must be divisible by heads_per_ngram = {self.heads_per_ngram}")
        self.check(len(self.table_sizes) == self.max_ngram_size - 1, "table_sizes",
                   f"needs one base size per order 2..{self.max_ngram_size}")
        self.check(min(self.table_sizes, default=2) >= 2, "table_sizes", "sizes must be >= 2")
        self.check(self.kernel_size >= 1, "kernel_size", "must be >= 1")
        self.check(self.conv_dilation is None or self.conv_dilation >= 1, "conv_dilation", "must be >= 1")
        self.check(self.seed >= 0, "seed", "must be >= 0")
        self.check(self.pad_id >= 0, "pad_id", "must be a raw token id, >= 0")
        self.check(self.table_init_std > 0, "table_init_std", "must be > 0")
        self.check(self.conv_norm_eps > 0, "conv_norm_eps", "must be > 0")
        self.check(self.gate_norm_eps is None or self.gate_norm_eps > 0, "gate_norm_eps", "must be > 0")
        self.check(self.placement in ("device", "host"), "placement", "must be 'device' or 'host'")
        self.check(self.table_dtype in ("float32", "bfloat16"), "table_dtype", "must be 'float32' or 'bfloat16'")
        self.check(self.lookup_capacity_factor >= 0, "lookup_capacity_factor", "must be >= 0 (0: never drop)")

    @property
    def num_heads(self) -> int:
        """H = (N - 1) * K hash heads per layer."""
        return (self.max_ngram_size - 1) * self.heads_per_ngram

    @property
    def head_dim(self) -> int:
        """Columns of the table: the width of one head's row."""
        return self.embed_per_ngram // self.heads_per_ngram

    @property
    def memory_dim(self) -> int:
        """d_mem = (N - 1) * embed_per_ngram, the width of e_t."""
        return (self.max_ngram_size - 1) * self.embed_per_ngram

    @property
    def dilation(self) -> int:
        return self.conv_dilation or self.max_ngram_size

    def head_sizes(self, layer_id: int) -> tuple[int, ...]:
        """Rows of each head of layer `layer_id`, n-major then head-minor, [H]."""
        primes = hashing.head_primes(self.table_sizes, self.heads_per_ngram, self.layer_ids)
        if layer_id not in primes:
            raise ValueError(f"layer {layer_id} carries no Engram (layer_ids = {list(self.layer_ids)})")
        return tuple(p for order in primes[layer_id] for p in order)

    def table_rows(self, layer_id: int) -> int:
        """Rows of layer `layer_id`'s table (computed from primes; nothing allocated)."""
        return sum(self.head_sizes(layer_id))

    @property
    def table_params(self) -> int:
        """Parameters in all Engram tables."""
        return sum(self.table_rows(i) for i in self.layer_ids) * self.head_dim

    def layer_params(self, hidden_size: int, branches: int) -> int:
        """Parameters of all Engram layers besides their tables (projections, norms, conv)."""
        g = branches if self.multi_branch else 1
        slots = 1 + g if self.gating else 1
        proj = (self.memory_dim + 1) * slots * hidden_size
        norms = 2 * g * hidden_size if self.gating else 0
        conv = (self.kernel_size + 1) * g * hidden_size if self.short_conv else 0
        return len(self.layer_ids) * (proj + norms + conv)

    def flops_per_token(self, hidden_size: int, branches: int) -> int:
        """Forward FLOPs per token of one Engram layer's projections and conv (no lookup)."""
        g = branches if self.multi_branch else 1
        slots = 1 + g if self.gating else 1
        conv = 2 * self.kernel_size * g * hidden_size if self.short_conv else 0
        return 2 * self.memory_dim * slots * hidden_size + conv

    def make_hasher(self, lookup, dtype=np.int32) -> hashing.NgramHasher:
        """The NgramHasher of this config over a raw-to-compressed lookup [V].

        With `compress_tokens=False` the lookup only gives the vocabulary size and the
        identity is used.
        """
        lookup = np.asarray(getattr(lookup, "lookup", lookup))
        if not self.compress_tokens:
            lookup = np.arange(lookup.shape[0])
        return hashing.NgramHasher(
            lookup,
            max_ngram_size=self.max_ngram_size,
            heads_per_ngram=self.heads_per_ngram,
            table_sizes=self.table_sizes,
            layer_ids=self.layer_ids,
            pad_id=self.pad_id,
            seed=self.seed,
            dtype=dtype,
        )


def _fan_in_uniform(key, shape, dtype=jnp.float32):
    """U(-1/sqrt(taps), 1/sqrt(taps)): PyTorch's default for a depthwise Conv1d."""
    bound = 1 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class _NormScale(nn.Module):
    """The learnable weights of one RMSNorm per branch, scale [G, D] (flax's RMSNorm
    layout, so checkpoints and `convert.py` see `<name>/scale`)."""

    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, shape: tuple[int, int]) -> jnp.ndarray:
        return self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (BRANCH, EMBED)),
                          shape, self.param_dtype)


class ShortConv(nn.Module):
    """The weights of the short conv (eq. 5): its RMSNorm's scale [G, D] and the
    depthwise kernel [kernel_size, G, D]; the conv itself is `_mix` (training) or
    `_conv_step` (decoding)."""

    kernel_size: int
    zero_init: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, g: int, d: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        scale = _NormScale(self.param_dtype, name="norm")((g, d))
        init = nn.initializers.zeros if self.zero_init else _fan_in_uniform
        kernel = self.param("kernel", nn.with_logical_partitioning(init, (TAPS, BRANCH, EMBED)),
                            (self.kernel_size, g, d), self.param_dtype)
        return scale, kernel


@dataclasses.dataclass(frozen=True)
class _MixSpec:
    """What `_mix` needs besides arrays (static under jit, hashable for the cache)."""

    dtype: jnp.dtype  # compute dtype of the value, u and the conv
    gating: bool
    signed_sqrt: bool
    gate_eps: float
    short_conv: bool
    conv_eps: float
    dilation: int

    @property
    def wide(self):
        """The gate's dtype (float32 or wider), also used for the whole backward."""
        return jnp.promote_types(self.dtype, jnp.float32)


def _rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float, dtype):
    """flax's RMSNorm over the last axis, op for op (so outputs are bit-equal).

    Args:
      x: [..., G, D].
      scale: [G, D].

    Returns:
      (x / rms(x) * scale in `dtype`, 1 / rms(x) [..., G, 1] in float32 or wider).
    """
    wide = jnp.promote_types(x.dtype, jnp.float32)
    xw = x.astype(wide)
    inv = jax.lax.rsqrt(jnp.mean(jax.lax.square(xw), axis=-1, keepdims=True) + eps)  # [..., G, 1]
    return (xw * (inv * scale)).astype(dtype), inv


def _gate_of_score(score: jnp.ndarray, signed_sqrt: bool) -> jnp.ndarray:
    """The gate from the scaled score s (eq. 4; the reference's signed square root)."""
    if signed_sqrt:
        score = jnp.sign(score) * jnp.sqrt(jnp.maximum(jnp.abs(score), _GATE_CLAMP))
    return jax.nn.sigmoid(score)


def _gated_value(kv, h, params, spec: _MixSpec):
    """u = a_g v from the projection and the branches (eqs. 3-4).

    Args:
      kv: [B, T, S, D] the value (slot 0) and, with gating, one key per branch.
      h: [B, T, G, D] the residual branches.
      params: {"key_scale", "query_scale": [G, D]} (with gating).

    Returns:
      u [B, T, G, D] in spec.dtype and, with gating, (gate, score) [B, T, G] and the
      inverse RMS of the keys and the queries [B, T, G, 1] (all float32 or wider);
      without gating those four are None.
    """
    value = kv[:, :, :1]  # [B, T, 1, D]
    if not spec.gating:
        return jnp.broadcast_to(value, h.shape), None, None, None, None
    key, inv_k = _rms_norm(kv[:, :, 1:].astype(spec.wide), params["key_scale"], spec.gate_eps, spec.wide)
    query, inv_q = _rms_norm(h.astype(spec.wide), params["query_scale"], spec.gate_eps, spec.wide)
    score = jnp.sum(key * query, axis=-1) / math.sqrt(h.shape[-1])  # [B, T, G]
    gate = _gate_of_score(score, spec.signed_sqrt)
    return gate[..., None].astype(spec.dtype) * value, gate, score, inv_k, inv_q  # u: [B, T, G, D]


def _causal_taps(x: jnp.ndarray, kernel: jnp.ndarray, dilation: int) -> jnp.ndarray:
    """Depthwise causal conv [B, T, G, D] -> [B, T, G, D]: tap i of kernel [K, G, D]
    reads x[t - (K - 1 - i) * dilation] (PyTorch's cross-correlation), zero before 0."""
    taps, t = kernel.shape[0], x.shape[1]
    span = (taps - 1) * dilation
    padded = jnp.pad(x, ((0, 0), (span, 0), (0, 0), (0, 0)))  # [B, span + T, G, D]
    return sum(kernel[i] * padded[:, i * dilation : i * dilation + t] for i in range(taps))


def _with_bias(kv, params, spec: _MixSpec):
    """kv plus the projection's bias [S, D] when `params` has one, in spec.dtype."""
    return kv + params["kv_bias"].astype(spec.dtype) if "kv_bias" in params else kv


def _mix_forward(kv, h, params, spec: _MixSpec):
    """Y and the gate from the projection and the branches; see `_mix`."""
    u, gate, score, inv_k, inv_q = _gated_value(_with_bias(kv, params, spec), h, params, spec)
    inv_c = None
    y = u
    if spec.short_conv:
        x, inv_c = _rms_norm(u, params["conv_scale"], spec.conv_eps, spec.dtype)
        y = u + nn.silu(_causal_taps(x, params["conv_kernel"].astype(spec.dtype), spec.dilation))
    return (y, gate), (gate, score, inv_k, inv_q, inv_c)


def _mix_backward(spec: _MixSpec, saved, cotangents):
    """The hand-written backward of `_mix`, in float32 or wider.

    Autodiff's backward of the same forward writes 38 [B, T, G, D] buffers at G = 4 on
    XLA:CPU (each broadcast of a norm's scale or of a per-row statistic that feeds a
    reduction, each conv tap's shifted input and cotangent, the re-padded projection
    cotangent); this one writes 21. It recomputes u, the conv's input and its
    pre-activation from kv and the [B, T, G] statistics, needs no row reduction for
    the gate's norms (their mean(g x) is the score), and returns d kv [B, T, S, D]
    with one concatenate and d h [B, T, G, D]. benchmarks/RESULTS.md (issue 20) has
    the side-by-side times.
    """
    kv, h, params, (gate, score, inv_k, inv_q, inv_c) = saved
    d_y, d_gate_out = cotangents
    wide = spec.wide
    kv = _with_bias(kv, params, spec)
    value = kv[:, :, :1]  # [B, T, 1, D]
    u = jnp.broadcast_to(value, h.shape) if gate is None else gate[..., None].astype(spec.dtype) * value
    d_u = d_y.astype(wide)  # [B, T, G, D]
    grads = {}
    if spec.short_conv:
        scale, kernel = params["conv_scale"], params["conv_kernel"]
        taps, t = kernel.shape[0], u.shape[1]
        span = (taps - 1) * spec.dilation
        x = (u.astype(wide) * (inv_c * scale)).astype(spec.dtype)  # the forward's conv input
        pre = _causal_taps(x, kernel.astype(spec.dtype), spec.dilation).astype(wide)
        sig = jax.nn.sigmoid(pre)
        d_pre = d_u * sig * (1 + pre * (1 - sig))  # SiLU'
        past = jnp.pad(x.astype(wide), ((0, 0), (span, 0), (0, 0), (0, 0)))  # [B, span + T, G, D]
        # Each tap's reduction reads its own shifted copy of x (measured: cheaper on
        # XLA:CPU than slicing both operands, which copies both).
        grads["conv_kernel"] = jnp.stack([
            jnp.sum(d_pre * past[:, i * spec.dilation : i * spec.dilation + t], axis=(0, 1))
            for i in range(taps)]).astype(kernel.dtype)  # [K, G, D]
        future = jnp.pad(d_pre, ((0, 0), (0, span), (0, 0), (0, 0)))  # [B, T + span, G, D]
        # Tap i's transpose: x[s] fed pre[s + (K - 1 - i) * dilation].
        k_wide = kernel.astype(spec.dtype).astype(wide)
        d_x = sum(k_wide[i] * future[:, (taps - 1 - i) * spec.dilation : (taps - 1 - i) * spec.dilation + t]
                  for i in range(taps))
        u_wide = u.astype(wide)
        grads["conv_scale"] = jnp.sum(d_x * u_wide * inv_c, axis=(0, 1)).astype(scale.dtype)
        d_normed = d_x * scale
        # RMSNorm: d u = r g - u r^3 mean(g u), for x = u r scale, r = 1 / rms(u).
        d_u = d_u + inv_c * d_normed - u_wide * inv_c**3 * jnp.mean(d_normed * u_wide, axis=-1, keepdims=True)
    if gate is None:
        d_kv = jnp.sum(d_u, axis=2, keepdims=True)  # [B, T, 1, D]
        return _bias_grad(d_kv, kv, params, grads), jnp.zeros_like(h), grads
    d_gate = jnp.sum(d_u * value.astype(wide), axis=-1) + d_gate_out  # [B, T, G]
    gate_c = gate[..., None].astype(spec.dtype).astype(wide)  # [B, T, G, 1]
    # Over the G branches as G slices: a reduction here would be a fusion of its own.
    d_value = sum(d_u[:, :, i : i + 1] * gate_c[:, :, i : i + 1] for i in range(d_u.shape[2]))  # [B, T, 1, D]
    _, score_vjp = jax.vjp(lambda s: _gate_of_score(s, spec.signed_sqrt), score)
    root_d = math.sqrt(h.shape[-1])
    d_dot = (score_vjp(d_gate)[0] / root_d)[..., None]  # d <key, query>: [B, T, G, 1]
    k_scale, q_scale = params["key_scale"], params["query_scale"]
    key = kv[:, :, 1:].astype(wide)
    query = h.astype(wide)
    # RMSNorm's backward d x = r (g - x r^2 mean(g x)) needs mean(g x) per row; for both
    # norms here it is the score itself: sum(scale_k k r_k * scale_q q r_q) = s sqrt(D).
    both = k_scale * q_scale  # [G, D]
    score_c = (score / root_d)[..., None]  # [B, T, G, 1]
    d_key = d_dot * inv_k * (both * (query * inv_q) - key * inv_k * score_c)
    d_query = d_dot * inv_q * (both * (key * inv_k) - query * inv_q * score_c)
    shared = jnp.sum(d_dot * inv_k * inv_q * key * query, axis=(0, 1))  # [G, D]
    grads["key_scale"] = (shared * q_scale).astype(k_scale.dtype)
    grads["query_scale"] = (shared * k_scale).astype(q_scale.dtype)
    d_kv = jnp.concatenate([d_value, d_key], axis=2)  # [B, T, 1 + G, D]
    return _bias_grad(d_kv, kv, params, grads), d_query.astype(h.dtype), grads


def _bias_grad(d_kv, kv, params, grads):
    """Adds the bias's gradient, summed from the wide cotangent (autodiff summed the
    bfloat16 one: a reduce-window of 64 ms at M = 4 on XLA:CPU), and returns d kv
    in kv's dtype."""
    if "kv_bias" in params:
        grads["kv_bias"] = jnp.sum(d_kv, axis=(0, 1)).astype(params["kv_bias"].dtype)  # [S, D]
    return d_kv.astype(kv.dtype)


@functools.lru_cache(maxsize=None)
def _mix_for(spec: _MixSpec):
    """`_mix` with its hand-written backward, one per spec."""

    @jax.custom_vjp
    def mix(kv, h, params):
        return _mix_forward(kv, h, params, spec)[0]

    def forward(kv, h, params):
        out, stats = _mix_forward(kv, h, params, spec)
        return out, (kv, h, params, stats)

    def backward(saved, cotangents):
        d_kv, d_h, grads = _mix_backward(spec, saved, cotangents)
        return d_kv, d_h, {k: grads[k] for k in saved[2]}

    mix.defvjp(forward, backward)
    return mix


def _mix(kv, h, params, spec: _MixSpec):
    """Everything after the projection: gate, gated value and short conv (eqs. 4-5).

    Args:
      kv: [B, T, S, D] projection output in spec.dtype (value, then one key per branch),
        before its bias.
      h: [B, T, G, D] residual branches.
      params: float arrays: the projection's "kv_bias" [S, D] (optional), "key_scale" and
        "query_scale" [G, D] with gating, "conv_scale" [G, D] and "conv_kernel"
        [K, G, D] with the conv.

    Returns:
      (Y [B, T, G, D] in spec.dtype, the gate [B, T, G] or None without gating).
    """
    return _mix_for(spec)(kv, h, params)


def _conv_step(x, kernel, cache, positions, dilation: int):
    """The short conv while decoding, before its SiLU.

    Args:
      x: [B, T, G, D] normalised inputs of the new tokens.
      kernel: [K, G, D].
      cache: [B, S, G, D] normalised inputs of the past, by slot.
      positions: [B, T] the slot of each new token.

    Returns:
      ([B, T, G, D], the cache with x written at `positions`); tap i reads slot
      position - (K - 1 - i) * dilation (zero before slot 0).
    """
    taps = kernel.shape[0]
    rows = jnp.arange(x.shape[0])[:, None]  # [B, 1]
    cache = cache.at[rows, positions].set(x.astype(cache.dtype), mode="drop")
    y = 0
    for i in range(taps):
        slot = positions - (taps - 1 - i) * dilation  # [B, T]
        tap = cache.at[rows, jnp.maximum(slot, 0)].get(mode="clip").astype(x.dtype)  # [B, T, G, D]
        y = y + kernel[i] * jnp.where((slot >= 0)[..., None, None], tap, 0)
    return y, cache


class Engram(nn.Module):
    """One Engram layer: the output Y that the caller adds to the residual stream.

    Attributes:
      config: the Engram config.
      layer_id: which of `config.layer_ids` this is (it selects the table's primes).
      dtype: compute dtype (float32 or bfloat16); gates are computed in float32 or wider.
      param_dtype: parameter dtype.
    """

    config: EngramConfig
    layer_id: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jnp.ndarray, memory: jnp.ndarray, cache: jnp.ndarray | None = None,
                 positions: jnp.ndarray | None = None):
        """Computes Y from the hidden state and the layer's memory vectors.

        Args:
          hidden: [B, T, G, D] residual branches, or [B, T, D] for a single stream.
          memory: [B, T, d_mem] the rows of this layer's hash ids, concatenated over the
            heads (`table.Tables.lookup`, or `table.gather` on one device).
          cache: decoding only: the short conv's past inputs [B, S, G, D] (`cache_shape`),
            with positions [B, T] the slot of each token. None: the whole sequence.

        Returns:
          Y with the shape of `hidden`, in `dtype`; with a cache, (Y, the updated cache).
        """
        cfg = self.config
        single = hidden.ndim == 3
        if hidden.ndim not in (3, 4):
            raise ValueError(f"Engram: hidden must be [B, T, G, D] or [B, T, D], got shape {hidden.shape}")
        h = hidden[:, :, None, :] if single else hidden  # [B, T, G, D]
        b, t, g, d = h.shape
        if memory.shape != (b, t, cfg.memory_dim):
            raise ValueError(f"Engram layer {self.layer_id}: memory must be [B, T, d_mem] = "
                             f"{(b, t, cfg.memory_dim)} to match hidden {hidden.shape}, got {memory.shape}")
        if not cfg.multi_branch and g != 1:
            raise ValueError("EngramConfig.multi_branch=False gates one stream: pass the stream read by "
                             f"mHC's H_pre as [B, T, D]; got {g} branches")
        chex.assert_type([h, memory], float)

        e = memory.astype(self.dtype)  # [B, T, d_mem]
        slots = 1 + g if cfg.gating else 1  # the value, then one key per branch
        kernel = self.param("kv_kernel", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)),
            (MEMORY, SLOT, EMBED)), (cfg.memory_dim, slots, d), self.param_dtype)
        bias = self.param("kv_bias", nn.with_logical_partitioning(nn.initializers.zeros, (SLOT, EMBED)),
                          (slots, d), self.param_dtype)
        kv = jnp.einsum("btm,msd->btsd", e, kernel.astype(self.dtype))  # [B, T, S, D], bias added in _mix

        params = {"kv_bias": bias}
        if cfg.gating:
            params["key_scale"] = _NormScale(self.param_dtype, name="key_norm")((g, d))
            params["query_scale"] = _NormScale(self.param_dtype, name="query_norm")((g, d))
        if cfg.short_conv:
            params["conv_scale"], params["conv_kernel"] = ShortConv(
                cfg.kernel_size, cfg.conv_zero_init, self.param_dtype, name="short_conv")(g, d)
        spec = _MixSpec(dtype=jnp.dtype(self.dtype), gating=cfg.gating, signed_sqrt=cfg.signed_sqrt,
                        gate_eps=cfg.gate_norm_eps or float(jnp.finfo(jnp.promote_types(self.dtype, jnp.float32)).eps),
                        short_conv=cfg.short_conv, conv_eps=cfg.conv_norm_eps, dilation=cfg.dilation)
        if cache is None:
            y, gate = _mix(kv, h, params, spec)  # [B, T, G, D], [B, T, G]
        else:  # decoding: no backward, the conv reads its cache
            u, gate, *_ = _gated_value(_with_bias(kv, params, spec), h, params, spec)
            y = u
            if cfg.short_conv:
                x, _ = _rms_norm(u, params["conv_scale"], spec.conv_eps, self.dtype)
                out, cache = _conv_step(x, params["conv_kernel"].astype(self.dtype), cache, positions,
                                        spec.dilation)
                y = u + nn.silu(out)
        if gate is not None:
            self.sow("intermediates", "gate", gate)
        y = y[:, :, 0] if single else y
        return y if cache is None else (y, cache)


def cache_shape(config: EngramConfig, batch: int, length: int, hidden_size: int, branches: int,
                dtype=jnp.float32) -> jax.ShapeDtypeStruct | None:
    """The decoding cache of one Engram layer: its short conv's normalised inputs
    [B, S, G, D] (G = 1 for single-branch fusion), or None without the conv."""
    if not config.short_conv:
        return None
    g = branches if config.multi_branch else 1
    return jax.ShapeDtypeStruct((batch, length, g, hidden_size), dtype)

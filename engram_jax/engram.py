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
"""

from __future__ import annotations

import dataclasses
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


def _branch_norm(eps: float, dtype, param_dtype, name: str) -> nn.RMSNorm:
    """RMSNorm over D with its own learnable weights per branch: scale [G, D]."""
    return nn.RMSNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, reduction_axes=-1, feature_axes=(-2, -1),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (BRANCH, EMBED)), name=name,
    )


def _fan_in_uniform(key, shape, dtype=jnp.float32):
    """U(-1/sqrt(taps), 1/sqrt(taps)): PyTorch's default for a depthwise Conv1d."""
    bound = 1 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class ShortConv(nn.Module):
    """SiLU of a causal, dilated, depthwise conv over RMSNorm'd branches (eq. 5).

    Channels are the G * D values of all branches side by side; each has its own
    `kernel_size` taps, spaced `dilation` tokens apart, reading only the past.
    """

    kernel_size: int
    dilation: int
    eps: float
    zero_init: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, u: jnp.ndarray, cache: jnp.ndarray | None = None,
                 positions: jnp.ndarray | None = None):
        """[B, T, G, D] -> [B, T, G, D].

        With a decoding cache [B, S, G, D] of the normalised inputs and positions [B, T],
        the inputs are written at their positions and tap i reads slot
        position - (kernel_size - 1 - i) * dilation (zero before slot 0); returns
        ([B, T, G, D], the updated cache).
        """
        _, t, g, d = u.shape
        x = _branch_norm(self.eps, self.dtype, self.param_dtype, "norm")(u)
        init = nn.initializers.zeros if self.zero_init else _fan_in_uniform
        kernel = self.param("kernel", nn.with_logical_partitioning(init, (TAPS, BRANCH, EMBED)),
                            (self.kernel_size, g, d), self.param_dtype)
        kernel = kernel.astype(self.dtype)
        if cache is not None:
            rows = jnp.arange(u.shape[0])[:, None]  # [B, 1]
            cache = cache.at[rows, positions].set(x.astype(cache.dtype), mode="drop")
            y = 0
            for i in range(self.kernel_size):
                slot = positions - (self.kernel_size - 1 - i) * self.dilation  # [B, T]
                tap = cache.at[rows, jnp.maximum(slot, 0)].get(mode="clip").astype(x.dtype)  # [B, T, G, D]
                y = y + kernel[i] * jnp.where((slot >= 0)[..., None, None], tap, 0)
            return nn.silu(y), cache
        span = (self.kernel_size - 1) * self.dilation
        padded = jnp.pad(x, ((0, 0), (span, 0), (0, 0), (0, 0)))  # [B, span + T, G, D]
        # Tap i reads x[t - (kernel_size - 1 - i) * dilation]: PyTorch's cross-correlation.
        y = sum(kernel[i] * padded[:, i * self.dilation : i * self.dilation + t]
                for i in range(self.kernel_size))
        return nn.silu(y)


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
        kv = jnp.einsum("btm,msd->btsd", e, kernel.astype(self.dtype)) + bias.astype(self.dtype)  # [B, T, S, D]
        value = kv[:, :, :1]  # [B, T, 1, D]

        if cfg.gating:
            wide = jnp.promote_types(self.dtype, jnp.float32)
            eps = cfg.gate_norm_eps or float(jnp.finfo(wide).eps)
            key = _branch_norm(eps, wide, self.param_dtype, "key_norm")(kv[:, :, 1:].astype(wide))
            query = _branch_norm(eps, wide, self.param_dtype, "query_norm")(h.astype(wide))
            score = jnp.sum(key * query, axis=-1) / math.sqrt(d)  # [B, T, G]
            if cfg.signed_sqrt:
                score = jnp.sign(score) * jnp.sqrt(jnp.maximum(jnp.abs(score), _GATE_CLAMP))
            gate = jax.nn.sigmoid(score)  # [B, T, G]
            self.sow("intermediates", "gate", gate)
            u = gate[..., None].astype(self.dtype) * value  # [B, T, G, D]
        else:
            u = jnp.broadcast_to(value, (b, t, g, d))

        y = u
        if cfg.short_conv:
            conv = ShortConv(cfg.kernel_size, cfg.dilation, cfg.conv_norm_eps, cfg.conv_zero_init,
                             self.dtype, self.param_dtype, name="short_conv")
            if cache is None:
                y = u + conv(u)
            else:
                out, cache = conv(u, cache, positions)
                y = u + out
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

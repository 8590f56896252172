"""A decoder-only language model whose blocks can carry Engram.

    tokens [B, T] -> embed -> expand to G branches -> L blocks -> sum branches
                  -> RMSNorm -> LM head -> logits [B, T, V]

Each block, over the residual stream X [B, T, G, D] (mHC; G = 1 is a plain pre-norm
residual stream):

    X <- X + Engram(X, hash ids)                         at the configured layers
    X <- H_res X + H_post^T Attention(RMSNorm(H_pre X))
    X <- H_res X + H_post^T FFN(RMSNorm(H_pre X))        dense MLP or DeepSeekMoE

Windows that pack several documents pass segment ids and positions [B, T]: attention
then stays within each document and its rotary positions restart there. Engram reads
across the boundary (its n-grams and short conv), as DeepSeek's reference does.

Runs of consecutive identical blocks (the same FFN kind, no Engram) are stacked with
`nn.scan` (`scan_layers`): one block is compiled per run, and its parameters carry a
leading `layers` axis (a module `blocks_<first>_<last>`; single blocks stay `block_<i>`).
Each block can recompute its activations in the backward pass under a policy (`remat`).
For a loss that never holds all [B, T, V] logits, `Model(..., return_hidden=True)`
returns the final hidden states and the LM-head kernel (`training.chunked_cross_entropy`).

Engram's hash ids arrive with the batch, one [B, T, H] array per Engram layer; they
are computed on the host by `NgramHasher` in the input pipeline (paper section 2.5).
The tables are not parameters of this model: the train step looks the rows up first
(`table.Tables.lookup`, sharded, possibly from host memory) and passes the memory
vectors e [B, T, d_mem] in, one per Engram layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import lift
from jax.sharding import Mesh

from engram_jax import mhc, sharding
from engram_jax.attention import Attention, AttentionConfig
from engram_jax.config_base import Config
from engram_jax.engram import Engram, EngramConfig
from engram_jax.mhc import HyperConnection, MHCConfig
from engram_jax.mlp import MLP, mlp_params
from engram_jax.moe import MoE, MoEConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What a block keeps for the backward pass ("none": everything, no recomputation).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # the block's inputs only
    # Matmuls with a weight (projections, experts, LM head): the FLOP-heavy results;
    # norms, activations and attention scores (batched dots) are recomputed.
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Logical name of the leading axis of parameters stacked by `nn.scan` (replicated).
LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    """The backbone and its optional Engram.

    Attributes:
      vocab_size: raw token vocabulary V.
      hidden_size: D.
      num_layers: L blocks.
      attention: the attention config (MHA, GQA or MLA).
      mlp_dim: hidden width of the dense FFN blocks.
      moe: DeepSeekMoE config for the blocks after the first `dense_layers`; None makes
        every block dense.
      dense_layers: how many leading blocks use the dense FFN (paper: 1).
      mhc: residual branches (mHC); branches = 1 is a plain residual stream.
      engram: the Engram config; None is a model without Engram.
      tie_embeddings: the LM head reuses the token embedding.
      embed_init_std: standard deviation of the token embedding's initialisation.
      norm_eps: epsilon of the block and final RMSNorms.
      dtype: compute dtype, "float32" or "bfloat16" (parameters stay `param_dtype`).
      param_dtype: parameter dtype.
      scan_layers: stack runs of identical blocks with `nn.scan` (compiles each run
        once: seconds instead of minutes for 30 layers); False unrolls every block.
      remat: what each block keeps for its backward pass, one of REMAT_POLICIES:
        "none" (everything), "full" (its input only: recompute the rest), "save_dots"
        (also its weight matmuls).
      loss_chunk: time steps per chunk of the training loss: float32 logits exist for
        [B, loss_chunk, V] at a time (`training.chunked_cross_entropy`); 0: all T.
    """

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    attention: AttentionConfig = AttentionConfig()
    mlp_dim: int = 512
    moe: MoEConfig | None = MoEConfig()
    dense_layers: int = 1
    mhc: MHCConfig = MHCConfig(branches=1)
    engram: EngramConfig | None = None
    tie_embeddings: bool = False
    embed_init_std: float = 1.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    loss_chunk: int = 128

    def validate(self) -> None:
        self.check(self.vocab_size >= 2, "vocab_size", "must be >= 2")
        self.check(self.hidden_size >= 1, "hidden_size", "must be >= 1")
        self.check(self.num_layers >= 1, "num_layers", "must be >= 1")
        self.check(self.mlp_dim >= 1, "mlp_dim", "must be >= 1")
        self.check(0 <= self.dense_layers <= self.num_layers, "dense_layers", "must be in [0, num_layers]")
        self.check(self.embed_init_std > 0, "embed_init_std", "must be > 0")
        self.check(self.norm_eps > 0, "norm_eps", "must be > 0")
        self.check(self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
        self.check(self.param_dtype in DTYPES, "param_dtype", f"must be one of {sorted(DTYPES)}")
        self.check(self.remat in REMAT_POLICIES, "remat", f"must be one of {', '.join(REMAT_POLICIES)}")
        self.check(self.loss_chunk >= 0, "loss_chunk", "must be >= 0 (0: the whole sequence at once)")
        if self.engram is not None:
            self.check(max(self.engram.layer_ids) < self.num_layers, "engram",
                       f"layer_ids {list(self.engram.layer_ids)} must be < num_layers = {self.num_layers}")
            self.check(self.engram.pad_id < self.vocab_size, "engram",
                       f"pad_id {self.engram.pad_id} must be < vocab_size = {self.vocab_size}")

    @property
    def branches(self) -> int:
        return self.mhc.branches

    def is_moe(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.dense_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe(i) for i in range(self.num_layers))

    def has_engram(self, layer: int) -> bool:
        return self.engram is not None and layer in self.engram.layer_ids

    @property
    def block_groups(self) -> tuple[tuple[int, int], ...]:
        """(first layer, count) of each module of blocks, in order: runs of identical
        blocks (same FFN kind, no Engram) with `scan_layers`, else single blocks."""
        groups: list[tuple[int, int]] = []
        for layer in range(self.num_layers):
            if groups and self.scan_layers and not self.has_engram(layer):
                first, count = groups[-1]
                if not self.has_engram(first) and self.is_moe(first) == self.is_moe(layer):
                    groups[-1] = (first, count + 1)
                    continue
            groups.append((layer, 1))
        return tuple(groups)


def group_name(first: int, count: int) -> str:
    """Module name of `count` blocks from layer `first`: block_3, or blocks_5_7 (scanned)."""
    return f"block_{first}" if count == 1 else f"blocks_{first}_{first + count - 1}"


def layers_of(name: str) -> list[int]:
    """The layers a module of `group_name` holds, in stacking order: block_3 -> [3],
    blocks_5_7 -> [5, 6, 7]."""
    kind, *bounds = name.split("_")
    if kind not in ("block", "blocks") or len(bounds) != (1 if kind == "block" else 2):
        raise ValueError(f"{name!r} is not a module of blocks")
    return list(range(int(bounds[0]), int(bounds[-1]) + 1))


def _norm(config: ModelConfig, name: str) -> nn.RMSNorm:
    return nn.RMSNorm(epsilon=config.norm_eps, dtype=DTYPES[config.dtype],
                      param_dtype=DTYPES[config.param_dtype], name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)))


def _tied_checkpoint(fun, policy):
    """`jax.checkpoint(fun, policy)` whose recomputation waits for the output cotangent.

    XLA:CPU expands jax.checkpoint's optimization barriers before its CSE pass, which
    then merges the backward's recomputation into the forward: outside a loop, remat
    saves nothing there (measured: small's train step 33.9 GiB of temporaries without
    remat, 31.6 GiB with it). Here the backward adds 0 * (one element of the cotangent)
    to everything saved, parameters included: XLA may not fold x + 0 * c for floats (c
    may be inf or nan), so the recomputation is new work that can only start once the
    cotangent has arrived, on every backend. (Left untied, a norm scale broadcast to
    [B, T, G, D] is computed once and kept from the forward to the backward.)
    """

    @jax.custom_vjp
    def run(*args):
        return fun(*args)

    def forward(*args):
        return jax.vjp(jax.checkpoint(fun, policy=policy, prevent_cse=False), *args)

    def backward(saved, cotangent):
        anchor = next(c for c in jax.tree.leaves(cotangent) if jnp.issubdtype(c.dtype, jnp.inexact) and c.size)
        zero = anchor.reshape(-1)[0] * 0

        def tie(x):
            return x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x

        return jax.tree.map(tie, saved)(cotangent)

    run.defvjp(forward, backward)
    return run


def _lift_remat(fn, policy):
    """`flax.core.lift.checkpoint` with `_tied_checkpoint` in place of jax.checkpoint."""

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
        def rematted(variable_groups, rng_groups, *args):
            scope = scope_fn(variable_groups, rng_groups)
            return fn(scope, *args), repack_fn(scope)

        return _tied_checkpoint(rematted, policy)(variable_groups, rng_groups, *args)

    return lift.pack(inner, (True,), (True,), (True,), name="remat")


class Block(nn.Module):
    """One block: optional Engram, then attention, then a dense FFN or a MoE.

    `mesh`: where the MoE runs expert-parallel (see `moe.MoE`); None for one device.
    `engram_off`: Engram's output is replaced by zeros (an inference-time ablation).
    """

    config: ModelConfig
    layer: int
    mesh: Mesh | None = None
    engram_off: bool = False

    def sublayer(self, x: jnp.ndarray, f, name: str) -> jnp.ndarray:
        """Applies f to the stream read from x and writes its output back: [B, T, G, D]."""
        if self.config.branches == 1:  # plain pre-norm residual
            return x + f(x[:, :, 0])[:, :, None]
        cfg = self.config
        h_pre, h_post, h_res = HyperConnection(cfg.mhc, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype],
                                               name=f"{name}_hc")(x)
        return mhc.write(x, h_res, h_post, f(mhc.read(h_pre, x)))

    @nn.compact
    def __call__(self, x: jnp.ndarray, memory: jnp.ndarray | None, segment_ids: jnp.ndarray | None = None,
                 positions: jnp.ndarray | None = None, cache: dict | None = None):
        """[B, T, G, D] -> [B, T, G, D]; memory [B, T, d_mem] at Engram layers; segment_ids and
        positions [B, T] (or None) for attention. With a decoding cache (`cache_shapes`),
        returns ([B, T, G, D], the updated cache)."""
        cfg = self.config
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        new_cache = {}
        if cfg.has_engram(self.layer):
            # Recomputed on its own too: its [B, T, G, D] float32 norms are the largest
            # activations of a block, and need not coexist with attention's and the FFN's
            # in the block's backward (measured on `small`: 7.3 -> 5.5 GiB of temporaries).
            engram_class = Engram if cache is not None else _remat_class(Engram, cfg.remat)
            engram_module = engram_class(cfg.engram, self.layer, dtype, param_dtype, name="engram")

            def engram(h):  # switched off (engram_off): Y = 0, the rest of the block unchanged
                if cache is None or cache.get("engram") is None:
                    y = engram_module(h, memory)
                else:
                    y, new_cache["engram"] = engram_module(h, memory, cache["engram"], positions)
                return jnp.zeros_like(y) if self.engram_off else y

            if cfg.engram.multi_branch or cfg.branches == 1:
                x = x + engram(x)  # every branch gated by its own state (eq. 6)
            else:  # ablation: one gate on the stream read by H_pre, written back by mHC
                x = self.sublayer(x, engram, "engram")

        attention_module = Attention(cfg.attention, dtype, param_dtype, name="attention")

        def attention(h):
            h = _norm(cfg, "attention_norm")(h)
            if cache is None:
                return attention_module(h, segment_ids, positions)
            y, new_cache["attention"] = attention_module(h, None, positions, cache["attention"])
            return y

        x = self.sublayer(x, attention, "attention")
        if cfg.is_moe(self.layer):
            ffn = MoE(cfg.moe, dtype, param_dtype, self.mesh, name="moe")
        else:
            ffn = MLP(cfg.mlp_dim, dtype, param_dtype, name="mlp")
        x = sharding.constrain_batch(self.sublayer(x, lambda h: ffn(_norm(cfg, "ffn_norm")(h)), "ffn"), self.mesh)
        return x if cache is None else (x, new_cache)


def cache_shapes(config: ModelConfig, batch: int, length: int) -> dict:
    """The decoding cache of the whole model for `batch` sequences of `length` slots.

    `{module name: {"attention": ..., "engram": ...}}` as ShapeDtypeStructs, one entry
    per module of `block_groups`; a module of stacked blocks has a leading axis of its
    layers on every array. Attention: `attention.cache_shapes`; Engram (at its layers,
    with the short conv): `engram.cache_shape`. Cache arrays are in the compute dtype.
    """
    from engram_jax import attention as attention_lib, engram as engram_lib

    dtype = DTYPES[config.dtype]
    out = {}
    for first, count in config.block_groups:
        layer = {"attention": attention_lib.cache_shapes(config.attention, batch, length, dtype)}
        if config.has_engram(first) and config.engram.short_conv:
            layer["engram"] = engram_lib.cache_shape(config.engram, batch, length, config.hidden_size,
                                                     config.branches, dtype)
        if count > 1:
            layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct((count, *a.shape), a.dtype), layer)
        out[group_name(first, count)] = layer
    return out


def _remat_class(module: type[nn.Module], remat: str) -> type[nn.Module]:
    """`module`, recomputed in the backward pass under REMAT_POLICIES[remat]."""
    if remat == "none":
        return module
    return nn.transforms.lift_transform(_lift_remat, module, REMAT_POLICIES[remat])


def _scanned_block(block: nn.Module, x, segment_ids, positions):
    """nn.scan's body: one block of a run (no Engram, so no memory)."""
    return block(x, None, segment_ids, positions), None


def _scanned_cached_block(block: nn.Module, x, positions, cache):
    """nn.scan's body while decoding: one block of a run and its own slice of the cache."""
    return block(x, None, None, positions, cache)


class LMHead(nn.Module):
    """The LM-head kernel [D, V] (the `kernel` of an nn.Dense named lm_head)."""

    hidden_size: int
    vocab_size: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jnp.ndarray:
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab"))
        return self.param("kernel", init, (self.hidden_size, self.vocab_size), self.param_dtype)


class Model(nn.Module):
    """The language model. `Model(config).apply(variables, tokens, memory)` -> logits.

    Attributes:
      config: the model config.
      mesh: the device mesh of the train step, for expert parallelism (its `expert`
        axis also sets how many experts the MoE kernels store, `MoEConfig.padded_experts`);
        None for one device.
      engram_off: Engram layer ids whose output Y is replaced by zeros, at inference
        (paper Fig. 6): the same variables, every other computation unchanged (gates are
        still computed and sown). With single-branch fusion (`multi_branch=False`,
        G > 1) Engram's mHC sublayer then writes zeros, so its H_res mixing remains.
    """

    config: ModelConfig
    mesh: Mesh | None = None
    engram_off: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, memory: Mapping[int, jnp.ndarray] | None = None,
                 segment_ids: jnp.ndarray | None = None, positions: jnp.ndarray | None = None,
                 return_hidden: bool = False, cache: dict | None = None):
        """Next-token logits (or what computes them).

        Args:
          tokens: [B, T] integer token ids.
          memory: `{layer_id: [B, T, d_mem]}` memory vectors (the table rows of the
            layer's hash ids), one entry per Engram layer; required with Engram.
          segment_ids: [B, T] integer document of each token (packed windows): attention
            stays within a document. None: each row is one document.
          positions: [B, T] integer position of each token within its document, for
            RoPE. None: 0..T-1.
          return_hidden: return (hidden, kernel) instead of the logits, for a loss
            computed in chunks: logits = (hidden @ kernel) as float32.
          cache: decoding (`engram_jax.decode`): the cache of `cache_shapes`. Each token
            is written at slot positions[b, t] and attends to the slots <= its position;
            positions are required, segment_ids not allowed.

        Returns:
          [B, T, V] float32 logits; with return_hidden, the final hidden states
          [B, T, D] and the LM-head kernel [D, V] (the transposed embedding when tied),
          both in the dtype the head computes in. With a cache, (that, the new cache).
        """
        cfg = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer [B, T] array, got {tokens.dtype} {tokens.shape}")
        for name, ids in (("segment_ids", segment_ids), ("positions", positions)):
            if ids is not None and (ids.shape != tokens.shape or not jnp.issubdtype(ids.dtype, jnp.integer)):
                raise ValueError(f"{name} must be an integer array shaped like tokens {tokens.shape}, "
                                 f"got {ids.dtype} {ids.shape}")
        if cache is not None and (positions is None or segment_ids is not None):
            raise ValueError("decoding with a cache needs positions [B, T] and no segment_ids")
        memory = dict(memory or {})
        engram_layers = cfg.engram.layer_ids if cfg.engram is not None else ()
        if any(i not in engram_layers for i in self.engram_off):
            raise ValueError(f"engram_off {list(self.engram_off)}: Engram layers are {list(engram_layers)}")
        if cfg.engram is not None:
            missing = [i for i in cfg.engram.layer_ids if i not in memory]
            if missing:
                raise ValueError(f"memory lacks Engram layers {missing}; got layers {sorted(memory)}")
        dtype = DTYPES[cfg.dtype]
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=DTYPES[cfg.param_dtype], name="embed",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(cfg.embed_init_std), ("vocab", "embed")))
        # With a mesh, activations stay split by batch over every device: GSPMD then
        # gathers fsdp-split weights where they are used rather than the batch.
        # The table is gathered whole first (ZeRO-3), so that looking tokens up needs no
        # exchange of activations.
        table = sharding.constrain_replicated(embed.embedding, self.mesh)  # [V, D]
        x = sharding.constrain_batch(mhc.expand(jnp.take(table, tokens, axis=0).astype(dtype), cfg.branches),
                                     self.mesh)  # [B, T, G, D]
        block = _remat_class(Block, cfg.remat) if cache is None else Block  # no backward pass when decoding
        new_cache = {}
        for first, count in cfg.block_groups:
            name = group_name(first, count)
            if count == 1:
                module = block(cfg, first, self.mesh, first in self.engram_off, name=name)
                if cache is None:
                    x = module(x, memory.get(first), segment_ids, positions)
                else:
                    x, new_cache[name] = module(x, memory.get(first), None, positions, cache[name])
                continue
            # Every collection gets a leading axis of `count` layers: params, the MoE
            # biases [L, E] and the sown intermediates (expert loads [L, E]).
            axes = {"params": 0, "moe_bias": 0, "intermediates": 0}
            if cache is None:
                run = nn.scan(_scanned_block, variable_axes=axes, split_rngs={"params": True},
                              in_axes=(nn.broadcast, nn.broadcast), length=count,
                              metadata_params={nn.PARTITION_NAME: LAYERS})
                x, _ = run(block(cfg, first, self.mesh, name=name), x, segment_ids, positions)  # [B, T, G, D]
            else:  # the cache of each layer is scanned with its parameters
                run = nn.scan(_scanned_cached_block, variable_axes=axes, split_rngs={"params": True},
                              in_axes=(nn.broadcast, 0), length=count, metadata_params={nn.PARTITION_NAME: LAYERS})
                x, new_cache[name] = run(block(cfg, first, self.mesh, name=name), x, positions, cache[name])
        h = sharding.constrain_batch(_norm(cfg, "final_norm")(mhc.reduce(x)), self.mesh)  # [B, T, D]
        if cfg.tie_embeddings:  # nn.Embed.attend: in the parameters' dtype
            h, kernel = h.astype(DTYPES[cfg.param_dtype]), embed.embedding.T  # [B, T, D], [D, V]
        else:  # as an nn.Dense in the compute dtype
            kernel = LMHead(cfg.hidden_size, cfg.vocab_size, DTYPES[cfg.param_dtype], name="lm_head")()
            h, kernel = h.astype(dtype), kernel.astype(dtype)
        out = (h, kernel) if return_hidden else logits_of(h, kernel)  # [B, T, V]
        return out if cache is None else (out, new_cache)


def logits_of(hidden: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Float32 logits [..., V] of hidden states [..., D] and the LM-head kernel [D, V]."""
    return jax.lax.dot_general(hidden, kernel, (((hidden.ndim - 1,), (0,)), ((), ()))).astype(jnp.float32)


def dummy_inputs(config: ModelConfig, batch: int = 1, seq: int = 1) -> tuple[jnp.ndarray, dict]:
    """Zero tokens and memory vectors of the right shapes, for init and eval_shape."""
    tokens = jnp.zeros((batch, seq), jnp.int32)
    memory = {}
    if config.engram is not None:
        memory = {i: jnp.zeros((batch, seq, config.engram.memory_dim), jnp.float32)
                  for i in config.engram.layer_ids}
    return tokens, memory


def init_variables(config: ModelConfig, rng: jax.Array, mesh: Mesh | None = None) -> dict:
    """All variables (`params`, `moe_bias`) of a fresh model (for `mesh`: see `Model`)."""
    return Model(config, mesh).init(rng, *dummy_inputs(config))


def variable_shapes(config: ModelConfig, mesh: Mesh | None = None) -> dict:
    """The shapes of all variables, computed with jax.eval_shape: nothing is allocated."""
    return jax.eval_shape(lambda: init_variables(config, jax.random.key(0), mesh))


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter accounting of a config (paper section 3.1).

    Attributes:
      total: every parameter.
      activated: parameters used per token, without the token embedding (the paper's
        "activated (w/o token embed)"): routed experts count top_k of E, Engram tables
        count the H rows each token reads.
      engram: parameters of the Engram tables.
      engram_layers: the other Engram parameters (projections, norms, conv; the mHC
        maps of single-branch fusion).
      routed_experts: parameters of all routed experts.
      embedding: the token embedding; lm_head: the output projection (0 when tied).
      rho: eq. 7's allocation ratio, the routed experts' share of the inactive
        parameters P_sparse = P_tot - P_act (1.0 without Engram).
    """

    total: int
    activated: int
    engram: int
    engram_layers: int
    routed_experts: int
    embedding: int
    lm_head: int
    rho: float

    @property
    def sparse(self) -> int:
        """P_sparse: parameters a token does not use (eq. 7)."""
        return self.total - self.embedding - self.activated


def _leaves(tree) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]
    return [(tuple(getattr(k, "key", str(k)) for k in path), tuple(leaf.shape)) for path, leaf in flat]


def _routed(path: tuple[str, ...], shape: tuple[int, ...], experts: int) -> int:
    """Routed-expert parameters of one leaf: a MoE's w_gate, w_up or w_down, [E', in, out]
    or, stacked by nn.scan, [L, E', in, out]; of the E' stored experts (padded for an
    expert mesh axis, `MoEConfig.padded_experts`) only E count."""
    if path[-2:-1] != ("moe",) or path[-1] not in ("w_gate", "w_up", "w_down"):  # not moe/shared/...
        return 0
    stored = shape[-3]  # the expert axis
    return math.prod(shape) // stored * experts


def count_params(config: ModelConfig) -> ParamCount:
    """Counts parameters from `jax.eval_shape` of init (no array is allocated); the
    Engram tables, which live beside the parameters, from their head primes."""
    leaves = _leaves(variable_shapes(config)["params"])
    engram = config.engram.table_params if config.engram else 0
    total = sum(math.prod(s) for _, s in leaves) + engram
    engram_layers = sum(math.prod(s) for p, s in leaves if {"engram", "engram_hc"} & set(p))
    experts = config.moe.num_experts if config.moe else 0
    routed = sum(_routed(p, s, experts) for p, s in leaves)
    embedding = config.vocab_size * config.hidden_size
    lm_head = 0 if config.tie_embeddings else embedding
    routed_idle = routed - routed * config.moe.top_k // experts if experts else 0
    engram_read = config.engram.memory_dim * len(config.engram.layer_ids) if config.engram else 0
    engram_idle = engram - engram_read if engram else 0
    activated = total - embedding - routed_idle - engram_idle
    sparse = routed_idle + engram_idle
    rho = routed_idle / sparse if sparse else 1.0
    return ParamCount(total, activated, engram, engram_layers, routed, embedding, lm_head, rho)


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token (multiply-adds count 2); training is about 3x this."""
    d, g = config.hidden_size, config.branches
    flops = 2 * d * config.vocab_size  # LM head
    maps = config.mhc.flops_per_token(d)  # one sublayer's mHC maps, read and write
    for layer in range(config.num_layers):
        flops += config.attention.flops_per_token(d, seq_len) + 2 * maps
        if config.is_moe(layer):
            flops += config.moe.flops_per_token(d)
        else:
            flops += 2 * mlp_params(d, config.mlp_dim)
        if config.has_engram(layer):
            flops += config.engram.flops_per_token(d, g)
            if not config.engram.multi_branch:  # Engram is then an mHC sublayer of its own
                flops += maps
    return flops


def engram_params(config: ModelConfig) -> int:
    """All parameters Engram adds (tables, layers, and mHC maps of single-branch fusion)."""
    e = config.engram
    if e is None:
        return 0
    total = e.table_params + e.layer_params(config.hidden_size, config.branches)
    if not e.multi_branch and config.branches > 1:  # Engram is then an mHC sublayer
        total += len(e.layer_ids) * config.mhc.num_params(config.hidden_size)
    return total


def expert_params(config: ModelConfig) -> int:
    """Parameters of one routed expert in one layer (SwiGLU: 3 D F)."""
    return mlp_params(config.hidden_size, config.moe.expert_dim)


def allocate_sparsity(base: ModelConfig, total_params: float, activated_params: float,
                      rho: float) -> tuple[int, int]:
    """Splits a sparse budget between routed experts and Engram (paper section 3.1).

    With P_sparse = total_params - activated_params (both without the token embedding
    and LM head, as the paper), routed experts take rho * P_sparse through their idle
    E - top_k experts, and the Engram tables of `base.engram`'s layout the rest.

    Args:
      base: the architecture: MoE layers, top_k, expert width and the Engram layout.
      total_params, activated_params: the budgets P_tot and P_act.
      rho: the allocation ratio in [0, 1] (eq. 7).

    Returns:
      (routed experts E, Engram base table size per head); the size is 0 when rho = 1.
    """
    if base.moe is None or base.num_moe_layers == 0:
        raise ValueError("allocate_sparsity needs a MoE backbone")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    sparse = total_params - activated_params
    if sparse <= 0:
        raise ValueError(f"total_params {total_params:.4g} must exceed activated_params {activated_params:.4g}")
    idle = round(rho * sparse / (base.num_moe_layers * expert_params(base)))
    experts = base.moe.top_k + idle
    if rho == 1.0:
        return experts, 0
    if base.engram is None:
        raise ValueError("rho < 1 needs an Engram layout in base.engram")
    e = base.engram
    rows_per_head = (1 - rho) * sparse / (len(e.layer_ids) * e.num_heads * e.head_dim)
    return experts, max(2, round(rows_per_head))

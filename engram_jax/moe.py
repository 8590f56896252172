"""DeepSeekMoE with auxiliary-loss-free load balancing (DeepSeek-V3 section 2.1.2).

For a token x [D], E routed experts, top_k K, router W_r [D, E] and a balancing bias
b [E] (not trained by gradients):

    s      = sigmoid(x W_r)                               affinities, float32    (eq. 15)
    chosen = TopK(s + b, K)                               b only picks experts   (eq. 16)
    g_i    = route_scale * s_i / sum_{j in chosen} s_j    for i in chosen, else 0 (eq. 13)
    y      = Shared(x) + sum_{i in chosen} g_i Expert_i(x)                        (eq. 12)

Every expert is a SwiGLU of width F (`mlp.py`); the shared experts, always on, are
computed as one SwiGLU of width num_shared * F. After each training step the caller
nudges the bias toward uniform load (Wang et al. 2024, "Auxiliary-Loss-Free Load
Balancing", Algorithm 1):

    b <- b + gamma * sign(mean(load) - load)

using the "expert_load" the layer sows into "intermediates". The bias lives in its own
variable collection, "moe_bias", apart from "params". DeepSeek-V3's node-limited
(grouped) routing and its small sequence-wise balance loss are left out.

Expert parallelism (given a mesh): inside `shard_map`, each device routes its own N_l
tokens, puts each of its N_l K token copies into the bucket of the device that holds
its expert (buckets of fixed capacity C), exchanges buckets with one `all_to_all`
over the `expert` axis, runs its E / X local experts on what it received (grouped, as
on one device), and sends the results back with a second `all_to_all`:

    C = ceil(capacity_factor * N_l K / X)        X devices on the `expert` axis
    sent per device and direction: X x C x D = capacity_factor x N_l K D values

so the traffic grows with the local tokens only. Copies beyond a full bucket are
dropped (their expert's output is 0 for that copy) and counted ("moe_dropped");
capacity_factor = 0 sizes buckets for the worst case (C = N_l K) and drops nothing.
Expert kernels are stored padded to a multiple of X experts (E = 55 on 2, 4 or 8
devices); padding experts have no router column, so nothing is ever sent to them.
Load and the balancing update use counts summed over the whole mesh.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from engram_jax import sharding
from engram_jax.config_base import Config
from engram_jax.mlp import EMBED, MLP, fan_in_init, mlp_params

# Logical axis names (mapped to mesh axes in sharding.py).
EXPERTS, EXPERT_MLP = "experts", "expert_mlp"
IMPLEMENTATIONS = ("auto", "ragged", "blocked", "dense")
# Largest block of the "blocked" grouped compute; smaller when experts get few tokens.
_MAX_BLOCK = 128
# Keeps the normalisation finite if every chosen sigmoid underflows (HF DeepseekV3 MoEGate).
_NORM_EPS = 1e-20
# Fan-in init of a stacked [E, in, out] kernel: each expert as one [in, out] matrix.
_expert_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


@dataclasses.dataclass(frozen=True)
class MoEConfig(Config):
    """What a DeepSeekMoE layer needs; the model width D comes from its input.

    Attributes:
      num_experts: E, routed experts.
      num_shared: shared experts, always on (0 for none).
      top_k: K, routed experts per token.
      expert_dim: F, the SwiGLU hidden width of one expert.
      route_scale: multiplies the normalised routing weights (V3 uses 2.5).
      bias_update_rate: gamma, the step of the balancing bias per training step
        (V3: 0.001 for most of training).
      implementation: how routed experts are computed; all but "dense" run each expert
        only on its own tokens, and none drops tokens.
        "ragged": sort the K copies of each token by expert, `jax.lax.ragged_dot`
        (grouped matmuls on TPU; on CPU this JAX lowers it to E times the work).
        "blocked": sort by expert, pad each expert's group to whole blocks, one batched
        matmul over blocks with each block's expert kernels (any backend).
        "auto": "blocked" on CPU, "ragged" elsewhere.
        "dense": every expert on every token (a reference for tests, small sizes only).
      capacity_factor: with expert parallelism, the size of each device-to-device
        bucket over an even share of the token copies (see the module docstring);
        copies past it are dropped and counted. 0: buckets hold the worst case, nothing
        is dropped (X times the traffic of factor 1).
    """

    num_experts: int = 8
    num_shared: int = 1
    top_k: int = 2
    expert_dim: int = 64
    route_scale: float = 1.0
    bias_update_rate: float = 1e-3
    implementation: str = "auto"
    capacity_factor: float = 2.0

    def validate(self) -> None:
        self.check(self.num_experts >= 1, "num_experts", "must be >= 1")
        self.check(self.num_shared >= 0, "num_shared", "must be >= 0")
        self.check(self.top_k >= 1, "top_k", "must be >= 1")
        self.check(self.top_k <= self.num_experts, "top_k",
                   f"must be <= num_experts = {self.num_experts}")
        self.check(self.expert_dim >= 1, "expert_dim", "must be >= 1")
        self.check(self.route_scale > 0, "route_scale", "must be > 0")
        self.check(self.bias_update_rate >= 0, "bias_update_rate", "must be >= 0")
        self.check(self.implementation in IMPLEMENTATIONS, "implementation",
                   f"must be one of {list(IMPLEMENTATIONS)}")
        self.check(self.capacity_factor >= 0, "capacity_factor", "must be >= 0 (0: never drop)")

    def padded_experts(self, shards: int) -> int:
        """E rounded up to a multiple of `shards` (devices on the `expert` axis)."""
        return -(-self.num_experts // shards) * shards

    def capacity(self, copies: int, shards: int) -> int:
        """C, the token copies one device may send to one device, of `copies` = N_l K."""
        if not self.capacity_factor or shards == 1:
            return copies
        return min(copies, max(1, -(-int(self.capacity_factor * copies) // shards)))

    def num_params(self, hidden_size: int) -> int:
        """Parameters of one layer: router + routed experts + shared experts."""
        router = hidden_size * self.num_experts
        routed = self.num_experts * mlp_params(hidden_size, self.expert_dim)
        return router + routed + mlp_params(hidden_size, self.num_shared * self.expert_dim)

    def active_params(self, hidden_size: int) -> int:
        """Parameters one token uses: router + shared + top_k routed experts."""
        experts = (self.top_k + self.num_shared) * mlp_params(hidden_size, self.expert_dim)
        return hidden_size * self.num_experts + experts

    def flops_per_token(self, hidden_size: int) -> int:
        """Forward matmul FLOPs per token (2 per active weight; gating ops left out)."""
        return 2 * self.active_params(hidden_size)


def route(scores: jnp.ndarray, bias: jnp.ndarray, top_k: int, route_scale: float
          ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Picks top_k experts by score + bias; weighs them by their normalised scores.

    Args:
      scores: [N, E] sigmoid affinities.
      bias: [E] balancing bias; it changes which experts are chosen, never the weights,
        and no gradient flows into it.
      top_k: K.
      route_scale: multiplies the weights, which then sum to route_scale.

    Returns:
      weights [N, K] (dtype of `scores`) and experts [N, K] int32, best first.
    """
    _, experts = jax.lax.top_k(scores + jax.lax.stop_gradient(bias), top_k)  # [N, K]
    # The gradient reaches the router only through the scores of the chosen experts.
    chosen = jnp.take_along_axis(scores, experts, axis=-1)  # [N, K]
    weights = chosen / (jnp.sum(chosen, axis=-1, keepdims=True) + _NORM_EPS) * route_scale
    return weights, experts.astype(jnp.int32)


def update_bias(bias: jnp.ndarray, load: jnp.ndarray, rate: float) -> jnp.ndarray:
    """One loss-free balancing step: raise underloaded experts' bias, lower overloaded.

    Args:
      bias: [E] current bias.
      load: [E] share of routed slots each expert took (the sown "expert_load").
      rate: gamma, the fixed step.

    Returns:
      [E] the new bias, bias + rate * sign(mean(load) - load).
    """
    return bias + rate * jnp.sign(jnp.mean(load) - load).astype(bias.dtype)


def _ragged_experts(x, weights, experts, group_sizes, w_gate, w_up, w_down):
    """Each token through its K experts, grouped by expert: [N, D] -> [N, D].

    The N * K (token, slot) pairs are sorted by expert so that each expert's tokens are
    contiguous; `ragged_dot` multiplies group e by kernel e only. That holds where
    XLA emits a grouped matmul (TPU). JAX 0.10.2 lowers ragged_dot on CPU to a dot
    over a [E, N * K, D] masked copy of the input, E times the grouped FLOPs
    (measured with cost_analysis); on GPU it emits chlo.ragged_dot unless
    `jax_ragged_dot_use_gpu_pallas_triton_lowering` picks the Pallas kernel.
    """
    n, k = experts.shape
    order = jnp.argsort(experts.reshape(-1), stable=True)  # [N * K], (token, slot) pairs by expert
    xs = x[order // k]  # [N * K, D]
    h = nn.silu(jax.lax.ragged_dot(xs, w_gate, group_sizes)) * jax.lax.ragged_dot(
        xs, w_up, group_sizes)  # [N * K, F]
    ys = jax.lax.ragged_dot(h, w_down, group_sizes)  # [N * K, D]
    y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True).reshape(n, k, -1)  # [N, K, D]
    return jnp.einsum("nkd,nk->nd", y.astype(weights.dtype), weights)  # [N, D]


def _block_size(slots: int, experts: int) -> int:
    """Rows per block: about half an even share of the slots, at most _MAX_BLOCK.

    Padding costs at most one block per expert, so blocks shrink as experts multiply.
    """
    return int(max(1, min(_MAX_BLOCK, slots // (2 * experts))))


def _blocked_experts(x, weights, experts, group_sizes, w_gate, w_up, w_down):
    """Each token through its K experts, grouped in blocks: [N, D] -> [N, D].

    The N * K (token, slot) pairs are sorted by expert and each expert's group is padded
    to whole blocks of `_block_size` rows, so every block belongs to one expert; a loop
    over the blocks runs each with its expert's kernels (`_expert_blocks`). Work is
    (N * K + E * block) * D * F instead of the dense E * N * D * F; no token is dropped.
    """
    n, k = experts.shape
    e, d = w_gate.shape[0], x.shape[-1]
    slots = n * k
    block = _block_size(slots, e)
    num_blocks = -(-slots // block) + e  # static bound: every group wastes < one block
    flat = experts.reshape(-1)  # [S]
    order = jnp.argsort(flat, stable=True)  # [S] sorted position -> (token, slot)
    by_expert = flat[order]  # [S]
    padded = -(-group_sizes // block) * block  # [E] group sizes rounded up to blocks
    padded_start = jnp.cumsum(padded) - padded  # [E]
    start = jnp.cumsum(group_sizes) - group_sizes  # [E]
    dest = padded_start[by_expert] + jnp.arange(slots) - start[by_expert]  # [S] row in the padded layout
    # Rows move by gathers with integer maps, never by scatters into zero [rows, D]
    # buffers: XLA computes such a constant once and keeps it from the forward to the
    # rematerialised backward (measured: 6 x 70 MB for `small`). Padding rows read the
    # zero row appended at index S (their cotangents are exact zeros).
    source = jnp.full((num_blocks * block,), slots, jnp.int32).at[dest].set(jnp.arange(slots, dtype=jnp.int32))
    xs = jnp.concatenate([x[order // k], jnp.zeros((1, d), x.dtype)])[source]  # [nb * b, D]
    # Block j belongs to the expert whose padded range holds row j * block; blocks past
    # the last group compute on zeros and are never read.
    owner = jnp.searchsorted(padded_start + padded, jnp.arange(num_blocks) * block, side="right")
    owner = jnp.minimum(owner, e - 1).astype(jnp.int32)  # [nb]
    kernels = (_varying_like(w, xs) for w in (w_gate, w_up, w_down))
    ys = _expert_blocks(xs.reshape(num_blocks, block, d), owner, *kernels).reshape(-1, d)  # [nb * b, D]
    row = jnp.zeros((slots,), jnp.int32).at[order].set(dest.astype(jnp.int32))  # [S] (token, slot) -> padded row
    y = ys[row].reshape(n, k, d)  # [N, K, D]
    return jnp.einsum("nkd,nk->nd", y.astype(weights.dtype), weights)  # [N, D]


@jax.custom_vjp
def _expert_blocks(xb, owner, w_gate, w_up, w_down):
    """SwiGLU of each block with its own expert's kernels: [nb, b, D] -> [nb, b, D].

    A `lax.scan` over blocks that slices kernel `owner[j]` out of the stacked [E, ...]
    kernels, so no per-block copy of the kernels is ever made (gathering them, as one
    batched matmul would, takes nb x D x F per kernel: 3 x 210 MB per layer for `small`
    at its preset batch, and as much again for their gradients). The backward is
    written out (`_expert_blocks_bwd`): differentiating the scan would add a zero
    [E, D, F] gradient per block.

    Args:
      xb: [nb, b, D] rows of the blocks; owner: [nb] int32 expert of each block.
      w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    """
    return _expert_blocks_fwd(xb, owner, w_gate, w_up, w_down)[0]


def _expert_blocks_fwd(xb, owner, w_gate, w_up, w_down):
    def one(_, inputs):
        rows, o = inputs  # [b, D], expert
        g, u = rows @ w_gate[o], rows @ w_up[o]  # [b, F] x2
        return None, (g, u, (nn.silu(g) * u) @ w_down[o])  # [b, D]

    _, (g, u, y) = jax.lax.scan(one, None, (xb, owner))
    return y, (xb, owner, w_gate, w_up, w_down, g, u)  # g, u [nb, b, F]: no recomputation


def _expert_blocks_bwd(saved, dy):
    xb, owner, w_gate, w_up, w_down, g, u = saved
    wide = jnp.promote_types(w_gate.dtype, jnp.float32)  # gradients summed over blocks

    def one(grads, inputs):
        rows, o, g, u, dy = inputs  # [b, D], expert, [b, F], [b, F], [b, D]
        d_gate, d_up, d_down = grads
        sig = jax.nn.sigmoid(g)
        dh = dy @ w_down[o].T  # [b, F]
        dg = dh * u * sig * (1 + g * (1 - sig))  # silu'(g) = sig (1 + g (1 - sig))
        du = dh * g * sig
        dx = dg @ w_gate[o].T + du @ w_up[o].T  # [b, D]
        add = lambda acc, update: acc.at[o].add(update.astype(wide))  # noqa: E731  (in place in the loop)
        grads = (add(d_gate, rows.T @ dg), add(d_up, rows.T @ du), add(d_down, (g * sig * u).T @ dy))
        return grads, dx

    zeros = tuple(_varying_like(jnp.zeros(w.shape, wide), w) for w in (w_gate, w_up, w_down))
    (d_gate, d_up, d_down), dx = jax.lax.scan(one, zeros, (xb, owner, g, u, dy))
    return (dx.astype(xb.dtype), None, d_gate.astype(w_gate.dtype), d_up.astype(w_up.dtype),
            d_down.astype(w_down.dtype))


_expert_blocks.defvjp(_expert_blocks_fwd, _expert_blocks_bwd)


def _varying_axes(x) -> set:
    """The manual mesh axes (inside `shard_map`) over which x differs between devices."""
    return set(getattr(getattr(jax.typeof(x), "mat", None), "varying", None) or ())


def _varying_like(a, *like):
    """`a` marked as varying over the manual mesh axes that any of `like` varies over
    (inside `shard_map`; a no-op outside): a scan's carry then keeps its type as sums
    flow into it, and a kernel's gradient is summed over those axes (the transpose of
    the mark) outside `_expert_blocks`' hand-written backward."""
    axes = set().union(*map(_varying_axes, like)) - _varying_axes(a)
    return jax.lax.pcast(a, tuple(sorted(axes)), to="varying") if axes else a


def _dense_experts(x, weights, experts, group_sizes, w_gate, w_up, w_down):
    """Every expert on every token, mixed by an [N, E] matrix zero off the chosen."""
    del group_sizes
    n, e = x.shape[0], w_gate.shape[0]
    mix = jnp.zeros((n, e), weights.dtype).at[jnp.arange(n)[:, None], experts].set(weights)  # [N, E]
    h = nn.silu(jnp.einsum("nd,edf->nef", x, w_gate)) * jnp.einsum(
        "nd,edf->nef", x, w_up)  # [N, E, F]
    y = jnp.einsum("nef,efd->ned", h, w_down)  # [N, E, D]
    return jnp.einsum("ned,ne->nd", y.astype(weights.dtype), mix)  # [N, D]


def _grouped(implementation: str):
    if implementation == "auto":
        implementation = "blocked" if jax.default_backend() == "cpu" else "ragged"
    return {"ragged": _ragged_experts, "blocked": _blocked_experts, "dense": _dense_experts}[implementation]


def _route_local(config: MoEConfig, tokens, router, bias, wide):
    """Scores, top-K and the [E] routed-slot counts of these tokens."""
    # The router runs wide: near-ties between experts decide which one is chosen.
    scores = jax.nn.sigmoid(tokens.astype(wide) @ router.astype(wide))  # [N, E]
    weights, experts = route(scores, bias.astype(wide), config.top_k, config.route_scale)  # [N, K] x2
    return weights, experts, jnp.bincount(experts.reshape(-1), length=config.num_experts)  # [E]


def _dispatch(x, experts, shards: int, local_experts: int, capacity: int):
    """Token copies into per-device buckets of `capacity` rows.

    Args:
      x: [N, D] this device's tokens; experts: [N, K] their experts (global ids).

    Returns:
      (buckets [X, C, D], bucket experts [X, C] local ids or -1 for an empty row,
       where [N * K, 2] (device, row) of every copy, row = C if it was dropped).
    """
    n, k = experts.shape
    flat = experts.reshape(-1)  # [S] copy -> expert
    device = flat // local_experts  # [S]
    # Rank of each copy within its device's copies, in (token, slot) order.
    order = jnp.argsort(device, stable=True)  # [S]
    counts = jnp.bincount(device, length=shards)  # [X]
    start = jnp.cumsum(counts) - counts
    rank = jnp.zeros_like(flat).at[order].set(jnp.arange(flat.shape[0]) - start[device[order]])  # [S]
    row = jnp.where(rank < capacity, rank, capacity)  # [S]; capacity = dropped
    buckets = jnp.zeros((shards, capacity, x.shape[-1]), x.dtype).at[device, row].set(
        jnp.repeat(x, k, axis=0), mode="drop")  # [X, C, D]
    ids = jnp.full((shards, capacity), -1, jnp.int32).at[device, row].set(flat % local_experts, mode="drop")
    return buckets, ids, jnp.stack([device, row], axis=-1)


def _expert_parallel(config: MoEConfig, mesh: Mesh, tokens, router, bias, w_gate, w_up, w_down, wide):
    """Route, dispatch, compute and combine in `shard_map`: [N, D] -> [N, D].

    Returns (y [N, D] wide, counts [E] over the mesh, dropped copies over the mesh).
    """
    shards = sharding.axis_size(mesh, sharding.EXPERT)
    local_experts = w_gate.shape[0] // shards
    grouped = _grouped(config.implementation)
    axes = sharding.batch_axes(mesh)
    # ZeRO-3: kernels arrive split over `fsdp` along D and are gathered here, so that
    # their gradients leave reduce-scattered (the transpose of the gather), not summed whole.
    fsdp = sharding.axis_size(mesh, sharding.FSDP)
    split = fsdp > 1 and w_gate.shape[1] % fsdp == 0
    along_d = sharding.FSDP if split else None

    def local(x, router, bias, w_gate, w_up, w_down):  # x [N_l, D], w_* [E_l, ...]
        if split:
            w_gate, w_up = (jax.lax.all_gather(w, sharding.FSDP, axis=1, tiled=True) for w in (w_gate, w_up))
            w_down = jax.lax.all_gather(w_down, sharding.FSDP, axis=2, tiled=True)  # [E_l, F, D]
        weights, experts, counts = _route_local(config, x, router, bias, wide)
        n, k = experts.shape
        if shards == 1:  # data parallel: every expert is here, nothing moves
            y = grouped(x, weights, experts, counts.astype(jnp.int32), w_gate, w_up, w_down)
            return y, jax.lax.psum(counts, axes), jnp.zeros((), jnp.int32)
        capacity = config.capacity(n * k, shards)
        buckets, ids, where = _dispatch(x, experts, shards, local_experts, capacity)
        exchange = lambda a: jax.lax.all_to_all(a, sharding.EXPERT, 0, 0, tiled=True)  # noqa: E731
        received, received_ids = exchange(buckets), exchange(ids)  # [X, C, D], [X, C] from each device
        rows = received.reshape(shards * capacity, -1)
        row_ids = received_ids.reshape(-1, 1)  # [X C, 1]
        present = row_ids >= 0
        # Empty rows go to local expert 0 as zeros: SwiGLU(0) = 0, and they are never read.
        sizes = jnp.bincount(jnp.where(present, row_ids, 0)[:, 0], length=local_experts)
        out = grouped(jnp.where(present, rows, 0), present.astype(wide), jnp.where(present, row_ids, 0),
                      sizes.astype(jnp.int32), w_gate, w_up, w_down)  # [X C, D]
        back = exchange(out.astype(x.dtype).reshape(shards, capacity, -1))  # [X, C, D] results of our copies
        copies = back.at[where[:, 0], where[:, 1]].get(mode="fill", fill_value=0).reshape(n, k, -1)
        y = jnp.einsum("nkd,nk->nd", copies.astype(wide), weights)  # [N_l, D]
        dropped = jnp.sum(where[:, 1] == capacity)
        return y, jax.lax.psum(counts, axes), jax.lax.psum(dropped, axes)

    up = PartitionSpec(sharding.EXPERT, along_d, None)  # [E, D, F]
    down = PartitionSpec(sharding.EXPERT, None, along_d)  # [E, F, D]
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(PartitionSpec(axes, None), PartitionSpec(), PartitionSpec(), up, up, down),
                         out_specs=(PartitionSpec(axes, None), PartitionSpec(), PartitionSpec()))(
        tokens, router, bias, w_gate, w_up, w_down)


class MoE(nn.Module):
    """DeepSeekMoE feed-forward layer with a loss-free balancing bias.

    Variables: "params" (router, w_gate, w_up, w_down, shared) and "moe_bias" (bias
    [E], updated outside the gradient with `update_bias`). Sows "expert_load" [E] and,
    with expert parallelism, "moe_dropped" (token copies dropped by full buckets) into
    "intermediates".

    Attributes:
      config: the MoE config.
      dtype: compute dtype of the experts (float32 or bfloat16); the router, the
        weights and the expert load are float32 or wider.
      param_dtype: parameter dtype.
      mesh: with a mesh, tokens stay on their devices and the experts are split over
        its `expert` axis (expert parallelism, see the module docstring); the expert
        kernels then hold `padded_experts(mesh expert size)` experts. None: one
        program over the whole batch (one device, or GSPMD's choice of collectives).
    """

    config: MoEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Routes each token to its top_k experts and adds the shared experts.

        Args:
          x: [B, T, D] activations.

        Returns:
          [B, T, D] in `dtype`.
        """
        cfg = self.config
        if x.ndim != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"MoE: x must be a floating [B, T, D] array, got {x.dtype}{list(x.shape)}")
        b, t, d = x.shape
        e, f, k = cfg.num_experts, cfg.expert_dim, cfg.top_k
        stored = cfg.padded_experts(sharding.axis_size(self.mesh, sharding.EXPERT))
        wide = jnp.promote_types(self.dtype, jnp.float32)

        router = self.param("router", nn.with_logical_partitioning(fan_in_init, (EMBED, EXPERTS)),
                            (d, e), self.param_dtype)
        bias = self.variable("moe_bias", "bias", jnp.zeros, (e,), jnp.float32).value

        def expert_kernel(name, axes, shape):
            init = nn.with_logical_partitioning(_expert_init, axes)
            return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

        w_gate = expert_kernel("w_gate", (EXPERTS, EMBED, EXPERT_MLP), (stored, d, f))
        w_up = expert_kernel("w_up", (EXPERTS, EMBED, EXPERT_MLP), (stored, d, f))
        w_down = expert_kernel("w_down", (EXPERTS, EXPERT_MLP, EMBED), (stored, f, d))

        tokens = x.reshape(b * t, d).astype(self.dtype)  # [N, D]
        if self.mesh is None or self.is_initializing():  # init: shapes only, any batch
            weights, experts, counts = _route_local(cfg, tokens, router, bias, wide)
            y = _grouped(cfg.implementation)(tokens, weights, experts, counts.astype(jnp.int32),
                                             w_gate, w_up, w_down)  # [N, D], wide
        else:
            y, counts, dropped = _expert_parallel(cfg, self.mesh, tokens, router, bias, w_gate, w_up, w_down, wide)
            self.sow("intermediates", "moe_dropped", dropped)
        self.sow("intermediates", "expert_load", counts.astype(jnp.float32) / (b * t * k))
        y = y.astype(self.dtype).reshape(b, t, d)  # [B, T, D]
        if cfg.num_shared:
            y = y + MLP(cfg.num_shared * f, self.dtype, self.param_dtype, name="shared")(x)
        return y

"""Causal self-attention: a naive reference, causality, packed documents, GQA, rotary,
sizes, dtypes, errors.

The layer tests run both traced and eager (`chex.variants`). The reference computes
each head and each query position on its own in float64 from DeepSeek-V3's MLA
equations (arXiv 2412.19437, eqs. 1-11) and rotates with complex numbers, as
DeepSeek's `apply_rotary_emb` does, so it shares no code with `attention.py`.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from engram_jax.attention import Attention, AttentionConfig, apply_rope
from engram_jax.config_base import ConfigError

_MLA = dict(kind="mla", num_heads=3, kv_lora_rank=12, qk_nope_dim=8, qk_rope_dim=4, v_head_dim=6)
CONFIGS = {
    "mha": AttentionConfig(num_heads=4, head_dim=8),
    "gqa": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
    "mqa": AttentionConfig(num_heads=4, num_kv_heads=1, head_dim=8),
    "mla": AttentionConfig(**_MLA),  # d_v = 6 < d_n + d_r = 12: v is padded
    "mla_q_lora": AttentionConfig(**_MLA, q_lora_rank=10),
    "mla_wide_value": AttentionConfig(**{**_MLA, "v_head_dim": 16}),  # d_v > d_n + d_r: q, k are padded
}
DIM, BATCH, SEQ = 16, 2, 7
# Two packed rows: documents of 3 + 4 tokens, and of 2 + 3 + 2 tokens.
SEGMENTS = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2]], np.int32)
POSITIONS = np.array([[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 0, 1]], np.int32)


@functools.cache
def _init(name):
    """Random params in the shapes `init` gives, and an input [B, T, D], once per config.

    Drawn with NumPy: compiling JAX's random initialisers takes seconds on a small CPU.
    Norm scales are moved away from 1 so that the reference checks they are applied.
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(BATCH, SEQ, DIM)), jnp.float32)
    shapes = nn.unbox(jax.eval_shape(Attention(CONFIGS[name]).init, jax.random.key(0), x)["params"])

    def draw(path, leaf):
        if path[-1].key == "scale":
            return jnp.asarray(1 + 0.3 * rng.normal(size=leaf.shape), jnp.float32)
        fan_in = np.prod(leaf.shape[:2 if path[-1].key == "out" else 1])
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes), x


@functools.cache
def forward(name, dtype=jnp.float32):
    """The jitted apply of config `name`, compiled once per dtype."""
    return jax.jit(Attention(CONFIGS[name], dtype=dtype).apply)


def make(name):
    """The layer, a fresh copy of its params tree and the input."""
    params, x = _init(name)
    return Attention(CONFIGS[name]), jax.tree.map(lambda a: a, params), x


def rope_complex(v, position, theta):
    """RoPE of one vector v [d] at `position`: pair i as the complex v[2i] + j v[2i+1],
    multiplied by exp(j position theta^(-2i/d)) (DeepSeek-V3's `precompute_freqs_cis` and
    `apply_rotary_emb`)."""
    d = v.shape[-1]
    z = (v[0::2] + 1j * v[1::2]) * np.exp(1j * position * theta ** (-np.arange(0, d, 2) / d))
    out = np.empty(d)
    out[0::2], out[1::2] = z.real, z.imag
    return out


def naive_attention(config, params, x, segments=None, positions=None):
    """Float64 attention, one batch row, head and query position at a time.

    Token t of row b is rotated at positions[b, t] (default t) and attends to the tokens
    s <= t with segments[b, s] = segments[b, t] (default: all s <= t).

    With h_t the input at position t, head i and the params named as in the paper:
      MHA/GQA: q_{t,i} = R(W_Q^i h_t), k_{t,j} = R(W_K^j h_t), v_{t,j} = W_V^j h_t, where
        query head i reads key/value head j = i // (H / Hkv).
      MLA (DeepSeek-V3 eqs. 1-11, with the RMSNorms of its code on the two latents):
        c^KV_t = W^DKV h_t,  k^C_{t,i} = W^UK_i c^KV_t,  v^C_{t,i} = W^UV_i c^KV_t,
        k^R_t = R(W^KR h_t),  k_{t,i} = [k^C_{t,i}; k^R_t],
        c^Q_t = W^DQ h_t,  q^C_{t,i} = W^UQ_i c^Q_t,  q^R_{t,i} = R(W^QR_i c^Q_t),
        q_{t,i} = [q^C_{t,i}; q^R_{t,i}]   (c^Q_t = h_t and W^UQ = W_Q without q_lora).
    Then o_{t,i} = sum_{s <= t} softmax_s(q_{t,i} . k_{s,i} / sqrt(d_qk)) v_{s,i} and
    u_t = W^O [o_{t,1}; ...; o_{t,H}].
    """
    p = {k: np.asarray(v["scale"] if isinstance(v, dict) else v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    heads, theta = config.num_heads, config.rope_theta

    def rms_norm(a, scale):
        return a / np.sqrt(np.mean(a**2) + config.norm_eps) * scale

    def head_qkv(h_t, t, i):
        """(q_{t,i}, k_{t,i}, v_{t,i}) of input vector h_t at position t, head i."""
        if config.kind == "mha":
            j = i // (heads // config.kv_heads)
            return (rope_complex(h_t @ p["query"][:, i], t, theta), rope_complex(h_t @ p["key"][:, j], t, theta),
                    h_t @ p["value"][:, j])
        n, r_kv = config.qk_nope_dim, config.kv_lora_rank
        c_kv = rms_norm(h_t @ p["kv_down"][:, :r_kv], p["kv_norm"])  # W^DKV, [r_kv]
        k_rope = rope_complex(h_t @ p["kv_down"][:, r_kv:], t, theta)  # W^KR, [d_r]: shared by heads
        k = np.concatenate([c_kv @ p["kv_up"][:, i, :n], k_rope])  # W^UK_i
        v = c_kv @ p["kv_up"][:, i, n:]  # W^UV_i
        if config.q_lora_rank:
            c_q, w_q = rms_norm(h_t @ p["q_down"], p["q_norm"]), p["q_up"][:, i]  # W^DQ; [W^UQ_i, W^QR_i]
        else:
            c_q, w_q = h_t, p["query"][:, i]
        q = np.concatenate([c_q @ w_q[:, :n], rope_complex(c_q @ w_q[:, n:], t, theta)])
        return q, k, v

    batch, seq, dim = x.shape
    segments = np.zeros((batch, seq), int) if segments is None else np.asarray(segments)
    positions = np.tile(np.arange(seq), (batch, 1)) if positions is None else np.asarray(positions)
    out = np.zeros((batch, seq, dim))
    for b in range(batch):
        for i in range(heads):
            q, k, v = (np.stack(a) for a in zip(*(head_qkv(x[b, t], positions[b, t], i) for t in range(seq))))
            for t in range(seq):
                seen = np.flatnonzero(segments[b, : t + 1] == segments[b, t])  # s <= t in t's segment
                scores = k[seen] @ q[t] / np.sqrt(q.shape[-1])
                weights = np.exp(scores - scores.max())
                o = (weights / weights.sum()) @ v[seen]  # [d_v]
                out[b, t] += o @ p["out"][i]  # head i's rows of W^O
    return out


class AttentionLayerTest(chex.TestCase):
    """Layer tests, each run under jit and eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((name, name) for name in CONFIGS))
    def test_matches_naive_reference(self, name):
        layer, params, x = make(name)
        out = self.variant(layer.apply)({"params": params}, x)
        chex.assert_shape(out, x.shape)
        chex.assert_type(out, jnp.float32)
        # Float32 rounding (eps 1.2e-7) of |out| <= 3 over a few dozen sums; measured <= 5e-7.
        chex.assert_trees_all_close(out, naive_attention(layer.config, params, x), rtol=0, atol=5e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((name, name) for name in ["mha", "gqa", "mla", "mla_q_lora"]))
    def test_outputs_never_depend_on_later_positions(self, name):
        layer, params, x = make(name)
        apply = self.variant(layer.apply)
        rng = np.random.default_rng(1)
        for t in (1, 4, SEQ - 1):
            changed = x.at[:, t:].set(rng.normal(size=x[:, t:].shape))
            a, b = apply({"params": params}, x), apply({"params": params}, changed)
            chex.assert_trees_all_equal(a[:, :t], b[:, :t])
            assert np.abs(a[:, t] - b[:, t]).max() > 1e-3

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((name, name) for name in ["mha", "gqa", "mla", "mla_q_lora"]))
    def test_tokens_never_attend_across_a_segment_boundary(self, name):
        layer, params, x = make(name)
        apply = self.variant(functools.partial(layer.apply, segment_ids=SEGMENTS, positions=POSITIONS))
        first = SEGMENTS == 0  # [B, T]: document 0 of each row
        other = jnp.where(first[..., None], np.random.default_rng(1).normal(size=x.shape), x)  # changed there
        a, b = apply({"params": params}, x), apply({"params": params}, other)
        chex.assert_trees_all_equal(a[~first], b[~first])  # later documents: bit-equal
        assert np.abs(a[first] - b[first]).max() > 1e-3
        # Without segment ids the same change reaches every later token.
        plain = self.variant(layer.apply)
        assert np.abs(plain({"params": params}, x)[~first] - plain({"params": params}, other)[~first]).min() > 0

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((name, name) for name in ["mha", "gqa", "mla_q_lora"]))
    def test_each_packed_document_equals_that_document_alone(self, name):
        """A document's outputs do not depend on where in the row it is.

        With the mask this would hold for any per-document shift of the positions (RoPE
        scores depend on m - n only), so the positions themselves are checked against the
        reference below.
        """
        layer, params, x = make(name)
        packed = self.variant(layer.apply)({"params": params}, x, SEGMENTS, POSITIONS)
        chex.assert_shape(packed, x.shape)
        alone = forward(name)  # jitted: an eager run per document length would take seconds
        for b, segments in enumerate(SEGMENTS):
            for s in np.unique(segments):
                doc = np.flatnonzero(segments == s)  # [T_s]: this document's columns
                want = alone({"params": params}, x[b : b + 1, doc])  # at positions 0..T_s - 1
                # The same sums of products over other matmul shapes: float32 rounding, measured <= 3e-7.
                chex.assert_trees_all_close(packed[b : b + 1, doc], want, rtol=0, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((name, name) for name in ["mha", "gqa", "mla", "mla_q_lora"]))
    def test_segments_and_positions_match_naive_reference(self, name):
        """RoPE rotates at the given positions: alone, positions that restart at each
        document change what a token sees of the earlier document; with segment ids too,
        each document is the reference run on it alone."""
        layer, params, x = make(name)
        apply = self.variant(layer.apply)
        positions_only = apply({"params": params}, x, positions=POSITIONS)
        want = naive_attention(layer.config, params, x, positions=POSITIONS)
        assert np.abs(want - naive_attention(layer.config, params, x)).max() > 1e-2  # restarting shows
        # Tolerance of test_matches_naive_reference (float32 rounding, measured <= 5e-7).
        chex.assert_trees_all_close(positions_only, want, rtol=0, atol=5e-6)
        chex.assert_trees_all_close(apply({"params": params}, x, SEGMENTS, POSITIONS),
                                    naive_attention(layer.config, params, x, SEGMENTS, POSITIONS), rtol=0, atol=5e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("gqa", "gqa"), ("mla_q_lora", "mla_q_lora"))
    def test_grad_is_finite_and_reaches_every_parameter(self, name):
        layer, params, x = make(name)
        cotangent = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
        grads = self.variant(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) * cotangent)))(params)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)
        chex.assert_tree_all_finite(grads)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            assert np.abs(g).max() > 0, path


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_key_value_weights(kv_heads):
    name = "gqa" if kv_heads == 2 else "mqa"
    _, params, x = make(name)
    group = 4 // kv_heads
    mha_params = {**params, "key": jnp.repeat(params["key"], group, axis=1),
                  "value": jnp.repeat(params["value"], group, axis=1)}
    chex.assert_trees_all_close(forward(name)({"params": params}, x), forward("mha")({"params": mha_params}, x),
                                rtol=0, atol=1e-6)


def test_gqa_with_all_heads_is_mha():
    config = AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=8)
    assert config.kv_heads == CONFIGS["mha"].kv_heads == 4
    _, params, x = make("mha")
    chex.assert_trees_all_equal(jax.jit(Attention(config).apply)({"params": params}, x),
                                forward("mha")({"params": params}, x))


def test_rope_equals_the_complex_rotation():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 9, 3, 16))  # [B, T, H, d]
    positions = np.stack([np.arange(9), rng.integers(0, 100, 9)])  # [B, T]: in order, and any
    out = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), 500.0)
    chex.assert_shape(out, x.shape)
    chex.assert_type(out, jnp.float32)
    expected = np.array([[[rope_complex(x[b, t, h], positions[b, t], 500.0) for h in range(3)]
                          for t in range(9)] for b in range(2)])
    # Float32 angles p * theta^(-2i/d) with p < 100 are off by <= 100 * 6e-8 rad; |x| < 5.
    chex.assert_trees_all_close(out, expected, rtol=0, atol=5e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 16)), jnp.float32) for _ in range(2))  # [T=1, H=1, d]

    def score(m, n):
        return float(jnp.sum(apply_rope(q, jnp.array([m]), 500.0) * apply_rope(k, jnp.array([n]), 500.0)))

    same_offset = [score(3, 1), score(9, 7), score(40, 38)]
    np.testing.assert_allclose(same_offset, same_offset[0], rtol=0, atol=1e-5)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3


def test_rope_rotates_pair_i_by_position_times_theta_power():
    x = jnp.array([[[1.0, 0.0, 2.0, 0.0]]])  # [T=1, H=1, d=4]: two pairs
    out = apply_rope(x, jnp.array([3]), 100.0)[0, 0]
    # Pair 0 turns by 3 * 100^0 = 3 rad, pair 1 by 3 * 100^(-2/4) = 0.3 rad.
    expected = [np.cos(3.0), np.sin(3.0), 2 * np.cos(0.3), 2 * np.sin(0.3)]
    chex.assert_trees_all_close(out, np.array(expected), rtol=0, atol=1e-6)
    chex.assert_trees_all_equal(apply_rope(x, jnp.array([0]), 100.0), x)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dim", [16, 24])
def test_num_params_counts_what_init_creates(name, dim):
    shapes = jax.eval_shape(Attention(CONFIGS[name]).init, jax.random.key(0), jnp.zeros((1, 3, dim)))
    assert sum(p.size for p in jax.tree.leaves(nn.unbox(shapes["params"]))) == CONFIGS[name].num_params(dim)


def test_flops_per_token_by_hand():
    # MHA, D=16, H=4, d=8: 4 matrices of 16 * 32; (T+1)/2 = 4 keys on average at T=7.
    assert CONFIGS["mha"].flops_per_token(16, 7) == 2 * 4 * 16 * 32 + 2 * 2 * 4 * 4 * 8
    # MLA with q_lora: q_down 16*10, q_up 10*3*12, kv_down 16*16, kv_up 12*3*14, out 3*6*16 (norms excluded).
    matmul = 16 * 10 + 10 * 3 * 12 + 16 * 16 + 12 * 3 * 14 + 3 * 6 * 16
    assert CONFIGS["mla_q_lora"].flops_per_token(16, 7) == 2 * matmul + 2 * 4 * 3 * (12 + 6)


@pytest.mark.parametrize("name", ["mha", "gqa", "mla_q_lora"])
def test_bfloat16_compute_tracks_float32(name):
    _, params, x = make(name)
    out16 = forward(name, jnp.bfloat16)({"params": params}, x)
    out32 = forward(name)({"params": params}, x)
    chex.assert_type(out16, jnp.bfloat16)
    # bfloat16 keeps 8 significant bits (eps 2^-8 = 0.4%) and rounds about ten times in
    # series; measured up to 0.85% of max |out|.
    chex.assert_trees_all_close(out16.astype(jnp.float32), out32, rtol=0, atol=0.03 * float(jnp.abs(out32).max()))


def test_parameters_carry_logical_axes():
    x = jnp.zeros((1, 3, DIM))
    specs = {name: nn.get_partition_spec(jax.eval_shape(Attention(CONFIGS[name]).init, jax.random.key(0), x))
             for name in ("gqa", "mla_q_lora")}
    gqa, mla = specs["gqa"]["params"], specs["mla_q_lora"]["params"]
    assert tuple(gqa["query"]) == ("embed", "heads", "head_dim")
    assert tuple(gqa["key"]) == tuple(gqa["value"]) == ("embed", "kv_heads", "head_dim")
    assert tuple(gqa["out"]) == ("heads", "head_dim", "embed")
    assert tuple(mla["q_down"]) == ("embed", "q_lora") and tuple(mla["kv_down"]) == ("embed", "kv_lora")
    assert tuple(mla["q_up"]) == ("q_lora", "heads", "head_dim")
    assert tuple(mla["kv_up"]) == ("kv_lora", "heads", "head_dim")
    assert tuple(mla["kv_norm"]["scale"]) == ("kv_lora",)


@pytest.mark.parametrize("changes, field", [
    (dict(kind="gqa"), "kind"),
    (dict(num_heads=0), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_kv_heads=-1), "num_kv_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(kind="mla", qk_rope_dim=5), "qk_rope_dim"),
    (dict(kind="mla", kv_lora_rank=0), "kv_lora_rank"),
    (dict(kind="mla", q_lora_rank=-2), "q_lora_rank"),
    (dict(kind="mla", v_head_dim=0), "v_head_dim"),
    (dict(kind="mla", norm_eps=0.0), "norm_eps"),
])
def test_bad_config_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"AttentionConfig.{field} = "):
        AttentionConfig(**changes)


@pytest.mark.parametrize("shape", [(2, 16), (2, 7, 1, 16)])
def test_wrong_input_rank_is_a_clear_error(shape):
    layer, params, _ = make("mha")
    with pytest.raises(ValueError, match=r"x must be \[B, T, D\]"):
        layer.apply({"params": params}, jnp.zeros(shape))


@pytest.mark.parametrize("arg", ["segment_ids", "positions"])
def test_segment_ids_and_positions_must_be_integer_b_t(arg):
    layer, params, x = make("mha")
    with pytest.raises(AssertionError, match=f"{arg} must be \\[B, T\\]"):
        layer.apply({"params": params}, x, **{arg: SEGMENTS[:, :-1]})
    with pytest.raises(AssertionError, match=f"{arg} must be integers"):
        layer.apply({"params": params}, x, **{arg: SEGMENTS.astype(np.float32)})

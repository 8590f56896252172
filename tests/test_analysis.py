"""LogitLens and linear CKA on small shapes."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import analysis
from engram_jax.model import Model, dummy_inputs
from test_engram_off import inputs, two_engram_layers


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from the n x n Gram matrices (HSIC form), float64: another route to the same number."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def test_cka_matches_the_gram_matrix_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6))
    y = x @ rng.normal(size=(6, 4)) + 0.5 * rng.normal(size=(50, 4))
    assert float(analysis.linear_cka(x, y)) == pytest.approx(reference_cka(x, y), abs=1e-5)


def test_cka_is_one_for_itself_and_invariant_to_rotation_and_isotropic_scale():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8)) + 3.0  # an offset: centring must remove it
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert float(analysis.linear_cka(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(analysis.linear_cka(x, 2.5 * x @ q)) == pytest.approx(1.0, abs=1e-5)
    # Not invariant to an anisotropic scale: the measure can tell representations apart.
    assert float(analysis.linear_cka(x, x * np.array([10.0] + [0.1] * 7))) < 0.5
    assert float(analysis.linear_cka(x, rng.normal(size=(200, 8)))) < 0.15


def test_cka_matrix_and_soft_alignment_find_a_shifted_band():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(6, 300, 5))  # [L, n, d]: six unrelated layers
    engram = base[[2, 3, 4, 5, 5, 5]] @ np.linalg.qr(rng.normal(size=(5, 5)))[0]  # layer j is like base j + 2
    similarity = analysis.cka_matrix(engram, base)  # [6, 6]
    chex.assert_shape(similarity, (6, 6))
    np.testing.assert_array_equal(np.argmax(np.asarray(similarity), axis=1), [2, 3, 4, 5, 5, 5])
    aligned = np.asarray(analysis.soft_alignment(similarity, k=1))
    np.testing.assert_allclose(aligned, [2, 3, 4, 5, 5, 5], atol=1e-6)
    soft = np.asarray(analysis.soft_alignment(jnp.asarray([[0.0, 1.0, 1.0, 0.0]]), k=2))
    np.testing.assert_allclose(soft, [1.5], atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_logit_lens_of_the_last_layer_is_the_final_distribution(tie):
    config = two_engram_layers().replace(tie_embeddings=tie)
    variables = nn.unbox(Model(config).init(jax.random.key(0), *dummy_inputs(config)))
    tokens, memory = inputs(config)
    # Jitted: eager Flax applies take tens of seconds on 2 loaded cores.
    streams, logits = jax.jit(functools.partial(analysis.layer_streams, config))(variables, tokens, memory)
    chex.assert_shape(streams, (config.num_layers, *tokens.shape, config.hidden_size))
    chex.assert_trees_all_close(logits, jax.jit(Model(config).apply)(variables, tokens, memory), atol=1e-6)
    chex.assert_trees_all_close(analysis.lens_logits(config, variables["params"], streams[-1]), logits, atol=1e-5)
    lens = jax.jit(functools.partial(analysis.logit_lens, config))(variables["params"], streams, logits)
    kl = np.asarray(lens["kl_sum"] / lens["tokens"])
    top1 = np.asarray(lens["top1_sum"] / lens["tokens"])
    assert kl[-1] == pytest.approx(0.0, abs=1e-5) and top1[-1] == 1.0
    assert (kl[:-1] > 1e-4).all()  # earlier layers are not yet the final distribution
    # A mask that keeps half the tokens halves the count and keeps the per-token mean's scale.
    mask = jnp.zeros(tokens.shape).at[:, ::2].set(1.0)
    half = analysis.logit_lens(config, variables["params"], streams, logits, mask)
    assert float(half["tokens"]) == tokens.size / 2
    assert float(half["kl_sum"][0]) < float(lens["kl_sum"][0])

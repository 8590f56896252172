"""Presets: every one builds and counts; the paper's parameter targets hold."""

import chex
import flax.linen as nn
import jax
import pytest

from engram_jax import configs, model
from engram_jax.config_base import ConfigError


@pytest.fixture(scope="module")
def counts():
    return {name: model.count_params(configs.get(name)) for name in configs.names()}


def test_every_preset_builds_and_counts(counts):
    assert {"tiny", "small", "moe-27b", "engram-27b", "engram-40b", "ablation-moe-3b",
            "ablation-engram-3b"} <= set(counts)
    assert all(c.total > 0 and 0 < c.activated < c.total for c in counts.values())


@pytest.mark.parametrize("name", configs.names())
def test_every_preset_initialises_to_its_count(counts, name):
    """Abstract init (no memory: about 1.5 s for a 27B preset) creates the dense parameters
    that count_params counts: all but the Engram table rows, which may live apart."""
    params = nn.unbox(model.variable_shapes(configs.get(name)))["params"]
    dense = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if "table" not in jax.tree_util.keystr(path)]
    chex.assert_type(dense, float)
    assert sum(leaf.size for leaf in dense) == counts[name].total - counts[name].engram


def within(value, target, fraction):
    return abs(value - target) <= fraction * target


def test_engram_27b_targets(counts):
    c = counts["engram-27b"]
    assert 5.7e9 <= c.engram <= 5.8e9
    assert within(c.total, 26.7e9, 0.03)
    assert abs(c.rho - 0.743) < 0.005  # paper section 4.1: rho = 74.3%


def test_moe_27b_targets(counts):
    c = counts["moe-27b"]
    assert within(c.total, 26.7e9, 0.03)
    assert within(c.activated, 3.8e9, 0.05)
    assert c.engram == 0 and c.rho == 1.0


def test_engram_40b_targets(counts):
    c = counts["engram-40b"]
    assert within(c.engram, 18.5e9, 0.02)
    assert within(c.total, 39.5e9, 0.03)


def test_small_is_about_100m(counts):
    assert within(counts["small"].total, 100e6, 0.15)


def test_ablation_models(counts):
    assert within(counts["ablation-moe-3b"].activated, 0.56e9, 0.05)
    assert within(counts["ablation-engram-3b"].engram, 1.6e9, 0.02)


@pytest.mark.parametrize("name", ["tiny", "small", "engram-27b", "engram-40b", "ablation-engram-3b"])
def test_baselines_are_iso_parameter_with_more_experts(counts, name):
    engram, baseline = configs.get(name), configs.get(f"{name}-baseline")
    assert baseline.engram is None and baseline.moe.num_experts > engram.moe.num_experts
    one_expert_everywhere = baseline.num_moe_layers * model.expert_params(baseline)
    assert abs(counts[f"{name}-baseline"].total - counts[name].total) <= one_expert_everywhere / 2 + 1


def test_engram_27b_baseline_is_the_papers_moe_27b():
    assert configs.get("engram-27b-baseline") == configs.get("moe-27b")


def test_engram_presets():
    assert configs.engram("engram-27b").memory_dim == 1280
    assert configs.engram("deepseek-v4.1-flash").memory_dim == 6144


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown model preset 'tiny2'; known:"):
        configs.get("tiny2")


def test_config_overrides_reach_nested_parts():
    config = configs.get("tiny").override(["engram.max_ngram_size=4", "engram.table_sizes=101,103,107"])
    assert config.engram.num_heads == 12
    with pytest.raises(ConfigError, match="table_sizes"):
        configs.get("tiny").override(["engram.max_ngram_size=4"])

"""Named presets, in one place.

Models (`get(name)`; `names()` lists them):
- `tiny`: trains in minutes on 2 CPU cores; `small`: about 100M parameters.
  Every preset but `tiny` recomputes its blocks' activations in the backward pass
  (`remat="full"`); runs of identical blocks are stacked with nn.scan (`scan_layers`).
- `moe-27b`, `engram-27b`, `engram-40b`: the paper's models (Table 5): 30 layers,
  D = 2560, MLA with 32 heads, mHC with 4 branches, 2 shared + 72 (MoE) or 55 (Engram)
  routed experts, top-6, 1 leading dense layer, vocabulary 129,280.
- `ablation-moe-3b`, `ablation-engram-3b`: the paper's 12-layer ablation models (0.56B
  activated; Engram adds 1.6B at layers [1, 5]).
- `<engram preset>-baseline` for every preset with Engram: iso-parameter, Engram's
  parameters spent on more routed experts instead (`iso_param_baseline`), as the paper
  does; `engram-27b-baseline` is exactly `moe-27b`.

Sizes the paper does not give, chosen to reproduce its parameter counts (checked in
tests/test_configs.py against `model.count_params`):
- expert width 1536: with 29 MoE layers it gives Engram-27B's rho = 74.3% (section 4.1)
  and 72 - 55 = 17 experts worth 5.8B, the Engram budget;
- MLA ranks q 768, kv 512, head widths 128 (no rotary) + 64 (rotary), values 128, as
  DeepSeek-V3's head widths with a query rank scaled to D = 2560;
- the dense FFN of layer 0 has width 12288 = (2 shared + 6 routed) x 1536, the width a
  token sees in a MoE layer;
- ablation models: D = 1280 and 12 layers (the mHC paper's 3B model), MLA 16 heads with
  ranks 512 / 256 and head widths 64 + 32, experts 2 shared + 64 routed of width 896,
  top-6: 2.9B total, 0.54B activated; Engram d_mem 1280 (80 per head, as the 27B) with
  625,000 base rows per head: 2 layers x 16 heads x 625,000 x 80 = 1.6B.

Engram tables start at the scale of the token embedding (0.02 for tiny and small,
DeepSeek's 0.006 for the paper models): measured on `tiny`, unit-scale rows (the
reference's PyTorch default) swamp the embedding early on and cost 0.26 nats of
validation loss after 400 steps (benchmarks/RESULTS.md).

Engram layouts (`engram(name)`):
- `engram-27b`: the paper's Engram-27B (Table 5): layers [1, 15] (the paper's 1-based
  "2 and 15"), N = 3, K = 8, d_mem = 1280 (80 columns per head), 2,262,400 base rows
  per head; 5.79e9 table parameters.
- `engram-40b`: the same with 7,239,680 base rows per head; 18.5e9 table parameters.
- `deepseek-v4.1-flash`: the released model (reference section 9): layers [1, 14],
  N = 4, K = 8, head width 256 (d_mem = 6144), 16,000,000 base rows per order, pad
  id 2; 384,006,168 and 384,016,682 rows per layer.
"""

from __future__ import annotations

from collections.abc import Callable

from engram_jax import model
from engram_jax.attention import AttentionConfig
from engram_jax.engram import EngramConfig
from engram_jax.mhc import MHCConfig
from engram_jax.model import ModelConfig
from engram_jax.moe import MoEConfig

# DeepSeek-V3 (section 4.2) initialises every parameter with standard deviation 0.006.
_DEEPSEEK_INIT_STD = 0.006


def _engram_27b() -> EngramConfig:
    return EngramConfig(layer_ids=(1, 15), max_ngram_size=3, heads_per_ngram=8, embed_per_ngram=640,
                        table_sizes=(2_262_400, 2_262_400), pad_id=2, table_init_std=_DEEPSEEK_INIT_STD)


def _engram_40b() -> EngramConfig:
    return _engram_27b().replace(table_sizes=(7_239_680, 7_239_680))


def _deepseek_v4_1_flash() -> EngramConfig:
    return EngramConfig(layer_ids=(1, 14), max_ngram_size=4, heads_per_ngram=8, embed_per_ngram=8 * 256,
                        table_sizes=(16_000_000,) * 3, pad_id=2)


ENGRAM_PRESETS: dict[str, Callable[[], EngramConfig]] = {
    "engram-27b": _engram_27b,
    "engram-40b": _engram_40b,
    "deepseek-v4.1-flash": _deepseek_v4_1_flash,
}


def _lookup(presets: dict[str, Callable], name: str, kind: str):
    if name not in presets:
        raise KeyError(f"unknown {kind} preset {name!r}; known: {', '.join(sorted(presets))}")
    return presets[name]()


def engram(name: str) -> EngramConfig:
    """The Engram layout preset `name` (see the module docstring)."""
    return _lookup(ENGRAM_PRESETS, name, "Engram")


# ---------------------------------------------------------------- model presets


def _tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=4096, hidden_size=128, num_layers=4,
        attention=AttentionConfig(kind="mha", num_heads=4, head_dim=32),
        mlp_dim=512, moe=MoEConfig(num_experts=8, num_shared=1, top_k=2, expert_dim=128), dense_layers=1,
        mhc=MHCConfig(branches=4),
        engram=EngramConfig(layer_ids=(1, 3), max_ngram_size=3, heads_per_ngram=4, embed_per_ngram=64,
                            table_sizes=(10_007, 10_007), pad_id=1, table_init_std=0.02),
        embed_init_std=0.02, tie_embeddings=False,
    )


def _small() -> ModelConfig:
    return ModelConfig(
        vocab_size=16384, hidden_size=512, num_layers=8,
        attention=AttentionConfig(kind="mha", num_heads=8, head_dim=64),
        mlp_dim=2048, moe=MoEConfig(num_experts=12, num_shared=1, top_k=2, expert_dim=384), dense_layers=1,
        mhc=MHCConfig(branches=4),
        engram=EngramConfig(layer_ids=(1, 4), max_ngram_size=3, heads_per_ngram=8, embed_per_ngram=256,
                            table_sizes=(20_011, 20_011), pad_id=1, table_init_std=0.02),
        embed_init_std=0.02,
        # At its run's batch (32 x 512) the step keeps 27.9 GiB of activations without
        # recomputation, 5.5 GiB with it (benchmarks/bench_memory.py).
        remat="full",
    )


def _mla_27b() -> AttentionConfig:
    return AttentionConfig(kind="mla", num_heads=32, q_lora_rank=768, kv_lora_rank=512, qk_nope_dim=128,
                           qk_rope_dim=64, v_head_dim=128)


def _moe_27b() -> ModelConfig:
    return ModelConfig(
        vocab_size=129_280, hidden_size=2560, num_layers=30, attention=_mla_27b(),
        mlp_dim=12_288, moe=MoEConfig(num_experts=72, num_shared=2, top_k=6, expert_dim=1536), dense_layers=1,
        mhc=MHCConfig(branches=4), engram=None, embed_init_std=_DEEPSEEK_INIT_STD, dtype="bfloat16", remat="full",
    )


def _engram_27b_model() -> ModelConfig:
    base = _moe_27b()
    return base.replace(moe=base.moe.replace(num_experts=55), engram=_engram_27b())


def _engram_40b_model() -> ModelConfig:
    return _engram_27b_model().replace(engram=_engram_40b())


def _ablation_moe_3b() -> ModelConfig:
    return ModelConfig(
        vocab_size=129_280, hidden_size=1280, num_layers=12,
        attention=AttentionConfig(kind="mla", num_heads=16, q_lora_rank=512, kv_lora_rank=256, qk_nope_dim=64,
                                  qk_rope_dim=32, v_head_dim=64),
        mlp_dim=8 * 896, moe=MoEConfig(num_experts=64, num_shared=2, top_k=6, expert_dim=896), dense_layers=1,
        mhc=MHCConfig(branches=4), engram=None, embed_init_std=_DEEPSEEK_INIT_STD, dtype="bfloat16", remat="full",
    )


def _ablation_engram_3b() -> ModelConfig:
    return _ablation_moe_3b().replace(engram=EngramConfig(
        layer_ids=(1, 5), max_ngram_size=3, heads_per_ngram=8, embed_per_ngram=640,
        table_sizes=(625_000, 625_000), pad_id=2, table_init_std=_DEEPSEEK_INIT_STD))


def iso_param_baseline(config: ModelConfig) -> ModelConfig:
    """The same model without Engram, its parameters spent on more routed experts.

    The number of added experts rounds Engram's parameters (tables and layers) over the
    parameters of one expert in every MoE layer, so the totals agree to half an expert.
    """
    if config.engram is None or config.moe is None:
        raise ValueError("an iso-parameter baseline needs a MoE model with Engram")
    without = config.replace(engram=None)
    extra = model.engram_params(config)
    added = round(extra / (without.num_moe_layers * model.expert_params(without)))
    return without.replace(moe=without.moe.replace(num_experts=without.moe.num_experts + added))


MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": _tiny,
    "small": _small,
    "moe-27b": _moe_27b,
    "engram-27b": _engram_27b_model,
    "engram-40b": _engram_40b_model,
    "ablation-moe-3b": _ablation_moe_3b,
    "ablation-engram-3b": _ablation_engram_3b,
}
for _name, _make in list(MODEL_PRESETS.items()):
    if _name in ("tiny", "small") or "engram" in _name:
        MODEL_PRESETS[f"{_name}-baseline"] = lambda _make=_make: iso_param_baseline(_make())


def names() -> list[str]:
    """All model preset names."""
    return sorted(MODEL_PRESETS)


def get(name: str) -> ModelConfig:
    """The model preset `name` (see the module docstring); KeyError names the known ones."""
    return _lookup(MODEL_PRESETS, name, "model")

"""Engram switched off at inference: the model, the layer choice, and `engram-eval --engram-off`."""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.attention import AttentionConfig
from engram_jax.engram import EngramConfig
from engram_jax.mhc import MHCConfig
from engram_jax.model import Model, ModelConfig, dummy_inputs
from engram_jax.moe import MoEConfig
from train import engram_off


def two_engram_layers(multi_branch: bool = True) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=16, num_layers=3, attention=AttentionConfig(num_heads=2, head_dim=8),
                       mlp_dim=32, moe=MoEConfig(num_experts=4, num_shared=1, top_k=2, expert_dim=8),
                       mhc=MHCConfig(branches=2),
                       engram=EngramConfig(layer_ids=(0, 2), heads_per_ngram=2, embed_per_ngram=8,
                                           table_sizes=(31, 37), multi_branch=multi_branch, pad_id=1))


def inputs(config: ModelConfig):
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)  # [B, T]
    memory = {i: jax.random.normal(jax.random.key(10 + i), (2, 12, config.engram.memory_dim))  # [B, T, d_mem]
              for i in config.engram.layer_ids}
    return tokens, memory


def zero_value_projection(params: dict, layers) -> dict:
    """Parameters whose Engram value v (slot 0 of the fused projection) is zero at
    `layers`: the gated value, its conv and so Y are all zero there."""
    params = jax.tree.map(lambda x: x, params)
    for layer in layers:
        engram = params[f"block_{layer}"]["engram"]
        engram["kv_kernel"] = engram["kv_kernel"].at[:, 0].set(0.0)  # [d_mem, 1 + G, D]
        engram["kv_bias"] = engram["kv_bias"].at[0].set(0.0)  # [1 + G, D]
    return params


@pytest.mark.parametrize("multi_branch", [True, False])
@pytest.mark.parametrize("layers", [(0, 2), (2,)])
def test_engram_off_equals_a_model_whose_engram_output_is_zero(multi_branch, layers):
    config = two_engram_layers(multi_branch)
    variables = nn.unbox(Model(config).init(jax.random.key(0), *dummy_inputs(config)))
    # Trained-like conv kernels (zero at init would hide a wrong conv path).
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 if "short_conv" in jax.tree_util.keystr(p) and "kernel" in jax.tree_util.keystr(p) else x,
        variables)
    tokens, memory = inputs(config)
    apply, apply_off = jax.jit(Model(config).apply), jax.jit(Model(config, engram_off=layers).apply)
    off = apply_off(variables, tokens, memory)  # [B, T, V]
    zeroed = apply({**variables, "params": zero_value_projection(variables["params"], layers)}, tokens, memory)
    on = apply(variables, tokens, memory)
    chex.assert_trees_all_close(off, zeroed, atol=1e-6, rtol=1e-6)
    assert float(jnp.abs(off - on).max()) > 1e-3  # Engram's output mattered


def test_switching_off_one_layer_differs_from_all_and_from_none():
    config = two_engram_layers()
    variables = nn.unbox(Model(config).init(jax.random.key(0), *dummy_inputs(config)))
    tokens, memory = inputs(config)
    out = {layers: np.asarray(jax.jit(Model(config, engram_off=layers).apply)(variables, tokens, memory))
           for layers in [(), (0,), (2,), (0, 2)]}
    for a in out:
        for b in out:
            if a != b:
                assert np.abs(out[a] - out[b]).max() > 1e-4, (a, b)


def test_engram_off_needs_engram_layers():
    config = two_engram_layers()
    variables = nn.unbox(Model(config).init(jax.random.key(0), *dummy_inputs(config)))
    with pytest.raises(ValueError, match=r"engram_off \[1\]: Engram layers are \[0, 2\]"):
        Model(config, engram_off=(1,)).apply(variables, *inputs(config))
    assert engram_off.engram_off_layers(config, None) == (0, 2)
    assert engram_off.engram_off_layers(config, (2, 2)) == (2,)
    with pytest.raises(ValueError, match=r"Engram layer ids \[1, 7\] out of range: .* \[0, 2\] \(of layers 0..2\)"):
        engram_off.engram_off_layers(config, (1, 7))
    with pytest.raises(ValueError, match="this model has no Engram layers"):
        engram_off.engram_off_layers(config.replace(engram=None), None)
    assert engram_off.parse_layers("all") is None and engram_off.parse_layers("0,2") == (0, 2)
    with pytest.raises(ValueError, match="comma-separated layer ids"):
        engram_off.parse_layers("first")


def test_fraction_kept_follows_the_score_direction():
    assert engram_off.fraction_kept(0.8, 0.4, higher_is_better=True) == pytest.approx(0.5)
    assert engram_off.fraction_kept(2.0, 4.0, higher_is_better=False) == pytest.approx(0.5)
    assert engram_off.Comparison("t", "acc", 0.5, 0.5, True).kept == 1.0


@pytest.mark.slow
def test_engram_eval_engram_off_prints_and_writes_on_off_and_kept(capsys):
    import micro_runs
    from train.evaluate import Trained
    from train.main import eval_main

    run = micro_runs.trained_run(engram=True)
    assert eval_main(["--checkpoint", str(run), "--engram-off", "--corpus", str(micro_runs.corpus())]) == 0
    out = capsys.readouterr().out
    assert "Engram off at layers [1]" in out and "kept" in out
    scores = json.loads((run / "eval" / "engram_off.json").read_text())
    assert scores["engram_off"] == [1] and scores["step"] == 8
    rows = {(r["name"], r["metric"]): r for r in scores["scores"]}
    assert set(rows) == {(name, m) for name in ("validation", str(micro_runs.corpus()))
                         for m in ("val_loss", "val_bits_per_byte")}
    on = Trained(run).validate()
    loss = rows["validation", "val_loss"]
    assert loss["on"] == pytest.approx(on["val_loss"], rel=1e-6)
    assert abs(loss["off"] - loss["on"]) > 1e-4
    assert loss["kept"] == pytest.approx(loss["on"] / loss["off"])
    # The same corpus read as another corpus: the same held-out files, the same scores.
    other = rows[str(micro_runs.corpus()), "val_loss"]
    assert other["on"] == pytest.approx(loss["on"], rel=1e-6) and other["off"] == pytest.approx(loss["off"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("engram, args, message", [
    (True, ["--engram-off", "0"], "Engram layer ids [0] out of range: this model's Engram layers are [1] (of layers 0..1)"),
    (True, ["--engram-off", "x"], "--engram-off takes 'all' or comma-separated layer ids"),
    (False, ["--engram-off"], "Engram cannot be switched off: this model has no Engram layers"),
])
def test_engram_off_bad_input_is_one_line(capsys, engram, args, message):
    import micro_runs
    from train.main import eval_main

    assert eval_main(["--checkpoint", str(micro_runs.trained_run(engram=engram)), *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"engram-eval: error: {message}"), lines


def test_tasks_without_lm_eval_is_one_line(monkeypatch, capsys):
    import sys

    from train.main import eval_main

    import train

    # As if lm-eval were not installed (the module may already be imported, by collection).
    monkeypatch.setitem(sys.modules, "train.lm_eval_model", None)
    monkeypatch.delattr(train, "lm_eval_model", raising=False)
    assert eval_main(["--checkpoint", "nowhere", "--tasks", "hellaswag"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("engram-eval: error: --tasks needs lm-eval (") and \
        lines[0].endswith('pip install -e ".[eval]"'), lines


def test_engram_off_with_nothing_to_score_is_refused(capsys):
    from train.main import eval_main

    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--checkpoint", "nowhere", "--engram-off", "--no-validation"])
    assert exit_info.value.code == 2
    assert "--engram-off with --no-validation needs --tasks" in capsys.readouterr().err

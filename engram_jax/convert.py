"""Weights from DeepSeek's PyTorch Engram layer, mapped onto `engram.Engram`'s params.

PyTorch names (reference demo)             -> engram-jax params
  multi_head_embedding.embedding.weight [V, Dh]   the table [V, Dh], returned beside the params
  value_proj.weight [D, d_mem], .bias [D]          kv_kernel[:, 0] (transposed), kv_bias[0]
  key_projs.g.weight [D, d_mem], .bias [D]         kv_kernel[:, 1 + g], kv_bias[1 + g]
  norm1.g.weight [D] (keys)                        key_norm/scale[g]
  norm2.g.weight [D] (hidden states)               query_norm/scale[g]
  short_conv.norms.g.weight [D]                    short_conv/norm/scale[g]
  short_conv.conv.weight [G * D, 1, w]             short_conv/kernel [w, G, D]
PyTorch Linear weights are [out, in]; the Conv1d channels are branch-major (g * D + d).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from engram_jax.engram import EngramConfig
from engram_jax.table import head_offsets


def engram_params_from_torch(weights: Mapping[str, np.ndarray], config: EngramConfig,
                             layer_id: int) -> tuple[dict, np.ndarray]:
    """Converts one PyTorch Engram layer's state dict (as NumPy arrays) to Flax params.

    Returns:
      (the layer's params, its table [V, Dh]): the table is state of its own in
      engram-jax (`table.py`), read through `table.gather` or `Tables.lookup`.

    Raises:
      ValueError: a weight is missing or has a shape that does not fit `config`.
    """
    w = {k: np.asarray(v) for k, v in weights.items()}

    def get(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in w:
            raise ValueError(f"PyTorch Engram weights lack {name!r}")
        if shape is not None and w[name].shape != shape:
            raise ValueError(f"{name} has shape {w[name].shape}, config expects {shape}")
        return w[name]

    d, d_mem = get("value_proj.weight").shape
    branches = sum(1 for k in w if k.startswith("key_projs.") and k.endswith(".weight"))
    sizes = config.head_sizes(layer_id)
    table = get("multi_head_embedding.embedding.weight", (sum(sizes), config.head_dim))
    if "multi_head_embedding.offsets" in w and not np.array_equal(
            w["multi_head_embedding.offsets"], head_offsets(sizes)):
        raise ValueError("PyTorch head offsets differ from the config's head primes")
    if d_mem != config.memory_dim:
        raise ValueError(f"value_proj takes {d_mem} inputs, config's d_mem is {config.memory_dim}")

    projections = ["value_proj"] + [f"key_projs.{g}" for g in range(branches)]
    kernel = np.stack([get(f"{p}.weight", (d, d_mem)).T for p in projections], axis=1)  # [d_mem, S, D]
    bias = np.stack([get(f"{p}.bias", (d,)) for p in projections])  # [S, D]
    params = {
        "kv_kernel": kernel,
        "kv_bias": bias,
        "key_norm": {"scale": np.stack([get(f"norm1.{g}.weight", (d,)) for g in range(branches)])},
        "query_norm": {"scale": np.stack([get(f"norm2.{g}.weight", (d,)) for g in range(branches)])},
    }
    if config.short_conv:
        conv = get("short_conv.conv.weight", (branches * d, 1, config.kernel_size))
        params["short_conv"] = {
            "kernel": conv[:, 0, :].reshape(branches, d, -1).transpose(2, 0, 1),  # [w, G, D]
            "norm": {"scale": np.stack([get(f"short_conv.norms.{g}.weight", (d,))
                                        for g in range(branches)])},
        }
    return params, table

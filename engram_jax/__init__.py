"""engram-jax: Engram, DeepSeek's conditional memory via scalable lookup, for JAX.

The public API:
- `EngramConfig` and the presets in `engram_jax.configs`;
- `NgramHasher` (host-side multi-head N-gram hashing, bit-exact with the reference);
- `compress_tokenizer` / `Compression` (tokenizer compression);
- `Engram` (the Flax layer), and `Tables` / `TableState`: the Engram tables as sharded
  state (device or host memory) with sparse row optimizers (`RowOptimizer`);
- `Decoder` / `SamplingConfig`: KV-cached, batched generation (`engram_jax.decode`).
"""

from engram_jax import configs
from engram_jax.compression import Compression, compress_tokenizer
from engram_jax.config_base import ConfigError
from engram_jax.decode import Decoder, SamplingConfig
from engram_jax.engram import Engram, EngramConfig
from engram_jax.hashing import NgramHasher
from engram_jax.table import Tables, TableState
from engram_jax.table_optim import RowOptimizer

__all__ = [
    "Compression",
    "ConfigError",
    "Decoder",
    "Engram",
    "EngramConfig",
    "NgramHasher",
    "RowOptimizer",
    "SamplingConfig",
    "TableState",
    "Tables",
    "compress_tokenizer",
    "configs",
]
__version__ = "0.1.0"

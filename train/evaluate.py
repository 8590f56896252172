"""Evaluation of a trained model: validation metrics, sampling, and the gate picture.

    engram-eval --checkpoint runs/tiny                       # loss, perplexity, bits/byte
    engram-eval --checkpoint runs/tiny --prompt "def main(" --prompt "import os" --max-new-tokens 40
    engram-eval --checkpoint runs/tiny --prompts-file prompts.txt --output out.jsonl --top-p 0.9 --temperature 0.8
    engram-eval --checkpoint runs/tiny --gates gates.png --prompt "import numpy as np"

Only the model's variables are restored (no optimizer state). Validation runs the same
function as training's periodic validation, on the same batches, so it reports the
loss that training logged at that step.
"""

from __future__ import annotations

import functools
import pathlib

import flax.linen as nn
import jax
import numpy as np
from tokenizers import Tokenizer

from engram_jax import data, model as model_lib, sharding, training
from engram_jax.checkpoint import CheckpointError, Checkpoints, UnreadableCheckpoint
from engram_jax.compression import compress_tokenizer
from engram_jax import hot_rows as hot_rows_lib
from engram_jax.decode import Decoder, SamplingConfig
from engram_jax.model import Model, ModelConfig
from train.run import RUNTIME_FIELDS, RunConfig, make_tables
from train.validation import Validation


# Tokens of the training split that `--hot-rows` counts rows over (NumPy hashes ~8M
# tokens/s on 2 cores: well under a second).
HOT_ROW_CALIBRATION = 2_000_000


class Trained:
    """A restored model: its run config, tokenizer, hasher and variables.

    A step that cannot be read is an error naming it and the steps that do read (each
    is tried), so that `--step N` can pick one; evaluation never switches step by itself.
    """

    def __init__(self, checkpoint: str | pathlib.Path, step: int | None = None, overrides: tuple[str, ...] = ()):
        path = pathlib.Path(checkpoint)
        if path.name.isdigit() and step is None:  # a step folder: runs/x/checkpoints/300
            step, path = int(path.name), path.parent
        if (path / "checkpoints").is_dir():
            path = path / "checkpoints"
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint at {checkpoint}")
        checkpoints = Checkpoints(path, read_only=True)
        try:
            self.step = checkpoints.resolve(step)
            try:
                self.config, self.mesh, self.tables, restored = _restore_model(checkpoints, self.step, tuple(overrides))
            except UnreadableCheckpoint as err:
                intact = [s for s in checkpoints.steps() if s != err.step and _restores(checkpoints, s)]
                which = (f"intact steps: {', '.join(map(str, sorted(intact)))}; --step N picks one" if intact
                         else "no other step reads either")
                raise CheckpointError(f"checkpoint {err.path} cannot be read ({which}): {err.reason}") from None
        finally:
            checkpoints.close()
        self.variables = {"params": restored["params"], "moe_bias": restored["moe_bias"]}
        self.rows = restored["tables"]
        tokenizer_file = path.parent / "tokenizer.json"
        self.tokenizer = (Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.is_file()
                          else data.load_tokenizer(self.config.data))
        self.hasher = None
        if self.config.model.engram is not None:
            lookup = compress_tokenizer(self.tokenizer, self.config.data.cache_root).lookup
            self.hasher = self.config.model.engram.make_hasher(lookup)

    def validate(self) -> dict:
        evaluate = jax.jit(functools.partial(training.eval_step, config=self.config.model, tables=self.tables,
                                             mesh=self.mesh))
        v = self.variables
        return Validation(self.config, self.tokenizer, self.hasher).metrics(
            lambda batch: evaluate(v["params"], v["moe_bias"], self.rows, batch), self.mesh)

    def apply(self, tokens, hash_ids, mutable=False):
        """The model on tokens [B, T] with their hash ids, the memory looked up from the tables."""
        memory, _ = training.lookup(self.tables, self.rows, {"hash_ids": hash_ids})
        return Model(self.config.model).apply(self.variables, tokens, memory, mutable=mutable)

    @functools.cached_property
    def _apply_with_intermediates(self):
        """`apply`, jitted once per model, also returning the sown intermediates (gates)."""
        return jax.jit(functools.partial(self.apply, mutable=["intermediates"]))

    def encode(self, text: str) -> list[int]:
        """The prompt's ids after an end-of-document id, as documents start in training."""
        start = data.eod_id(self.tokenizer, self.config.data.eod_token)
        return [start] + self.tokenizer.encode(text).ids

    def hash_window(self, tokens: list[int], position: int) -> dict[int, np.ndarray]:
        """Hash ids [H] of `position`, from it and the N - 1 tokens before it."""
        n = self.config.model.engram.max_ngram_size
        window = np.asarray(tokens[max(0, position - n + 1): position + 1])[None]  # [1, <= N]
        return {layer: ids[0, -1] for layer, ids in self.hasher(window).items()}

    @functools.cached_property
    def decoder(self) -> Decoder:
        """The KV-cached decoding engine over this model and its tables (`engram_jax.decode`)."""
        return Decoder(self.config.model, self.variables, self.tables, self.rows, self.hasher,
                       data.eod_id(self.tokenizer, self.config.data.eod_token), getattr(self, "hot_rows", None))

    def use_hot_rows(self, k: int, calibration_tokens: int = HOT_ROW_CALIBRATION) -> hot_rows_lib.HotRows:
        """Serves the k most addressed rows of each layer from device memory when generating
        (`engram_jax.hot_rows`), counted over the first `calibration_tokens` of the run's
        training split. For tables in host memory (`--set model.engram.placement=host`)."""
        engram = self.config.model.engram
        if k < 1:
            raise ValueError(f"--hot-rows must be >= 1, got {k}")
        if engram is None:
            raise ValueError("--hot-rows: this model has no Engram tables")
        if not self.tables.host:
            raise ValueError("--hot-rows caches tables in host memory; add --set model.engram.placement=host")
        for layer in engram.layer_ids:  # before reading the training split
            if k > engram.table_rows(layer):
                raise ValueError(f"--hot-rows {k:,} is larger than layer {layer}'s table of "
                                 f"{engram.table_rows(layer):,} rows")
        ids = data.tokenize_split(self.config.data, self.tokenizer, "train", limit=calibration_tokens)
        counts = hot_rows_lib.count_rows(self.hasher, [ids[i: i + 65_536] for i in range(0, ids.size, 65_536)],
                                         engram)
        self.hot_rows = hot_rows_lib.HotRows.build(counts, self.rows, engram, k)
        self.__dict__.pop("decoder", None)  # the next generation builds a decoder with the cache
        return self.hot_rows

    def generate(self, prompts: str | list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0, top_k: int = 0, top_p: float = 1.0,
                 cache_length: int | None = None) -> str | list[str]:
        """Continues each prompt, all in one batch (`Decoder.generate`): greedy at
        temperature 0, else sampled (with top_k / top_p filtering).

        Returns the prompt and its continuation as text (a list for a list of prompts).
        `last_generation` keeps the `Generation` (new ids, finished flags, seconds).
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = [self.encode(text) for text in texts]
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        out = self.decoder.generate(encoded, max_new_tokens, sampling, seed, cache_length)
        self.last_generation = out
        decoded = [self.tokenizer.decode(prompt[1:] + new) for prompt, new in zip(encoded, out.tokens)]
        return decoded[0] if isinstance(prompts, str) else decoded

    def gates(self, prompt: str) -> tuple[list[str], dict[int, np.ndarray]]:
        """Each token's text and `{layer: gate [T, G]}` of every Engram layer."""
        if self.hasher is None:
            raise ValueError("this model has no Engram, so there are no gates to show")
        tokens = np.asarray([self.encode(prompt)], np.int32)
        hash_ids = self.hasher(tokens)
        _, state = self._apply_with_intermediates(tokens, hash_ids)
        gates = {layer: np.asarray(gate[0])  # the one prompt: [T, G]
                 for layer, gate in training._per_layer(state["intermediates"], "gate").items()}
        pieces = [self.tokenizer.decode([t]) for t in tokens[0]]
        return pieces, gates


def _restore_model(checkpoints: Checkpoints, step: int, overrides: tuple[str, ...] = ()):
    """The run config (with `overrides`), mesh and table engine of `step`, and its restored
    `{"params", "moe_bias", "tables"}` (no optimizer state is read)."""
    config = RunConfig.from_dict(checkpoints.read_config(step))
    if overrides:
        # Only what changes how the model runs, not what it computes: other values would
        # restore the checkpoint's arrays into the shapes of another model.
        other = [o.split("=", 1)[0].strip() for o in overrides if o.split("=", 1)[0].strip() not in RUNTIME_FIELDS]
        if other:
            raise ValueError(f"--set {other[0]}: a checkpoint is evaluated with its own config; only the runtime "
                             f"settings {', '.join(RUNTIME_FIELDS)} can change")
        config = config.override(list(overrides))
    # This machine's devices, all on `data`, whatever the training mesh was: expert
    # kernels restore without the training mesh's padding experts, tables re-split.
    mesh = sharding.make_mesh(sharding.MeshConfig())
    tables = make_tables(config.replace(mesh=sharding.MeshConfig()), mesh)
    shapes = model_lib.variable_shapes(config.model)
    shardings = sharding.tree_shardings(mesh, sharding.logical_axes(shapes), nn.unbox(shapes))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(shapes), shardings)
    rows = tables.abstract_state().rows if tables else {}
    restored = checkpoints.restore_model({"params": abstract["params"], "moe_bias": abstract.get("moe_bias", {}),
                                          "tables": rows}, step)
    return config, mesh, tables, restored


def _restores(checkpoints: Checkpoints, step: int) -> bool:
    """Whether `step`'s model restores (read in full, then dropped)."""
    try:
        _restore_model(checkpoints, step)
    except CheckpointError:
        return False
    return True


def draw_gates(pieces_and_gates: list[tuple[list[str], np.ndarray]], path: str | pathlib.Path,
               title: str) -> None:
    """Tokens coloured by gate value (white 0 to red 1), one row per prompt (paper Fig. 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("Reds")
    rows = len(pieces_and_gates)
    height = 0.6 * rows + 1.6
    fig = plt.figure(figsize=(12, height))
    ax = fig.add_axes([0.02, 1.0 / height, 0.96, 0.6 * rows / height])
    ax.set_xlim(0, 1)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    renderer = fig.canvas.get_renderer()
    for row, (pieces, gate) in enumerate(pieces_and_gates):
        x = 0.0
        for piece, value in zip(pieces[1:], gate[1:]):  # the leading end-of-document id is not shown
            text = piece.replace("\n", "\u23ce").replace("\t", "\u21e5") or " "
            label = ax.text(x, row + 0.5, text, va="center", ha="left", family="monospace", fontsize=10,
                            bbox=dict(boxstyle="square,pad=0.15", facecolor=cmap(float(value)), edgecolor="white", linewidth=0.8))
            width = label.get_window_extent(renderer).transformed(ax.transData.inverted()).width
            x += width + 0.004
    bar = fig.add_axes([0.3, 0.45 / height, 0.4, 0.15 / height])
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=cmap),
                 cax=bar, orientation="horizontal", label="gate value")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def gate_picture(trained: Trained, prompts: list[str], path: str | pathlib.Path, layer: int | None = None,
                 branch: str = "mean") -> pathlib.Path:
    """Writes the gate picture of `prompts` for one Engram layer and branch (or their mean)."""
    cfg: ModelConfig = trained.config.model
    layer = cfg.engram.layer_ids[0] if layer is None else layer
    if layer not in cfg.engram.layer_ids:
        raise ValueError(f"layer {layer} has no Engram; Engram layers: {list(cfg.engram.layer_ids)}")
    rows = []
    for prompt in prompts:
        pieces, gates = trained.gates(prompt)
        g = gates[layer]  # [T, G]
        if branch == "mean":
            values = g.mean(axis=-1)
        else:
            if not (branch.isdigit() and int(branch) < g.shape[-1]):
                raise ValueError(f"branch must be 'mean' or 0..{g.shape[-1] - 1}, got {branch!r}")
            values = g[:, int(branch)]
        rows.append((pieces, values))
    which = "mean over branches" if branch == "mean" else f"branch {branch}"
    draw_gates(rows, path, f"Engram gates, layer {layer} ({which}), step {trained.step}")
    return pathlib.Path(path)

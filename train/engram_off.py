"""Engram switched off at inference: scores with and without Engram's output (paper Fig. 6).

    engram-eval --checkpoint runs/tiny --engram-off            # every Engram layer
    engram-eval --checkpoint runs/tiny --engram-off 1          # chosen layers (0-based ids)
    engram-eval --checkpoint runs/tiny --engram-off --corpus other_texts/

Switching Engram off replaces its output Y by zeros (`Model(..., engram_off=layers)`):
the same variables, every other computation unchanged. The paper suppresses the module's
output at inference and reports, per benchmark, the share of the score that remains.

`fraction kept` is off / on for a score where higher is better (accuracy) and on / off
for one where lower is better (a loss, bits per byte, perplexity): 1 means Engram's
output made no difference, below 1 that switching it off lost that share.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence

import jax

from engram_jax import training
from engram_jax.model import ModelConfig


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """`--engram-off`'s argument: None or "all" is every Engram layer; "1,15" chosen ids."""
    if text is None or text.strip() == "all":
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--engram-off takes 'all' or comma-separated layer ids, got {text!r}") from None


def engram_off_layers(config: ModelConfig, layers: Sequence[int] | None) -> tuple[int, ...]:
    """The Engram layer ids to switch off: all of them (layers None) or the chosen ones.

    Raises:
      ValueError: the model has no Engram, or a chosen id is not one of its Engram layers.
    """
    if config.engram is None:
        raise ValueError("Engram cannot be switched off: this model has no Engram layers")
    engram_layers = tuple(config.engram.layer_ids)
    if layers is None:
        return engram_layers
    if not layers:
        raise ValueError("--engram-off: no layer ids given")
    bad = [i for i in layers if i not in engram_layers]
    if bad:
        raise ValueError(f"Engram layer ids {bad} out of range: this model's Engram layers are "
                         f"{list(engram_layers)} (of layers 0..{config.num_layers - 1})")
    return tuple(sorted(set(layers)))


def fraction_kept(on: float, off: float, higher_is_better: bool) -> float:
    """The share of the score that remains with Engram off (see the module docstring)."""
    num, den = (off, on) if higher_is_better else (on, off)
    return num / den if den else float("nan")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One score with Engram on and off.

    Attributes:
      name: the corpus or task.
      metric: what is scored (e.g. "val_bits_per_byte", "acc").
      on, off: the score with Engram, and with the chosen layers' output zeroed.
      higher_is_better: the score's direction.
    """

    name: str
    metric: str
    on: float
    off: float
    higher_is_better: bool

    @property
    def kept(self) -> float:
        return fraction_kept(self.on, self.off, self.higher_is_better)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "kept": self.kept}


def validation_metrics(trained, engram_off: tuple[int, ...] = (), source: str | None = None) -> dict:
    """`Trained.validate`'s metrics with `engram_off` layers' output zeroed, on the run's
    validation split or on the held-out split of another corpus `source` (a path read
    with the run's data settings and tokenizer).

    Args:
      trained: a restored `train.evaluate.Trained`.
    """
    from train.validation import Validation

    config = trained.config
    if source is not None:
        config = config.replace(data=config.data.replace(source=source))
    # One jitted step per model and set of layers, whatever the corpus: compiled once.
    steps = trained.__dict__.setdefault("_engram_off_steps", {})
    key = tuple(engram_off)
    if key not in steps:
        steps[key] = jax.jit(functools.partial(training.eval_step, config=config.model, tables=trained.tables,
                                               mesh=trained.mesh, engram_off=key))
    evaluate = steps[key]
    v = trained.variables
    return Validation(config, trained.tokenizer, trained.hasher).metrics(
        lambda batch: evaluate(v["params"], v["moe_bias"], trained.rows, batch), trained.mesh)


# Validation metrics compared on and off, and their direction (all lower is better).
VALIDATION_METRICS = ("val_loss", "val_bits_per_byte")


def validation_comparison(trained, layers: Sequence[int] | None = None,
                          corpora: Sequence[str] = ()) -> list[Comparison]:
    """Validation loss and bits per byte with Engram on and off, on the run's validation
    split ("validation") and on each corpus in `corpora`."""
    off = engram_off_layers(trained.config.model, layers)
    rows = []
    for source in (None, *corpora):
        on_metrics = validation_metrics(trained, (), source)
        off_metrics = validation_metrics(trained, off, source)
        rows += [Comparison(source or "validation", m, on_metrics[m], off_metrics[m], False)
                 for m in VALIDATION_METRICS]
    return rows


def format_table(rows: Sequence[Comparison], off: Sequence[int]) -> str:
    """A plain-text table: name, metric, on, off, fraction kept."""
    width = max([len(r.name) for r in rows] + [len("corpus/task")])
    metric_width = max([len(r.metric) for r in rows] + [len("metric")])
    lines = [f"Engram off at layers {list(off)}",
             f"{'corpus/task':<{width}}  {'metric':<{metric_width}}  {'on':>9}  {'off':>9}  {'kept':>6}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.metric:<{metric_width}}  {r.on:9.4f}  {r.off:9.4f}  {r.kept:6.3f}")
    return "\n".join(lines)


def results_folder(checkpoint: str | pathlib.Path) -> pathlib.Path:
    """Where evaluation results go: `<run folder>/eval`, beside its checkpoints folder
    (`checkpoint` is a run folder, its checkpoints folder or a step folder)."""
    path = pathlib.Path(checkpoint)
    if path.name.isdigit():
        path = path.parent
    if path.name == "checkpoints":
        path = path.parent
    return path / "eval"


def write_json(path: pathlib.Path, payload: dict) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path

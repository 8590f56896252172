"""Ablations of Engram's parts (paper Fig. 5): each variant against the default, same steps and data.

    python benchmarks/sweep_ablations.py                                 # every variant, tiny, 400 steps, seed 0
    python benchmarks/sweep_ablations.py --variants default,no_gating --steps 200
    python benchmarks/sweep_ablations.py --redraw                        # one plot of what is recorded

Each variant is `--set` overrides of the preset (below). Every run is a plain `train()`
(compare_engram.py's `_train_and_record`: the same data order, tokenizer and validation
batches for all), recorded to `--record` (default `benchmarks/runs/ablations`) as
`<preset>_<variant>_steps<steps>_seed<seed>/` (config and metrics). Prints one JSON
object with every variant's final validation loss and its difference from the
default's, and draws them as bars into `--out`.

Caveats, for reading the numbers: the N-gram order variants keep the total table rows
of the preset's two orders and the width per order, so their memory vector d_mem (and
Engram's activated parameters) changes with N; "single_branch" gates one stream, read
and written by an mHC map of its own (more parameters, `EngramConfig.multi_branch`).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from compare_engram import _recorded_final, _train_and_record

from train.run import run_preset

# The tiny preset's Engram: layers (1, 3), N = 3, 10,007 base rows per head per order.
VARIANTS = {
    "default": [],
    "no_gating": ["model.engram.gating=false"],
    "no_compression": ["model.engram.compress_tokens=false"],
    "no_short_conv": ["model.engram.short_conv=false"],
    "single_branch": ["model.engram.multi_branch=false"],
    "max_n_2": ["model.engram.max_ngram_size=2", "model.engram.table_sizes=20011"],
    "max_n_4": ["model.engram.max_ngram_size=4", "model.engram.table_sizes=6673,6673,6673"],
    "layers_0_2": ["model.engram.layer_ids=0,2"],
    "layers_2_3": ["model.engram.layer_ids=2,3"],
}


def draw_bars(finals: dict[str, float], title: str, out: pathlib.Path) -> None:
    """Final validation loss per variant, the default's as a dashed line."""
    names = list(finals)
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(names) + 1.2), dpi=120)
    ax.barh(names, [finals[n] for n in names], color=["C1" if n == "default" else "C0" for n in names])
    if "default" in finals:
        ax.axvline(finals["default"], color="C1", linestyle="--", linewidth=1)
    low = min(finals.values())
    ax.set_xlim(low - 0.1 * abs(low), max(finals.values()) + 0.02 * abs(low))
    ax.invert_yaxis()
    ax.set_xlabel("final validation loss (nats/token)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="a preset whose Engram matches VARIANTS' overrides")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="key=value for every run")
    parser.add_argument("--record", type=pathlib.Path, default=pathlib.Path("benchmarks/runs/ablations"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/ablations.png"))
    parser.add_argument("--redraw", action="store_true", help="train nothing: redraw from the recorded runs")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    lr = run_preset(args.config).optim.learning_rate

    runs = {}
    for variant in variants:
        label = f"{args.config}_{variant}_steps{args.steps}_seed{args.seed}"
        record = args.record / label
        if args.redraw:
            if not (record / "metrics.jsonl").is_file():
                continue
            runs[variant] = _recorded_final(record)
        else:
            run_args = argparse.Namespace(steps=args.steps, overrides=[*VARIANTS[variant], *args.overrides])
            runs[variant] = _train_and_record(args.config, args.seed, lr, run_args, record)
            print(json.dumps({"run": label, **runs[variant]}), flush=True)
    if not runs:
        raise SystemExit(f"--redraw: no recorded run of these variants in {args.record}")
    finals = {v: r["val_loss"] for v, r in runs.items()}
    draw_bars(finals, f"{args.config}: Engram ablations, {args.steps} steps, seed {args.seed}", args.out)
    default = finals.get("default")
    print(json.dumps({"benchmark": "sweep_ablations", "config": args.config, "steps": args.steps, "seed": args.seed,
                      "overrides": args.overrides, "runs": runs,
                      "minus_default": {v: f - default for v, f in finals.items()} if default is not None else None,
                      "plot": str(args.out)}, indent=1))


if __name__ == "__main__":
    main()

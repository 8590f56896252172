"""Does Engram help? Trains a preset and its iso-parameter baseline on the same data, seed by seed.

    python benchmarks/compare_engram.py                                  # tiny vs tiny-baseline, seed 0, 400 steps
    python benchmarks/compare_engram.py --learning-rates 1.5e-3,3e-3,6e-3,1.2e-2   # the sweep
    python benchmarks/compare_engram.py --seeds 1 --learning-rates 3e-3,6e-3        # a second seed
    python benchmarks/compare_engram.py --steps 1200 --set eval_every=200            # longer
    python benchmarks/compare_engram.py --redraw --seeds 0,1 --learning-rates 1.5e-3,3e-3,6e-3,1.2e-2
                                                                   # one plot of what is recorded

Each run is a plain `train()` of the run preset (same data order, tokenizer and
validation batches for both models of a pair). A seed sets both the parameter
initialisation (`seed`) and the data order (`data.seed`). Every run's metrics and config
are copied to `--record` (default `benchmarks/runs/compare`) as
`<preset>_lr<lr>_steps<steps>_seed<seed>/`, so that the figures in RESULTS.md are
reproducible from the repository. Prints one JSON object with every run's final
validation loss and bits per byte and the baseline-minus-Engram gap of every pair, and
draws into `--out` the validation curves or, for more than one learning rate, final loss
against learning rate.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from plot_runs import draw

from train.run import run_preset, train


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _recorded_final(record: pathlib.Path) -> dict:
    """The last validation of a recorded run."""
    lines = [json.loads(line) for line in (record / "metrics.jsonl").read_text().splitlines()]
    last = [line for line in lines if "val_loss" in line][-1]
    return {"val_loss": last["val_loss"], "val_bits_per_byte": last.get("val_bits_per_byte")}


def _train_and_record(name: str, seed: int, lr: float, args: argparse.Namespace,
                      record: pathlib.Path) -> dict:
    """Trains one run in a scratch folder; copies its metrics and config to `record`."""
    config = run_preset(name).override([f"steps={args.steps}", f"seed={seed}", f"data.seed={seed}",
                                        f"optim.learning_rate={lr}", *args.overrides])
    config = config.replace(eval_every=min(config.eval_every, args.steps), save_every=args.steps)
    with tempfile.TemporaryDirectory() as scratch:
        final = train(config, pathlib.Path(scratch) / record.name)
        record.mkdir(parents=True, exist_ok=True)
        for file in ("metrics.jsonl", "config.json"):
            shutil.copy(pathlib.Path(scratch) / record.name / file, record / file)
    return {"val_loss": final["val_loss"], "val_bits_per_byte": final.get("val_bits_per_byte")}


def draw_sweep(finals: dict, config: str, out: pathlib.Path) -> None:
    """Final validation loss against learning rate, one line per model and seed."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    names, seeds = sorted({n for n, _ in finals}), sorted({s for _, s in finals})
    for (name, seed), by_lr in sorted(finals.items()):  # colour: the model; line style: the seed
        lrs = sorted(by_lr)
        ax.plot(lrs, [by_lr[lr] for lr in lrs], marker="o", color=f"C{names.index(name)}",
                linestyle=("-", "--", ":", "-.")[seeds.index(seed) % 4], label=f"{name} seed {seed}")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(f"{config} against {config}-baseline: learning-rate sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="a preset with Engram; its '-baseline' is the pair")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (initialisation and data order)")
    parser.add_argument("--learning-rates", default="", help="comma-separated peak learning rates "
                        "(default: the preset's)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="key=value for every run")
    parser.add_argument("--record", type=pathlib.Path, default=pathlib.Path("benchmarks/runs/compare"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/compare.png"))
    parser.add_argument("--redraw", action="store_true", help="train nothing: redraw from the runs recorded in "
                        "--record (those not recorded are left out), e.g. seeds run by separate calls in one plot")
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",") if s]
    preset_lr = run_preset(args.config).optim.learning_rate
    learning_rates = _floats(args.learning_rates) or [preset_lr]
    models = (args.config, f"{args.config}-baseline")

    runs, folders, finals = {}, [], {}
    for seed in seeds:
        for lr in learning_rates:
            for name in models:
                label = f"{name}_lr{lr:g}_steps{args.steps}_seed{seed}"
                record = args.record / label
                if args.redraw:
                    if not (record / "metrics.jsonl").is_file():
                        continue  # not recorded: left out of the plot
                    runs[label] = _recorded_final(record)
                else:
                    runs[label] = _train_and_record(name, seed, lr, args, record)
                    print(json.dumps({"run": label, **runs[label]}), flush=True)
                finals.setdefault((name, seed), {})[lr] = runs[label]["val_loss"]
                folders.append(record)

    if not runs:
        raise SystemExit(f"--redraw: no recorded run of these seeds and learning rates in {args.record}")
    gaps = {f"lr{lr:g}_seed{seed}": finals[(models[1], seed)][lr] - finals[(models[0], seed)][lr]
            for seed in seeds for lr in learning_rates
            if lr in finals.get((models[0], seed), {}) and lr in finals.get((models[1], seed), {})}
    if len(learning_rates) > 1:
        draw_sweep(finals, args.config, args.out)
    else:
        draw(folders, args.out, f"{args.config} against {args.config}-baseline, {args.steps} steps")
    print(json.dumps({"benchmark": "compare_engram", "config": args.config, "steps": args.steps,
                      "overrides": args.overrides, "runs": runs, "baseline_minus_engram": gaps,
                      "plot": str(args.out)}, indent=1))


if __name__ == "__main__":
    main()

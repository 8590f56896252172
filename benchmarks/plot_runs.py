"""Validation loss against tokens seen, for run folders written by `engram-train`.

    python benchmarks/plot_runs.py runs/tiny runs/tiny-baseline --out compare.png

Prints one JSON line per run (its last validation) and draws every run's validation
curve into one PNG.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def validations(run: pathlib.Path) -> tuple[list[int], list[float]]:
    """(tokens seen, validation loss) at every validation of the run in `run`."""
    config = json.loads((run / "config.json").read_text())
    tokens_per_step = config["data"]["batch_size"] * config["data"]["seq_len"]
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            by_step[record["step"]] = record["val_loss"]  # a resumed run may repeat a step
    steps = sorted(by_step)
    if not steps:
        raise SystemExit(f"{run}: no validation in metrics.jsonl")
    return [s * tokens_per_step for s in steps], [by_step[s] for s in steps]


def draw(runs: list[pathlib.Path], out: pathlib.Path, title: str = "validation loss") -> None:
    """Every run's validation curve in one PNG; prints each run's last validation."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for run in runs:
        tokens, losses = validations(run)
        ax.plot([t / 1e6 for t in tokens], losses, marker="o", label=run.name)
        print(json.dumps({"run": str(run), "tokens": tokens[-1], "val_loss": losses[-1]}))
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    print(json.dumps({"plot": str(out)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="run folders (with config.json, metrics.jsonl)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("val_loss.png"))
    parser.add_argument("--title", default="validation loss")
    args = parser.parse_args()
    draw(args.runs, args.out, args.title)


if __name__ == "__main__":
    main()

"""Does Engram help? Trains a preset and its iso-parameter baseline on the same data, seed by seed.

    python benchmarks/compare_engram.py                          # tiny vs tiny-baseline, seed 0, 400 steps
    python benchmarks/compare_engram.py --seeds 0,1 --steps 1200 --set optim.learning_rate=3e-3

Each run is a plain `train()` of the run preset (same data order, tokenizer and
validation batches for both models); its metrics and config are copied to
`--record` (default `benchmarks/runs/compare`), so that the figures in RESULTS.md are
reproducible from the repository. Prints one JSON object with the final validation
losses and their differences, and draws the validation curves into `--out`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import tempfile

from plot_runs import draw

from train.run import run_preset, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="a preset with Engram; its '-baseline' is the pair")
    parser.add_argument("--seeds", default="0", help="comma-separated parameter seeds")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="key=value for both runs")
    parser.add_argument("--record", type=pathlib.Path, default=pathlib.Path("benchmarks/runs/compare"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/compare.png"))
    args = parser.parse_args()

    results, folders = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in (args.config, f"{args.config}-baseline"):
                config = run_preset(name).override([f"steps={args.steps}", f"seed={seed}", *args.overrides])
                config = config.replace(eval_every=min(config.eval_every, args.steps),
                                        save_every=args.steps)
                final = train(config, pathlib.Path(scratch) / f"{name}_seed{seed}")
                record = args.record / f"{name}_seed{seed}"
                record.mkdir(parents=True, exist_ok=True)
                for file in ("metrics.jsonl", "config.json"):
                    shutil.copy(pathlib.Path(scratch) / f"{name}_seed{seed}" / file, record / file)
                results[f"{name}_seed{seed}"] = final["val_loss"]
                folders.append(record)
    gaps = {f"seed{s}": results[f"{args.config}-baseline_seed{s}"] - results[f"{args.config}_seed{s}"]
            for s in args.seeds.split(",")}
    draw(folders, args.out, f"{args.config} against {args.config}-baseline")
    print(json.dumps({"benchmark": "compare_engram", "steps": args.steps, "overrides": args.overrides,
                      "val_loss": results, "baseline_minus_engram": gaps, "plot": str(args.out)}, indent=1))


if __name__ == "__main__":
    main()

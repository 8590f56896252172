"""Ablations of Engram's parts (paper Fig. 5), or its table size alone (Fig. 3 right), at the same steps and data.

    python benchmarks/sweep_engram.py                                 # every variant, tiny, 400 steps, seed 0
    python benchmarks/sweep_engram.py --variants default,no_gating --steps 200
    python benchmarks/sweep_engram.py --sweep table_size              # rows x 1/4 .. 16, backbone fixed
    python benchmarks/sweep_engram.py --sweep allocation --seed 1     # memory's share of the sparse budget
    python benchmarks/sweep_engram.py --redraw                        # one plot of what is recorded
    python benchmarks/sweep_engram.py --set data.source=prose.jsonl.gz --record benchmarks/runs/ablations_prose
                                            # another corpus (benchmarks/prose_corpus.py writes this one)

Each variant is `--set` overrides of the preset (below). Every run is a plain `train()`
(compare_engram.py's `_train_and_record`: the same data order, tokenizer and validation
batches for all), recorded to `--record` (default `benchmarks/runs/ablations`) as
`<preset>_<variant>_steps<steps>_seed<seed>/` (config and metrics). Prints one JSON
object with every variant's final validation loss and its difference from the
default's (rows_x1 for the table sweep, memory_0pct for the allocation), and draws them
into `--out`. The ablation and table-size overrides are written for `tiny`'s Engram.

Caveats, for reading the numbers: the allocation's rho = 1 point is the baseline preset,
whose activated parameters lack Engram's own projections (a few percent of tiny's), and
one seed per call (`--seed 1` records a second; the allocation plot draws every recorded
seed and their mean); the N-gram
order variants keep the total table rows of the preset's two orders and the width per
order, so their memory vector d_mem (and Engram's activated parameters) changes with N;
"single_branch" gates one stream, read and written by an mHC map of its own (more
parameters, `EngramConfig.multi_branch`).
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

# The table alone from 1/4 to 16 times the preset's rows per head (backbone fixed):
# base sizes of both orders scaled (each head then takes its own prime above the base).
TABLE_SCALES = (0.25, 0.5, 1, 2, 4, 8, 16)
TINY_ROWS = 10_007
TABLE_SIZE_VARIANTS = {f"rows_x{m:g}": [f"model.engram.table_sizes={round(TINY_ROWS * m)},{round(TINY_ROWS * m)}"]
                       for m in TABLE_SCALES}


# Routed experts' share rho of the sparse budget (eq. 7): memory takes 1 - rho, 0% to 80%.
ALLOCATION_RHOS = (1.0, 0.8, 0.6, 0.4, 0.25, 0.2)


def allocation_variants(config: str) -> dict[str, tuple[str, list[str]]]:
    """{name: (preset, overrides)} at the preset's total and activated parameters (without
    embedding and LM head): `allocate_sparsity` sets the routed experts and the table rows;
    rho = 1 is the `-baseline` preset (no Engram) with that many experts."""
    from engram_jax.model import allocate_sparsity, count_params

    base = run_preset(config).model
    count = count_params(base)
    total, activated = count.total - count.embedding - count.lm_head, count.activated - count.lm_head
    variants = {}
    for rho in ALLOCATION_RHOS:
        experts, rows = allocate_sparsity(base, total, activated, rho)
        name = f"memory_{round(100 * (1 - rho))}pct"
        if rows == 0:
            variants[name] = (f"{config}-baseline", [f"model.moe.num_experts={experts}"])
        else:
            sizes = ",".join([str(rows)] * len(base.engram.table_sizes))
            variants[name] = (config, [f"model.moe.num_experts={experts}", f"model.engram.table_sizes={sizes}"])
    return variants


def _draw_line(points: list[tuple[float, float]] | dict[str, list[tuple[float, float]]], xlabel: str, title: str,
               out: pathlib.Path, log_x: bool = False) -> None:
    """Final validation loss (y) against one swept quantity (x); a dict draws one labelled
    line per entry (e.g. per seed)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, line in (points.items() if isinstance(points, dict) else [(None, points)]):
        ax.plot([x for x, _ in line], [f for _, f in line], marker="o", label=label)
    if isinstance(points, dict):
        ax.legend()
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def draw_allocation(finals: dict[int, dict[str, float]], title: str, out: pathlib.Path) -> None:
    """Final validation loss against memory's share of the sparse budget (Fig. 3 left),
    one line per seed ({seed: {variant: loss}}) and their mean where every seed has the point."""
    def share(v: str) -> int:
        return int(v.removeprefix("memory_").removesuffix("pct"))

    lines = {f"seed {seed}": sorted((share(v), f) for v, f in by.items()) for seed, by in sorted(finals.items())}
    if len(finals) > 1:
        common = set.intersection(*(set(by) for by in finals.values()))
        lines["mean"] = sorted((share(v), sum(by[v] for by in finals.values()) / len(finals)) for v in common)
    _draw_line(lines, "memory's share of the sparse parameters, % (1 - rho)", title, out)


def draw_table_size(finals: dict[str, float], title: str, out: pathlib.Path) -> None:
    """Final validation loss against rows per head, on a log axis."""
    points = sorted((round(TINY_ROWS * float(v.removeprefix("rows_x"))), f) for v, f in finals.items())
    _draw_line(points, "base rows per hash head (each order)", title, out, log_x=True)


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
    parser.add_argument("--sweep", choices=("ablations", "table_size", "allocation"), default="ablations")
    parser.add_argument("--variants", help="comma-separated subset (default: all of the sweep's), of: "
                        + ", ".join([*VARIANTS, *TABLE_SIZE_VARIANTS]))
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="key=value for every run")
    parser.add_argument("--record", type=pathlib.Path, default=pathlib.Path("benchmarks/runs/ablations"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/ablations.png"))
    parser.add_argument("--redraw", action="store_true", help="train nothing: redraw from the recorded runs")
    args = parser.parse_args()
    table = {"ablations": VARIANTS, "table_size": TABLE_SIZE_VARIANTS}.get(args.sweep) or allocation_variants(args.config)
    variants = [v for v in (args.variants or ",".join(table)).split(",") if v]
    unknown = [v for v in variants if v not in table]
    if unknown:
        raise SystemExit(f"unknown {args.sweep} variant(s) {', '.join(unknown)}; known: {', '.join(table)}")
    if args.sweep != "ablations" and args.out == pathlib.Path("benchmarks/ablations.png"):
        args.out = pathlib.Path(f"benchmarks/{args.sweep}.png")
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
            preset, overrides = table[variant] if isinstance(table[variant], tuple) else (args.config, table[variant])
            run_args = argparse.Namespace(steps=args.steps, overrides=[*overrides, *args.overrides])
            runs[variant] = _train_and_record(preset, args.seed, lr, run_args, record)
            print(json.dumps({"run": label, **runs[variant]}), flush=True)
    if not runs:
        raise SystemExit(f"--redraw: no recorded run of these variants in {args.record}")
    finals = {v: r["val_loss"] for v, r in runs.items()}
    what = f"{args.steps} steps, seed {args.seed}"
    source = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("data.source=")), None)
    if source:  # the corpus in the title when it is not the default
        what += f", {pathlib.Path(source).name}"
    if args.sweep == "ablations":
        draw_bars(finals, f"{args.config}: Engram ablations, {what}", args.out)
    elif args.sweep == "table_size":
        draw_table_size(finals, f"{args.config}: table size alone, {what}", args.out)
    else:  # every recorded seed of these variants, one line each
        by_seed = {args.seed: finals}
        for path in sorted(args.record.glob(f"{args.config}*_steps{args.steps}_seed*")):
            seed = int(path.name.rsplit("_seed", 1)[1])
            variant = next((v for v in variants if path.name.endswith(f"_{v}_steps{args.steps}_seed{seed}")), None)
            if seed != args.seed and variant and (path / "metrics.jsonl").is_file():
                by_seed.setdefault(seed, {})[variant] = _recorded_final(path)["val_loss"]
        seeds = ", ".join(map(str, sorted(by_seed)))
        draw_allocation(by_seed, f"{args.config}: experts against memory, {args.steps} steps, "
                        f"seed{'s' if len(by_seed) > 1 else ''} {seeds}", args.out)
    default = finals.get("default", finals.get("rows_x1", finals.get("memory_0pct")))
    print(json.dumps({"benchmark": f"sweep_{args.sweep}", "config": args.config, "steps": args.steps, "seed": args.seed,
                      "overrides": args.overrides, "runs": runs,
                      "minus_default": {v: f - default for v, f in finals.items()} if default is not None else None,
                      "plot": str(args.out)}, indent=1))


if __name__ == "__main__":
    main()

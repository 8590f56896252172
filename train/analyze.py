"""`engram-analyze`: LogitLens, CKA against a baseline, and the gate picture (paper Fig. 4, 7).

    engram-analyze --checkpoint runs/tiny                                  # LogitLens and gates
    engram-analyze --checkpoint runs/tiny --baseline runs/tiny-baseline    # and CKA, alignment

Both models read the same held-out text: the first validation batches of the Engram
run (its data settings and tokenizer), up to `--max-tokens` tokens. Writes
`logit_lens.png`, `cka.png` (with a baseline), `gates.png` (with Engram) and
`analysis.json` with the numbers into `--out` (default `<run>/eval/analysis`).
The baseline must have the same number of layers and the same tokenizer.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np

from engram_jax import analysis, data, sharding, training

DEFAULT_PROMPTS = ["import numpy as np", "def __init__(self, config):", "for i in range(len(x)):"]


def held_out_batches(trained, max_tokens: int) -> list[dict]:
    """The Engram run's first validation batches, together at least `max_tokens` tokens
    (or the whole split if it is smaller)."""
    pipeline = data.Pipeline(trained.config.data, trained.tokenizer, trained.hasher, "validation")
    per_batch = trained.config.data.batch_size * trained.config.data.seq_len
    iterator = pipeline.iterator(max(1, -(-max_tokens // per_batch)))
    try:
        return list(iterator)
    finally:
        iterator.close()


def check_comparable(trained, baseline) -> None:
    """Raises ValueError unless the two models can be compared layer by layer on one text."""
    a, b = trained.config.model, baseline.config.model
    if a.num_layers != b.num_layers:
        raise ValueError(f"the baseline has {b.num_layers} layers and the Engram model {a.num_layers}: "
                         "CKA compares models of the same depth")
    if trained.tokenizer.to_str() != baseline.tokenizer.to_str():
        raise ValueError("the baseline's tokenizer differs from the Engram model's: they must read the same tokens")


def model_pass(trained, batches: list[dict]) -> tuple[dict, np.ndarray]:
    """LogitLens per layer (mean KL in nats and top-1 agreement) and the layers' streams
    [L, n, D] (float32, on the host) of `trained` over `batches`."""
    config = trained.config.model

    @jax.jit
    def run(variables, rows, batch):
        memory, _ = training.lookup(trained.tables, rows, batch)
        streams, logits = analysis.layer_streams(config, variables, batch["inputs"], memory,
                                                 batch.get("segment_ids"), batch.get("positions"))
        return streams, analysis.logit_lens(config, variables["params"], streams, logits)

    totals, kept = None, []
    for batch in batches:
        streams, lens = run(trained.variables, trained.rows, sharding.global_batch(trained.mesh, batch))
        lens = jax.device_get(lens)
        totals = lens if totals is None else jax.tree.map(np.add, totals, lens)
        streams = np.asarray(streams, np.float32)  # [L, B, T, D]
        kept.append(streams.reshape(streams.shape[0], -1, streams.shape[-1]))  # [L, B T, D]
    tokens = float(totals["tokens"])
    lens = {"kl": (np.asarray(totals["kl_sum"]) / tokens).tolist(),
            "top1": (np.asarray(totals["top1_sum"]) / tokens).tolist(), "tokens": int(tokens)}
    return lens, np.concatenate(kept, axis=1)


def analyze(trained, baseline=None, max_tokens: int = 4096, k: int = 3) -> tuple[dict, dict[str, np.ndarray]]:
    """LogitLens of both models and, with a baseline, CKA [L, L] (Engram layers x
    baseline layers) and the soft alignment index per Engram layer.

    Returns:
      (the JSON-able numbers, the streams {"engram": [L, n, D], "baseline": ...}).
    """
    if baseline is not None:
        check_comparable(trained, baseline)
    batches = held_out_batches(trained, max_tokens)
    lens, streams = model_pass(trained, batches)
    result = {"engram": {"name": trained.config.name, "step": trained.step, "engram_layers":
                         list(trained.config.model.engram.layer_ids) if trained.config.model.engram else [],
                         **lens}}
    kept = {"engram": streams}
    if baseline is not None:
        base_lens, base_streams = model_pass(baseline, batches)
        result["baseline"] = {"name": baseline.config.name, "step": baseline.step, **base_lens}
        kept["baseline"] = base_streams
        cka = jax.jit(analysis.cka_matrix)(streams, base_streams)  # [L, L]
        result["cka"] = np.asarray(cka).tolist()
        result["alignment"] = np.asarray(analysis.soft_alignment(cka, k)).tolist()
        result["alignment_k"] = k
    return result, kept


def plot_logit_lens(result: dict, path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_ax, top_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("engram", "baseline"):
        if key in result:
            layers = range(len(result[key]["kl"]))
            label = f"{result[key]['name']} (step {result[key]['step']})"
            kl_ax.plot(layers, result[key]["kl"], marker="o", label=label)
            top_ax.plot(layers, result[key]["top1"], marker="o", label=label)
    kl_ax.set(xlabel="layer", ylabel="KL(final || layer), nats", title="LogitLens: KL to the final distribution")
    top_ax.set(xlabel="layer", ylabel="top-1 agreement", title="LogitLens: top-1 agrees with the final", ylim=(0, 1.02))
    kl_ax.legend()
    for ax in (kl_ax, top_ax):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cka(result: dict, path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cka = np.asarray(result["cka"])  # [L engram, L baseline]
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    image = ax.imshow(cka, origin="lower", vmin=0, vmax=1, cmap="viridis")
    layers = np.arange(cka.shape[0])
    ax.plot([0, cka.shape[1] - 1], [0, cka.shape[0] - 1], color="white", linestyle="--", linewidth=1)
    ax.plot(result["alignment"], layers, "o", color="red", label=f"soft alignment (top-{result['alignment_k']})")
    ax.set(xlabel=f"baseline layer ({result['baseline']['name']})", ylabel=f"Engram layer ({result['engram']['name']})",
           title="linear CKA")
    ax.legend(loc="upper left", fontsize=8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engram-analyze", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the (Engram) run folder, checkpoints folder or step")
    parser.add_argument("--step", type=int, help="its step (default: the latest)")
    parser.add_argument("--baseline", help="a baseline run to compare with by CKA (same depth and tokenizer)")
    parser.add_argument("--baseline-step", type=int, help="the baseline's step (default: the latest)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens read (default 4096)")
    parser.add_argument("--top-k", type=int, default=3, help="baseline layers in the soft alignment (default 3)")
    parser.add_argument("--prompt", action="append", default=[], help="a gate-picture prompt (repeatable)")
    parser.add_argument("--out", help="output folder (default <run>/eval/analysis)")
    args = parser.parse_args(argv)
    from train.engram_off import results_folder
    from train.main import USER_ERRORS, _fail, _setup_logging

    try:
        from train.evaluate import Trained, gate_picture

        if args.max_tokens < 1 or args.top_k < 1:
            raise ValueError("--max-tokens and --top-k must be >= 1")
        _setup_logging()
        trained = Trained(args.checkpoint, args.step)
        baseline = Trained(args.baseline, args.baseline_step) if args.baseline else None
        if baseline is not None:
            check_comparable(trained, baseline)  # before any model runs
        out = pathlib.Path(args.out) if args.out else results_folder(args.checkpoint) / "analysis"
        out.mkdir(parents=True, exist_ok=True)
        result, _ = analyze(trained, baseline, args.max_tokens, args.top_k)
        written = [plot_logit_lens(result, out / "logit_lens.png")]
        if baseline is not None:
            written.append(plot_cka(result, out / "cka.png"))
        if trained.hasher is not None:
            written.append(gate_picture(trained, args.prompt or DEFAULT_PROMPTS, out / "gates.png"))
        (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
        written.append(out / "analysis.json")
    except USER_ERRORS as err:
        return _fail("engram-analyze", err)
    print(format_summary(result))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def format_summary(result: dict) -> str:
    """One line per layer: KL and top-1 of each model, CKA peak and alignment."""
    names = [k for k in ("engram", "baseline") if k in result]
    header = "layer" + "".join(f"  {result[k]['name'][:14]:>14} KL  top-1" for k in names)
    if "alignment" in result:
        header += "  aligned to baseline layer"
    lines = [header]
    for layer in range(len(result["engram"]["kl"])):
        line = f"{layer:>5}" + "".join(f"  {result[k]['kl'][layer]:17.4f}  {result[k]['top1'][layer]:5.3f}" for k in names)
        if "alignment" in result:
            line += f"  {result['alignment'][layer]:.2f}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

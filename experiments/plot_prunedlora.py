"""
Figures of the PrunedLoRA table (experiments/table_prunedlora.py), from its per-run results <row>-s<seed>.json:

    python experiments/plot_prunedlora.py [--results results/prunedlora]

predicted_vs_actual.png: every pruning event of the main comparison (rows *_64to8 and abl_no_gradient_term:
one row per score method, seeds pooled), predicted against actual held-out loss change, one marker per method
(the prediction is the same Fisher quadratic model of the change of B for every method); the legend has each
method's Spearman over its events. final_ranks_global.png: the final rank of every adapter of row abl_global
(its lowest seed), layers x projections. Both go into the results folder; a one-line summary per method is
printed. Needs matplotlib (pip install matplotlib), which the project itself does not.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

from plotting import pyplot, save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prunedlora import spearman  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def events_by_method(results):
    """{method: [(predicted, actual)]} of the main comparison's rows; events without a finite pair are left out."""
    out = {}
    for r in results:
        if r["row"].endswith("_64to8") or r["row"] == "abl_no_gradient_term":
            out.setdefault(r["overrides"].get("rank_method", "prunedlora"), []).extend(
                (e["predicted"], e["actual"]) for e in r["events"] if math.isfinite(e["predicted"] + e["actual"]))
    return {method: pairs for method, pairs in sorted(out.items()) if pairs}


def plot_events(plt, by_method, command, out):
    fig, ax = plt.subplots(figsize=(7, 6))
    lim = max(abs(v) for pairs in by_method.values() for pair in pairs for v in pair)
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=1, ls="--", label="y = x")
    for (method, pairs), marker in zip(by_method.items(), "osD^v<>pPX*h"):
        rho = spearman(*zip(*pairs)) if len(pairs) > 2 else math.nan
        ax.scatter(*zip(*pairs), s=18, marker=marker, alpha=0.7, label=f"{method} (Spearman {rho:.2f}, n={len(pairs)})")
        print(f"{method:>18}: {len(pairs)} events, Spearman {rho:.3f}, sum predicted {sum(p for p, _ in pairs):.4g}, "
              f"sum actual {sum(a for _, a in pairs):.4g}")
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set(xlabel="predicted held-out loss change per event", ylabel="actual held-out loss change per event")
    get = lambda k: (re.search(rf"--{k}=(\S+)", command) or [None, "?"])[1]
    ax.set_title(f"SmolLM2-135M-Instruct, GSM8K, {get('max_iters')} steps of {get('batch_size')} x "
                 f"{get('block_size')} tokens: predicted vs actual loss change", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, out)


def rank_grid(result):
    """layers x PROJ final ranks (None: no adapter). The adapters are the last event's; without events, the
    command's --lora_targets (default all) in every layer up to the last one rank_pattern names."""
    names = set(result["events"][-1]["ranks"] if result["events"] else ()) | set(result["rank_pattern"])
    if not result["events"]:
        targets = (re.search(r"--lora_targets=(\S+)", result["command"]) or [None, ",".join(PROJ)])[1].split(",")
        names |= {f"model.layers.{i}.{'mlp' if t in PROJ[4:] else 'self_attn'}.{t}" for t in targets
                  for i in range(1 + max(int(n.split(".")[2]) for n in names))}
    grid = [[None] * len(PROJ) for _ in range(1 + max(int(n.split(".")[2]) for n in names))]
    for n in names:
        grid[int(n.split(".")[2])][PROJ.index(n.split(".")[-1])] = result["rank_pattern"].get(n, result["final_rank"])
    return grid


def plot_ranks(plt, result, out):
    grid = rank_grid(result)
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(grid) + 1.5))
    im = ax.imshow([[math.nan if v is None else v for v in row] for row in grid], cmap="viridis", aspect="auto")
    mid = (im.norm.vmin + im.norm.vmax) / 2
    for i, j, v in ((i, j, v) for i, row in enumerate(grid) for j, v in enumerate(row) if v is not None):
        ax.text(j, i, v, ha="center", va="center", fontsize=7, color="white" if v < mid else "black")
    ax.set_xticks(range(len(PROJ)), [p.removesuffix("_proj") for p in PROJ])
    ax.set_yticks(range(len(grid)))
    ax.tick_params(labelsize=7)
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="final rank")
    ranks = [v for row in grid for v in row if v is not None]
    ax.set_title(f"abl_global seed {result['seed']}: final ranks, global allocation\n"
                 f"mean {sum(ranks) / len(ranks):.2f}, min {min(ranks)}, max {max(ranks)}", fontsize=9)
    save(fig, out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "results" / "prunedlora", help="folder of <row>-s<seed>.json")
    args = p.parse_args()
    plt = pyplot(__file__)
    results = [json.loads(f.read_text()) for f in sorted(args.results.glob("*-s*.json"))]
    by_method = events_by_method(results)
    if not by_method:
        raise SystemExit(f"no pruning events of the main rows (*_64to8, abl_no_gradient_term) in {args.results}")
    plot_events(plt, by_method, results[0]["command"], args.results / "predicted_vs_actual.png")
    runs = sorted((r for r in results if r["row"] == "abl_global"), key=lambda r: r["seed"])
    if runs:
        plot_ranks(plt, runs[0], args.results / "final_ranks_global.png")
    else:
        print(f"no abl_global result in {args.results}: final_ranks_global.png skipped")


if __name__ == "__main__":
    main()

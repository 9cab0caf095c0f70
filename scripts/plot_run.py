"""
The loss curve of a train.py run (its metrics.jsonl), and for a rank-pruning run the adapters' ranks at each pruning
event (its rank_pruning.jsonl), drawn to OUT_DIR/curves.png. Needs matplotlib (pip install matplotlib).

    python scripts/plot_run.py out
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from plotting import pyplot, save  # noqa: E402  (matplotlib, or a one-line exit)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot(out_dir):
    metrics, events = read_jsonl(out_dir / "metrics.jsonl"), read_jsonl(out_dir / "rank_pruning.jsonl")
    if not metrics:
        sys.exit(f"plot_run.py: {out_dir}/metrics.jsonl is missing or empty: not a train.py run folder?")
    plt = pyplot(__file__)
    fig, axes = plt.subplots(1, 2 if events else 1, figsize=(11 if events else 6, 4), squeeze=False)
    ax = axes[0, 0]
    steps = [m for m in metrics if "loss" in m]
    ax.plot([m["iter"] for m in steps], [m["loss"] for m in steps], lw=0.8, alpha=0.6, label="train (step)")
    for key in ("train_loss", "val_loss"):
        evals = [m for m in metrics if key in m]
        ax.plot([m["iter"] for m in evals], [m[key] for m in evals], "o-", label=key.replace("_", " "))
    ax.set(xlabel="iteration", ylabel="loss", title=out_dir.name)
    ax.legend()
    if events:
        ax = axes[0, 1]
        for key in ("rank_mean", "rank_min", "rank_max"):
            ax.step([e["step"] for e in events], [e[key] for e in events], where="post", label=key.replace("_", " "))
        ax.set(xlabel="iteration", ylabel="rank of the adapters", title="rank pruning events")
        ax.legend()
    save(fig, out_dir / "curves.png")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("out_dir", type=Path, help="a train.py run folder")
    plot(p.parse_args().out_dir)

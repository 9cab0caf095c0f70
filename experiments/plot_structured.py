"""
The shapes the structured methods leave: query heads and MLP channels kept in every layer, one line per method, one
row of panels per sparsity, the dense model's widths as the top line.

    python experiments/plot_structured.py [results/structured/table.json] [--output results/structured/widths.png]

Reads the table.json of `python experiments/table_structured.py report` (each row's per-layer widths). A recovered row
(<method>-<sparsity>-lora) has its one-shot row's shape, so only the one-shot, loraprune and lorashear rows are drawn.
Needs matplotlib (pip install matplotlib), which the project itself does not.
"""
import argparse
import json
import sys
from pathlib import Path

from plotting import pyplot, save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configurator import renamed  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("json", type=Path, nargs="?", default=ROOT / "results" / "structured" / "table.json")
    p.add_argument("--output", type=Path, help="image file (default: widths.png beside the JSON)")
    renamed(p, {"--out": "--output"})
    args = p.parse_args()
    plt = pyplot(__file__)
    rows = json.loads(args.json.read_text())["rows"]
    dense = rows["dense"]
    shapes = {name: r for name, r in rows.items() if name != "dense" and not name.endswith("-lora")}
    sparsities = sorted({name.rsplit("-", 1)[1] for name in shapes})
    if not sparsities:
        raise SystemExit(f"{args.json}: no pruned rows yet")
    fig, axes = plt.subplots(len(sparsities), 2, figsize=(11, 3.2 * len(sparsities)), squeeze=False)
    for (ax_heads, ax_mlp), sp in zip(axes, sparsities):
        for key, ax, label in (("heads", ax_heads, "query heads kept"), ("widths", ax_mlp, "MLP channels kept")):
            ax.plot(dense[key], color="black", linestyle=":", label="dense")
            for name, r in shapes.items():
                if name.rsplit("-", 1)[1] == sp:
                    ax.plot(r[key], marker=".", label=f"{name.rsplit('-', 1)[0]} ({r['removed']:.1%} removed)")
            ax.set_title(f"{label}, sparsity {sp}", fontsize=10)
            ax.set_xlabel("layer")
            ax.set_ylim(bottom=0)
        ax_mlp.legend(fontsize=7, loc="lower left")
    save(fig, args.output or args.json.with_name("widths.png"), dpi=110)


if __name__ == "__main__":
    main()

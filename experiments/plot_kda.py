"""
The knowledge distribution analysis of LoRAShear as a figure: per layer, the mean |loss change| when its attention
(query heads) or its MLP (channels) alone is thinned at the analysed ratios; the unprunable node groups are marked.

    python experiments/plot_kda.py results/lorashear/lorashear-0.2-kda.json [--output kda.png]

Reads lorashear.knowledge_distribution's JSON (or a results file of lorashear.py, which holds it under "kda").
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
    p.add_argument("json", type=Path)
    p.add_argument("--output", type=Path, help="image file (default: the JSON's name with .png)")
    renamed(p, {"--out": "--output"})
    args = p.parse_args()
    plt = pyplot(__file__)
    kda = json.loads(args.json.read_text())
    kda = kda.get("kda", kda)
    unprunable = {tuple(n) for n in kda["unprunable"]}
    n_layer = max(n["layer"] for n in kda["nodes"]) + 1
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * n_layer), 3.5))
    for offset, kind, color in ((-0.2, "attn", "tab:blue"), (0.2, "mlp", "tab:orange")):
        nodes = [n for n in kda["nodes"] if n["kind"] == kind]
        ax.bar([n["layer"] + offset for n in nodes], [n["sensitivity"] for n in nodes], width=0.4, color=color,
               label=kind, linewidth=1.5,
               edgecolor=["black" if (n["layer"], kind) in unprunable else color for n in nodes])
        for n in nodes:
            if (n["layer"], kind) in unprunable:
                ax.annotate("*", (n["layer"] + offset, n["sensitivity"]), ha="center", va="bottom")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean |loss change|")
    if all(n["sensitivity"] > 0 for n in kda["nodes"]):
        ax.set_yscale("log")
    ax.set_title(f"knowledge distribution (ratios {kda['ratios']}; * unprunable, gamma {kda['gamma']}); "
                 f"base loss {kda['base_loss']:.3f}", fontsize=9)
    ax.legend()
    save(fig, args.output or args.json.with_suffix(".png"))


if __name__ == "__main__":
    main()

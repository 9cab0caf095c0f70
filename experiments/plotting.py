"""What the plot scripts share: matplotlib, which the project itself does not need, imported for files only."""
from pathlib import Path


def pyplot(script):
    """matplotlib.pyplot with the file-only Agg backend, or a one-line exit naming `script` if it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(f"{Path(script).name} needs matplotlib: pip install matplotlib")
    return plt


def save(fig, out, dpi=120):
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    print(f"wrote {out}")

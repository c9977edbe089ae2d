"""The accuracy-versus-fairness trade-off figure: one marker per run, a line per method over ``c``."""

from __future__ import annotations

from pathlib import Path

__all__ = ["tradeoff_plot"]

_STYLE = {"fair": ("tab:red", "o", "implicit fair (ours)"), "pdfm": ("tab:blue", "s", "PDFM"),
          "imaml": ("tab:green", "^", "iMAML"), "maml": ("tab:gray", "v", "MAML")}


def tradeoff_plot(records: list[dict], path: Path, title: str = "") -> None:
    """Plot mean accuracy against mean demographic parity gap, with 95% interval bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, (color, marker, label) in _STYLE.items():
        runs = sorted((r for r in records if r["method"] == method), key=lambda r: r["c"] or 0.0)
        if not runs:
            continue
        gap = [r["summary"]["parity_gap"]["mean"] for r in runs]
        acc = [r["summary"]["accuracy"]["mean"] for r in runs]
        ax.errorbar(gap, acc, xerr=[r["summary"]["parity_gap"]["ci95"] for r in runs],
                    yerr=[r["summary"]["accuracy"]["ci95"] for r in runs], color=color, marker=marker,
                    linestyle="-" if len(runs) > 1 else "none", capsize=2, label=label)
        for r, x, y in zip(runs, gap, acc):
            if r["c"] is not None:
                ax.annotate(f"c={r['c']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=color)
    ax.set_xlabel("demographic parity gap (lower is fairer)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

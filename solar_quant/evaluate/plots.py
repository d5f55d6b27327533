"""PNG plots of perplexity and KL by position, one line per model (matplotlib, Agg canvas)."""

from __future__ import annotations

from pathlib import Path


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _plot(report: dict, context: str, key: str, ylabel: str, path: Path, variants_only: bool) -> None:
    fig, ax = _figure()
    for m in report["models"]:
        section = (m.get("long") or {}).get(context)
        if section is None or (variants_only and m["role"] != "variant"):
            continue
        xs = [(b["start"] + b["end"]) / 2 for b in section["buckets"]]
        ys = [b.get(key) for b in section["buckets"]]
        label = f"{m['name']} ({m['role']})" if m["role"] == "baseline" else m["name"]
        ax.plot(xs, ys, marker="o", label=label)
    trained = report["protocol"].get("trained_length")
    if trained:
        ax.axvline(trained, color="grey", linestyle="--", linewidth=1, label=f"trained length {trained}")
    ax.set_xlabel("token position in window")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} by position, context {context}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))


def write_plots(report: dict, staging: Path) -> list[str]:
    """Two PNGs per long context; returns their file names."""
    names = []
    contexts = sorted({c for m in report["models"] for c in (m.get("long") or {})}, key=int)
    for c in contexts:
        for key, ylabel, name, variants_only in (("ppl", "perplexity", f"ppl_by_position_c{c}.png", False),
                                                 ("kl_mean", "mean KL vs baseline", f"kl_by_position_c{c}.png", True)):
            _plot(report, c, key, ylabel, staging / name, variants_only)
            names.append(name)
    return names

"""The timeline picture: one step, each rank on its own clock, a compute lane and a comm lane per rank."""
from __future__ import annotations

from pathlib import Path

COLOURS = {"data": "#9e9e9e", "forward": "#1f77b4", "loss": "#8c564b", "backward": "#ff7f0e",
           "comm": "#d62728", "optimizer": "#2ca02c", "allreduce": "#9467bd"}
LANES = ((0, ("data", "forward", "loss", "backward", "optimizer")), (1, ("comm", "allreduce")))


def _bars(ax, r: dict, y: float, kinds: tuple) -> None:
    """One lane of a rank's timeline step: its events of `kinds`, named where they are wide enough."""
    span = r["timeline"]["seconds"] * 1e3
    for kind, name, start, end in r["timeline"]["events"]:
        if kind not in kinds:
            continue
        ms0, width = start * 1e3, (end - start) * 1e3
        ax.broken_barh([(ms0, width)], (y, 0.9), facecolors=COLOURS[kind], edgecolors="white", linewidth=0.4)
        if width > span * 0.035:
            text = name if kind in ("forward", "backward", "comm") else kind
            ax.text(ms0 + width / 2, y + 0.45, text.replace(".forward", " f").replace(".backward", " b"),
                    ha="center", va="center", fontsize=6, color="white", clip_on=True)
    spans = r["timeline"].get("allreduce")
    if "allreduce" in kinds and spans:  # the all-reduce in flight behind backward: a thin bar under the lane
        ax.broken_barh([(spans["first_launch"] * 1e3, (spans["last_ready"] - spans["first_launch"]) * 1e3)],
                       (y - 0.15, 0.12), facecolors=COLOURS["allreduce"], alpha=0.6)


def plot_timeline(profile: dict, path: Path) -> None:
    """Draw the profile's timeline step into `path` (PNG). A rank without exchanges or replicas
    (dist.mp=1, one replica) has no comm lane."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.transforms import offset_copy

    ranks = profile["ranks"]
    fig, ax = plt.subplots(figsize=(13, 1.1 + 1.1 * len(ranks)))
    labels = []
    for i, r in enumerate(ranks):
        kinds_present = {e[0] for e in r["timeline"]["events"]}
        for lane, kinds in LANES:
            if lane and not kinds_present & set(kinds):
                continue
            y = (len(ranks) - 1 - i) * 2.4 + (1 - lane) * 1.1
            labels.append((y + 0.45, f"rank {r['rank']} {'comm' if lane else 'compute'}"))
            _bars(ax, r, y, kinds)
        ax.axvline(r["timeline"]["seconds"] * 1e3, color="black", lw=0.6, ls=":")
    ax.set_yticks([y for y, _ in labels], [t for _, t in labels])
    ax.set_xlabel("ms since the rank's step start (gaps: other; dotted line: the rank's step end)")
    ax.set_title(f"step {ranks[0]['timeline']['step'] + 1}: where the time goes, per rank "
                 f"({profile['versions']['backend']}, {ranks[0]['device']})")
    # The legend hangs a fixed distance below the axes, under the tick labels and the axis label.
    below = offset_copy(ax.transAxes, fig=fig, y=-0.5, units="inches")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()], ncol=7, fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)

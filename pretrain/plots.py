"""Loss and accuracy curves of a run's metrics.jsonl: one PNG per objective, <run.dir>/curves/<objective>.png.

An objective is any `<name>_loss` / `<name>_acc` column (stage one: mlm, wso, sso; stage two: lm, mlm; fine-tuning:
cls, tag, lm). Each figure has two panels, loss and accuracy, with a line per split: train, valid, each
valid/<source> of a blend (and any other split that logged the column). Null values (masked LM after stage two's
switch) are left out, and a split with none is not drawn. Stage two's figures mark the masked-LM switch with a
vertical line at the last logged step that had it on. matplotlib is imported only when a figure is drawn.
"""
from __future__ import annotations

import os
import re
import tempfile

CURVES = "curves"  # the folder under run.dir
SIZE_IN, DPI = (10.0, 4.0), 100  # 1000 x 400 pixels
SUFFIXES = (("_loss", "loss"), ("_acc", "accuracy"))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def objectives(rows: list[dict]) -> list[str]:
    """The names of the `<name>_loss`/`<name>_acc` columns with at least one value, in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            for suffix, _ in SUFFIXES:
                if key.endswith(suffix) and len(key) > len(suffix) and _number(value):
                    names.setdefault(key[: -len(suffix)])
    return list(names)


def splits(rows: list[dict]) -> list[str]:
    """train, valid, then the valid/<source> splits, then any other (a fine-tuning run's test), each as first seen."""
    seen = list(dict.fromkeys(r["split"] for r in rows))
    rank = {"train": 0, "valid": 1}
    return sorted(seen, key=lambda s: (rank.get(s, 2 if s.startswith("valid/") else 3), seen.index(s)))


def series(rows: list[dict], split: str, column: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one split's column, rows without a value left out."""
    points = [(r["step"], r[column]) for r in rows if r["split"] == split and _number(r.get(column))]
    return [s for s, _ in points], [v for _, v in points]


def mlm_switch(rows: list[dict]) -> int | None:
    """Stage two's last logged step with masked LM on before the first one with it off (the first off step if none
    was logged on); None when no row has it off (stage one, fine-tuning, or a run that stopped before the switch)."""
    off = [r["step"] for r in rows if r.get("mlm_active") is False]
    if not off:
        return None
    on = [r["step"] for r in rows if r.get("mlm_active") is True and r["step"] < min(off)]
    return max(on) if on else min(off)


def figure(rows: list[dict], objective: str, title: str = ""):
    """The matplotlib Figure of one objective (not saved): two panels, loss and accuracy."""
    from matplotlib.figure import Figure  # not pyplot: no backend state, no display, nothing for the table to load

    fig = Figure(figsize=SIZE_IN, dpi=DPI, layout="constrained")
    names = splits(rows)
    switch = mlm_switch(rows)
    last = max((r["step"] for r in rows), default=0)  # every panel spans the whole run (mlm's ends at the switch)
    for ax, (suffix, quantity) in zip(fig.subplots(1, 2), SUFFIXES):
        column, drawn = objective + suffix, False
        for i, split in enumerate(names):  # a split keeps its colour in both panels
            steps, values = series(rows, split, column)
            if not steps:
                continue
            style = ({"linewidth": 1.0, "alpha": 0.8} if split == "train"
                     else {"marker": "o", "markersize": 3, "linewidth": 1.5,
                           "linestyle": "-" if split == "valid" else "--" if split.startswith("valid/") else "none"})
            ax.plot(steps, values, color=f"C{i}", label=split, **style)
            drawn = True
        if switch is not None:
            ax.axvline(switch, color="0.3", linestyle=":", linewidth=1.2,
                       label=f"masked LM off (last on: step {switch})")
        if not drawn:
            ax.text(0.5, 0.5, f"no {column} logged", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_title(f"{objective} {quantity}")
        ax.set_xlabel("step")
        ax.set_xlim(0, max(1, last) * 1.03)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def save(fig, path: str) -> None:
    """Write the PNG atomically: a temporary file in the same folder, then os.replace."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the picture from the rest of a group
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_curves(run_dir: str, rows: list[dict]) -> list[str]:
    """One PNG per objective under run_dir/curves; their paths."""
    out = os.path.join(run_dir, CURVES)
    os.makedirs(out, exist_ok=True)
    title = os.path.normpath(run_dir)
    paths = []
    for objective in objectives(rows):
        path = os.path.join(out, re.sub(r"[^A-Za-z0-9_.-]", "_", objective) + ".png")
        save(figure(rows, objective, title), path)
        paths.append(path)
    return paths

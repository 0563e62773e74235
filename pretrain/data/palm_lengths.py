"""Stage two's length histogram as text: what pretrain.samples prints and pretrain.summary shows from run.json. A
module of its own, without torch, so that pretrain.summary starts in a moment."""
from __future__ import annotations


def render_lengths(h: dict) -> list[str]:
    """Stage two's drawn and realised lengths, as run.json records them (data/palm.py, PalmDataset.stats)."""
    lines = [f"  lengths of the first {h['samples']} samples (with [CLS]/[SEP]; parts snapped within {h['snap']:g}):"]
    for side in ("encoder", "decoder"):
        x = h[side]
        bins = [f"{lo}-{hi - 1}" for lo, hi in zip(x["edges"][:-1], x["edges"][1:])]
        lines.append("    " + side.ljust(10) + "".join(b.rjust(9) for b in bins) + "below".rjust(7) + "mean".rjust(8))
        for kind, below in (("drawn", 0), ("realised", x["realised_below"])):
            lines.append("    " + f"  {kind}".ljust(10) + "".join(str(c).rjust(9) for c in x[kind])
                         + str(below).rjust(7) + f"{x['mean_' + kind]:.1f}".rjust(8))
    return lines

"""One picture of the side-by-side runs: image AUROC, wall time and peak memory of gaussad `lite0`
and anomalib PaDiM per data set, from the committed comparison JSON files.

    .venv/bin/python benchmarks/plot_compare.py [--out docs/img/compare_padim.png]

Each data set is one run of benchmarks/compare_anomalib.py with both tools (the files listed in
SETS); image AUROC with error bars of ±1 standard error (Hanley & McNeil, from the test set's
counts of good and defective images).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

RESULTS = Path(__file__).resolve().parent / "results"
SETS = {  # label -> comparison run (lite0 and PaDiM in the same run)
    "ELPV poly": "compare_elpv_poly_binomial.json",
    "ELPV mono\n(held out)": "compare_elpv_mono_binomial.json",
    "ELPV poly\ncracks": "compare_elpv_poly_cracks_binomial.json",
    "ELPV mono\ncracks": "compare_elpv_mono_cracks_binomial.json",
    "demo\nbrushed": "compare_demo_brushed_sharp.json",
    "demo\nhexnut": "compare_demo_hexnut_binomial.json",
    "demo\nweave": "compare_demo_weave_binomial.json",
}
TOOLS = {("gaussad", "lite0"): "gaussad lite0", ("anomalib", "padim"): "anomalib PaDiM"}


def auroc_standard_error(auc: float, n_defective: int, n_good: int) -> float:
    """Hanley & McNeil (1982): the standard error of an AUROC from the two class sizes."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (n_defective - 1) * (q1 - auc * auc) + (n_good - 1) * (q2 - auc * auc))
    return math.sqrt(variance / (n_defective * n_good))


def rows() -> dict[str, dict[str, dict]]:
    table = {}
    for label, name in SETS.items():
        run = json.loads((RESULTS / name).read_text())
        found = {}
        for result in run["results"]:
            key = (result["tool"].split()[0], result["config"])
            if key in TOOLS:
                found[TOOLS[key]] = {**result, "n_defective": run["n_defective"],
                                     "n_good": run["n_test_images"] - run["n_defective"]}
        table[label] = found
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img"
                        / "compare_padim.png")
    args = parser.parse_args()
    table = rows()
    labels, x, width = list(table), np.arange(len(table)), 0.38
    figure = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    panels = figure.subplots(3, 1, sharex=True)
    for offset, (tool, colour) in zip((-width / 2, width / 2), zip(TOOLS.values(), ("tab:blue", "tab:orange"))):
        values = [table[s][tool] for s in labels]
        auc = [v["image_auroc"] for v in values]
        errors = [auroc_standard_error(v["image_auroc"], v["n_defective"], v["n_good"]) for v in values]
        panels[0].errorbar(x + offset, auc, yerr=errors, fmt="o", color=colour, capsize=4, label=tool)
        panels[1].bar(x + offset, [v["wall_s"] for v in values], width, color=colour, label=tool)
        panels[2].bar(x + offset, [v["peak_rss_mb"] / 1024 for v in values], width, color=colour, label=tool)
    panels[0].set(ylabel="image AUROC (±1 SE)", ylim=(0.75, 1.0),
                  title="gaussad lite0 and anomalib PaDiM, same weights, 2 CPU cores, one run per data set")
    panels[1].set(ylabel="wall time, fit + evaluate (s)")
    panels[2].set(ylabel="peak memory (GB)", xticks=x, xticklabels=labels)
    for axes in panels:
        axes.grid(axis="y", alpha=0.3)
        axes.legend(loc="upper right")
    FigureCanvasAgg(figure)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, format="png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Figures of the spectrum, from the maths or from intl.py runs (matplotlib is needed here only).

  python figures.py maths --out docs/spectral_maps.png
  python figures.py spectrum RUN_DIR --out docs/spectrum.png
  python figures.py ablation RUN_DIR... --out docs/ablation.png
"""
import argparse
import json
import os

import matplotlib
matplotlib.use("Agg")            # files only, no display
import matplotlib.pyplot as plt
import numpy as np

import intl


def read_jsonl(run, name):
    """The records of RUN/NAME, one JSON object a line; a clear error if the file is missing."""
    path = os.path.join(run, name)
    if not os.path.exists(path):
        intl.fail(f"{path} not found: is {run} the --output-dir of an intl.py run?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def iternorm_map(lam, iters):
    """λ ↦ λ p_T(λ)², the output eigenvalue of IterNorm for the trace-normalised eigenvalue λ."""
    p = np.ones_like(lam)
    for _ in range(iters):
        p = 1.5 * p - 0.5 * p ** 3 * lam
    return lam * p ** 2


def maths(args):
    lam = np.logspace(-4, 0, 200)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for t in range(1, 9):
        a.plot(lam, iternorm_map(lam, t), color=plt.cm.viridis(t / 9), label=f"T = {t}")
    for p in [0.25, 0.5, 0.75]:
        b.plot(lam, lam ** (1 - 2 * p), label=f"p = {p}")
    a.set_title("IterNorm: λ ↦ λ·p_T(λ)²")
    b.set_title("Spectral Transformation: λ ↦ λ^(1−2p)")
    for ax in (a, b):
        ax.plot(lam, lam, "k:", lw=1, label="identity")
        ax.set(xscale="log", yscale="log", xlabel="eigenvalue λ of Σ/trΣ")
        ax.legend(fontsize=7)
    a.set_ylabel("output eigenvalue")
    return fig


def spectrum(args):
    recs = read_jsonl(args.runs[0], "spectrum.jsonl")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for i, r in enumerate(recs):
        for ax, key in zip(axes, ["before", "after"]):
            lam = np.clip(np.array(r[key]), 0, None)
            ax.plot(np.arange(1, len(lam) + 1), np.maximum(lam / lam.sum(), 1e-12),
                    color=plt.cm.viridis(i / max(1, len(recs) - 1)), label=f"epoch {r['epoch']}")
    for ax, title in zip(axes, ["projector output", "after the transform"]):
        ax.set(yscale="log", title=title, xlabel="index (largest first)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("λ / Σλ (last batch of the epoch)")
    return fig


def ablation(args):
    runs = {os.path.basename(os.path.normpath(r)): [x for x in read_jsonl(r, "log.jsonl") if "projector" in x]
            for r in args.runs}
    panels = [("projector", "effective rank, projector output"), ("iternorm", "effective rank, after the transform")]
    if any("knn5_top1" in x for recs in runs.values() for x in recs):
        panels.append(("knn5_top1", "5-NN top-1 (%)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        for name, recs in runs.items():
            pts = [(x["epoch"], x[key] if key == "knn5_top1" else x[key]["erank"]) for x in recs if key in x]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(title=title, xlabel="epoch")
    axes[0].legend(fontsize=7)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("figure", choices=["maths", "spectrum", "ablation"])
    p.add_argument("runs", nargs="*", help="--output-dir of intl.py runs (spectrum: one; ablation: several)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.error = lambda msg: intl.fail(f"{msg} (see --help)")
    args = p.parse_args(argv)
    if args.figure != "maths" and not args.runs:
        intl.fail(f"{args.figure} needs at least one run folder")
    fig = {"maths": maths, "spectrum": spectrum, "ablation": ablation}[args.figure](args)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KB)")


if __name__ == "__main__":
    main()

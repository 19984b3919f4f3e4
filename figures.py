"""Figures of the spectrum, from the maths or from intl.py runs (matplotlib is needed here only).

  python figures.py maths --out docs/spectral_maps.png
  python figures.py run RUN_DIR... --out run.png
  python figures.py spectrum RUN_DIR --out docs/spectrum.png
  python figures.py ablation RUN_DIR... --out docs/ablation.png
  python figures.py monitor RUN_DIR --out docs/monitor.png
  python figures.py robustness runs/robust/b*-d*-t* --out docs/robustness.png
"""
import argparse
import importlib.util
import json
import math
import os
import re

import numpy as np
import torch

import intl
import utils


NO_MATPLOTLIB = "figures.py draws with matplotlib, which is not installed: pip install matplotlib"


def pyplot():
    """matplotlib.pyplot drawing to files (imported only here, so that --help needs no matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        utils.fail(NO_MATPLOTLIB)
    matplotlib.use("Agg")            # files only, no display
    import matplotlib.pyplot as plt
    return plt


def read_jsonl(run, name):
    """The records of RUN/NAME, one JSON object a line; a clear error if the file is missing."""
    path = os.path.join(run, name)
    if not os.path.exists(path):
        utils.fail(f"{path} not found: is {run} the --output-dir of an intl.py run?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def iternorm_map(lam, iters):
    """λ ↦ λ p_T(λ)², the output eigenvalue of IterNorm for the trace-normalised eigenvalue λ."""
    p = np.ones_like(lam)
    for _ in range(iters):
        p = 1.5 * p - 0.5 * p ** 3 * lam
    return lam * p ** 2


def maths(args):
    plt = pyplot()
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
    plt = pyplot()
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


def epoch_records(recs):
    """The epoch-end records of a log.jsonl; "transformed" read from "iternorm" in runs before the rename."""
    return [{**x, "transformed": x.get("transformed", x.get("iternorm"))} for x in recs if "projector" in x]


def curve(ax, recs, x, key, **style):
    """rec[key] (its effective rank where it is a cond/erank record) against rec[x], over the
    records that hold key; nothing when none does."""
    pts = [(r[x], r[key]["erank"] if isinstance(r[key], dict) else r[key]) for r in recs if key in r]
    if pts:
        ax.plot(*zip(*pts), **style)


def ablation(args):
    plt = pyplot()
    runs = {os.path.basename(os.path.normpath(r)): epoch_records(read_jsonl(r, "log.jsonl")) for r in args.runs}
    panels = [("projector", "effective rank, projector output"), ("transformed", "effective rank, after the transform")]
    panels += [(key, title) for key, title in [("knn5_top1", "5-NN top-1 (%)"), ("linear_top1", "linear probe top-1 (%)")]
               if any(key in x for recs in runs.values() for x in recs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        for name, recs in runs.items():
            curve(ax, recs, "epoch", key, marker="o", label=name)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7)
    return fig


def run_curves(args):
    """Each run's loss and its parts per step; per epoch, the effective rank of the projector
    output and of the transformed output, and the monitor's top-1 where it ran (one colour a run)."""
    plt = pyplot()
    runs = {r: read_jsonl(r, "log.jsonl") for r in args.runs}
    monitored = any("knn5_top1" in x for recs in runs.values() for x in recs)
    fig, axes = plt.subplots(1, 3 if monitored else 2, figsize=(13 if monitored else 9, 3.6))
    for i, (r, recs) in enumerate(runs.items()):
        name, steps, ends = os.path.basename(os.path.normpath(r)), [x for x in recs if "loss" in x], epoch_records(recs)
        for key, style, what in [("loss", "-", "loss"), ("nmse", "--", "nmse"), ("trace_loss", ":", "trace loss")]:
            curve(axes[0], steps, "step", key, ls=style, color=f"C{i}", label=f"{name}: {what}")
        for key, style in [("projector", "-"), ("transformed", "--")]:
            curve(axes[1], ends, "epoch", key, ls=style, marker="o", color=f"C{i}", label=f"{name}: {key} output")
        if monitored:
            for key, style, what in [("knn5_top1", "-", "5-NN"), ("linear_top1", "--", "linear probe")]:
                curve(axes[2], ends, "epoch", key, ls=style, marker="o", color=f"C{i}", label=f"{name}: {what}")
    axes[0].set(title="loss, nmse and trace loss per step", xlabel="step", yscale="log")
    axes[1].set(title="effective rank (last batch of the epoch)", xlabel="epoch")
    if monitored:
        axes[2].set(title="monitor top-1 (%): 5-NN, linear probe", xlabel="epoch")
    for ax in axes:
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def monitor(args):
    """One run's online monitor per epoch (5-NN and linear probe), beside the same two probes on
    the same labelled images for the raw pixels (as they are, 32 px) and the network at random init."""
    plt, run, cpu = pyplot(), args.runs[0], torch.device("cpu")
    recs = [r for r in read_jsonl(run, "log.jsonl") if "linear_top1" in r]
    if not recs:
        utils.fail(f"{run}/log.jsonl has no monitor records: train with --monitor-every 1")
    a = argparse.Namespace(**utils.load_checkpoint(os.path.join(run, "checkpoint.pth"))["args"])
    labelled = intl.monitor_data(a)
    small = a.small_images or a.data in utils.SMALL_DATA          # then the pixels as they are: 32 px, no resize
    as_they_are = intl.monitor_data(argparse.Namespace(**{**vars(a), "small_images": small}))
    torch.manual_seed(a.seed)      # the weights the run started from
    baselines = {"random init": utils.monitor(intl.resnet_backbone(a.arch, a.small_images)[0], labelled, cpu),
                 "raw pixels": utils.monitor(torch.nn.Flatten(), as_they_are, cpu)}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in zip(axes, ["knn5_top1", "linear_top1"], ["5-NN top-1 (%)", "linear probe top-1 (%)"]):
        ax.plot([r["epoch"] for r in recs], [r[key] for r in recs], marker="o", label="INTL, per epoch")
        for (name, b), style in zip(baselines.items(), ["--", ":"]):
            ax.axhline(b[key], ls=style, color="grey", label=f"{name}: {b[key]:.1f}")
            print(f"{name}: {title} {b[key]:.2f}")
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    return fig


def robustness(args):
    """Runs named b<batch>-d<embedding dim>-t<T>: the final linear-probe top-1 and effective rank
    over batch × embedding dim (T = 4), and over T; a run with a non-finite loss, or that stopped
    before its epoch ended, counts as diverged."""
    plt = pyplot()
    cells = {}
    for run in args.runs:
        m = re.fullmatch(r"b(\d+)-d(\d+)-t(\d+)", os.path.basename(os.path.normpath(run)))
        if not m:
            utils.fail(f"{run}: robustness runs are named b<batch>-d<embedding dim>-t<T>, e.g. b256-d1024-t4")
        recs = read_jsonl(run, "log.jsonl")
        ends = [r for r in recs if "linear_top1" in r]
        ok = ends and all(math.isfinite(r.get("loss", 0)) for r in recs) and not ends[-1]["nonfinite"]
        cells[tuple(map(int, m.groups()))] = ends[-1] if ok else None
    grid = sorted({(b, d) for b, d, t in cells if t == 4})
    batches, dims = sorted({b for b, _ in grid}), sorted({d for _, d in grid})
    iters = sorted((t, r) for (b, d, t), r in cells.items() if (b, d) == (256, 1024))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.3, 1]})
    acc = np.full((len(batches), len(dims)), np.nan)
    for (i, bs), (j, d) in ((x, y) for x in enumerate(batches) for y in enumerate(dims)):
        r = cells.get((bs, d, 4))
        acc[i, j] = r["linear_top1"] if r else np.nan
    im = a.imshow(acc, cmap="viridis", aspect="auto")
    for (i, bs), (j, d) in ((x, y) for x in enumerate(batches) for y in enumerate(dims)):
        if (bs, d, 4) in cells:     # light text on the dark half of the colour map
            r = cells[bs, d, 4]
            dark = r and im.norm(r["linear_top1"]) < 0.5
            a.text(j, i, f"{r['linear_top1']:.1f}\nrank {r['projector']['erank']:.0f}" if r else "diverged",
                   ha="center", va="center", fontsize=7, color="white" if dark else "black")
    fig.colorbar(im, ax=a, label="linear probe top-1 (%)")
    a.set(xticks=range(len(dims)), xticklabels=dims, yticks=range(len(batches)), yticklabels=batches,
          xlabel="embedding dimension", ylabel="batch size",
          title="T = 4: linear probe top-1 (%), effective rank (of batch)")
    t_ok = [(t, r) for t, r in iters if r]
    b.plot([t for t, _ in t_ok], [r["linear_top1"] for _, r in t_ok], marker="o", label="linear probe top-1 (%)")
    b.plot([t for t, _ in t_ok], [r["projector"]["erank"] for _, r in t_ok], marker="s",
           label="effective rank, projector output (of 256)")
    for t, r in iters:
        if r is None:
            b.axvline(t, color="red", ls=":", label=f"T = {t} diverged")
    b.set(xlabel="Newton iterations T", title="batch 256, embedding 1024", xticks=[t for t, _ in iters])
    b.legend(fontsize=7)
    return fig


FIGURES = {"maths": maths, "run": run_curves, "spectrum": spectrum, "ablation": ablation, "monitor": monitor,
           "robustness": robustness}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=None if importlib.util.find_spec("matplotlib") else NO_MATPLOTLIB)
    p.add_argument("figure", choices=FIGURES)
    p.add_argument("runs", nargs="*", help="--output-dir of intl.py runs (spectrum, monitor: one; others: several)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.error = lambda msg: utils.fail(f"{msg} (see --help)")
    args = p.parse_args(argv)
    if args.figure != "maths" and not args.runs:
        utils.fail(f"{args.figure} needs at least one run folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    fig = FIGURES[args.figure](args)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=90)
    pyplot().close(fig)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KB)")


if __name__ == "__main__":
    main()

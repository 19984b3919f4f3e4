"""Speed figures for intl.py: python benchmark.py step|aug|check|syncbn [its flags] [intl.py's flags].

Figures are medians of 5 repeats (syncbn: 15, short calls vary more with the machine's load); the
last line printed is one JSON object.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torchvision.datasets.folder import default_loader
from torchvision.transforms.functional import pil_to_tensor

import gpu_aug
import intl
import utils

REPEATS = 5


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats=REPEATS):
    """Median wall time of fn() over repeats, the device drained before and after each."""
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- step
def uses_cuda_graphs(mode):
    """Whether torch.compile's `mode` captures CUDA graphs (reduce-overhead, max-autotune)."""
    import torch._inductor
    return bool(mode) and torch._inductor.list_mode_options(mode).get("triton.cudagraphs", False)


def cudagraph_skips():
    """How often torch.compile fell back from CUDA graphs to running the graph as it is."""
    import torch._dynamo.utils
    return torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]


def head_ms(args, per_rank, n_views, beta, amp, device, runs=10):
    """gather + IterNorm + trace loss + nmse, forward and backward, on embeddings shaped and
    typed like the step's: the INTL head alone, `runs` at a time as the step queues them."""
    dim = int(args.projector.split("-")[-1])
    zs = [torch.randn(per_rank, dim, device=device, dtype=amp, requires_grad=True)
          for _ in range(n_views)]
    target = zs[0].detach() if args.method == "intl-m" else None
    online = zs[1:] if args.method == "intl-m" else zs

    def run():
        loss = intl.intl_loss([utils.gather(z) for z in online], None if target is None else utils.gather(target),
                              beta, args.whiten, intl.whitening(args))[0]
        loss.backward()
    run()
    return 1000 * median_time(lambda: [run() for _ in range(runs)], device) / runs


def bench_step(args):
    rank, world, device = utils.setup_distributed(args.batch_size)
    recipe, state = args.recipe, intl.build_state(args, device, world)
    for g in state.optimizer.param_groups:
        g["lr"] = 1e-4       # a small constant lr: the weights stay sane however long it runs
    per_rank = args.batch_size // world
    if args.data:
        loader = intl.train_loader(args, rank, world, device)
        batches = iter(())

        def next_batch():
            nonlocal batches
            try:
                return next(batches)[0]
            except StopIteration:
                batches = iter(loader)
                return next(batches)[0]
    else:                                    # crops already augmented, on the device
        gen = torch.Generator(device).manual_seed(0)
        fixed = intl.to_views([torch.randn(per_rank, 3, c.size, c.size, device=device, generator=gen)
                               for c in recipe], recipe, None, device)   # then a no-op per step
        next_batch, state.aug = (lambda: fixed), None

    waits = []

    def steps():
        wait = 0.0
        for _ in range(args.bench_steps):
            t = time.perf_counter()
            batch = next_batch()             # waiting for the loader only, as in training
            wait += time.perf_counter() - t
            views = intl.to_views(batch, recipe, state.aug, device)
            intl.train_step(state, views, args.target_momentum, args)
        waits.append(wait)

    state.model.train()
    t = time.perf_counter()
    steps()                  # warm-up: cuDNN autotuning, torch.compile, CUDA graph capture
    sync(device)
    warmup_s = time.perf_counter() - t
    if rank == 0:
        print(f"warm-up ({args.bench_steps} steps{', compiling' if args.compile else ''}): "
              f"{warmup_s:.1f} s", flush=True)
    waits.clear()
    if device.type == "cuda":            # the steady state, not cuDNN's search in the warm-up
        torch.cuda.reset_peak_memory_stats(device)
    step_s = median_time(steps, device) / args.bench_steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
    amp = state.amp
    head = head_ms(args, per_rank, len(recipe), args.beta, amp, device)
    result = {"benchmark": "step", "device": device_name(device), "world": world,
              "method": args.method, "arch": args.arch, "views": [c.size for c in recipe],
              "per_gpu_batch": per_rank, "amp": str(amp).replace("torch.", ""), "compile": args.compile,
              "data": args.data and ("gpu-aug" if args.gpu_aug else "pil"),
              "img_per_s": round(args.batch_size / step_s, 2), "step_ms": round(1000 * step_s, 2),
              "peak_gib": peak and round(peak, 2), "peak_reserved_gib": reserved and round(reserved, 2),
              "cudagraph_skips": cudagraph_skips() if uses_cuda_graphs(args.compile) else None,
              "head_ms": round(head, 3),
              "head_share": round(head / (1000 * step_s), 4),
              "data_wait_share": round(statistics.median(waits) / (args.bench_steps * step_s), 4),
              "warmup_s": round(warmup_s, 1)}
    utils.leave_process_group()
    if rank == 0:
        print(f"{result['img_per_s']:.0f} img/s, {result['step_ms']:.1f} ms/step, head "
              f"{result['head_ms']:.2f} ms ({100 * result['head_share']:.1f}%), data wait "
              f"{100 * result['data_wait_share']:.0f}%, peak {result['peak_gib']} GiB on {result['device']}")
        print(json.dumps(result), flush=True)
    return result


# ----------------------------------------------------------------------------- aug
def scene(seed, size=(500, 375)):
    """A stand-in photograph of ImageNet's median size: a colour gradient, shapes, texture."""
    rng = np.random.RandomState(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    c = rng.rand(3, 3)
    img = np.stack([255 * (c[i, 0] * x + c[i, 1] * y + c[i, 2]) / 2 for i in range(3)], -1)
    img = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.randint(0, w), rng.randint(0, h)
        box = [x0, y0, x0 + rng.randint(20, w // 2), y0 + rng.randint(20, h // 2)]
        fill = tuple(int(v) for v in rng.randint(0, 256, 3))
        (draw.ellipse if rng.rand() < 0.5 else draw.rectangle)(box, fill=fill)
    noise = Image.fromarray(rng.randint(0, 40, (h, w, 3), dtype=np.uint8))
    return Image.blend(img.filter(ImageFilter.SMOOTH), noise, 0.15)


def image_files(args, n, tmp):
    """n image files: spread over --data DIR/train, else stand-in JPEGs written to tmp."""
    if args.data and args.data != "fashion-mnist":
        samples = utils.image_folder(os.path.join(args.data, "train"), None).samples
        return [samples[i][0] for i in np.linspace(0, len(samples) - 1, n).astype(int)]
    for i in range(n):
        scene(i).save(os.path.join(tmp, f"{i}.jpg"), quality=90)
    return [os.path.join(tmp, f"{i}.jpg") for i in range(n)]


def aug_grid(path, recipe, out, n=4, cell=72):
    """One row per crop of the recipe: n PIL-path views | n gpu_aug views, denormalised."""
    img = default_loader(path)
    torch.manual_seed(0)             # the PIL path draws from torch's global generator
    pil = [torch.stack([intl.crop_transform(crop)(img) for _ in range(n)]) for crop in recipe]
    ours = gpu_aug.multi_view([pil_to_tensor(img)] * n, recipe, torch.Generator().manual_seed(0))
    mean, std = torch.tensor(intl.MEAN).view(3, 1, 1), torch.tensor(intl.STD).view(3, 1, 1)
    rows = []
    for a, b in zip(pil, ours):
        cells = [F.interpolate(v[None], size=(cell, cell), mode="bilinear", antialias=True)[0]
                 for v in torch.cat([a, b])]
        cells = [(c * std + mean).clamp(0, 1) for c in cells]
        gap = torch.ones(3, cell, cell // 4)
        rows.append(torch.cat(cells[:n] + [gap] + cells[n:], 2))
    grid = (255 * torch.cat(rows, 1)).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(grid).save(out)


def bench_aug(args):
    torch.set_num_threads(1)         # images per second per CPU core
    rank, world, device = utils.setup_distributed(args.batch_size)
    recipe = args.recipe
    pil_views = intl.views_transform(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        files = image_files(args, args.bench_steps, tmp)

        def pil_path():              # what each PIL worker does per image
            for f in files:
                pil_views(default_loader(f))

        def gpu_aug_cpu_side():      # what each --gpu-aug worker does: decode, pad
            gpu_aug.pad_collate([(pil_to_tensor(gpu_aug.load_capped(f)), 0) for f in files])

        pil_s, ours_s = [], []
        for _ in range(REPEATS):     # alternated, so that both see the same machine load
            pil_s.append(median_time(pil_path, torch.device("cpu"), 1))
            ours_s.append(median_time(gpu_aug_cpu_side, torch.device("cpu"), 1))
        pil_rate = len(files) / statistics.median(pil_s)
        ours_rate = len(files) / statistics.median(ours_s)

        images = [pil_to_tensor(gpu_aug.load_capped(f)) for f in files]
        per_rank = args.batch_size // world
        batch, heights, widths = gpu_aug.pad_batch([images[i % len(images)] for i in range(per_rank)])
        batch, heights, widths = batch.to(device), heights.to(device), widths.to(device)
        gen = torch.Generator(device).manual_seed(0)
        run = lambda: gpu_aug.multi_view(batch, recipe, gen, heights, widths)   # noqa: E731
        run()
        device_rate = per_rank / median_time(run, device)
        os.makedirs(args.output_dir, exist_ok=True)
        grid = os.path.join(args.output_dir, "aug_grid.png")
        aug_grid(files[0], recipe, grid)
    result = {"benchmark": "aug", "views": [c.size for c in recipe], "images": len(files),
              "pil_img_per_s_per_core": round(pil_rate, 2),
              "gpu_aug_cpu_img_per_s_per_core": round(ours_rate, 2),
              "cpu_cost_ratio": round(ours_rate / pil_rate, 2),
              "gpu_aug_device": device_name(device), "gpu_aug_img_per_s": round(device_rate, 1),
              "grid": grid}
    print(f"one CPU core: PIL path {pil_rate:.1f} img/s, --gpu-aug decode + pad {ours_rate:.1f} img/s "
          f"({ours_rate / pil_rate:.1f}x less CPU per image); gpu_aug on {result['gpu_aug_device']}: "
          f"{device_rate:.0f} img/s; grid in {grid}")
    print(json.dumps(result), flush=True)
    return result


# ----------------------------------------------------------------------------- syncbn
# Per-rank inputs of BN layers at 32 images per rank: a projector layer, ResNet's last and first
# stages (32-px images on CPUs, 224-px crops on GPUs).
SYNCBN_SHAPES = {"cpu": [(32, 2048), (32, 512, 4, 4), (32, 64, 32, 32)],
                 "cuda": [(32, 8192), (32, 2048, 7, 7), (32, 256, 56, 56)]}


def torch_sync_batchnorm(bn, group):
    """nn.SyncBatchNorm's multi-rank path (its own forward takes it only with two ranks or more)."""
    from torch.nn.modules._functions import SyncBatchNorm

    def forward(x):
        bn.num_batches_tracked.add_(1)
        return SyncBatchNorm.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                                   bn.momentum, group, dist.get_world_size(group))
    return forward


def syncbn_layers(shape, device):
    """Plain nn.BatchNorm, ours and (CUDA only) torch's nn.SyncBatchNorm, the last two forced
    through their multi-rank path in this one-process group: their collectives run."""
    plain = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1]).to(device)
    ours = utils.convert_sync_batchnorm(copy.deepcopy(plain))
    ours.forward = ours.forward_every_rank
    layers = {"plain": plain, "ours": ours}
    if device.type == "cuda":
        theirs = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
        theirs.forward = torch_sync_batchnorm(theirs, dist.group.WORLD)
        layers["torch"] = theirs
    return layers


def host_us(layer, x, dy, device, passes):
    """Host time of one forward + backward (input, weight and bias gradients) in µs: `passes` in
    a row from a drained device, timed until the host returns, not until the device is done."""
    inputs = [x, *layer.parameters()]
    sync(device)
    t = time.perf_counter()
    for _ in range(passes):
        torch.autograd.grad(layer(x), inputs, dy)
    t = time.perf_counter() - t
    sync(device)
    return 1e6 * t / passes


def collectives_us(layer, x, dy, device, passes):
    """Host time per forward + backward inside the layer's collectives (each call of
    dist.all_reduce and dist.all_gather_single, each start of utils.start_all_reduce and each wait
    on it, timed) and outside them: its process group's share of its host time, and the rest."""
    spent, calls = [0.0], (dist.all_reduce, dist.all_gather_single, utils.start_all_reduce)

    def timed(call):
        def timed_call(*args, **kwargs):
            t = time.perf_counter()
            out = call(*args, **kwargs)
            spent[0] += time.perf_counter() - t
            return out
        return timed_call

    def timed_start(t):
        return timed(timed(calls[2])(t))        # its start, and the wait it returns
    dist.all_reduce, dist.all_gather_single = map(timed, calls[:2])
    utils.start_all_reduce = timed_start
    try:
        total = host_us(layer, x, dy, device, passes)
    finally:
        dist.all_reduce, dist.all_gather_single, utils.start_all_reduce = calls
    inside = 1e6 * spent[0] / passes
    return inside, total - inside


def syncbn_row(shape, device, dtype, passes, repeats):
    """One shape's medians, the layers alternated within each repeat (the same machine load)."""
    x = torch.randn(shape, device=device, dtype=dtype)
    x = (x.to(memory_format=utils.memory_format(device)) if x.dim() == 4 else x).requires_grad_()
    dy, layers = torch.randn_like(x), syncbn_layers(shape, device)
    times = {name: [] for name in [*layers, "collectives", "outside"]}
    for layer in layers.values():                                   # warm-up
        host_us(layer, x, dy, device, 3)
    for _ in range(repeats):
        for name, layer in layers.items():
            times[name].append(host_us(layer, x, dy, device, passes))
        inside, outside = collectives_us(layers["ours"], x, dy, device, passes)
        times["collectives"].append(inside)
        times["outside"].append(outside)
    us = {name: statistics.median(t) for name, t in times.items()}
    return {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
            **{f"{name}_us": round(v, 1) for name, v in us.items()},
            "ours_over_plain": round(us["ours"] / us["plain"], 2),
            "outside_over_plain": round(us["outside"] / us["plain"], 2),
            "torch_over_plain": round(us["torch"] / us["plain"], 2) if "torch" in us else None}


def bench_syncbn(args):
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)     # one core's time, not that of threads waiting for a busy core
    dtype = utils.autocast_dtype("auto", device) or torch.float32     # BN's input in the step
    repeats = 3 * REPEATS            # short calls: their time varies more with the machine's load
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        rows = [syncbn_row(shape, device, dtype, args.bench_steps, repeats)
                for shape in SYNCBN_SHAPES[device.type]]
    finally:
        dist.destroy_process_group()
    print(f"host time of one forward + backward per layer, medians of {repeats} repeats of "
          f"{args.bench_steps} on {device_name(device)}; ours and torch's take their multi-rank "
          f"path in a one-process {backend} group (their collectives run; no other rank to wait for)")
    for r in rows:
        theirs = (f"torch's nn.SyncBatchNorm {r['torch_us']:.0f} µs ({r['torch_over_plain']}x)"
                  if r["torch_over_plain"] else "torch's nn.SyncBatchNorm: needs CUDA")
        print(f"{r['shape']} {r['dtype']}: plain nn.BatchNorm {r['plain_us']:.0f} µs, ours "
              f"{r['ours_us']:.0f} µs ({r['ours_over_plain']}x; inside its two {backend} calls "
              f"{r['collectives_us']:.0f} µs, outside them {r['outside_us']:.0f} µs: "
              f"{r['outside_over_plain']}x plain), {theirs}")
    result = {"benchmark": "syncbn", "device": device_name(device), "backend": backend,
              "passes": args.bench_steps, "repeats": repeats, "layers": rows}
    print(json.dumps(result), flush=True)
    return result


# ----------------------------------------------------------------------------- the GPU check
CHECK = [   # (work, mode, intl.py flags), most important first: what does not fit the time is skipped
    ("INTL-M multi-crop, 256/GPU", "eager", "--method intl-m --multi-crop --batch-size 256"),
    ("INTL 2 views, 256/GPU", "eager", "--method intl --no-multi-crop --batch-size 256"),
    ("INTL 2 views, 256/GPU", "compile", "--method intl --no-multi-crop --batch-size 256 --compile"),
    ("INTL-M multi-crop, 32/GPU", "eager", "--method intl-m --multi-crop --batch-size 32"),
    ("INTL 2 views, 32/GPU", "CUDA graphs", "--method intl --no-multi-crop --batch-size 32 --compile reduce-overhead"),
    ("augmentation, multi-crop", "aug", "--multi-crop --batch-size 256 --bench-steps 32"),
    ("INTL 2 views, 32/GPU", "eager", "--method intl --no-multi-crop --batch-size 32"),
    ("INTL-M multi-crop, 256/GPU", "compile", "--method intl-m --multi-crop --batch-size 256 --compile"),
    ("INTL-M multi-crop, 32/GPU", "CUDA graphs", "--method intl-m --multi-crop --batch-size 32 --compile reduce-overhead"),
]


def check(budget_s, extra):
    """Each row of CHECK in its own process (clean memory peaks and compile caches), one table."""
    start, rows = time.time(), []
    for work, mode, flags in CHECK:
        left = budget_s - (time.time() - start)
        if left < (150 if mode in ("compile", "CUDA graphs") else 30):   # compiling takes minutes
            rows.append((work, mode, None, "skipped: out of time"))
            continue
        cmd = [sys.executable, os.path.abspath(__file__),
               *(["aug"] if mode == "aug" else ["step", "--bench-steps", "10"]), *flags.split(),
               "--output-dir", "runs/benchmark", *extra]
        print("$ python", " ".join(cmd[1:]), flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append((work, mode, r, None))
        except subprocess.TimeoutExpired:
            rows.append((work, mode, None, "stopped: out of time"))
        except (ValueError, IndexError):     # failed: its last words instead of figures
            rows.append((work, mode, None, (p.stderr.strip().splitlines() or ["failed"])[-1][:150]))
        print(rows[-1][2] or rows[-1][3], flush=True)
    print("\n| work | mode | img/s | step ms | peak GiB | head ms (share) | warm-up s |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for work, mode, r, why in rows:
        if r is None:
            print(f"| {work} | {mode} | {why} | | | | |")
        elif mode == "aug":
            print(f"| {work} | gpu_aug on {r['gpu_aug_device']} | {r['gpu_aug_img_per_s']:.0f} | | | | |")
            print(f"| {work} | one CPU core | PIL path {r['pil_img_per_s_per_core']}, --gpu-aug "
                  f"{r['gpu_aug_cpu_img_per_s_per_core']} ({r['cpu_cost_ratio']}x) | | | | |")
        else:
            mode += f" ({r['cudagraph_skips']} fallbacks)" if r["cudagraph_skips"] else ""
            print(f"| {work} | {mode} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} | {r['peak_gib']} | "
                  f"{r['head_ms']:.2f} ({100 * r['head_share']:.1f}%) | {r['warmup_s']} |")
    device = next((r["device"] for _, mode, r, _ in rows if r and mode != "aug"), "no step ran")
    print(f"\n{device}, {time.time() - start:.0f} s")
    return rows


MODES = {
    "step": "Training steps as intl.py runs them (bf16, channels_last, fused SGD, --compile) on "
            "synthetic crops already on the device, or with --data DIR through the real pipeline "
            "(PIL workers, or --gpu-aug). Under torchrun it times the DDP step.",
    "aug": "The crop recipe on ONE CPU core: the PIL path and the CPU side of --gpu-aug (decode "
           "and pad only), in images per second per core; gpu_aug on the device; and a grid of "
           "both paths side by side, OUTPUT_DIR/aug_grid.png.",
    "check": "The GPU check: both benchmarks over the standard settings, each in its own "
             "process, within --seconds, the other flags added to each; one table.",
    "syncbn": "Host time per BatchNorm layer, forward + backward, at 32 images per rank: plain "
              "nn.BatchNorm, utils.SyncBatchNorm, and torch's nn.SyncBatchNorm (needs CUDA), the "
              "last two forced through their multi-rank path in a one-process group (gloo on "
              "CPUs, NCCL on GPUs), with the ratios to plain BN measured in the same run.",
}


def parser():
    """benchmark.py's own flags, a set per mode; --help lists the modes and each one's flags."""
    def one_line(msg):                       # one line, not the whole usage
        utils.fail(f"{msg} (see python benchmark.py --help)")
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = p.add_subparsers(dest="mode", required=True, metavar="{step,aug,check,syncbn}",
                             help="what to time; each mode and its flags below")
    for name, what in MODES.items():
        # no abbreviations: a prefix of one of its flags may be meant for intl.py
        m = modes.add_parser(name, description=what, allow_abbrev=False, epilog={
            "check": "Any other flag is given to each run (intl.py's, --bench-steps).",
            "syncbn": "It takes no other flag."}.get(name, "Any other flag is intl.py's "
                                                        "(python intl.py --help)."))
        if name == "check":
            m.add_argument("--seconds", type=float, default=330.0, metavar="S",
                           help="the time budget of the whole check (default: %(default)g)")
        else:
            timed = {"aug": "images", "syncbn": "forward + backward passes of each layer"}.get(
                name, "training steps")
            m.add_argument("--bench-steps", type=int, default=20, metavar="N",
                           help=f"{timed} timed per repeat (default: %(default)s)")
        m.error = one_line
    p.error = one_line
    p.epilog = "\n".join(m.format_help() for m in modes.choices.values())   # each mode's flags
    return p


def main(argv=None):
    own, rest = parser().parse_known_args(argv)
    if own.mode == "check":
        if own.seconds <= 0:
            utils.fail("--seconds must be positive")
        return check(own.seconds, rest)
    if own.bench_steps < 1:
        utils.fail("--bench-steps must be positive")
    if own.mode == "syncbn":
        if rest:
            utils.fail(f"benchmark.py syncbn takes no other flag: {' '.join(rest)}")
        return bench_syncbn(own)
    args = intl.parse_args(rest, need_data=False)
    args.bench_steps = own.bench_steps
    return bench_step(args) if own.mode == "step" else bench_aug(args)


if __name__ == "__main__":
    main()

"""What a run needs besides the method, for intl.py and eval_linear.py: one-line errors, the run
folder and its progress lines, the data files, what a long run survives, checkpoints and their
resume, and the k-NN and linear probe on frozen features. Nothing here knows a script's flags:
the scripts pass in what they mean.

* unreadable files (empty, truncated, not an image, over Pillow's decompression-bomb limit) give
  their slot to another image of the folder (SkipUnreadable), are reported once and counted
  (Unreadable); past a fraction of an epoch's images the run stops in one line;
* SIGTERM, SIGINT and SIGUSR1 only raise a flag (StopSignals): the step finishes, a checkpoint
  holds the position in the epoch (ResumableSampler skips what was seen), and the ranks agree on
  it over a CPU process group (agree), so the GPU is never waited for;
* a non-finite loss skips its update on the device (step_if_finite) and leaves the BatchNorm
  statistics (and INTL-M's target) as they were (undo_memory, snapshot, restore_if_not_finite);
* saves are atomic; a full disk stops in one line, keeps the previous file and removes the partial
  one; a folder in use by another run is refused (RunFolder's lock);
* checkpoints load without running code (weights_only) and are continued only by a run with the
  same network and settings (Checkpoints.resume).
"""
import argparse
import contextlib
import dataclasses
import datetime
import difflib
import errno
import fcntl
import glob
import gzip
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError


# ----------------------------------------------------------------------------- one-line errors, processes
def fail(msg):
    """Bad input: one line on stderr and a non-zero exit, never a traceback."""
    sys.exit(f"error: {msg}")


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def attempt(fn):
    """(fn(), None), or (None, its line) when fn stops with a one-line exit (fail)."""
    try:
        return fn(), None
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        return None, e.code


def rank_of():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def exit_all(rank, line, code=1, group=None):
    """End this rank; rank 0 says why in one line (on stderr), so that N ranks print it once.
    With `group`, the ranks first wait for each other (for rank 0's save)."""
    if group is not None:
        dist.barrier(group=group)
    destroy_process_group()
    if code == 1:           # as fail(): the line is the exit's (stderr, exit code 1)
        sys.exit(line if rank == 0 else 1)
    if rank == 0:
        print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def stop_together(problem, group, code=1):
    """Every rank stops when any rank has a problem (a line), agreed in one collective of the CPU
    group, so that none is left waiting in another: rank 0 prints the first rank's line."""
    problems = [problem]
    if group is not None:
        problems = [None] * dist.get_world_size(group)
        dist.all_gather_object(problems, problem, group=group)
    first = next((p for p in problems if p), None)
    if first:
        exit_all(rank_of(), first, code)


STOP_LATER = []     # the first stop met outside the ranks' agreement: a failed log write


def stop_later(line):
    """A write of rank 0's logs failed: the run goes on to the ranks' next agreement (a step, an
    epoch's end, the run's end; Guard, RunFolder), where every rank stops with this line."""
    if not STOP_LATER:
        STOP_LATER.append(line)


def stop_if_later(group):
    """At an agreement of the ranks: every rank stops if a log write of any has failed."""
    stop_together(STOP_LATER.pop() if STOP_LATER else None, group)


def exit_on_ctrl_c(main):
    """main(), with a Ctrl-C that comes before a run handles its stop signals as one line (exit
    130), not a traceback."""
    try:
        return main()
    except KeyboardInterrupt:
        sys.exit("stopped by Ctrl-C before the run had started: nothing to save")


CPU_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers():
    """Data workers per process: the node's CPU cores shared among its processes, at most 8."""
    return max(1, min(8, CPU_CORES // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


RANGES = {"positive": lambda v: 0 < v < math.inf, "0 or more": lambda v: 0 <= v < math.inf,
          "in [0, 1]": lambda v: 0 <= v <= 1}


def check_ranges(args, rules):
    """rules {"positive": "epochs lr", ...}: one line for the first number out of its range (NaN
    and infinity too)."""
    for rule, names in rules.items():
        for name in names.split():
            v = getattr(args, name)
            if v is not None and not RANGES[rule](v):
                fail(f"--{name.replace('_', '-')} must be {rule}, not {v}")


class HelpFormatter(argparse.HelpFormatter):
    """--help that states each default once: "(default: X)" unless the help says it or it is None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def argument_parser(description):
    """An ArgumentParser whose errors are one line (not the whole usage) and whose --help states
    each default once."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.error = lambda msg: fail(f"{msg} (see --help)")
    return p


def cuda_device(local_rank, visible):
    """This process's GPU, or one line when torchrun starts more processes on a node than it has."""
    if local_rank >= visible:
        fail(f"{int(os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1))} processes on this node but "
             f"{visible} GPU(s) visible: set --nproc_per_node to at most {visible} (or check "
             f"CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", local_rank)


def setup_distributed(batch_size, timeout_minutes=30):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (env://); plain python runs one process. The
    global batch must split evenly: checked before any process group is joined. A collective
    waits timeout_minutes for the other ranks (a first compilation takes minutes)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.backends.cudnn.benchmark = True    # fixed crop shapes: pick the fastest convolutions once
    if batch_size % world:
        fail(f"--batch-size {batch_size} is not divisible by the world size {world}")
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = cuda_device(int(os.environ["LOCAL_RANK"]), torch.cuda.device_count())
        torch.cuda.set_device(device)
    store, rank, world = next(dist.rendezvous("env://"))
    # torchrun --max-restarts keeps its store: each attempt's keys apart, or the restarted
    # ranks read the addresses of the dead ones and cannot connect
    store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    host_group(timeout)
    return rank, world, device


class GatherWithGrad(torch.autograd.Function):
    """All-gather along the batch. Backward sums the gradients of every rank and keeps this
    rank's slice, so that DDP's gradient average equals the single-process gradient."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(z):
    """The global batch: every rank whitens the same m × d matrix."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return GatherWithGrad.apply(z)
    return z


def sum_over_ranks(t):
    """The sum of t over the ranks: an all-reduce on t's device (under NCCL, no host sync)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def mean_over_ranks(t):
    """The mean of t over the ranks."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return t if world == 1 else sum_over_ranks(t) / world


def destroy_process_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    HOST_GROUP.clear()


def leave_process_group():
    """Every rank leaves together (a barrier first): with gloo, a rank that tears the group down
    while another still works (rank 0 saving) can hang both at exit. A log write that failed on
    the way stops them all here (stop_later)."""
    stop_if_later(host_group())
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    destroy_process_group()


def on_rank0(read):
    """read() on rank 0, its result sent to every process: all act on rank 0's view of the files,
    also where each node has an output folder of its own. If read() stops in one line (fail),
    every rank stops with it."""
    box = [attempt(read) if rank_of() == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(box, src=0, group=host_group())
    value, problem = box[0]
    if problem:
        exit_all(rank_of(), problem)
    return value


def autocast_dtype(amp, device):
    """--amp as a dtype (None: float32). auto: bf16 on GPUs with native bf16 (emulated bf16 on
    older GPUs is slower than float32)."""
    if amp == "auto":
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else None
    if amp == "fp16" and device.type == "cpu":
        fail("--amp fp16 on the CPU is many times slower than float32 (no fast fp16 kernels "
             "there): use --amp off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def memory_format(device):
    """channels_last is faster for convolutions on GPUs, slower on CPUs."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def seed_all(seed):
    """torch's, numpy's and Python's random streams."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def unwrap(model):
    """The module that owns the weights, inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def plain(value):
    """Settings as JSON and torch.load(weights_only=True) take them: named tuples as dicts, tuples
    as lists."""
    if hasattr(value, "_asdict"):
        value = value._asdict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- the run folder
def make_output_dir(path):
    """Create the output folder and check that it takes files, before the first step, not after it."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        fail(f"--output-dir {path}: {'a file, not a folder' if os.path.isfile(path) else e.strerror or e}")


RESUME = "free space and run the same command: it continues from its last checkpoint"


def append_whole(f, data):
    """Append bytes to the unbuffered file f whole or not at all: a write cut short (a full disk)
    is truncated away before its OSError goes on."""
    size = os.fstat(f.fileno()).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
    except OSError:
        f.truncate(size)
        raise


class Tee:
    """A text stream that also hands what it is given to `copy` (the run folder's log.txt)."""

    def __init__(self, stream, copy):
        self.stream, self.copy = stream, copy

    def write(self, text):
        self.copy(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class RunFolder:
    """--output-dir of a run, held for its duration (`with RunFolder(...)`): created and checked
    for writing, locked against a second run (a dead run's lock is free: the kernel drops it),
    rank 0's console copied to log.txt, the settings written to args.json once the run starts
    (start()) with the world size, the device and the versions of torch and torchvision, `done`
    written when the whole run has finished (finish()). A run that fails before it has trained
    leaves no folder it created, and the folder's args.json as it was."""

    def __init__(self, path, rank, settings, device):
        self.path, self.rank, self.lock, self.log = path, rank, None, None
        self.settings = {**settings, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                         "device": device.type, "torch": torch.__version__,
                         "torchvision": torchvision.__version__}
        self.created, self.started = False, False

    def __enter__(self):
        problem = attempt(self.take)[1] if self.rank == 0 else None
        stop_together(problem, host_group())     # a folder in use stops every rank
        return self

    def take(self):
        self.created = not os.path.exists(self.path)
        make_output_dir(self.path)
        self.lock = open(os.path.join(self.path, "run.lock"), "a+")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.seek(0)
            holder = self.lock.read().strip() or "another process"
            self.lock.close()
            fail(f"--output-dir {self.path} is in use by {holder}: wait for it to finish, or "
                 f"use another --output-dir")
        self.lock.seek(0)
        self.lock.truncate()
        self.lock.write(f"process {os.getpid()} on {os.uname().nodename}\n")
        self.lock.flush()
        self.log = open(os.path.join(self.path, "log.txt"), "ab", buffering=0)
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(sys.stdout, self.copy_to_log), Tee(sys.stderr, self.copy_to_log)

    def copy_to_log(self, text):
        """log.txt takes the console's text; a failed write (a full disk) leaves it whole, is not
        tried again, and stops the run at the ranks' next agreement (stop_later)."""
        if self.log is None:
            return
        try:
            append_whole(self.log, text.encode())
        except OSError as e:
            self.log.close()
            self.log = None
            stop_later(f"error: cannot write {os.path.join(self.path, 'log.txt')}: "
                       f"{disk_error(e, self.path)}; {RESUME}")

    def start(self):
        """The run begins: these settings are the folder's (a refused resume leaves them), it is
        no longer done, and the partial files of saves cut short by earlier runs go."""
        self.started = True
        if self.rank == 0:
            remove_partial_saves(self.path)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.path, "done"))
            write_json(os.path.join(self.path, "args.json"), self.settings)

    def finish(self, summary):
        """The whole run has finished (not a --stop-epoch, a signal or a failure): FOLDER/done holds
        the summary, which is what a pipeline (run_imagenet.sh) counts as done."""
        stop_if_later(host_group())      # not done while a log write has failed
        if self.rank == 0:
            write_json(os.path.join(self.path, "done"), {**summary, "time": round(time.time(), 3)})

    def __exit__(self, kind, error, trace):
        if self.rank != 0:
            return False
        if kind is not None and not (kind is SystemExit and not isinstance(error.code, str)):
            why = error.code if kind is SystemExit else f"{kind.__name__}: {error}"
            self.copy_to_log(f"{why}\n")     # the reason of a failed run goes to log.txt too
        sys.stdout, sys.stderr = self.stdout, self.stderr
        if self.log is not None:
            self.log.close()
        self.lock.close()       # and its flock with it
        if kind is not None and self.created and not self.started:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


def write_json(path, obj):
    save_atomic(obj, path, lambda o, f: f.write(json.dumps(o, indent=1).encode()))


def json_safe(value):
    """A record as JSON allows it: a float that is not finite (a diverged loss) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_log(folder, rec, name="log.jsonl"):
    """One JSON object per line in FOLDER/NAME (call it on rank 0), whole or not at all; a failed
    write (a full disk) stops the run at the ranks' next agreement (stop_later)."""
    path = os.path.join(folder, name)
    try:
        with open(path, "ab", buffering=0) as f:
            append_whole(f, (json.dumps(json_safe(rec)) + "\n").encode())
    except OSError as e:
        stop_later(f"error: cannot write {path}: {disk_error(e, folder)}; {RESUME}")


# ----------------------------------------------------------------------------- progress
def clock(seconds):
    """A duration as H:MM:SS (hours unbounded)."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress(items, total, label, log=print, every=None):
    """Yield from items; every `every` items (default: about 10 lines a pass) and after the last,
    log 'LABEL i/total, elapsed H:MM:SS, ETA H:MM:SS (at HH:MM)' (ETA: the rest at the mean rate so far)."""
    every = every or max(1, round(total / 10))
    start, i, said = time.monotonic(), 0, 0

    def say():
        elapsed = time.monotonic() - start
        eta = elapsed / i * max(0, total - i)
        at = time.strftime("%H:%M", time.localtime(time.time() + eta))
        log(f"{label} {i}/{total}, elapsed {clock(elapsed)}, ETA {clock(eta)} (at {at})")

    for item in items:
        yield item          # the caller's work on it happens here: counted in the rate
        i += 1
        if i % every == 0 or i == total:
            say()
            said = i
    if i and said != i:     # fewer or more items than `total`: still a line after the last
        say()


class Progress:
    """Progress lines as DINO's MetricLogger prints them: the step's figures, the time of day,
    elapsed time and ETA of the epoch and of the run; the same figures to log.jsonl (with the
    time) and, if asked, to TensorBoard. `step()` costs nothing between printed lines: the
    figures are device tensors, read (a host sync) only when printed."""

    def __init__(self, folder, rank, steps_per_epoch, epochs, print_freq, tensorboard=False):
        self.folder, self.rank, self.steps, self.epochs = folder, rank, steps_per_epoch, epochs
        self.print_freq, self.start, self.tb = print_freq, time.time(), None
        if tensorboard and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                fail("--tensorboard needs the tensorboard package: pip install tensorboard")
            self.tb = SummaryWriter(os.path.join(folder, "tensorboard"))

    def print(self, line):
        if self.rank == 0:
            print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    def batches(self, loader, epoch, first):
        """The loader's items from its `first` step on, each with the seconds waited for it."""
        self.current, self.first, self.images, self.wait = epoch, first, 0, 0.0
        self.epoch_start = self.t_last = time.time()
        t = time.time()
        for i, item in enumerate(loader, start=first):
            self.wait += time.time() - t
            yield i, item
            t = time.time()

    def step(self, i, step, batch_size, **figures):
        self.images += batch_size
        if step % self.print_freq and i != self.steps - 1:
            return
        now = time.time()
        figures = {k: v.item() if torch.is_tensor(v) else v for k, v in figures.items()}
        rec = {"epoch": self.current, "step": step, **figures,
               "img_per_s": self.images / (now - self.t_last), "data_wait": self.wait / (now - self.t_last)}
        done = i + 1 - self.first       # this process's steps of this epoch, for the rates
        per_step = (now - self.epoch_start) / done
        left = self.steps - i - 1
        run_left = left + (self.epochs - self.current - 1) * self.steps
        self.print(f"ep {self.current + 1}/{self.epochs} step {i + 1}/{self.steps} "
                   + " ".join(f"{k} {v:.6g}" for k, v in figures.items())
                   + f" {rec['img_per_s']:.0f} img/s, data wait {100 * rec['data_wait']:.0f}%, "
                   f"elapsed {clock(now - self.start)}, ETA epoch {clock(per_step * left)}, "
                   f"run {clock(per_step * run_left)}")
        self.record(rec)
        self.images, self.wait, self.t_last = 0, 0.0, now

    def epoch(self, rec, k, transform):
        """The epoch's line: the spectrum before / after the transform, the monitor, what went
        wrong; then its record."""
        erank = lambda s: "-" if s["erank"] is None else f"{s['cond']:.3g}/{s['erank']:.1f}"
        line = (f"epoch {rec['epoch']}: spectrum cond/erank projector {erank(rec['projector'])}, "
                f"{transform} output {erank(rec['transformed'])} of {k}")
        if "knn5_top1" in rec:
            line += f"; top-1 5-NN {rec['knn5_top1']:.1f}%, linear {rec['linear_top1']:.1f}%"
        if rec["unreadable"]:
            line += f", {rec['unreadable']} unreadable images replaced"
        if rec["nonfinite"]:
            line += f", {rec['nonfinite']} steps skipped (loss not finite)"
        self.print(line)
        before, after = rec["projector"].pop("eigenvalues"), rec["transformed"].pop("eigenvalues")
        if self.rank == 0:
            write_log(self.folder, {"epoch": rec["epoch"], "before": before, "after": after},
                      "spectrum.jsonl")
        self.record(rec)

    def record(self, rec):
        """log.jsonl and TensorBoard, from rank 0: every number of the record, nested ones as a/b."""
        if self.rank != 0:
            return
        write_log(self.folder, {**rec, "time": round(time.time(), 3)})
        if self.tb is not None:
            flat = {k: v for k, v in rec.items() if isinstance(v, (int, float))}
            flat.update({f"{k}/{kk}": vv for k, v in rec.items() if isinstance(v, dict)
                         for kk, vv in v.items() if isinstance(vv, (int, float))})
            for k, v in flat.items():
                if k not in ("epoch", "step", "time"):
                    self.tb.add_scalar(k, v, rec.get("step", rec["epoch"]))
            self.tb.flush()

    def finish(self):
        self.print(f"total time {clock(time.time() - self.start)}")
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- unreadable images
GREY16 = ("I", "I;16", "I;16B", "I;16L")   # how Pillow opens 16-bit greyscale PNGs


def load_rgb(path, max_side=None):
    """8-bit RGB from an image file (16-bit greyscale scaled by 1/256: convert("RGB") clips it to
    white). With max_side, at most that many px a side: JPEGs are reduced while decoding (draft);
    other formats cannot be (a PNG's rows are filtered against each other), so they are reduced
    right after decoding, before any full-size copy."""
    with open(path, "rb") as f:
        img = Image.open(f)
        if max_side:
            img.draft("RGB", (max_side, max_side))
        img.load()
    if img.mode in GREY16:     # 16-bit levels to 8; an "I" image may hold 8-bit ones (a TIFF)
        levels = np.asarray(img)
        shift = 8 if img.mode != "I" or levels.max(initial=0) > 255 else 0
        img = Image.fromarray(np.clip(levels >> shift, 0, 255).astype(np.uint8))
    elif img.mode not in ("RGB", "L"):
        img = img.convert("RGB")      # first: Pillow resizes RGBA premultiplied
    if max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return img if img.mode == "RGB" else img.convert("RGB")


def reason(path, e):
    """Why a file could not be read, in a few words."""
    if isinstance(e, UnidentifiedImageError):    # its message only repeats the path
        return f"not an image Pillow can identify ({os.path.getsize(path)} bytes)"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class SkipUnreadable(torchvision.datasets.ImageFolder):
    """ImageFolder whose unreadable files give their slot to another image of the folder (the
    same stand-ins every epoch and run), so batches keep their shape and DDP ranks their
    lockstep. Items are (image, label, problem): problem is '' or 'PATH: reason'."""
    tries = 16

    def __getitem__(self, i):
        problem, stand_ins = "", random.Random(i)
        j = i
        for _ in range(self.tries):
            path, label = self.samples[j]
            try:
                img = self.loader(path)
            except Exception as e:      # any decoding error is the file's
                problem = problem or f"{path}: {reason(path, e)}"
                j = stand_ins.randrange(len(self))
                continue
            return self.transform(img), label, problem
        return self.transform(Image.new("RGB", (32, 32))), label, problem   # none readable in reach


def collate(batch, inner=torch.utils.data.default_collate):
    """`inner`'s batch of the (x, y) pairs, then the problems: one string per image ('' if read)."""
    problems = [item[2] if len(item) > 2 else "" for item in batch]
    return (*inner([item[:2] for item in batch]), problems)


class Unreadable:
    """The unreadable files that loaders replaced: each reported once per process, counted, and
    a one-line stop once an epoch (or pass) has more than max_fraction of its images unreadable."""

    def __init__(self, max_fraction):
        self.max_fraction, self.reported, self.first = max_fraction, set(), None

    def add(self, problems):
        """Report a batch's new problems on stderr; returns how many of its images were replaced."""
        found = [p for p in problems if p]
        for p in found:
            if p not in self.reported:
                self.reported.add(p)
                self.first = self.first or p
                print(f"warning: unreadable image replaced by another: {p}", file=sys.stderr, flush=True)
        return len(found)

    def check(self, count, images, rank=0, where="this epoch"):
        """count: agreed over the ranks, so that every rank takes the same decision."""
        if count > self.max_fraction * images:
            first = f" (first: {self.first})" if self.first else ""
            exit_all(rank, f"error: {count} of {images} images unreadable in {where}, more than "
                           f"--max-bad-files {self.max_fraction}{first}; repair or remove them, or "
                           f"raise --max-bad-files")


class PassWatch:
    """Called after each batch of a pass that every rank takes (features, a val pass): counts its
    unreadable files over the ranks (`count`), stops in one line past --max-bad-files of the
    pass's images, and returns True once any rank has a stop signal (one CPU collective)."""

    def __init__(self, unreadable, images, stop, group, where):
        self.unreadable, self.images, self.stop, self.group, self.where = unreadable, images, stop, group, where
        self.count = 0

    def __call__(self, problems):
        stopping, bad = agree([self.stop.signum, self.unreadable.add(problems)], self.group)
        self.count += bad
        self.unreadable.check(self.count, self.images, rank_of(), self.where)
        return bool(stopping)


# ----------------------------------------------------------------------------- data files
FMNIST_DIRS = ["/usr/share/datasets/fashion-mnist", "./data", "./data/FashionMNIST/raw"]


def fashion_mnist_dirs():
    """Where Fashion-MNIST's files are looked for: $FASHION_MNIST_DIR first, if set."""
    return [d for d in [os.environ.get("FASHION_MNIST_DIR")] if d] + FMNIST_DIRS


def read_idx(path):
    """An IDX file (the MNIST format), gzipped: big-endian dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_fashion_mnist(train=True):
    """uint8 images (N, 28, 28) and labels from $FASHION_MNIST_DIR, the Debian package
    dataset-fashion-mnist, ./data, else a torchvision download into ./data."""
    split = "train" if train else "t10k"
    for d in fashion_mnist_dirs():
        images = os.path.join(d, f"{split}-images-idx3-ubyte.gz")
        if os.path.exists(images):
            return read_idx(images), read_idx(os.path.join(d, f"{split}-labels-idx1-ubyte.gz"))
    try:
        ds = torchvision.datasets.FashionMNIST("./data", train=train, download=True)
    except Exception as e:
        fail(f"Fashion-MNIST not in {', '.join(fashion_mnist_dirs())} and the download failed "
             f"({type(e).__name__}); install the Debian package dataset-fashion-mnist")
    return ds.data.numpy(), ds.targets.numpy()


def load_cifar(name, train=True, root="./data"):
    """uint8 images (N, 32, 32, 3) and labels from torchvision's CIFAR-10/100 folder in
    ./data (pickled batches), downloaded there first if absent."""
    folder, files, key = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]
                                      if train else ["test_batch"], b"labels"),
                          "cifar100": ("cifar-100-python", ["train" if train else "test"],
                                       b"fine_labels")}[name]
    if not os.path.isdir(os.path.join(root, folder)):
        try:
            getattr(torchvision.datasets, name.upper())(root, download=True)
        except Exception as e:
            fail(f"{name} is not in {root}/{folder} and the download failed ({type(e).__name__})")
    images, labels = [], []
    for f in files:
        try:
            with open(os.path.join(root, folder, f), "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
        except FileNotFoundError:
            fail(f"{root}/{folder} has no {f}: remove the folder so that {name} downloads again")
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            fail(f"cannot read {name} batch {root}/{folder}/{f}: {e}")
        images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += batch[key]
    return np.concatenate(images), np.array(labels)


class ArrayImages(torch.utils.data.Dataset):
    """uint8 images in an array -> RGB PIL images (28-px grey ones padded to 32), then `transform`."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        img = Image.fromarray(np.pad(img, 2) if img.ndim == 2 else img).convert("RGB")
        return self.transform(img), int(self.labels[i])


def image_folder(root, transform, loader=load_rgb):
    """torchvision ImageFolder with one-line errors for a missing or empty folder; an unreadable
    file's slot goes to another image (items: image, label, problem; SkipUnreadable)."""
    if not os.path.isdir(root):
        data = os.path.dirname(root)
        close = difflib.get_close_matches(data.lower(), SMALL_DATA, n=1, cutoff=0.5)
        if close and not os.path.exists(data):
            fail(f"--data {data} is not a folder: did you mean --data {close[0]}?")
        fail(f"{root} not found: --data DIR must hold DIR/train/<class>/<image> (ImageNet layout)")
    try:
        folder = SkipUnreadable(root, transform, loader=loader, allow_empty=True)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"no images in {root}: {str(e).splitlines()[0]}")
    full = set(folder.targets)
    empty = [c for c, i in folder.class_to_idx.items() if i not in full]
    if not full:
        fail(f"no images in {root}: its {len(empty)} class folder(s) hold no image files")
    if empty:
        fail(f"{os.path.join(root, empty[0])} holds no images" + (f" (nor {len(empty) - 1} more class "
             f"folders)" if len(empty) > 1 else "") + f"; {len(full)} of {len(folder.classes)} class "
             f"folders do: remove the empty ones or add their images")
    return folder


SMALL_DATA = ["fashion-mnist", "cifar10", "cifar100"]


def labelled_images(data, train, transform, loader=load_rgb):
    """Fashion-MNIST, CIFAR-10/100 (train or test split), or DIR/train or DIR/val (ImageNet layout)."""
    if data == "fashion-mnist":
        return ArrayImages(*load_fashion_mnist(train), transform)
    if data in ("cifar10", "cifar100"):
        return ArrayImages(*load_cifar(data, train), transform)
    return image_folder(os.path.join(data, "train" if train else "val"), transform, loader)


def random_subset(ds, n):
    """A fixed random subset of n images (all when n is 0), the same on every rank."""
    if not n or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    return torch.utils.data.Subset(ds, idx.tolist())


class Shard(torch.utils.data.Dataset):
    """Every world-th item from `rank` on, padded to the same length on every rank (so that the
    ranks' batches, and their agreements, line up) with items labelled -1, dropped after."""

    def __init__(self, dataset, rank, world):
        self.dataset, self.items = dataset, range(rank, len(dataset), world)
        self.length = math.ceil(len(dataset) / world)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if i < len(self.items):
            return self.dataset[self.items[i]]
        return self.dataset[0][0], -1, ""


# ----------------------------------------------------------------------------- the evaluation view
def eval_side(data, stem_3x3=False):
    """The evaluation view's side: 224; 32 for 32-px data; 48 for Fashion-MNIST through the
    ImageNet stem, whose 32-px training crops show an object 1.4x (median) to 1.6x (mean)
    larger than the whole image does (and at 32 px its last block is one pixel)."""
    if data == "fashion-mnist" and not stem_3x3:
        return 48
    return 32 if stem_3x3 or data in SMALL_DATA else 224


def eval_transform(side, mean, std):
    """Centre view: Resize(256) (bilinear, torchvision's default) + CenterCrop(224); 32 px as
    they are; other sides resized bicubic."""
    T = torchvision.transforms
    resize = []
    if side == 224:
        resize = [T.Resize(256), T.CenterCrop(224)]
    elif side != 32:
        resize = [T.Resize(side, interpolation=T.InterpolationMode.BICUBIC)]
    return T.Compose(resize + [T.ToTensor(), T.Normalize(mean, std)])


def monitor_pair(data, transform, n_bank=10000, n_queries=2000):
    """The online monitor's labelled data: a fixed random n_bank training images as the bank,
    n_queries test (val) images as queries; None for a folder without val/."""
    if data not in SMALL_DATA and not os.path.isdir(os.path.join(data, "val")):
        return None
    return (random_subset(labelled_images(data, True, transform), n_bank),
            random_subset(labelled_images(data, False, transform), n_queries))


# ----------------------------------------------------------------------------- preemption
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 (what schedulers send before a kill) only note which came
    first: the training loop finishes its step, saves and exits. restore() undoes it."""

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.catch) for s in STOP_SIGNALS}

    def catch(self, signum, frame):
        self.signum = self.signum or signum

    def exit(self, rank, where, group=None):
        """Every rank exits as if killed by the signal (128 + its number), after `group`'s barrier
        (rank 0's save), rank 0 with the line 'stopped by SIGNAL <where>'."""
        name = signal.Signals(self.signum).name if self.signum else "a signal to another rank"
        exit_all(rank, f"stopped by {name} {where}", 128 + (self.signum or signal.SIGTERM), group)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id=None):
    """A data worker's init: the main process handles the signals and shuts its workers down."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


HOST_GROUP = []     # the gloo group of the ranks' small agreements, made once per process


def host_group(timeout=None):
    """A gloo group for the ranks' small agreements (None for one process): CPU tensors, so
    under NCCL it never waits for the GPU. Made once, by every rank (setup_distributed)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if not HOST_GROUP:
        HOST_GROUP.append(dist.new_group(backend="gloo", timeout=timeout))
    return HOST_GROUP[0]


def agree(values, group):
    """Each value summed over the ranks (a few integers, on the CPU)."""
    t = torch.tensor([int(v) for v in values], dtype=torch.int64)
    if group is not None:
        dist.all_reduce(t, group=group)
    return t.tolist()


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose epoch can start part-way: the first `skip` indices of its order
    (seen before a mid-epoch checkpoint) are left out, the rest come in the same order. Its
    length stays the whole epoch's: the schedules count steps per epoch."""
    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])


def train_loader(dataset, batch_size, rank, world, seed, workers, device, collate=collate,
                 drop_last=True):
    """Each rank reads its share of a global batch; the sampler reshuffles every epoch. drop_last:
    N // batch steps per epoch on any number of processes (no padding repeats; else the sampler
    pads with repeats and the last batch is smaller); an epoch can start part-way (a mid-epoch
    checkpoint); batches end with their unreadable files."""
    sampler = ResumableSampler(dataset, world, rank, seed=seed, drop_last=drop_last)
    per_rank = batch_size // world
    if drop_last and len(sampler) < per_rank:
        fail(f"{len(dataset)} images are fewer than one batch of {batch_size}")
    return torch.utils.data.DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals,   # workers' seeds: drawn from the rank's stream
        generator=torch.Generator().manual_seed(int(torch.randint(2**62, ()))))


def drop_log_records_after(path, key, last):
    """On resume, the log records written after the checkpoint (by a run killed later) go, so
    that each step is logged once; so does a line cut short by the kill."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        with contextlib.suppress(ValueError):
            if json.loads(line).get(key, 0) <= last:
                keep.append(line)
    if len(keep) < len(lines):
        save_atomic(keep, path, lambda lines, f: f.write("".join(lines).encode()))


# ----------------------------------------------------------------------------- divergence
def zero_momentum(optimizer):
    """Momentum buffers of zeros before the first step: the same update (0.9·0 + g = g), but a
    skipped first step (found_inf) cannot leave fused SGD's buffers uninitialised."""
    for group in optimizer.param_groups:
        for p in group["params"] if group["momentum"] else []:
            optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def step_if_finite(optimizer, loss):
    """optimizer.step(), skipped when the loss is not finite. Fused SGD (GPUs) takes the flag as
    it takes the fp16 GradScaler's found_inf and skips on the device, with no host sync; other
    optimizers run on the CPU, where reading the flag costs nothing."""
    found_inf = (~torch.isfinite(loss.detach())).float()
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf
        optimizer.step()
        del optimizer.found_inf
    elif not found_inf.item():
        optimizer.step()


def flat_like(tensors):
    """One flat tensor for `tensors` (one dtype and device) and views of it shaped as each."""
    flat = tensors[0].new_empty(sum(t.numel() for t in tensors))
    return flat, [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def undo_memory(tensors):
    """Room, allocated once, for what a skipped step puts back (`tensors`: BatchNorm's running
    statistics, INTL-M's target before its EMA). Per dtype and device: (the tensors, (their copy,
    its views), (room for restore_if_not_finite, its views))."""
    kinds = dict.fromkeys((t.dtype, t.device) for t in tensors)
    groups = [[t for t in tensors if (t.dtype, t.device) == kind] for kind in kinds]
    return [(group, flat_like(group), flat_like(group)) for group in groups]


@torch.no_grad()
def snapshot(undo):
    """The tensors of undo_memory, copied at the start of a step: one foreach copy per dtype."""
    for live, (_, copies), _ in undo:
        torch._foreach_copy_(copies, live)


@torch.no_grad()
def restore_if_not_finite(undo, loss):
    """A step whose loss is not finite leaves no trace: the snapshot's tensors go back, decided on
    the device (no host sync): per dtype, the tensors as they are now into flat memory, where()
    picks the copy if the loss is not finite, and a copy back."""
    bad = ~torch.isfinite(loss.detach())
    for live, (copy, _), (now, now_views) in undo:
        torch._foreach_copy_(now_views, live)
        torch.where(bad, copy, now, out=now)
        torch._foreach_copy_(live, now_views)


def count_nonfinite(counts, loss):
    """counts = [steps skipped, current run, longest run] of non-finite losses, on the device."""
    bad = (~torch.isfinite(loss.detach())).to(counts.dtype)
    run = (counts[1] + 1) * bad
    counts.copy_(torch.stack([counts[0] + bad, run, torch.maximum(counts[2], run)]))


def check_nonfinite(counts, k, step, lr, rank, hint="lower --lr"):
    """A one-line stop once k non-finite losses came in a row (reads the counter: a host sync)."""
    if counts[2] >= k:
        exit_all(rank, f"error: the loss was not finite for {k} steps in a row, by step {step} "
                       f"(lr {lr:.4g}); stopped without saving: {hint}")


def finite(*modules):
    """Every floating-point weight and buffer is finite (one host sync: only at saves)."""
    ts = [t for m in modules if m is not None for t in m.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


# ----------------------------------------------------------------------------- saves, a full disk
def disk_error(e, folder):
    """Why a write failed, in words: a full disk (or file-size limit) says how much is free."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "unexpected pos" in str(e):
        return f"the disk is full ({shutil.disk_usage(folder).free / 2**30:.2f} GiB free in {folder})"
    return getattr(e, "strerror", None) or str(e).splitlines()[0]


def save_atomic(obj, path, write=torch.save):
    """write(obj, file) to a temporary file, then rename: a crash never leaves a half-written
    file. A failed write (a full disk: an OSError, or torch's zip writer's RuntimeError) removes
    its partial file at once and stops in one line; the previous file stays."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(obj, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = "the previous one is intact" if os.path.exists(path) else "nothing was saved"
        sys.exit(f"error: cannot save {path}: {disk_error(e, os.path.dirname(os.path.abspath(path)))}; "
                 f"{kept}")


def remove_partial_saves(folder):
    """Temporary files of saves that never finished (a kill -9 or a full disk in an earlier run)."""
    for f in glob.glob(os.path.join(glob.escape(folder), "*.tmp[0-9]*")):
        with contextlib.suppress(OSError):
            os.remove(f)


# ----------------------------------------------------------------------------- checkpoints and resume
def rng_state(aug=None, device=None):
    """Every random stream a rank draws from (the --gpu-aug generator and this rank's GPU too), in
    types that torch.load(weights_only=True) reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda,
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "aug": aug.get_state() if aug is not None else None}


def set_rng_state(s, aug=None, device=None):
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    if s["cuda"] is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)
    if aug is not None and s.get("aug") is not None and len(s["aug"]) == len(aug.get_state()):
        aug.set_state(s["aug"])     # (moved between CPU and GPU: the new device's own stream)


def resume_rng_state(states, rank, aug=None, device=None):
    """This rank's stored streams; a rank the file has none for (more processes now) seeds its own."""
    set_rng_state(states[rank % len(states)], aug, device)
    if rank >= len(states):     # from a stored stream and the rank: never another rank's crops
        seed = (int(torch.randint(2**31, ())) + rank) % 2**31
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
        if aug is not None:
            aug.manual_seed(int(torch.randint(2**62, ())))


def file_kind(obj, kinds):
    """What a loaded file holds, in words, for an error; kinds {key: words}: the first key found."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    listed = ", ".join(sorted(map(str, obj))[:4]) or "nothing"
    return next((v for k, v in kinds.items() if k in obj), f"a dict of {listed}")


def load_checkpoint(path, mmap=False):
    """torch.load of tensors and plain containers only: a file that would run code when unpickled
    (any other object) is refused in one line, and nothing in it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            fail(f"{path} holds Python objects besides tensors, numbers, strings and containers; "
                 f"unpickling it could run code, so it is not loaded")
        fail(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else 'corrupt'}")
    except Exception as e:
        fail(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def file_identity(path, tail=2**20):
    """A file's size and the hash of its last MiB (None: no such file). The tail of torch's zip
    files holds the CRC-32 of each record and the save's own id: two saves of one size differ."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - tail))
        return size, hashlib.sha256(f.read()).hexdigest()


def read_everywhere(path, group):
    """The checkpoint at `path` as rank 0 sees it: where every rank sees the same file (a shared
    folder), each reads it itself, memory-mapped; else (a node's own folder, without it or with
    a stale one) rank 0's copy is broadcast."""
    def identity():
        if os.path.isdir(path):
            fail(f"--resume {path} is a directory, not a checkpoint file")
        return file_identity(path) or fail(f"--resume {path}: no such file")

    theirs = on_rank0(identity)
    if agree([file_identity(path) != theirs], group)[0] == 0:
        ckpt, problem = attempt(lambda: load_checkpoint(path, mmap=True))
        stop_together(problem, group)
        return ckpt
    return on_rank0(lambda: load_checkpoint(path))


@dataclasses.dataclass
class TrainState:
    """What a training run holds and its checkpoint restores."""
    model: nn.Module                    # runs the step (DDP, compiled); unwrap(model) owns the weights
    target: nn.Module = None            # INTL-M's momentum target
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None
    aug: torch.Generator = None         # --gpu-aug's random stream
    amp: torch.dtype = None             # the autocast dtype (None: float32)
    device: torch.device = None
    best: dict = None                   # an evaluation's best val accuracy so far
    counters: dict = None               # Guard's counts of the epoch in flight
    undo: list = None                   # what a skipped step puts back (undo_memory): not saved

    def train(self):
        """Training mode for both networks: BN layers use the batch's statistics in each."""
        self.model.train()
        if self.target is not None:
            self.target.train()


def match_layouts(optimizer):
    """Each optimizer buffer in fresh memory with its parameter's layout: a file's are contiguous
    (saved on a CPU) while the weights may be channels_last (GPUs), and fused SGD requires the
    same strides."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape:
                state[k] = torch.empty_like(p).copy_(v)      # empty_like keeps p's strides


def start_afresh(folder):
    """--restart: the logs of the runs the folder held become *.jsonl.old (replacing older ones)."""
    print(f"--restart: starting afresh in {folder}", flush=True)
    for log in glob.glob(os.path.join(glob.escape(folder), "*.jsonl")):
        os.replace(log, log + ".old")
        print(f"--restart: {log} renamed {log}.old", flush=True)


class Checkpoints:
    """checkpoint.pth of a run in FOLDER, with the files exported beside it (`exports(state)` ->
    {name: object}, e.g. backbone.pth). `settings` (plain values) is what the run computes; a
    resume continues only a file with the same `describe(settings)` (what the run trains, in
    words) and the same settings but the `free` ones, unless allow_changed: then from the file's
    point, in this run's steps. Rank 0 writes; a failed write stops every rank with its line."""

    def __init__(self, folder, state, settings, free, describe, exports, rank, world, group, device):
        self.folder, self.path, self.state, self.settings = folder, os.path.join(folder, "checkpoint.pth"), state, settings
        self.free, self.describe, self.exports = free, describe, exports
        self.rank, self.world, self.group, self.device = rank, world, group, device

    def save(self, epoch, step, exports=False):
        """`epoch` whole epochs and `step` steps done (more than epoch x steps per epoch: a
        mid-epoch save), with every rank's random streams; the exports first, so that a cut-off
        save is redone, exports included, by the resumed run."""
        rngs = [rng_state(self.state.aug, self.device)]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state(self.state.aug, self.device))
        s = self.state
        ckpt = lambda: {"model": unwrap(s.model).state_dict(), "optimizer": s.optimizer.state_dict(),  # noqa: E731
                        "target": s.target.state_dict() if s.target else None, "best": s.best,
                        "counters": s.counters,
                        "scaler": s.scaler.state_dict() if s.scaler else None, "epoch": epoch,
                        "step": step, "rng": rngs, "args": self.settings,
                        "describe": self.describe(self.settings)}
        if exports:
            self.export()
        self.write(lambda: save_atomic(ckpt(), self.path))

    def export(self):
        self.write(lambda: [save_atomic(obj, os.path.join(self.folder, name))
                            for name, obj in self.exports(self.state).items()])

    def write(self, save):
        """save() on rank 0; if it fails (a full disk), every rank stops with its line."""
        stop_together(attempt(save)[1] if self.rank == 0 else None, self.group)

    def resume(self, path=None, restart=False, allow_changed=False):
        """(epoch, step) to start from: PATH, else FOLDER/checkpoint.pth unless `restart` (then the
        logs become *.old), else (0, 0). Rank 0 then drops the log records written after the
        checkpoint (by a run killed later)."""
        path = on_rank0(lambda: path or (self.path if os.path.exists(self.path) and not restart else None))
        epoch, step = self.load(path, allow_changed) if path else (0, 0)
        if self.rank == 0:
            if path:
                print(f"resumed from {path} at epoch {epoch}, step {step}", flush=True)
            elif restart:
                start_afresh(self.folder)
            drop_log_records_after(os.path.join(self.folder, "log.jsonl"), "step", step)
            drop_log_records_after(os.path.join(self.folder, "spectrum.jsonl"), "epoch", epoch)
        return epoch, step

    def load(self, path, allow_changed=False):
        """Restores the state from PATH; a file that does not fit stops every rank in one line."""
        ckpt = read_everywhere(path, self.group)
        restored, problem = attempt(lambda: self.restore(ckpt, path, allow_changed))
        stop_together(problem, self.group)
        return restored

    def restore(self, ckpt, path, allow_changed):
        step = self.resumable(ckpt, path, allow_changed)
        s = self.state
        try:
            unwrap(s.model).load_state_dict(ckpt["model"])
            if s.target is not None:
                s.target.load_state_dict(ckpt["target"])
            mine = [{k: v for k, v in g.items() if k != "params"} for g in s.optimizer.param_groups]
            s.optimizer.load_state_dict(ckpt["optimizer"])
            match_layouts(s.optimizer)
            for g, settings in zip(s.optimizer.param_groups, mine):
                g.update(settings)       # this run's lr, weight decay, fused: the file's buffers only
            if ckpt["scaler"] and s.scaler:   # none without fp16: a fresh one (--amp may change)
                s.scaler.load_state_dict(ckpt["scaler"])
            s.best = ckpt.get("best", s.best)
            if ckpt.get("counters") and s.counters:      # in place: Guard holds this dict
                s.counters.update({k: v.to(s.counters[k].device) if torch.is_tensor(v) else v
                                   for k, v in ckpt["counters"].items()})
            resume_rng_state(ckpt["rng"], self.rank, s.aug, self.device)
        except (KeyError, TypeError, RuntimeError, ValueError) as e:
            fail(f"checkpoint {path} does not match this run ({self.describe(self.settings)}): "
                 f"{str(e).splitlines()[0]}")
        return ckpt["epoch"], step

    def resumable(self, ckpt, path, allow_changed):
        """The step to continue from if `ckpt` is a checkpoint of what this run trains, with its
        settings, else one line on what differs."""
        if not isinstance(ckpt, dict) or "step" not in ckpt:
            kinds = {"conv1.weight": "a bare backbone (backbone.pth)", "best": "an older evaluation's checkpoint"}
            fail(f"--resume {path} holds {file_kind(ckpt, kinds)}, not a run's checkpoint.pth")
        now = self.settings
        made = {**now, **(ckpt.get("args") or {})}   # what the file does not record counts as this run's
        theirs = ckpt.get("describe") or self.describe(made)
        if theirs != self.describe(now):
            fail(f"checkpoint {path} does not match this run: it holds {theirs}; this run: "
                 f"{self.describe(now)}. Use another --output-dir, or add --restart to start afresh")
        diffs = [f"{k.replace('_', '-')} {made[k]} -> {v}" for k, v in now.items()
                 if k not in self.free and made[k] != v]
        if not diffs:
            return ckpt["step"]
        if not allow_changed:
            fail(f"checkpoint {path} was made with other settings ({', '.join(diffs)}): run with "
                 f"those, use another --output-dir, add --restart to start afresh, or add "
                 f"--allow-changed-args to continue with these")
        # the same point of the same epoch, in this run's steps (the schedules follow step / all steps)
        step = round(ckpt["step"] * now["steps_per_epoch"] / made["steps_per_epoch"])
        if self.rank == 0:
            print(f"--allow-changed-args: {', '.join(diffs)}; continuing after epoch {ckpt['epoch']} "
                  f"at step {step} (step {ckpt['step']} in the file)")
        return step


class Guard:
    """What a long run survives, behind two calls of the training loop: after_step() counts
    non-finite losses and unreadable images and saves mid-epoch when a stop signal came or a save
    is due (then exits on the signal); end_epoch() saves the epoch. Between counter reads every
    `check_every` steps, nothing here waits for the GPU."""

    def __init__(self, checkpoints, images, max_bad_files, max_nonfinite, save_every_minutes,
                 check_every, nonfinite_hint="lower --lr", stop=None, unreadable=None):
        self.ckpt, self.images, self.group = checkpoints, images, checkpoints.group
        self.max_nonfinite, self.hint, self.check_every = max_nonfinite, nonfinite_hint, check_every
        self.every_s, self.last_save = 60 * save_every_minutes, time.time()
        self.stop = stop or StopSignals()
        self.unreadable = unreadable or Unreadable(max_bad_files)
        # the epoch's counts, in the state (a mid-epoch resume continues them): non-finite losses
        # [skipped, current run, longest run] on the device, and the unreadable images replaced
        self.counts = checkpoints.state.counters = {
            "nonfinite": torch.zeros(3, device=checkpoints.device), "unreadable": 0}
        self.stopping = False

    def after_step(self, epoch, step, loss, problems, last):
        """loss: the same on every rank (the global batch's), so that they decide alike."""
        count_nonfinite(self.counts["nonfinite"], loss)
        due = self.every_s and time.time() - self.last_save > self.every_s
        stopping, due, bad, later = agree([self.stop.signum, due, self.unreadable.add(problems),
                                           bool(STOP_LATER)], self.group)
        if later:       # a log write failed: the checkpoint holds the last save
            stop_if_later(self.group)
        self.stopping = bool(stopping)
        self.counts["unreadable"] += bad
        self.unreadable.check(self.counts["unreadable"], self.images, self.ckpt.rank)
        if step % self.check_every == 0:
            self.check_nonfinite(step)
        if (self.stopping or due) and not last:     # mid-epoch (an epoch's end saves anyway)
            self.save(epoch, step)
            self.stop_if_asked(step)

    def check_nonfinite(self, step):
        lr = self.ckpt.state.optimizer.param_groups[0]["lr"]
        check_nonfinite(self.counts["nonfinite"], self.max_nonfinite, step, lr, self.ckpt.rank, self.hint)

    def save(self, epoch, step, exports=False):
        """Never weights after a divergence: the last finite checkpoint stays."""
        self.check_nonfinite(step)
        s = self.ckpt.state
        if agree([not finite(unwrap(s.model), s.target)], self.group)[0]:
            lr = s.optimizer.param_groups[0]["lr"]
            exit_all(self.ckpt.rank, f"error: weights not finite at step {step} (lr {lr:.4g}): not "
                                     f"saved, {self.ckpt.path} keeps the last finite ones")
        self.ckpt.save(epoch, step, exports)
        self.last_save = time.time()

    def end_epoch(self, epoch, step, exports=True):
        """Saves the epoch (the exports, then the checkpoint, with the counts reset for the next
        epoch); returns the epoch's counts."""
        counts = {"unreadable": self.counts["unreadable"], "nonfinite": int(self.counts["nonfinite"][0])}
        self.counts["unreadable"] = 0
        self.counts["nonfinite"][0] = 0
        self.save(epoch, step, exports)
        return counts

    def stop_if_asked(self, step):
        """After a save: every rank stops once any has a stop signal (at an epoch's end, also one
        that came during the monitor or the val pass)."""
        if self.stopping or agree([self.stop.signum], self.group)[0]:
            self.stop.exit(self.ckpt.rank, f"after step {step}: {self.ckpt.path} holds this point; "
                                            f"run the same command to resume", self.group)

    def close(self):
        self.stop.restore()


# ----------------------------------------------------------------------------- k-NN and linear probe on frozen features
@torch.no_grad()
def features(backbone, dataset, device, batch_size=1000, workers=0, after_batch=None, log=None,
             label="features: batch"):
    """RAW (not normalised) features of the backbone in eval mode, and the labels; None when
    after_batch(problems), called after each batch, says stop (a stop signal: within a batch).
    With `log`, the pass reports its progress (progress); without, it is silent (the monitor)."""
    backbone.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate)
    batches = loader if log is None else progress(loader, len(loader), label, log)
    out = []
    for x, y, problems in batches:
        out.append((backbone(x.to(device)).float(), y.to(device)))
        if after_batch is not None and after_batch(problems):
            return None
    return torch.cat([f for f, _ in out]), torch.cat([y for _, y in out])


@torch.no_grad()
def knn_predict(bank, bank_labels, queries, k=5, temperature=None, chunk=1024):
    """k-NN class of each query, `chunk` queries at a time; k is clamped to the bank size.
    temperature None: majority of the k nearest by Euclidean distance on the raw features,
    ties to the smallest label among the most frequent (the authors' small-data k-NN);
    else DINO's vote weighted by exp(cos/T), cosine of the L2-normalised features."""
    k, bank_labels, classes = min(k, len(bank)), bank_labels.long(), int(bank_labels.max()) + 1
    if temperature is not None:
        bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    preds = []
    for q in queries.split(chunk):
        if temperature is None:
            idx = torch.cdist(q, bank).topk(k, dim=1, largest=False).indices
            w = q.new_ones(idx.shape)
        else:
            sim, idx = (q @ bank.T).topk(k, dim=1)
            w = (sim / temperature).exp()
        votes = q.new_zeros(len(q), classes).scatter_add_(1, bank_labels[idx], w)
        preds.append(votes.argmax(dim=1))   # the first of equal maxima: the smallest label
    return torch.cat(preds)


def exp_lr(epoch, epochs, lr, lr_end=1e-6):
    """lr (lr_end/lr)^(epoch/epochs): lr at epoch 0, ×(lr_end/lr)^(1/epochs) each epoch, lr_end
    after the last one (the authors' ExponentialLR, stepped once per epoch)."""
    return lr * (lr_end / lr) ** (epoch / epochs)


@torch.no_grad()
def top1_top5(head, x, y):
    """Top-1 and top-5 (%) of a classifier on fixed features."""
    top = head(x).topk(min(5, head.out_features), dim=1).indices == y[:, None]
    return 100 * top[:, 0].double().mean().item(), 100 * top.any(dim=1).double().mean().item()


def train_probe(x, y, xv, yv, classes, epochs, lr=1e-2, batch_size=1000, every=50, report=print):
    """nn.Linear on fixed features: Adam (weight decay 5e-6), exp_lr decay to 1e-6, mini-batches
    from a fresh permutation each epoch. Every `every` epochs and after the last, report() gets
    the epoch's loss, lr and val top-1 / top-5 (%); returns the last top-1 and top-5."""
    head = nn.Linear(x.shape[1], classes).to(x.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=5e-6)
    for epoch in range(epochs):
        for g in optimizer.param_groups:
            g["lr"] = exp_lr(epoch, epochs, lr)
        batches = torch.randperm(len(x), device=x.device).split(batch_size)
        total = torch.zeros((), device=x.device)
        for idx in batches:
            loss = F.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            acc1, acc5 = top1_top5(head, xv, yv)
            report({"epoch": epoch + 1, "loss": total.item() / len(batches),
                    "lr": optimizer.param_groups[0]["lr"], "acc1": acc1, "acc5": acc5})
    return acc1, acc5


def spectrum(x):
    """Of the covariance of x's rows (the whitened variables, float64): its condition number
    λmax/λmin (capped at 1e12: singular), effective rank exp(entropy(λ/Σλ)) and eigenvalues λ,
    largest first; None and [] where it is not finite (the batch of a skipped step)."""
    k, n = x.shape
    cov = (x @ x.T if k <= n else x.T @ x) / (n - 1)
    if not torch.isfinite(cov).all():
        return {"cond": None, "erank": None, "eigenvalues": []}
    lam = torch.linalg.eigvalsh(cov).clamp_min(0)
    lam = torch.cat([lam, lam.new_zeros(k - len(lam))])   # the Gram misses k - n zeros
    p = lam / lam.sum()
    erank = torch.exp(-(p * p.clamp_min(1e-300).log()).sum()).item()
    cond = (lam.max() / lam.min().clamp_min(lam.max() * 1e-12)).item()
    return {"cond": cond, "erank": erank, "eigenvalues": [float(f"{v:.5g}") for v in lam.flip(0).tolist()]}


def monitor(backbone, pair, device, workers=0, stop=None):
    """The online monitor on pair = (bank, queries): the 5-NN top-1 (%) of the queries (the
    authors' small-data k-NN) and that of a linear probe trained on the bank's features
    (train_probe, 100 epochs), each from the same features, computed once; {} when a stop
    signal (StopSignals) comes: the run stops within the batch in flight."""
    stopping = None if stop is None else (lambda problems: bool(stop.signum))
    with torch.random.fork_rng(devices=[]):     # the training run's random streams are untouched
        bank = features(backbone, pair[0], device, workers=workers, after_batch=stopping)
        queries = bank and features(backbone, pair[1], device, workers=workers, after_batch=stopping)
        if queries is None:
            return {}
        (fb, lb), (fq, lq) = bank, queries
        torch.manual_seed(0)
        linear = train_probe(fb, lb, fq, lq, int(lb.max()) + 1, 100, every=100, report=lambda rec: None)[0]
    return {"knn5_top1": 100 * (knn_predict(fb, lb, fq, k=5) == lq).float().mean().item(), "linear_top1": linear}


# ----------------------------------------------------------------------------- synchronised BatchNorm
# Every rank has an equal, non-empty batch (the sampler drops the last partial one), so every
# rank's count is known: one collective per BN layer and direction, and the host never waits for
# the GPU (torch's nn.SyncBatchNorm all-gathers the counts and drops empty ranks: a host wait).
def dense(t):
    """t as torch's SyncBatchNorm hands it to the kernels: channels_last kept, else contiguous."""
    return t if t.is_contiguous(memory_format=torch.channels_last) else t.contiguous()


def update_running_stats(running_mean, running_var, mean, var, n, momentum):
    """running <- (1 - m) running + m batch, the variance unbiased (var n / (n - 1)), as
    nn.BatchNorm; m a float, or a tensor on the device (momentum None: 1 / batches seen)."""
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_((var * (n / (n - 1))).to(running_var.dtype), momentum)


class SyncBatchNormCUDA(torch.autograd.Function):
    """torch's fused kernels, as its nn.SyncBatchNorm calls them (so the same dtypes under
    autocast: statistics in float32 for 16-bit input), each rank's count made on the device."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        x, world, channels = dense(x), dist.get_world_size(), x.shape[1]
        mean, invstd = torch.batch_norm_stats(x, eps)
        stats = mean.new_empty(world * 2 * channels)
        dist.all_gather_single(stats, torch.cat([mean, invstd]))  # every rank's mean and 1/std
        means, invstds = stats.view(world, 2 * channels).split(channels, dim=1)
        fused = not torch.is_tensor(momentum)       # the kernel updates the running stats itself
        dtype = mean.dtype if running_mean is None else running_mean.dtype
        counts = torch.full((world,), x.numel() // channels, dtype=dtype, device=x.device)
        mean, invstd = torch.batch_norm_gather_stats_with_counts(
            x, means, invstds, running_mean if fused else None, running_var if fused else None,
            momentum if fused else 0.0, eps, counts)
        if running_mean is not None and not fused:
            update_running_stats(running_mean, running_var, mean, invstd.pow(-2) - eps,
                                 x.numel() // channels * world, momentum)
        ctx.save_for_backward(x, weight, mean, invstd, counts.int())
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, counts = ctx.saved_tensors
        dy, (needs_x, needs_w, needs_b) = dense(dy), ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu, dw, db = torch.batch_norm_backward_reduce(
            dy, x, mean, invstd, weight, needs_x, needs_w, needs_b)
        dx = None
        if needs_x:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums)           # [sum dy, sum dy (x - mean)] of every rank, in one call
            weight = None if weight is None else weight.to(mean.dtype)
            dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, *sums.chunk(2), counts)
        return dx, dw if needs_w else None, db if needs_b else None, None, None, None, None


def start_all_reduce(t):
    """Start summing t over the default group's ranks, in place; returns the call that waits for
    the sum. The group's own call, without dist.all_reduce's Python checks (a few to 30 µs a call
    on a CPU core); torch.compile traces dist.all_reduce only, and only waited on at once."""
    if torch.compiler.is_compiling():
        dist.all_reduce(t)
        return lambda: None
    return dist.group.WORLD.allreduce([t]).wait


class SyncBatchNormCPU(torch.autograd.Function):
    """The same on CPUs, which lack those kernels: each rank's mean and mean square in one
    all-reduce, then nn.BatchNorm's own CPU kernels in eval mode with the global statistics.
    Statistics in float32 at least, as cuDNN's BN accumulates 16-bit input."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if torch.compiler.is_compiling():   # the kernel below has none that torch.compile traces
            var, mean = torch.var_mean(wide, [0, *range(2, x.dim())], correction=0)
        else:
            mean, var = torch.batch_norm_update_stats(wide, None, None, 0.0)    # this rank's, 1 pass
        moments = torch.stack([mean, var.addcmul_(mean, mean)])  # this rank's mean of x and of x²
        start_all_reduce(moments)()     # summed; equal counts: the global moments are their mean
        world = dist.get_world_size()
        mean, mean_sq = moments.div_(world).unbind()
        var = mean_sq.addcmul_(mean, mean, value=-1).clamp_min_(0)   # rounding: a hair below 0
        n = x.numel() // x.shape[1] * world
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, n, momentum)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.n = eps, n
        return torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]

    @staticmethod
    def backward(ctx, dy):
        """dx = s (dy - mean(dy) - x̂ mean(dy x̂)) over the global batch, s = w / sqrt(var + eps);
        the weight and bias gradients are this rank's own sums, like torch's SyncBatchNorm: DDP's
        average over ranks then equals the gradient of one process on the global batch."""
        x, weight, mean, var = ctx.saved_tensors
        _, sum_dy_x_hat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, None, None, False, ctx.eps, [False, True, True])
        dx = None
        if ctx.needs_input_grad[0]:
            sums = torch.stack([sum_dy, sum_dy_x_hat])
            wait_for_sums = start_all_reduce(sums)  # [sum dy, sum dy x̂] of every rank, in one call
            invstd = (var + ctx.eps).rsqrt_()   # while it runs, the terms that need no other rank
            scale = invstd if weight is None else invstd * weight
            to_x = (1, -1) + (1,) * (x.dim() - 2)       # per-channel values broadcast against x
            dx = torch.mul(dy, scale.view(to_x))        # in float32 at least
            wait_for_sums()
            mean_dy, mean_dy_x_hat = sums.div_(ctx.n).unbind()
            slope = mean_dy_x_hat.mul_(invstd).mul_(scale)  # dx = s dy - slope (x - mean) - s mean(dy)
            shift = torch.mul(slope, mean).addcmul_(scale, mean_dy, value=-1)
            dx = dx.addcmul_(x, slope.view(to_x), value=-1).add_(shift.view(to_x)).to(x.dtype)
        dw = sum_dy_x_hat if ctx.needs_input_grad[1] else None
        db = sum_dy if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """nn.BatchNorm1d/2d whose training batch is that of every rank; plain BN in eval mode and
    in a single process. Same parameters, buffers and state_dict keys as nn.BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected an [N, C, ...] input, got {x.dim()}-d")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        return self.forward_every_rank(x)

    def forward_every_rank(self, x):
        """The training forward over every rank's batch: torch's fused kernels on CUDA input
        (whatever the backend), our own on CPUs; running statistics as nn.BatchNorm's."""
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:   # the cumulative average, with no host read of the count
                momentum = 1 / self.num_batches_tracked
        function = SyncBatchNormCUDA if x.is_cuda else SyncBatchNormCPU
        return function.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                              self.eps, momentum)


def convert_sync_batchnorm(module):
    """module with every nn.BatchNorm1d/2d replaced by a SyncBatchNorm that shares its
    parameters and buffers (the module itself if it is one)."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        shared = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, t in shared:
            setattr(sync, name, t)
        return sync.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


def distributed_data_parallel(module, device, broadcast_buffers=False):
    """DDP of `module`, by default without a broadcast of its buffers at each forward:
    SyncBatchNorm keeps the BN statistics equal on every rank. (Set once built: the constructor's
    flag for it is deprecated in recent torch, under another name that older torch lacks.)"""
    model = nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)
    model.broadcast_buffers = broadcast_buffers
    return model


def warn_if_cuda_graphs_under_ddp(mode, world):
    """torch.compile's CUDA-graph modes meet open torch issues under DDP: one line says which."""
    if world > 1 and mode in ("reduce-overhead", "max-autotune"):
        warn(f"torch.compile mode {mode} captures CUDA graphs, which with {world} DDP processes meet "
             f"open torch issues: pytorch#139207 (BatchNorm + CUDA graphs + DDP: 10x slower, then "
             f"an NCCL error) and pytorch#140395 (DDP + max-autotune hangs); mode default has "
             f"neither")

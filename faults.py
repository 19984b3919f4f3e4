"""What a long run survives, apart from the method: unreadable images, stop signals (preemption),
a non-finite loss and a full disk. intl.py and eval_linear.py use it:

* unreadable files (empty, truncated, not an image, over Pillow's decompression-bomb limit) give
  their slot to another image of the folder (SkipUnreadable), are reported once and counted
  (Unreadable); past a fraction of an epoch's images the run stops in one line;
* SIGTERM, SIGINT and SIGUSR1 only raise a flag (StopSignals): the step finishes, a checkpoint
  holds the position in the epoch (ResumableSampler skips what was seen), and the ranks agree on
  it over a CPU process group (agree), so the GPU is never waited for;
* a non-finite loss skips its update on the device (step_if_finite);
* saves are atomic, a full disk stops in one line, and partial files of earlier runs go.
"""
import contextlib
import errno
import glob
import json
import os
import random
import shutil
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image, UnidentifiedImageError


def exit_all(rank, line, code=1, group=None):
    """End this rank; rank 0 says why in one line (on stderr), so that N ranks print it once.
    With `group`, the ranks first wait for each other (for rank 0's save)."""
    if rank == 0:
        print(line, file=sys.stderr, flush=True)
    if group is not None:
        dist.barrier(group=group)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


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
    if img.mode in GREY16:
        img = Image.fromarray(np.clip(np.asarray(img) >> 8, 0, 255).astype(np.uint8))
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
        self.max_fraction, self.reported, self.first, self.count = max_fraction, set(), None, 0

    def add(self, problems):
        """Report a batch's new problems on stderr; returns how many of its images were replaced."""
        found = [p for p in problems if p]
        for p in found:
            if p not in self.reported:
                self.reported.add(p)
                self.first = self.first or p
                print(f"warning: unreadable image replaced by another: {p}", file=sys.stderr, flush=True)
        self.count += len(found)
        return len(found)

    def check(self, count, images, rank=0):
        if count > self.max_fraction * images:
            first = f" (first: {self.first})" if self.first else ""
            exit_all(rank, f"error: {count} of {images} images unreadable in this epoch, more than "
                           f"--max-bad-files {self.max_fraction}{first}; repair or remove them, or "
                           f"raise --max-bad-files")

    def batches(self, loader):
        """(x, y) of each batch of a loader of (x, y, problems); each pass is checked on its own."""
        count = 0
        for x, y, problems in loader:
            count += self.add(problems)
            self.check(count, len(loader.sampler))
            yield x, y


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

    def exit(self, rank, step, path, group):
        """Every rank exits as if killed by the signal (128 + its number) once rank 0 has saved."""
        name = signal.Signals(self.signum).name if self.signum else "a signal to another rank"
        exit_all(rank, f"stopped by {name} after step {step}: {path} holds this point; run the "
                       f"same command to resume", 128 + (self.signum or signal.SIGTERM), group)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id=None):
    """A data worker's init: the main process handles the signals and shuts its workers down."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def host_group():
    """A gloo group for the ranks' small agreements (None for one process): CPU tensors, so
    under NCCL it never waits for the GPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.new_group(backend="gloo")
    return None


def agree(values, group):
    """Each value summed over the ranks (a few integers, on the CPU)."""
    t = torch.tensor([int(v) for v in values], dtype=torch.int64)
    if group is not None:
        dist.all_reduce(t, group=group)
    return t.tolist()


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose epoch can start part-way: the first `skip` indices of its order
    (seen before a mid-epoch checkpoint) are left out, the rest come in the same order."""
    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return super().__len__() - self.skip


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
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


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


def count_nonfinite(counts, loss):
    """counts = [steps skipped, current run, longest run] of non-finite losses, on the device."""
    bad = (~torch.isfinite(loss.detach())).to(counts.dtype)
    run = (counts[1] + 1) * bad
    counts.copy_(torch.stack([counts[0] + bad, run, torch.maximum(counts[2], run)]))


def check_nonfinite(counts, k, step, lr, rank):
    """A one-line stop once k non-finite losses came in a row (reads the counter: a host sync)."""
    if counts[2] >= k:
        exit_all(rank, f"error: the loss was not finite for {k} steps in a row, by step {step} "
                       f"(lr {lr:.4g}); stopped without saving: lower --lr")


def finite(*modules):
    """Every floating-point weight and buffer is finite (one host sync: only at saves)."""
    ts = [t for m in modules if m is not None for t in m.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


# ----------------------------------------------------------------------------- saves, a full disk
def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written file. A failed
    write (a full disk) removes its partial file and stops in one line; the old file stays."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:   # a file object: a full disk raises ENOSPC, not a zip error
            torch.save(obj, f)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        where = os.path.dirname(os.path.abspath(path))
        why = e.strerror or str(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            why = f"the disk is full ({shutil.disk_usage(where).free / 2**30:.2f} GiB free in {where})"
        kept = "the previous one is intact" if os.path.exists(path) else "nothing was saved"
        sys.exit(f"error: cannot save {path}: {why}; {kept}")


def remove_partial_saves(folder):
    """Temporary files of saves that never finished (a kill -9 or a full disk in an earlier run)."""
    for f in glob.glob(os.path.join(glob.escape(folder), "*.tmp[0-9]*")):
        with contextlib.suppress(OSError):
            os.remove(f)

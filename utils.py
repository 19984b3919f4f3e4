"""What a run needs besides the method, for intl.py and eval_linear.py: one-line errors, the
data files, what a long run survives, checkpoints and their resume, and the online monitor's k-NN
and linear probe on frozen features.

* unreadable files (empty, truncated, not an image, over Pillow's decompression-bomb limit) give
  their slot to another image of the folder (SkipUnreadable), are reported once and counted
  (Unreadable); past a fraction of an epoch's images the run stops in one line;
* SIGTERM, SIGINT and SIGUSR1 only raise a flag (StopSignals): the step finishes, a checkpoint
  holds the position in the epoch (ResumableSampler skips what was seen), and the ranks agree on
  it over a CPU process group (agree), so the GPU is never waited for;
* a non-finite loss skips its update on the device (step_if_finite);
* saves are atomic, a full disk stops in one line, and partial files of earlier runs go;
* a checkpoint is continued only by a run with the same network and settings (check_resumable).
"""
import contextlib
import errno
import glob
import gzip
import json
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile

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


CPU_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


RANGES = {"positive": lambda v: v > 0, "0 or more": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1}


def check_ranges(args, rules):
    """rules {"positive": "epochs lr", ...}: one line for the first number out of its range (NaN too)."""
    for rule, names in rules.items():
        for name in names.split():
            v = getattr(args, name)
            if v is not None and not RANGES[rule](v):
                fail(f"--{name.replace('_', '-')} must be {rule}, not {v}")


def make_output_dir(path):
    """Create the output folder and check that it takes files, before the first step, not after it."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        fail(f"--output-dir {path}: {'a file, not a folder' if os.path.isfile(path) else e.strerror or e}")


def setup_distributed(batch_size):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (env://); plain python runs one process.
    The global batch must split evenly: checked before any process group is joined."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.backends.cudnn.benchmark = True    # fixed crop shapes: pick the fastest convolutions once
    if batch_size % world:
        fail(f"--batch-size {batch_size} is not divisible by the world size {world}")
    if world == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    store, rank, world = next(dist.rendezvous("env://"))
    # torchrun --max-restarts keeps its store: each attempt's keys apart, or the restarted
    # ranks read the addresses of the dead ones and cannot connect
    store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    return rank, world, device


def leave_process_group():
    """Every rank leaves together (a barrier first): with gloo, a rank that tears the group down
    while another still works (rank 0 saving) can hang both at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_rank0(read):
    """read() on rank 0, its result sent to every process: all act on rank 0's view of the files,
    also where each node has an output folder of its own."""
    box = [read() if not dist.is_initialized() or dist.get_rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def write_log(args, rank, rec, name="log.jsonl"):
    """One JSON object per line in OUTPUT_DIR/NAME, from rank 0."""
    if rank == 0:
        with open(os.path.join(args.output_dir, name), "a") as f:
            f.write(json.dumps(rec) + "\n")


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


# ----------------------------------------------------------------------------- data files
FMNIST_DIRS = ["/usr/share/datasets/fashion-mnist", "./data", "./data/FashionMNIST/raw"]


def read_idx(path):
    """An IDX file (the MNIST format), gzipped: big-endian dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_fashion_mnist(train=True):
    """uint8 images (N, 28, 28) and labels from the Debian package dataset-fashion-mnist,
    else ./data, else a torchvision download into ./data."""
    split = "train" if train else "t10k"
    for d in FMNIST_DIRS:
        images = os.path.join(d, f"{split}-images-idx3-ubyte.gz")
        if os.path.exists(images):
            return read_idx(images), read_idx(os.path.join(d, f"{split}-labels-idx1-ubyte.gz"))
    try:
        ds = torchvision.datasets.FashionMNIST("./data", train=train, download=True)
    except Exception as e:
        fail(f"Fashion-MNIST not in {', '.join(FMNIST_DIRS)} and the download failed "
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
        fail(f"{root} not found: --data DIR must hold DIR/train/<class>/<image> (ImageNet layout)")
    try:
        return SkipUnreadable(root, transform, loader=loader)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"no images in {root}: {str(e).splitlines()[0]}")


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


# ----------------------------------------------------------------------------- checkpoints and resume
def rng_state(aug=None):
    """Every random stream a rank draws from, the --gpu-aug generator included."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(), "aug": aug.get_state() if aug is not None else None,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s, aug=None):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    if aug is not None and s.get("aug") is not None and len(s["aug"]) == len(aug.get_state()):
        aug.set_state(s["aug"])     # (moved between CPU and GPU: the new device's own stream)


def resume_rng_state(states, rank, aug=None):
    """This rank's stored streams; a rank the file has none for (more processes now) seeds its own."""
    set_rng_state(states[rank % len(states)], aug)
    if rank >= len(states):     # from a stored stream and the rank: never another rank's crops
        seed = (int(torch.randint(2**31, ())) + rank) % 2**31
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
        if aug is not None:
            aug.manual_seed(int(torch.randint(2**62, ())))


def file_kind(obj):
    """What a loaded file holds, in words, for an error."""
    kinds = {"step": "intl.py's checkpoint.pth", "best": "eval_linear.py's checkpoint.pth",
             "state_dict": "the authors' checkpoint", "conv1.weight": "a bare backbone, like a backbone.pth"}
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    return next((v for k, v in kinds.items() if k in obj), f"a dict of {', '.join(sorted(map(str, obj))[:4]) or 'nothing'}")


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def save_checkpoint(path, online, target, optimizer, scaler, aug, nonfinite, args, rank, world, group,
                    steps_per_epoch, epoch, step):
    """Rank 0 writes what a run resumes from: `epoch` whole epochs and `step` steps done (more
    than epoch × steps per epoch: a mid-epoch save). Never weights after a divergence."""
    lr = optimizer.param_groups[0]["lr"]
    check_nonfinite(nonfinite, args.max_nonfinite, step, lr, rank)
    if agree([not finite(online, target)], group)[0]:
        exit_all(rank, f"error: weights not finite at step {step} (lr {lr:.4g}): not saved, "
                              f"{path} keeps the last finite ones")
    rngs = [rng_state(aug)]         # every rank's, so that each resumes its own stream
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(aug))
    if rank == 0:
        save_atomic({"model": online.state_dict(),
                            "target": target.state_dict() if target is not None else None,
                            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                            "epoch": epoch, "step": step, "rng": rngs,
                            "args": {**vars(args), "steps_per_epoch": steps_per_epoch}}, path)


def resume_from(path, online, target, optimizer, scaler, aug, args, rank, steps_per_epoch):
    """Restore everything a checkpoint holds; returns (epoch, global step)."""
    ckpt = on_rank0(lambda: load_checkpoint(path) if os.path.exists(path) else fail(f"--resume {path}: no such file"))
    step = check_resumable(ckpt, args, path, rank, steps_per_epoch)
    try:
        online.load_state_dict(ckpt["model"])
        if target is not None:
            target.load_state_dict(ckpt["target"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for g in optimizer.param_groups:   # fused on GPUs: this run's choice, not the file's
            g["fused"] = optimizer.defaults["fused"]
        if ckpt["scaler"]:       # none without fp16: a fresh one (--amp may change on resume)
            scaler.load_state_dict(ckpt["scaler"])
        resume_rng_state(ckpt["rng"], rank, aug)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        fail(f"checkpoint {path} does not match this run ({args.arch}, {args.method}, "
             f"--projector {args.projector}): {str(e).splitlines()[0]}")
    return ckpt["epoch"], step


def resume_if_any(path, online, target, optimizer, scaler, aug, args, rank, steps_per_epoch):
    """(epoch, step) to start from: --resume, else PATH if an earlier run saved it, else (0, 0).
    Rank 0 then clears what runs cut short left: partial saves, log records after the checkpoint."""
    resume = on_rank0(lambda: args.resume or (path if os.path.exists(path) else None))
    epoch, step = resume_from(resume, online, target, optimizer, scaler, aug, args, rank, steps_per_epoch) \
        if resume else (0, 0)
    if rank == 0:
        if resume:
            print(f"resumed from {resume} at epoch {epoch}, step {step}", flush=True)
        remove_partial_saves(args.output_dir)
        drop_log_records_after(os.path.join(args.output_dir, "log.jsonl"), "step", step)
        drop_log_records_after(os.path.join(args.output_dir, "spectrum.jsonl"), "epoch", epoch)
    return epoch, step


# What a resumed run may change: it does not change what is computed.
FREE_ON_RESUME = {"workers", "print_freq", "output_dir", "resume", "stop_epoch", "amp", "compile", "gpu_aug",
                  "seed", "monitor_every", "allow_changed_args", "save_every_minutes", "max_bad_files", "max_nonfinite"}


def check_resumable(ckpt, args, path, rank, steps_per_epoch):
    """The step to continue from if `ckpt` is intl.py's checkpoint of this network and settings, else one
    line on what differs. --allow-changed-args: after the file's epoch, in this run's steps and settings."""
    if not isinstance(ckpt, dict) or "step" not in ckpt:
        fail(f"--resume {path} holds {file_kind(ckpt)}, not intl.py's checkpoint.pth")
    now = {**vars(args), "steps_per_epoch": steps_per_epoch}   # the data must give as many steps
    made = {**now, **(ckpt.get("args") or {})}     # what the file does not record counts as this run's
    net = lambda a: (f"{a['method'].upper()} {a['arch']}{' (small images)' if a.get('small_images') else ''} "
                     f"--projector {a['projector']}")
    if net(made) != net(now):
        fail(f"checkpoint {path} does not match this run: it holds {net(made)}, this run builds {net(now)}")
    diffs = [f"{k.replace('_', '-')} {made[k]} -> {v}" for k, v in now.items()
             if k not in FREE_ON_RESUME and made[k] != v]
    if not diffs:
        return ckpt["step"]
    if not args.allow_changed_args:
        fail(f"checkpoint {path} was made with other settings ({', '.join(diffs)}): run with those, "
             f"use another --output-dir, or add --allow-changed-args to continue with these")
    # the same point of the same epoch, in this run's steps per epoch (the schedules follow step / all steps)
    step = round(ckpt["step"] * steps_per_epoch / made["steps_per_epoch"])
    if rank == 0:
        print(f"--allow-changed-args: {', '.join(diffs)}; continuing after epoch {ckpt['epoch']} at step "
              f"{step} of {args.epochs * steps_per_epoch} (step {ckpt['step']} in the file)")
    return step


# ----------------------------------------------------------------------------- k-NN and linear probe on frozen features
@torch.no_grad()
def features(backbone, dataset, device, batch_size=1000, workers=0, unreadable=None):
    """RAW (not normalised) features of the backbone in eval mode, and the labels; unreadable
    files are replaced (and counted by `unreadable`, an Unreadable, if given)."""
    backbone.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate)
    batches = unreadable.batches(loader) if unreadable else ((x, y) for x, y, _ in loader)
    out = [(backbone(x.to(device)).float(), y.to(device)) for x, y in batches]
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


def monitor(backbone, pair, device):
    """The online monitor on pair = (bank, queries): the 5-NN top-1 (%) of the queries (the
    authors' small-data k-NN) and that of a linear probe trained on the bank's features
    (train_probe, 100 epochs), each from the same features, computed once."""
    with torch.random.fork_rng(devices=[]):     # the training run's random streams are untouched
        (fb, lb), (fq, lq) = (features(backbone, ds, device) for ds in pair)    # (loaders draw a seed)
        torch.manual_seed(0)
        linear = train_probe(fb, lb, fq, lq, int(lb.max()) + 1, 100, every=100, report=lambda rec: None)[0]
    return {"knn5_top1": 100 * (knn_predict(fb, lb, fq, k=5) == lq).float().mean().item(), "linear_top1": linear}

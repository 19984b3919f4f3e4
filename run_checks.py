"""What intl.py and eval_linear.py check before a run does any work: numbers in range, a writable
output folder, what a file to resume holds and which settings it was made with -- each refused
in one line -- and reading that file once, on rank 0, for every process."""
import hashlib
import os
import sys
import tempfile

import torch.distributed as dist


def fail(msg):
    """Bad input: one line on stderr and a non-zero exit, never a traceback (as intl.fail)."""
    sys.exit(f"error: {msg}")


RANGES = {"positive": lambda v: v > 0, "0 or more": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1}


def check_ranges(args, rules):
    """rules: {"positive": "epochs lr", ...}; one line for the first number out of its range (NaN
    too), not a traceback later or a silent run on NaN. None (a default computed later) passes."""
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


def on_rank0(read):
    """read() on rank 0, its result sent to every process: all of them act on rank 0's view of the
    files, also where each node has an output folder of its own."""
    box = [read() if not dist.is_initialized() or dist.get_rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


FILE_KINDS = {"step": "intl.py's checkpoint.pth (for eval_linear.py --pretrained)",
              "best": "eval_linear.py's checkpoint.pth", "state_dict": "the authors' checkpoint (for eval_linear.py --pretrained)",
              "conv1.weight": "a bare backbone, like a backbone.pth (for eval_linear.py --pretrained)"}


def file_kind(obj):
    """What a loaded file holds, in words, for an error."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    return next((v for k, v in FILE_KINDS.items() if k in obj),
                f"a dict of {', '.join(sorted(map(str, obj))[:4]) or 'nothing'}")


def changed_settings(made, now, free):
    """'name old -> new' for each setting that a checkpoint's args and this run's both have, other
    than the `free` ones, and that differs."""
    return [f"{k.replace('_', '-')} {made[k]} -> {v}" for k, v in now.items()
            if k in made and k not in free and made[k] != v]


def file_sha256(path):
    """The hex SHA-256 of a file's content, read in 16 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()

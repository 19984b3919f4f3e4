"""Evaluation of a backbone pretrained with intl.py, or by the paper's authors: linear probe
(on augmented images, or on features computed once), semi-supervised fine-tuning on the
SimCLR 1 % / 10 % subsets, and k-NN.

    python eval_linear.py --data fashion-mnist --arch resnet18 --pretrained runs/quick-start/backbone.pth
    torchrun --nproc_per_node=8 eval_linear.py --data /imagenet --pretrained runs/intl/backbone.pth --lr 0.4
    torchrun --nproc_per_node=8 eval_linear.py --data /imagenet --pretrained runs/intl/backbone.pth \\
        --weights finetune --train-subset 1percent.txt --lr-classifier 0.2 --lr-backbone 0.004
    python eval_linear.py --data fashion-mnist --arch resnet18 --pretrained runs/quick-start/backbone.pth --knn
    python eval_linear.py --pretrained runs/intl/backbone.pth --export-detectron2 intl_r50.pkl

Modelled on Barlow Twins' evaluate.py and DINO's eval_linear.py / eval_knn.py.
"""
import argparse
import contextlib
import functools
import hashlib
import math
import os
import pickle
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import utils
from intl import CIFAR_NORM, MEAN, STD, resnet_backbone
from utils import (CPU_CORES, SMALL_DATA, check_ranges, eval_side, eval_transform, fail, features, file_kind,
                   knn_predict, labelled_images, load_checkpoint, make_output_dir, memory_format, on_rank0,
                   random_subset, save_atomic, setup_distributed, train_probe)

CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))   # the authors' test-time
#                                                    normalisation, for CIFAR-10 and CIFAR-100 alike
KNN = [("knn5_euclidean_majority_top1", 5, None, "5-NN Euclidean majority (raw features)"),
       ("knn20_cosine_weighted_top1", 20, 0.07,
        "20-NN cosine, exp(cos/0.07)-weighted (normalised features)")]

# unreadable images: replaced in their batches, reported once, counted per epoch (--max-bad-files)
UNREADABLE = utils.Unreadable(max_fraction=0.01)


def write_log(args, rank, rec):
    """A record of this evaluation in OUTPUT_DIR/log.jsonl, from rank 0."""
    if rank == 0:
        utils.write_log(args.output_dir, rec)


# ----------------------------------------------------------------------------- checkpoints
def key_prefixes(state):
    """'module.backbone', 'projector', ...: what an unrecognised file holds, for the error."""
    heads = {".".join(k.split(".")[:2 if k.startswith("module.") else 1]) for k in map(str, state)}
    return ", ".join(sorted(heads)) or "none"


def backbone_state(path, momentum_encoder=False):
    """The torchvision-format backbone state_dict in any of four layouts: our checkpoint.pth
    (online or momentum encoder), our backbone.pth, the authors' checkpoint, or a plain
    torchvision state_dict (fc dropped). Also returns how the file says it was trained."""
    if not os.path.isfile(path):
        fail(f"--pretrained {path}: no such file")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        fail(f"--pretrained {path} holds a {type(ckpt).__name__}, not a checkpoint or a state_dict")
    trained = ""
    if "model" in ckpt and "target" in ckpt:        # ours: intl.py's checkpoint.pth
        state, prefix = ckpt["target" if momentum_encoder else "model"], "backbone."
        a = ckpt.get("args") or {}
        trained = f"--arch {a.get('arch')}" + (" --small-images" if a.get("small_images") else "")
        if state is None:
            fail(f"{path} has no momentum encoder: it was pretrained with --method {a.get('method')}")
    elif "state_dict" in ckpt:                      # the authors': module.backbone.<torchvision key>
        state = ckpt["state_dict"]
        prefix = "module.momentum_backbone." if momentum_encoder else "module.backbone."
        trained = f"arch {ckpt.get('arch')}"
    else:                                           # our backbone.pth, or torchvision's
        state, prefix = ckpt, ""
        if momentum_encoder:
            fail(f"--momentum-encoder: {path} holds one backbone; give the checkpoint.pth instead")
    state = state if isinstance(state, dict) else ckpt
    out = {k[len(prefix):]: v for k, v in state.items()
           if isinstance(k, str) and k.startswith(prefix) and not k.startswith(prefix + "fc.")}
    if "conv1.weight" not in out:
        fail(f"--pretrained {path}: unrecognised layout (no {prefix}conv1.weight); "
             f"key prefixes found: {key_prefixes(state)}")
    return out, trained


def load_pretrained(backbone, args, loaded=None):
    """Load --pretrained (or `loaded`, backbone_state's result for it) into the backbone, or
    say in one line why it does not fit."""
    state, trained = loaded or backbone_state(args.pretrained, args.momentum_encoder)
    own = backbone.state_dict()
    problems = [f"{k} is {list(state[k].shape)} in the file, {list(v.shape)} here"
                for k, v in own.items() if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems += [f"{len(missing)} keys missing ({missing[0]}, ...)"] if missing else []
    problems += [f"{len(unexpected)} unexpected keys ({unexpected[0]}, ...)"] if unexpected else []
    if problems:
        this = f"--arch {args.arch}" + (" --small-images" if args.small_images else "")
        fail(f"--pretrained {args.pretrained} does not fit {this}"
             + (f" (it was trained with {trained})" if trained else "") + f": {problems[0]}")
    backbone.load_state_dict(state)


# ----------------------------------------------------------------------------- data
def subset_samples(list_file, root, class_to_idx):
    """(path, class) for each file named in a SimCLR subset list: one name per line, e.g.
    n01440764_10026.JPEG in root/n01440764/, the class being the part before '_'."""
    if not os.path.isfile(list_file):
        fail(f"--train-subset {list_file}: no such file")
    with open(list_file) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        fail(f"--train-subset {list_file} names no files")
    samples = []
    for name in names:
        cls = name.split("_")[0]
        path = os.path.join(root, cls, name)
        if cls not in class_to_idx or not os.path.isfile(path):
            fail(f"--train-subset {list_file} names {name}, but {path} does not exist")
        samples.append((path, class_to_idx[cls]))
    return samples


def train_transform(small_images, norm=(MEAN, STD)):
    """RandomResizedCrop(224) + flip; the same crop at 32 px for 32-px data."""
    return T.Compose([T.RandomResizedCrop(32 if small_images else 224), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(*norm)])


def datasets(args, small_images):
    """Train and val sets and the number of classes. Fashion-MNIST and CIFAR: the training
    images, and the test images as val. k-NN and --protocol features see the test-time
    transform (centre view, no augmentation) on the training images too."""
    centre = args.knn or args.protocol == "features"
    if args.data in SMALL_DATA and args.train_subset:
        fail("--train-subset needs --data DIR in ImageNet layout")
    norm = CIFAR10_NORM if args.data in CIFAR_NORM else (MEAN, STD)
    train_tf = eval_transform(eval_side(args.data, args.small_images), *norm) if centre else train_transform(small_images, norm)
    train = labelled_images(args.data, True, train_tf)
    val = labelled_images(args.data, False, eval_transform(eval_side(args.data, args.small_images), *norm))
    if args.data in SMALL_DATA:
        classes = 100 if args.data == "cifar100" else 10
    else:
        if val.classes != train.classes:
            fail(f"{args.data}/val has {len(val.classes)} classes, {args.data}/train "
                 f"{len(train.classes)}: they must be the same folders")
        if args.train_subset:
            train.samples = subset_samples(args.train_subset, train.root, train.class_to_idx)
            train.targets = [c for _, c in train.samples]
        classes = len(train.classes)
    return random_subset(train, args.subset), val, classes


def shard(dataset, rank, world):
    """Every world-th image from rank on: the shards cover the set exactly once, no padding."""
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world))


def sum_over_ranks(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def bf16(device):
    """bf16 autocast on GPUs that have it; fp32 elsewhere."""
    on = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


# ----------------------------------------------------------------------------- k-NN
def bank_features(backbone, dataset, rank, world, device, args, log=None, name="train"):
    """Raw features of the whole set on every rank: each rank encodes a shard,
    padded to equal length for the all-gather, the padding (label -1) dropped after.
    With `log`, the pass reports its progress (rank 0's shard)."""
    f, y = features(backbone, shard(dataset, rank, world), device, args.batch_size, args.workers, UNREADABLE,
                    log, f"{name} features: batch")
    if world == 1:
        return f, y
    pad = math.ceil(len(dataset) / world) - len(f)
    f, y = utils.gather(torch.cat([f, f.new_zeros(pad, f.shape[1])])), utils.gather(F.pad(y, (0, pad), value=-1))
    return f[y >= 0], y[y >= 0]


def knn_eval(backbone, train, val, rank, world, device, args, log):
    """Top-1 of each k-NN in KNN on frozen features: the authors' 5-NN Euclidean majority on
    raw features and DINO's 20-NN weighted cosine; queries in chunks so ImageNet's bank fits."""
    with bf16(device):
        bank, bank_labels = bank_features(backbone, train, rank, world, device, args, log, "train")
        q, q_labels = features(backbone, shard(val, rank, world), device, args.batch_size, args.workers,
                               UNREADABLE, log, "val features: batch")
    if any(k > len(bank) for _, k, _, _ in KNN):
        log(f"note: the bank holds {len(bank)} images; each k larger than that is clamped to {len(bank)}")
    result = {}
    for key, k, temperature, _ in KNN:
        pred = knn_predict(bank, bank_labels, q, k, temperature, args.knn_chunk)
        correct = sum_over_ranks((pred == q_labels).sum().double())
        result[key] = 100 * correct.item() / len(val)
    return result


# ----------------------------------------------------------------------------- linear / fine-tune
def lr_factor(epoch, epochs, schedule):
    """const: 1 (fine-tuning); step: ×0.1 at 60 % and 80 % of the epochs (60 and 80 of 100),
    never at epoch 0 (1 or 2 epochs: no decay before the last); cos: a per-epoch cosine."""
    if schedule == "const":
        return 1.0
    if schedule == "step":
        return 0.1 ** sum(epoch >= max(1, round(f * epochs)) for f in (0.6, 0.8))
    return 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def logits(model, x, finetune):
    """Class scores. Linear protocol: the frozen backbone runs under no_grad and the linear
    layer in fp32; fine-tuning: the whole network under autocast."""
    if finetune:
        with bf16(x.device):
            return model(x).float()
    backbone, head = model
    with torch.no_grad(), bf16(x.device):
        f = backbone(x)
    return head(f.float())


def train_epoch(model, optimizer, loader, epoch, args, device, log):
    """One pass over the training set; returns the mean loss of this rank."""
    finetune = args.weights == "finetune"
    model.train(finetune)   # linear protocol: the whole backbone stays in eval mode (BN frozen)
    mem = memory_format(device)
    total, t_last, seen = 0.0, time.time(), 0
    for i, (x, y) in enumerate(UNREADABLE.batches(loader)):
        x, y = x.to(device, non_blocking=True, memory_format=mem), y.to(device, non_blocking=True)
        loss = F.cross_entropy(logits(model, x, finetune), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        seen += len(x)
        if (i + 1) % args.print_freq == 0 or i == len(loader) - 1:
            log(f"ep {epoch + 1}/{args.epochs} step {i + 1}/{len(loader)} loss {loss.item():.4f} "
                f"lr {optimizer.param_groups[0]['lr']:.4g} {seen / (time.time() - t_last):.0f} img/s/rank",
                flush=True)
            t_last, seen = time.time(), 0
    return total / max(1, len(loader))


@torch.no_grad()
def evaluate(backbone, head, val, rank, world, device, args):
    """Top-1 and top-5 (%) on the whole val set: each rank scores a shard, hits summed."""
    backbone.eval()
    mem = memory_format(device)
    loader = torch.utils.data.DataLoader(shard(val, rank, world), batch_size=args.batch_size // world,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         collate_fn=utils.collate)
    hits = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in UNREADABLE.batches(loader):
        x, y = x.to(device, non_blocking=True, memory_format=mem), y.to(device, non_blocking=True)
        with bf16(device):
            f = backbone(x)
        top = head(f.float()).topk(min(5, head.out_features), dim=1).indices == y[:, None]
        hits += torch.stack([top[:, 0].sum(), top.any(dim=1).sum()])
    hits = sum_over_ranks(hits)
    return (100 * hits / len(val)).tolist()


def full_state(backbone, head):
    """Backbone + classifier as one torchvision state_dict (loads into models.<arch>())."""
    return {**backbone.state_dict(), "fc.weight": head.weight.detach(), "fc.bias": head.bias.detach()}


# ----------------------------------------------------------------------------- linear probe on features
def features_protocol(backbone, train, val, classes, rank, world, device, args, log):
    """The small-data linear protocol: features of the frozen backbone (eval mode, test-time
    transform) computed once, in batches of --batch-size, then train_probe on them."""
    t0 = time.time()
    x, y = bank_features(backbone, train, rank, world, device, args, log, "train")
    xv, yv = bank_features(backbone, val, rank, world, device, args, log, "val")
    log(f"linear probe on features: {len(x)} train / {len(xv)} val images, {x.shape[1]} features, "
        f"computed once in {time.time() - t0:.0f} s; Adam, lr {args.lr:g} -> 1e-6 exponentially over "
        f"{args.epochs} epochs, batches of {args.batch_size}", flush=True)

    def report(rec):
        log(f"epoch {rec['epoch']}/{args.epochs}: loss {rec['loss']:.4f} lr {rec['lr']:.3g} "
            f"top-1 {rec['acc1']:.2f}% top-5 {rec['acc5']:.2f}%", flush=True)
        write_record(args, rank, rec)

    torch.manual_seed(args.seed)   # the same probe on every rank (each has all the features)
    acc1, acc5 = train_probe(x, y, xv, yv, classes, args.epochs, args.lr, args.batch_size,
                             args.print_freq, report)
    result = {"protocol": "features", "epochs": args.epochs, "acc1": acc1, "acc5": acc5}
    log(f"linear probe on features: top-1 {acc1:.2f}%, top-5 {acc5:.2f}% after {args.epochs} epochs")
    write_record(args, rank, result)
    return result


# ----------------------------------------------------------------------------- detectron2 weights
def detectron2_name(key):
    """A torchvision ResNet key as MoCo's convert-pretrain-to-detectron2.py renames it: layerN ->
    res{N+1}, bnK -> convK.norm, downsample.0 / .1 -> shortcut / shortcut.norm, the stem under stem."""
    key = key if "layer" in key else "stem." + key
    for n in (1, 2, 3, 4):
        key = key.replace(f"layer{n}", f"res{n + 1}")
    for k in (1, 2, 3):
        key = key.replace(f"bn{k}", f"conv{k}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def export_detectron2(args):
    """--export-detectron2 OUT.pkl: the backbone's float32 arrays under detectron2's names (fc and
    num_batches_tracked dropped) in MoCo's pickle, written to a temporary file, then renamed."""
    state, _ = backbone_state(args.pretrained, args.momentum_encoder)
    if state["conv1.weight"].shape[-1] == 3:
        fail(f"--pretrained {args.pretrained} has the 3x3 stem of 32-px pretraining: no detectron2 "
             f"config takes it (detection needs a backbone pretrained with the 7x7 ImageNet stem)")
    model = {detectron2_name(k): v.detach().float().cpu().numpy() for k, v in state.items()
             if not k.endswith("num_batches_tracked")}
    out, tmp = args.export_detectron2, f"{args.export_detectron2}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            pickle.dump({"model": model, "__author__": "INTL", "matching_heuristics": True}, f)
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        fail(f"--export-detectron2 {out}: {e.strerror or e}")
    print(f"wrote {out}: {len(model)} arrays of the backbone in {args.pretrained}"
          + (" (momentum encoder)" if args.momentum_encoder else "") + " under detectron2's names; "
          f"train with detection/train_net.py (detection/README.md)", flush=True)
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    # each help states its default once, in words where the default depends on the mode or machine
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="DIR with DIR/train and DIR/val (ImageNet layout), fashion-mnist, "
                                  "cifar10 or cifar100 (required, except with --export-detectron2)")
    p.add_argument("--arch", default="resnet50", help="a torchvision ResNet (default: %(default)s)")
    p.add_argument("--small-images", action="store_true",
                   help="3x3 stem, no max-pool (implied when --pretrained has a 3x3 conv1)")
    p.add_argument("--pretrained", help="checkpoint.pth, backbone.pth, the authors' checkpoint or a "
                                        "torchvision state_dict (default: a random backbone)")
    p.add_argument("--momentum-encoder", action="store_true",
                   help="evaluate the momentum (target) backbone of an INTL-M checkpoint")
    p.add_argument("--weights", choices=["freeze", "finetune"], default="freeze",
                   help="freeze: linear protocol; finetune: semi-supervised (default: %(default)s)")
    p.add_argument("--protocol", choices=["images", "features"],
                   help="linear protocol: SGD on augmented images through the frozen backbone, or Adam "
                        "on its features computed once (default: features for fashion-mnist and "
                        "CIFAR, images otherwise)")
    p.add_argument("--train-subset", help="SimCLR subset list (1percent.txt, 10percent.txt) "
                                          "(default: every training image)")
    p.add_argument("--subset", type=int, default=0,
                   help="train on a fixed random subset of N images (default: 0, all of them)")
    p.add_argument("--knn", action="store_true", help="only k-NN: 5-NN Euclidean majority (raw "
                   "features) and 20-NN cosine exp(cos/0.07)-weighted (normalised features) top-1")
    p.add_argument("--knn-chunk", type=int, default=256,
                   help="queries per similarity block (default: %(default)s)")
    p.add_argument("--epochs", type=int,
                   help="training epochs (default: 100 on images, 500 with --protocol features, "
                        "20 with finetune)")
    p.add_argument("--stop-epoch", type=int, default=0, help="stop after this epoch (schedules still "
                   "span --epochs); resume later (default: 0, run to the end)")
    p.add_argument("--schedule", choices=["const", "step", "cos"],
                   help="the lr schedule (default: step for the linear protocol on images, const for "
                        "finetune; --protocol features decays exponentially)")
    p.add_argument("--batch-size", type=int,
                   help="global batch size (default: 256, 1000 with --protocol features)")
    p.add_argument("--lr-classifier", "--lr", dest="lr", type=float,
                   help="the classifier's lr in every protocol; --lr is the same flag (default: 0.4 per "
                        "256 images for the linear protocol on images, 0.2 per 256 images with "
                        "finetune, 0.01 with --protocol features, Adam's, decaying to 1e-6)")
    p.add_argument("--lr-backbone", type=float, default=0.004,
                   help="backbone lr per 256 images with finetune (default: 0.004, for INTL-M "
                        "checkpoints; 0.006 suits INTL ones)")
    p.add_argument("--workers", type=int, default=min(8, CPU_CORES),
                   help="data workers per process (default: the CPU cores, at most 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier's initialisation, the "
                   "random backbone, the data order and the crops (default: %(default)s)")
    p.add_argument("--print-freq", type=int, default=50,
                   help="steps (features: epochs) between progress lines (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/eval", help="the folder of log.jsonl, checkpoint.pth "
                   "and best.pth (default: %(default)s)")
    p.add_argument("--resume", help="checkpoint to resume (default: OUTPUT_DIR/checkpoint.pth if present)")
    p.add_argument("--restart", action="store_true",
                   help="start afresh even if OUTPUT_DIR/checkpoint.pth exists (it is replaced after "
                        "epoch 1); the old log.jsonl is renamed log.jsonl.old")
    p.add_argument("--allow-changed-args", action="store_true",
                   help="resume a checkpoint made with other settings, continuing with this run's "
                        "(the backbone file's content must be the same)")
    p.add_argument("--export-detectron2", metavar="OUT.pkl",
                   help="only write the --pretrained backbone as detectron2 weights (MoCo's names and "
                        "pickle) to OUT.pkl, for detection/train_net.py; no data needed")
    p.error = lambda msg: fail(f"{msg} (see --help)")     # one line, not the whole usage
    p.add_argument("--max-bad-files", type=float, default=0.01,
                   help="stop when more than this fraction of a pass's images are unreadable "
                        "(default: %(default)s)")
    args = p.parse_args(argv)
    if args.export_detectron2 and not args.pretrained:
        fail("--export-detectron2 needs --pretrained (the backbone to convert)")
    if not args.data and not args.export_detectron2:
        fail("--data is required (a folder in ImageNet layout, fashion-mnist, cifar10 or cifar100)")
    finetune = args.weights == "finetune"
    if finetune and args.protocol == "features":
        fail("--protocol features is a linear protocol; --weights finetune trains on images")
    args.protocol = args.protocol or ("features" if args.data in SMALL_DATA and not finetune else "images")
    on_features = args.protocol == "features" and not args.knn
    if on_features and (args.schedule or args.stop_epoch or args.resume):
        fail("--schedule, --stop-epoch and --resume apply to --protocol images and --weights finetune; "
             "--protocol features decays the lr exponentially and takes minutes, without checkpoints")
    if args.epochs is None:
        args.epochs = 20 if finetune else 500 if on_features else 100
    # fine-tuning: a constant lr (the authors' milestones at epochs 60 and 80 fall after its 20)
    args.schedule = args.schedule or ("const" if finetune else "step")
    if args.batch_size is None:
        args.batch_size = 1000 if on_features else 256
    if args.lr is None:
        args.lr = 0.2 if finetune else 0.01 if on_features else 0.4
    check_ranges(args, {"positive": "epochs batch_size knn_chunk print_freq lr",
                        "0 or more": "subset stop_epoch workers lr_backbone"})
    return args


# What a resumed run may change: it does not change what is computed (the backbone file may move,
# its content may not).
FREE_ON_RESUME = {"workers", "print_freq", "output_dir", "resume", "restart", "stop_epoch", "knn_chunk",
                  "pretrained", "pretrained_sha256", "allow_changed_args", "export_detectron2"}


def file_sha256(path):
    """The hex SHA-256 of a file's content, read in 16 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def backbone_file(a):
    """The backbone a run was made from, in words: its file and content hash, or a random one."""
    return f"{a['pretrained']} (sha256 {a['pretrained_sha256'][:12]})" if a["pretrained_sha256"] else "a random backbone"


def write_record(args, rank, rec):
    """utils.write_log's record, naming the backbone it came from: its file and the first 12 hex
    of its sha256, or "random"."""
    backbone = "random" if not args.pretrained else {
        "path": args.pretrained, "sha256": args.pretrained_sha256[:12], "momentum_encoder": args.momentum_encoder}
    write_log(args, rank, {**rec, "backbone": backbone})


def start_fresh_log(folder, log):
    """--restart: the earlier run's log.jsonl becomes log.jsonl.old (replacing an older one)."""
    path = os.path.join(folder, "log.jsonl")
    if os.path.exists(path):
        os.replace(path, path + ".old")
        log(f"--restart: {path} renamed {path}.old")


def resume_from(path, backbone, head, optimizer, args, log):
    """Classifier, backbone and optimizer of an earlier run; returns its epoch and best top-1.
    --allow-changed-args: other settings (never another backbone), continued with this run's."""
    ckpt = on_rank0(lambda: load_checkpoint(path) if os.path.isfile(path) else fail(f"--resume {path}: no such file"))
    if not isinstance(ckpt, dict) or "best" not in ckpt:
        fail(f"--resume {path} holds {file_kind(ckpt, {'step': 'a training checkpoint'})}, not eval_linear.py's checkpoint.pth")
    made = ckpt.get("args") or {}
    if made.get("weights") == "finetune" and "lr_classifier" in made:   # saved when --lr was unused there
        made = {**made, "lr": made["lr_classifier"]}
    diffs = [f"{k.replace('_', '-')} {made[k]} -> {v}" for k, v in vars(args).items()
             if k in made and k not in FREE_ON_RESUME and made[k] != v]
    if made.get("pretrained_sha256", args.pretrained_sha256) != args.pretrained_sha256:
        fail(f"checkpoint {path} was made by another run "
             f"({', '.join([f'backbone {backbone_file(made)} -> {backbone_file(vars(args))}'] + diffs)}): "
             f"use another --output-dir, or add --restart to start afresh")
    if diffs and not args.allow_changed_args:
        fail(f"checkpoint {path} was made with other settings ({', '.join(diffs)}): use another "
             f"--output-dir, add --restart to start afresh, or --allow-changed-args to continue it "
             f"with these")
    if diffs:
        log(f"--allow-changed-args: {', '.join(diffs)}; continuing after epoch {ckpt.get('epoch')}")
    try:
        state = dict(ckpt["model"])
        head.load_state_dict({"weight": state.pop("fc.weight"), "bias": state.pop("fc.bias")})
        backbone.load_state_dict(state)
        base_lrs = [g["base_lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for g, base_lr in zip(optimizer.param_groups, base_lrs):   # this run's lr, not the file's
            g["base_lr"] = base_lr
        return ckpt["epoch"], ckpt["best"]
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        fail(f"checkpoint {path} does not match this run (--arch {args.arch}, --weights {args.weights}, "
             f"{head.out_features} classes): {type(e).__name__} {str(e).splitlines()[0]}")


def fit(backbone, dim, train, val, classes, rank, world, device, args, log):
    """Linear protocol or fine-tuning: train, score val every epoch, checkpoint, resume."""
    finetune = args.weights == "finetune"
    head = nn.Linear(dim, classes).to(device)
    head.weight.data.normal_(0, 0.01)   # N(0, 0.01), bias 0, as the authors
    head.bias.data.zero_()
    ddp = lambda m: nn.parallel.DistributedDataParallel(
        m, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else m
    model = ddp(nn.Sequential(backbone, head)) if finetune else nn.Sequential(backbone, ddp(head))
    scale = args.batch_size / 256   # lr × batch/256
    groups = [{"params": list(head.parameters()),
               "base_lr": args.lr * scale}]
    if finetune:
        groups.append({"params": list(backbone.parameters()), "base_lr": args.lr_backbone * scale})
    optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9, weight_decay=0)   # no weight decay

    start_epoch, best = 0, {"acc1": 0.0, "acc5": 0.0, "epoch": 0}
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    found = on_rank0(lambda: os.path.exists(ckpt_path))
    resume = args.resume or (ckpt_path if found and not args.restart else None)
    if found and args.restart and not args.resume:
        log(f"--restart: starting afresh; {ckpt_path} is replaced after the first epoch")
    if resume:
        start_epoch, best = resume_from(resume, backbone, head, optimizer, args, log)
        log(f"resumed from {resume} at epoch {start_epoch}")
        if rank == 0:     # a run killed after its log line but before its save
            utils.drop_log_records_after(os.path.join(args.output_dir, "log.jsonl"), "epoch", start_epoch)
    sampler = torch.utils.data.DistributedSampler(train, world, rank, seed=args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size // world, sampler=sampler,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         collate_fn=utils.collate)
    log(f"{'fine-tuning' if finetune else 'linear protocol'}: {len(train)} train / {len(val)} val "
        f"images, {classes} classes, {world} process(es) on {device.type}, batch {args.batch_size}, "
        f"{args.epochs} epochs ({args.schedule})", flush=True)
    for epoch in range(start_epoch, min(args.epochs, args.stop_epoch or args.epochs)):
        t0 = time.time()
        torch.manual_seed(args.seed + epoch * world + rank)   # augmentation: a resumed run repeats it
        sampler.set_epoch(epoch)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(epoch, args.epochs, args.schedule)
        UNREADABLE.count = 0
        loss = train_epoch(model, optimizer, loader, epoch, args, device, log)
        acc1, acc5 = evaluate(backbone, head, val, rank, world, device, args)
        if acc1 > best["acc1"]:
            best = {"acc1": acc1, "acc5": acc5, "epoch": epoch + 1}
            if rank == 0:
                save_atomic(full_state(backbone, head), os.path.join(args.output_dir, "best.pth"))
        bad = int(sum_over_ranks(torch.tensor(UNREADABLE.count, device=device)))
        rec = {"epoch": epoch + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "acc1": acc1,
               "acc5": acc5, "best_acc1": best["acc1"], "time": time.time() - t0, "unreadable": bad}
        log(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f} top-1 {acc1:.2f}% top-5 {acc5:.2f}% "
            f"(best top-1 {best['acc1']:.2f}% at epoch {best['epoch']}) {rec['time']:.0f} s"
            + (f", {bad} unreadable images replaced" if bad else ""), flush=True)
        write_record(args, rank, rec)
        if rank == 0:
            save_atomic({"model": full_state(backbone, head), "optimizer": optimizer.state_dict(),
                         "epoch": epoch + 1, "best": best, "args": vars(args)}, ckpt_path)
    if start_epoch >= args.epochs:
        log(f"already finished: {ckpt_path} is at epoch {start_epoch} of {args.epochs}")
    log(f"best top-1 {best['acc1']:.2f}%, top-5 {best['acc5']:.2f}% (epoch {best['epoch']})")
    return best


def main(argv=None):
    args = parse_args(argv)
    if args.export_detectron2:
        return export_detectron2(args)
    rank, world, device = setup_distributed(args.batch_size)
    log = functools.partial(print, flush=True) if rank == 0 else (lambda *a, **k: None)
    if rank == 0:
        make_output_dir(args.output_dir)
        if args.restart and not args.resume:
            start_fresh_log(args.output_dir, log)
    loaded = backbone_state(args.pretrained, args.momentum_encoder) if args.pretrained else None
    # which backbone file this run is made from (read above): each record names it, a resume checks it
    args.pretrained_sha256 = on_rank0(lambda: file_sha256(args.pretrained)) if args.pretrained else None
    if loaded and loaded[0]["conv1.weight"].shape[-1] == 3:   # the 3×3 stem of 32-px pretraining
        args.small_images = True
    torch.manual_seed(args.seed)   # the same random backbone and classifier on every rank
    backbone, dim = resnet_backbone(args.arch, args.small_images)
    if args.pretrained:
        load_pretrained(backbone, args, loaded)
        log(f"backbone: {args.arch} from {args.pretrained}" + (" (momentum encoder)" if args.momentum_encoder else ""))
    else:
        log(f"backbone: {args.arch}, randomly initialised (no --pretrained), seed {args.seed}")
    backbone = backbone.to(device, memory_format=memory_format(device))
    backbone.requires_grad_(args.weights == "finetune" and not args.knn)
    train, val, classes = datasets(args, small_images=args.small_images or args.data in SMALL_DATA)
    if rank == 0:
        utils.remove_partial_saves(args.output_dir)     # of saves cut short in earlier runs
    UNREADABLE.max_fraction, UNREADABLE.count = args.max_bad_files, 0
    if args.knn:
        result = knn_eval(backbone, train, val, rank, world, device, args, log)
        result["unreadable"] = int(sum_over_ranks(torch.tensor(UNREADABLE.count, device=device)))
        log(f"k-NN on {len(val)} val images, bank of {len(train)}: "
            + ", ".join(f"{label} top-1 {result[key]:.2f}%" for key, _, _, label in KNN), flush=True)
        write_record(args, rank, result)
    elif args.protocol == "features":
        result = features_protocol(backbone, train, val, classes, rank, world, device, args, log)
    else:
        result = fit(backbone, dim, train, val, classes, rank, world, device, args, log)
    utils.leave_process_group()
    return result


if __name__ == "__main__":
    main()

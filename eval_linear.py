"""Evaluation of a backbone pretrained with intl.py, or by the paper's authors: linear probe
(on augmented images, or on features computed once), semi-supervised fine-tuning on the
SimCLR 1 % / 10 % subsets, and k-NN.

    python eval_linear.py --data fashion-mnist --arch resnet18 --pretrained runs/quick-start/backbone.pth
    torchrun --nproc_per_node=8 eval_linear.py --data /imagenet --pretrained runs/intl/backbone.pth --lr-classifier 0.4
    torchrun --nproc_per_node=8 eval_linear.py --data /imagenet --pretrained runs/intl/backbone.pth \\
        --weights finetune --train-subset 1percent.txt --lr-classifier 0.2 --lr-backbone 0.004
    python eval_linear.py --data fashion-mnist --arch resnet18 --pretrained runs/quick-start/backbone.pth --knn
    python eval_linear.py --pretrained runs/intl/backbone.pth --export-detectron2 intl_r50.pkl

Modelled on Barlow Twins' evaluate.py and DINO's eval_linear.py / eval_knn.py.
"""
import argparse
import contextlib
import hashlib
import math
import os
import pickle
import time
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

import utils
from intl import CIFAR_NORM, MEAN, STD, resnet_backbone
from utils import (SMALL_DATA, check_ranges, eval_side, eval_transform, fail, features,
                   knn_predict, labelled_images, load_checkpoint, memory_format, on_rank0, random_subset,
                   setup_distributed, train_probe)

CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))   # the authors' test-time
#                                                    normalisation, for CIFAR-10 and CIFAR-100 alike
KNN = [("knn5_euclidean_majority_top1", 5, None, "5-NN Euclidean majority (raw features)"),
       ("knn20_cosine_weighted_top1", 20, 0.07,
        "20-NN cosine, exp(cos/0.07)-weighted (normalised features)")]


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
        fail(f"--pretrained {path}: " + ("is a directory, not a checkpoint file" if os.path.isdir(path)
                                         else "no such file"))
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


def bf16(device):
    """bf16 autocast on GPUs that have it; fp32 elsewhere."""
    on = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


class Run(NamedTuple):
    """What each part of an evaluation needs: this process's place, the settings, the progress
    lines and records, the stop signals and the count of unreadable files."""
    rank: int
    world: int
    device: torch.device
    args: argparse.Namespace
    progress: utils.Progress
    signals: utils.StopSignals
    unreadable: utils.Unreadable


def pass_features(backbone, dataset, name, run, stop_here=True, everywhere=True):
    """Raw features and labels of a whole set on every rank (each rank encodes its shard; they
    are all-gathered), or, not everywhere, of this rank's shard; the shards' padding dropped; and
    how many of the set's images were unreadable and replaced (counted over the ranks). A stop
    signal ends the pass within a batch: every rank stops (nothing to save: the features are
    computed again), or, not stop_here, None."""
    watch = utils.PassWatch(run.unreadable, len(dataset), run.signals, utils.host_group(),
                            f"the {name} images")
    with bf16(run.device):
        out = features(backbone, utils.Shard(dataset, run.rank, run.world), run.device,
                       run.args.batch_size // run.world, run.args.workers, watch,
                       run.progress.print, f"{name} features: batch")
    if out is None and stop_here:
        run.signals.exit(run.rank, f"during the {name} features: nothing is saved (they are "
                                   f"computed again): run the same command to start again")
    if out is None:
        return None
    f, y = [utils.gather(t) for t in out] if everywhere else out
    return f[y >= 0], y[y >= 0], watch.count


# ----------------------------------------------------------------------------- k-NN
def knn_eval(backbone, train, val, run):
    """Top-1 of each k-NN in KNN on frozen features: the authors' 5-NN Euclidean majority on
    raw features and DINO's 20-NN weighted cosine; queries in chunks so ImageNet's bank fits."""
    bank, bank_labels, bad_train = pass_features(backbone, train, "train", run)
    q, q_labels, bad_val = pass_features(backbone, val, "val", run, everywhere=False)  # a shard
    if any(k > len(bank) for _, k, _, _ in KNN):
        run.progress.print(f"note: the bank holds {len(bank)} images; each k larger than that is "
                           f"clamped to {len(bank)}")
    result = {"unreadable": bad_train + bad_val}
    for key, k, temperature, _ in KNN:
        pred = knn_predict(bank, bank_labels, q, k, temperature, run.args.knn_chunk)
        hits = utils.sum_over_ranks((pred == q_labels).sum().double())   # of every rank's shard
        result[key] = 100 * (hits / len(val)).item()
    run.progress.print(f"k-NN on {len(val)} val images, bank of {len(train)}: "
                   + ", ".join(f"{label} top-1 {result[key]:.2f}%" for key, _, _, label in KNN))
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


class Classifier(nn.Module):
    """The backbone, then a linear classifier in float32. Linear protocol: the backbone frozen,
    in eval mode (BN statistics fixed) and without autograd; fine-tuning: trained with it."""

    def __init__(self, backbone, head, finetune):
        super().__init__()
        self.backbone, self.head, self.finetune = backbone, head, finetune

    def forward(self, x):
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()), bf16(x.device):
            f = self.backbone(x)
        return self.head(f.float())

    def train(self, mode=True):
        super().train(mode)
        self.backbone.train(mode and self.finetune)
        return self


def build_state(backbone, dim, classes, args, device, world):
    """The classifier, N(0, 0.01) weights and zero bias as the authors, on the backbone (trained
    too with finetune), in DDP; SGD with momentum 0.9, no weight decay, lr × batch/256."""
    finetune = args.weights == "finetune"
    head = nn.Linear(dim, classes).to(device)
    head.weight.data.normal_(0, 0.01)
    head.bias.data.zero_()
    model = Classifier(backbone, head, finetune)
    if world > 1:       # fine-tuning's BN statistics: rank 0's on every rank, as DDP keeps them
        model = utils.distributed_data_parallel(model, device, broadcast_buffers=finetune)
    groups = [{"params": list(head.parameters()), "base_lr": args.lr_classifier * args.batch_size / 256}]
    if finetune:
        groups.append({"params": list(backbone.parameters()),
                       "base_lr": args.lr_backbone * args.batch_size / 256})
    optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9, weight_decay=0)
    utils.zero_momentum(optimizer)     # buffers exist before a first step that may be skipped
    undo = utils.undo_memory(list(backbone.buffers()) if finetune else [])    # frozen BN: nothing
    return utils.TrainState(model, optimizer=optimizer, device=device, undo=undo,
                            best={"acc1": 0.0, "acc5": 0.0, "epoch": 0})


def train_step(state, x, y):
    """One SGD step on the cross-entropy, skipped on the device (BN statistics put back too) when
    the loss of any rank is not finite. Returns the global batch's loss."""
    utils.snapshot(state.undo)          # the BN statistics a skipped step puts back
    loss = F.cross_entropy(state.model(x), y)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loss = utils.mean_over_ranks(loss.detach())
    utils.restore_if_not_finite(state.undo, loss)
    utils.step_if_finite(state.optimizer, loss)
    return loss


def train_one_epoch(state, loader, epoch, step, run, guard):
    """One pass over the training set from where a checkpoint left it; returns the global step."""
    args, progress = run.args, run.progress
    state.train()
    loader.sampler.set_epoch(epoch)
    steps = len(loader)
    first = step - epoch * steps                     # > 0: resumed mid-epoch
    loader.sampler.skip = first * loader.batch_size
    if first == 0:      # the crops of an epoch: the same whatever the number of restarts
        torch.manual_seed(args.seed + epoch * run.world + run.rank)
    for g in state.optimizer.param_groups:
        g["lr"] = g["base_lr"] * lr_factor(epoch, args.epochs, args.schedule)
    mem = memory_format(state.device)
    for i, (x, y, problems) in progress.batches(loader, epoch, first):
        x = x.to(state.device, non_blocking=True, memory_format=mem)
        loss = train_step(state, x, y.to(state.device, non_blocking=True))
        step += 1
        progress.step(i, step, args.batch_size, loss=loss, lr=state.optimizer.param_groups[0]["lr"])
        guard.after_step(epoch, step, loss, problems, last=i == steps - 1)
    return step


@torch.no_grad()
def evaluate(model, val, run):
    """Top-1 and top-5 (%) on the whole val set, each rank scoring a shard, hits summed, and the
    number of unreadable images replaced; None when a stop signal comes."""
    classifier = utils.unwrap(model)
    out = pass_features(classifier.backbone, val, "val", run, stop_here=False, everywhere=False)
    if out is None:
        return None
    f, y, unreadable = out
    top = classifier.head(f).topk(min(5, classifier.head.out_features), dim=1).indices == y[:, None]
    hits = utils.sum_over_ranks(torch.stack([top[:, 0].sum(), top.any(dim=1).sum()]).double())
    acc1, acc5 = (100 * (hits / len(val))).tolist()
    return acc1, acc5, unreadable


def full_state(backbone, head):
    """Backbone + classifier as one torchvision state_dict (loads into models.<arch>())."""
    return {**backbone.state_dict(), "fc.weight": head.weight.detach(), "fc.bias": head.bias.detach()}


def exports(state):
    """best.pth, written when the val top-1 improves: the backbone and the classifier as one
    torchvision state_dict, on the CPU."""
    classifier = utils.unwrap(state.model)
    return {"best.pth": {k: v.cpu() for k, v in full_state(classifier.backbone, classifier.head).items()}}


# ----------------------------------------------------------------------------- linear probe on features
def features_protocol(backbone, train, val, classes, run):
    """The small-data linear protocol: features of the frozen backbone (eval mode, test-time
    transform) computed once, in batches of --batch-size, then train_probe on them."""
    args, progress = run.args, run.progress
    t0 = time.time()
    x, y, bad_train = pass_features(backbone, train, "train", run)
    xv, yv, bad_val = pass_features(backbone, val, "val", run)
    progress.print(f"linear probe on features: {len(x)} train / {len(xv)} val images, {x.shape[1]} "
                   f"features, computed once in {time.time() - t0:.0f} s; Adam, lr {args.lr_classifier:g} -> 1e-6 "
                   f"exponentially over {args.epochs} epochs, batches of {args.batch_size}")

    def report(rec):
        progress.print(f"epoch {rec['epoch']}/{args.epochs}: loss {rec['loss']:.4f} lr {rec['lr']:.3g} "
                       f"top-1 {rec['acc1']:.2f}% top-5 {rec['acc5']:.2f}%")
        progress.record({**rec, "backbone": backbone_id(args)})

    torch.manual_seed(args.seed)   # the same probe on every rank (each has all the features)
    acc1, acc5 = train_probe(x, y, xv, yv, classes, args.epochs, args.lr_classifier, args.batch_size,
                             args.print_freq, report)
    progress.print(f"linear probe on features: top-1 {acc1:.2f}%, top-5 {acc5:.2f}% after "
                   f"{args.epochs} epochs")
    return {"protocol": "features", "epochs": args.epochs, "acc1": acc1, "acc5": acc5,
            "unreadable": bad_train + bad_val}


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
          "train with detection/train_net.py (detection/README.md)", flush=True)
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    # each help states its default once (utils.HelpFormatter), in words where it depends on the mode
    p = utils.argument_parser(__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--data", help="DIR with DIR/train and DIR/val (ImageNet layout), fashion-mnist, cifar10 or "
        "cifar100 (required, except with --export-detectron2)")
    add("--arch", default="resnet50", help="a torchvision ResNet")
    add("--small-images", action="store_true", help="3x3 stem, no max-pool (implied when --pretrained "
        "has a 3x3 conv1)")
    add("--pretrained", help="checkpoint.pth, backbone.pth, the authors' checkpoint or a torchvision "
        "state_dict (default: a random backbone)")
    add("--momentum-encoder", action="store_true", help="evaluate the momentum (target) backbone of "
        "an INTL-M checkpoint")
    add("--weights", choices=["freeze", "finetune"], default="freeze", help="freeze: linear protocol; "
        "finetune: semi-supervised")
    add("--protocol", choices=["images", "features"], help="linear protocol: SGD on augmented images "
        "through the frozen backbone, or Adam on its features computed once (default: features for "
        "fashion-mnist and CIFAR, images otherwise)")
    add("--train-subset", help="SimCLR subset list (1percent.txt, 10percent.txt) (default: every "
        "training image)")
    add("--subset", type=int, default=0, help="train on a fixed random subset of N images (0: all)")
    add("--knn", action="store_true", help="only k-NN: 5-NN Euclidean majority (raw features) and "
        "20-NN cosine exp(cos/0.07)-weighted (normalised features) top-1")
    add("--knn-chunk", type=int, default=256, help="queries per similarity block")
    add("--epochs", type=int, help="training epochs (default: 100 on images, 500 with --protocol "
        "features, 20 with finetune)")
    add("--stop-epoch", type=int, default=0, help="stop after this epoch (schedules still span "
        "--epochs; 0: the last); resume later")
    add("--schedule", choices=["const", "step", "cos"], help="the lr schedule (default: step for the "
        "linear protocol on images, const for finetune; --protocol features decays exponentially)")
    add("--batch-size", type=int, help="global batch size (default: 256, 1000 with --protocol features)")
    add("--lr-classifier", "--lr", type=float, help="the classifier's lr in every protocol; --lr is "
        "the same flag (default: 0.4 per 256 images for the linear protocol on images, 0.2 per 256 "
        "images with finetune, 0.01 with --protocol features, Adam's, decaying to 1e-6)")
    add("--lr-backbone", type=float, default=0.004, help="backbone lr per 256 images with finetune "
        "(default: 0.004, for INTL-M checkpoints; 0.006 suits INTL ones)")
    add("--workers", type=int, default=utils.default_workers(), help="data workers per process "
        "(default: the node's CPU cores shared among its processes, at most 8)")
    add("--seed", type=int, default=0, help="seed of the classifier's initialisation, the random "
        "backbone, the data order and the crops")
    add("--print-freq", type=int, default=50, help="steps (features: epochs) between progress lines")
    add("--output-dir", default="runs/eval", help="the run folder: log.jsonl, log.txt, args.json, "
        "checkpoint.pth, best.pth, done")
    add("--resume", help="checkpoint to resume (default: OUTPUT_DIR/checkpoint.pth if present)")
    add("--restart", action="store_true", help="start afresh even if OUTPUT_DIR/checkpoint.pth exists "
        "(it is replaced after the first save); the old log.jsonl is renamed log.jsonl.old")
    add("--allow-changed-args", action="store_true", help="resume a checkpoint made with other "
        "settings, continuing with this run's (the backbone file's content must be the same)")
    add("--save-every-minutes", type=float, default=0, help="also save mid-epoch this often, against "
        "kill -9 (0: at each epoch's end only)")
    add("--max-bad-files", type=float, default=0.01, help="stop past this fraction of a pass unreadable")
    add("--max-nonfinite", type=int, default=20, help="stop after N non-finite losses in a row")
    add("--tensorboard", action="store_true", help="also write the logged figures to "
        "OUTPUT_DIR/tensorboard (needs the tensorboard package)")
    add("--dist-timeout", type=float, default=30, help="minutes a process waits for the others")
    add("--export-detectron2", metavar="OUT.pkl", help="only write the --pretrained backbone as "
        "detectron2 weights (MoCo's names and pickle) to OUT.pkl, for detection/train_net.py; no "
        "data needed")
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
    if args.lr_classifier is None:
        args.lr_classifier = 0.2 if finetune else 0.01 if on_features else 0.4
    check_ranges(args, {"positive": "epochs batch_size knn_chunk print_freq lr_classifier lr_backbone "
                                    "max_nonfinite dist_timeout",
                        "0 or more": "subset stop_epoch workers save_every_minutes",
                        "in [0, 1]": "max_bad_files"})
    return args


# What a resumed run may change: it does not change what is computed (the backbone file may move,
# its content may not: describe() names it by its sha256).
FREE_ON_RESUME = {"workers", "print_freq", "output_dir", "resume", "restart", "stop_epoch", "knn_chunk",
                  "pretrained", "pretrained_sha256", "allow_changed_args", "export_detectron2",
                  "save_every_minutes", "max_bad_files", "max_nonfinite", "tensorboard", "dist_timeout"}


def file_sha256(path):
    """The hex SHA-256 of a file's content, read in 16 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def backbone_id(args):
    """The backbone a record comes from: its file and the first 12 hex of its sha256, or "random"."""
    return "random" if not args.pretrained else {
        "path": args.pretrained, "sha256": args.pretrained_sha256[:12], "momentum_encoder": args.momentum_encoder}


def describe(settings):
    """What an evaluation trains, in words: a checkpoint resumes only into the same."""
    what = "fine-tuning" if settings["weights"] == "finetune" else "the linear protocol"
    sha = settings["pretrained_sha256"]
    backbone = (f"the backbone with sha256 {sha[:12]}" + (" (its momentum encoder)"
                if settings["momentum_encoder"] else "")) if sha else f"a random {settings['arch']}"
    return f"{what} of {backbone}, {settings['classes']} classes"


def end_epoch(state, scores, epoch, step, run, guard):
    """The best epoch so far (best.pth when it improves), the checkpoint, the epoch's line and
    record."""
    acc1, acc5, unreadable = scores
    improved = acc1 > state.best["acc1"]
    if improved:
        state.best = {"acc1": acc1, "acc5": acc5, "epoch": epoch + 1}
    counts = guard.end_epoch(epoch + 1, step, exports=improved)
    counts["unreadable"] += unreadable       # the val pass's too
    best = state.best
    notes = [f", {n} {what}" for n, what in [(counts["unreadable"], "unreadable images replaced"),
                                              (counts["nonfinite"], "steps skipped (loss not finite)")] if n]
    run.progress.print(f"epoch {epoch + 1}/{run.args.epochs}: top-1 {acc1:.2f}% top-5 {acc5:.2f}% (best "
                       f"top-1 {best['acc1']:.2f}% at epoch {best['epoch']})" + "".join(notes))
    run.progress.record({"epoch": epoch + 1, "step": step, "lr": state.optimizer.param_groups[0]["lr"],
                         "acc1": acc1, "acc5": acc5, "best_acc1": best["acc1"], **counts,
                         "backbone": backbone_id(run.args)})


def fit(backbone, dim, train, val, classes, run, folder):
    """Linear protocol or fine-tuning: SGD on the training images, the val top-1 after every epoch,
    the best kept (best.pth); checkpoints, resume, stop signals, unreadable files and divergence
    as in pretraining (utils.Checkpoints, utils.Guard). Returns the result, or None (not done)
    before the end of the schedule."""
    args = run.args
    state = build_state(backbone, dim, classes, args, run.device, run.world)
    loader = utils.train_loader(train, args.batch_size, run.rank, run.world, args.seed, args.workers,
                                run.device, drop_last=False)
    settings = {**utils.plain(vars(args)), "steps_per_epoch": len(loader), "classes": classes}
    ckpt = utils.Checkpoints(args.output_dir, state, settings, FREE_ON_RESUME, describe, exports,
                             run.rank, run.world, utils.host_group(), run.device)
    hint = "lower --lr-classifier" + (" or --lr-backbone" if args.weights == "finetune" else "")
    guard = utils.Guard(ckpt, len(train), args.max_bad_files, args.max_nonfinite,
                        args.save_every_minutes, args.print_freq, hint, run.signals, run.unreadable)
    epoch, step = ckpt.resume(args.resume, args.restart, args.allow_changed_args)
    run.progress.steps = len(loader)
    run.progress.print(f"{'fine-tuning' if args.weights == 'finetune' else 'linear protocol'}: "
                       f"{len(train)} train / {len(val)} val images, {classes} classes, {run.world} "
                       f"process(es) on {run.device.type}, batch {args.batch_size}, {args.epochs} epochs "
                       f"({args.schedule})")
    folder.start()
    last = min(args.epochs, args.stop_epoch or args.epochs)
    for epoch in range(epoch, last):
        step = train_one_epoch(state, loader, epoch, step, run, guard)
        scores = evaluate(state.model, val, run)
        if scores is None:      # a stop signal in the val pass: the epoch's steps are kept
            guard.save(epoch, step)
            guard.stop_if_asked(step)
        end_epoch(state, scores, epoch, step, run, guard)
        guard.stop_if_asked(step)
    if epoch >= args.epochs:
        run.progress.print(f"already finished: {ckpt.path} is at epoch {epoch} of {args.epochs}")
    best = state.best
    run.progress.print(f"best top-1 {best['acc1']:.2f}%, top-5 {best['acc5']:.2f}% (epoch {best['epoch']})")
    if last < args.epochs:
        return None
    return {"epochs": args.epochs, "acc1": best["acc1"], "acc5": best["acc5"], "best_epoch": best["epoch"]}


def load_backbone(args, device):
    """The backbone to evaluate, the same on every rank: --pretrained's (its stem read from the
    file, the file's SHA-256 kept in args) or a random one; frozen but for fine-tuning."""
    loaded = backbone_state(args.pretrained, args.momentum_encoder) if args.pretrained else None
    args.pretrained_sha256 = on_rank0(lambda: file_sha256(args.pretrained)) if args.pretrained else None
    if loaded and loaded[0]["conv1.weight"].shape[-1] == 3:   # the 3×3 stem of 32-px pretraining
        args.small_images = True
    torch.manual_seed(args.seed)   # the same random backbone and classifier on every rank
    backbone, dim = resnet_backbone(args.arch, args.small_images)
    if args.pretrained:
        load_pretrained(backbone, args, loaded)
    backbone.requires_grad_(args.weights == "finetune" and not args.knn)
    return backbone.to(device, memory_format=memory_format(device)), dim


def main(argv=None):
    """One evaluation, in its run folder (utils.RunFolder): k-NN, the linear probe on features,
    or the linear protocol / fine-tuning on images (fit); returns its result."""
    args = parse_args(argv)
    if args.export_detectron2:
        return export_detectron2(args)
    rank, world, device = setup_distributed(args.batch_size, args.dist_timeout)
    backbone, dim = load_backbone(args, device)
    train, val, classes = datasets(args, small_images=args.small_images or args.data in SMALL_DATA)
    with utils.RunFolder(args.output_dir, rank, {**utils.plain(vars(args)), "classes": classes}, device) as folder:
        progress = utils.Progress(args.output_dir, rank, 1, args.epochs, args.print_freq, args.tensorboard)
        run = Run(rank, world, device, args, progress, utils.StopSignals(), utils.Unreadable(args.max_bad_files))
        progress.print(f"backbone: {args.arch}, {args.pretrained or f'random (seed {args.seed})'}"
                       + " (momentum encoder)" * args.momentum_encoder)
        if args.knn or args.protocol == "features":      # minutes: no checkpoints
            if args.restart and rank == 0:
                utils.start_afresh(args.output_dir)
            folder.start()
            result = (knn_eval(backbone, train, val, run) if args.knn
                      else features_protocol(backbone, train, val, classes, run))
            progress.record({**result, "backbone": backbone_id(args)})
        else:
            result = fit(backbone, dim, train, val, classes, run, folder)
        run.signals.restore()
        progress.finish()
        if result is not None:
            folder.finish(result)
    utils.leave_process_group()
    return result


if __name__ == "__main__":
    utils.exit_on_ctrl_c(main)

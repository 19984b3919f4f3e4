"""INTL: IterNorm with trace loss -- "Modulate Your Spectrum in Self-Supervised Learning"
(Weng et al., ICLR 2024, arXiv 2305.16789), the whole pretraining method in one file.

    python intl.py                                    # quick start: Fashion-MNIST on this machine
    torchrun --nproc_per_node=8 intl.py --data /imagenet --method intl-m --multi-crop

Read top to bottom beside the paper: IterNorm (§2) -> trace loss (§3) -> objective (§4)
-> networks (§5) -> augmentation (§6) -> data -> training loop (§7) -> main. The § marks are
this file's sections; where the paper leaves a detail open (divisors, centring, defaults),
the code does what the authors' implementation does. Speed lives beside the method:
--gpu-aug draws the crops on the GPU (gpu_aug.py), --benchmark step|aug times it (benchmark.py).
"""
import argparse
import copy
import gzip
import json
import math
import os
import random
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter
from torchvision import transforms as T

import gpu_aug


def fail(msg):
    """Bad input: one line on stderr and a non-zero exit, never a traceback."""
    sys.exit(f"error: {msg}")


# ----------------------------------------------------------------------------- §2 IterNorm
def whitened_variables(z, whiten):
    """The matrix whose ROWS are whitened: Z centred over its d features (channel whitening,
    the m samples are the variables) or Z^T centred over its m samples (batch whitening)."""
    if whiten == "channel":
        return z - z.mean(dim=1, keepdim=True)
    return (z - z.mean(dim=0, keepdim=True)).T


def newton_iterations(sigma_n, iters):
    """P_k = 1.5 P_{k-1} - 0.5 P_{k-1}^3 Σ_N, P_0 = I  (§2): P_T -> Σ_N^{-1/2}."""
    p = torch.eye(sigma_n.shape[0], dtype=sigma_n.dtype, device=sigma_n.device)
    for _ in range(iters):
        p = torch.addmm(p, torch.linalg.matrix_power(p, 3), sigma_n, beta=1.5, alpha=-0.5)
    return p


def iter_norm(z, iters=4, whiten="channel"):
    """Ŷ = P_T(Σ/trΣ) Zc / sqrt(trΣ)  (§2), in float32 (or float64) even under autocast.

    x (k variables × n observations) is whitened by the k × k covariance Σ = x x^T/(n-1).
    P_T is a polynomial in Σ, so p(x x^T) x = x p(x^T x): when k > n the n × n Gram matrix
    gives the same output at O(n²k) instead of O(k³)."""
    with torch.autocast(z.device.type, enabled=False):
        x = whitened_variables(z.to(torch.promote_types(z.dtype, torch.float32)), whiten)
        k, n = x.shape
        small = x @ x.T if k <= n else x.T @ x
        small = small / (n - 1)
        trace = small.diagonal().sum()
        p = newton_iterations(small / trace, iters)
        y = (p @ x if k <= n else x @ p) / trace.sqrt()
        return y if whiten == "channel" else y.T


# ----------------------------------------------------------------------------- §3 trace loss
def trace_loss(y, whiten="channel"):
    """TL(Ŷ) = Σ_j (v_j - 1)², v_j the unbiased variance of whitened variable j  (§3)."""
    v = y.var(dim=1 if whiten == "channel" else 0)
    return ((v - 1) ** 2).sum()


def trace_loss_weight(k):
    """β = 0.01 (log2 k - 3), k = number of whitened variables  (§3)."""
    return 0.01 * (math.log2(k) - 3)


# ----------------------------------------------------------------------------- §4 objective
def nmse(a, b):
    """2 - 2 mean_i cos(a_i, b_i)  (§4)."""
    return 2 - 2 * F.cosine_similarity(a, b, dim=1).mean()


class GatherWithGrad(torch.autograd.Function):
    """All-gather along the batch (§1). Backward sums the gradients of every rank and keeps
    this rank's slice, so that DDP's gradient average equals the single-process gradient."""

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


def intl_loss(online, target, views, beta, iters=4, whiten="channel"):
    """INTL (target None) or INTL-M (momentum target encodes views[0])  (§4).

    Returns the loss, its nmse and (unweighted) trace-loss parts, and the global embedding
    and whitened output of one online view, for the spectrum."""
    if target is None:   # L = 1/(V-1) Σ_i [nmse(Ŷ_i, Ŷ_0) + β (TL(Ŷ_i) + TL(Ŷ_0))]
        zs = [gather(z) for z in online(views)]
        ys = [iter_norm(z, iters, whiten) for z in zs]
        y0, ys = ys[0], ys[1:]
        tl0 = trace_loss(y0, whiten)
        tls = [trace_loss(y, whiten) + tl0 for y in ys]
    else:                # L = 1/(V-1) Σ_i [nmse(Ŷ_i, Ŷ_target) + β TL(Ŷ_i)]
        with torch.no_grad():
            y0 = iter_norm(gather(target(views[:1])[0]), iters, whiten)
        zs = [gather(z) for z in online(views[1:])]
        ys = [iter_norm(z, iters, whiten) for z in zs]
        tls = [trace_loss(y, whiten) for y in ys]
    n = torch.stack([nmse(y, y0) for y in ys]).mean()
    tl = torch.stack(tls).mean()
    return n + beta * tl, n.detach(), tl.detach(), (zs[-1].detach(), ys[-1].detach())


def momentum_at(step, total_steps, m0):
    """m = 1 - (1 - m0)(cos(π t / t_total) + 1)/2: m0 at the start, 1 at the end  (§4)."""
    return 1 - (1 - m0) * (math.cos(math.pi * step / total_steps) + 1) / 2


@torch.no_grad()
def update_momentum(target, online, m):
    """θ_target <- m θ_target + (1 - m) θ_online, parameters only  (§4)."""
    t, o = list(target.parameters()), list(online.parameters())
    torch._foreach_mul_(t, m)
    torch._foreach_add_(t, o, alpha=1 - m)


def spectrum(z, whiten="channel"):
    """Condition number λmax/λmin (capped at 1e12: singular) and effective rank
    exp(entropy(λ/Σλ)) of the covariance of the whitened variables -- the paper's
    view of collapse."""
    x = whitened_variables(z.detach().double().cpu(), whiten)
    k, n = x.shape
    lam = torch.linalg.eigvalsh((x @ x.T if k <= n else x.T @ x) / (n - 1)).clamp_min(0)
    lam = torch.cat([lam, lam.new_zeros(k - len(lam))])   # the Gram misses k - n zeros
    p = lam / lam.sum()
    erank = torch.exp(-(p * p.clamp_min(1e-300).log()).sum()).item()
    cond = (lam.max() / lam.min().clamp_min(lam.max() * 1e-12)).item()
    return {"cond": cond, "erank": erank}


# ----------------------------------------------------------------------------- §5 networks
RESNETS = [n for n in torchvision.models.list_models(module=torchvision.models)
           if n.startswith(("resnet", "wide_resnet", "resnext"))]


def resnet_backbone(arch, small_images=False):
    """torchvision ResNet without its classifier; last BN of each block zero-initialised
    except for ResNet-18; 3×3 stride-1 stem and no max-pool for 32-px images  (§5)."""
    if arch not in RESNETS:
        fail(f"unknown --arch {arch!r}; choose one of {', '.join(RESNETS)}")
    net = torchvision.models.get_model(arch, zero_init_residual=arch != "resnet18")
    if small_images:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def projector(in_dim, widths):
    """Linear(no bias)-BN-ReLU for each hidden width, then Linear(bias)  (§5)."""
    dims = [in_dim] + [int(w) for w in widths.split("-")]
    layers = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Backbone + projector over a list of views, in ONE forward so that DDP reduces once.
    Each view is its own BN batch (multi-crop views differ in size anyway)."""

    def __init__(self, backbone, projector):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, views):
        return [self.projector(self.backbone(v)) for v in views]


# ----------------------------------------------------------------------------- §6 augmentation
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#            (size, scale range,    p_blur, p_solarize)
TWO_VIEWS = [(224, (0.08, 1.0), 1.0, 0.0), (224, (0.08, 1.0), 0.1, 0.2)]
MULTI_CROP = [(224, (0.2, 1.0), 0.5, 0.1), (224, (0.2, 1.0), 0.5, 0.1),
              (192, (0.171, 0.857), 0.5, 0.1), (160, (0.143, 0.714), 0.5, 0.1),
              (128, (0.114, 0.571), 0.5, 0.1), (96, (0.086, 0.429), 0.5, 0.1)]
SMALL_IMAGES = [(32, (0.08, 1.0), 0.0, 0.0), (32, (0.08, 1.0), 0.0, 0.2)]


def gaussian_blur(img, sigma=(0.1, 2.0)):
    """Pillow's GaussianBlur(σ) (three extended box blurs), σ ~ U(sigma) on a PIL image."""
    s = torch.empty(1).uniform_(*sigma).item()      # as T.GaussianBlur.get_params draws σ
    return img.filter(ImageFilter.GaussianBlur(radius=s))


def crop_transform(size, scale, p_blur, p_sol):
    """One crop of the augmentation recipe on a PIL image; the blur is Pillow's."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([gaussian_blur], p=p_blur),
        T.RandomSolarize(128, p=p_sol),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def apply_each(crops, img):
    return [crop(img) for crop in crops]


def views_transform(recipe):
    """PIL image -> list of augmented views (picklable, so data workers can spawn)."""
    return partial(apply_each, [crop_transform(*c) for c in recipe])


def eval_transform(small_images):
    """Centre view for evaluation: Resize(256) + CenterCrop(224), or as is for 32-px data."""
    resize = [] if small_images else [T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
                                      T.CenterCrop(224)]
    return T.Compose(resize + [T.ToTensor(), T.Normalize(MEAN, STD)])


# ----------------------------------------------------------------------------- data
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


class GreyImages(torch.utils.data.Dataset):
    """uint8 greyscale images -> RGB PIL images padded to 32 px, then `transform`."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(np.pad(self.images[i], 2)).convert("RGB")
        return self.transform(img), int(self.labels[i])


def image_folder(root, transform, loader=torchvision.datasets.folder.default_loader):
    """torchvision ImageFolder with one-line errors for a missing or empty folder."""
    if not os.path.isdir(root):
        fail(f"{root} not found: --data DIR must hold DIR/train/<class>/<image> (ImageNet layout)")
    try:
        return torchvision.datasets.ImageFolder(root, transform, loader=loader)
    except (FileNotFoundError, RuntimeError) as e:
        fail(f"no images in {root}: {str(e).splitlines()[0]}")


def train_dataset(args, recipe):
    """Images -> augmented views, or with --gpu-aug decoded uint8 images (capped in size)."""
    transform = T.PILToTensor() if args.gpu_aug else views_transform(recipe)
    if args.data == "fashion-mnist":
        ds = GreyImages(*load_fashion_mnist(train=True), transform)
    else:
        loader = gpu_aug.load_capped if args.gpu_aug else torchvision.datasets.folder.default_loader
        ds = image_folder(os.path.join(args.data, "train"), transform, loader)
    return random_subset(ds, args.subset)


def train_loader(args, recipe, rank, world, device):
    """Each rank reads its share of a global batch; the sampler reshuffles every epoch."""
    dataset = train_dataset(args, recipe)
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, seed=args.seed)
    per_rank = args.batch_size // world
    if len(sampler) < per_rank:
        fail(f"{len(dataset)} images are fewer than one batch of {args.batch_size}")
    return torch.utils.data.DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=args.workers,
        collate_fn=gpu_aug.pad_collate if args.gpu_aug else None, pin_memory=device.type == "cuda",
        drop_last=True, persistent_workers=args.workers > 0)


def random_subset(ds, n):
    """A fixed random subset of n images (all when n is 0), the same on every rank."""
    if not n or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    return torch.utils.data.Subset(ds, idx.tolist())


# ----------------------------------------------------------------------------- §7 training loop
def learning_rate(step, total_steps, warmup_steps, lr):
    """Linear warm-up from 0, then per-step cosine to 0.001 × lr  (§7)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return lr * q + 0.001 * lr * (1 - q)


def param_groups(model, wd):
    """Weight decay on weights only; none on biases and BN parameters (1-d)  (§7)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def setup_distributed(batch_size):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (env://); plain python runs one process.
    The global batch must split evenly: checked before any process group is joined."""
    world = int(os.environ.get("WORLD_SIZE", 1))
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
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


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


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def build_training(args, device, world):
    """The online encoder (DDP-wrapped, compiled if asked), the INTL-M momentum target, SGD
    and the fp16 loss scaler. Seeded alike on every rank: all ranks start from the same weights."""
    torch.manual_seed(args.seed)
    backbone, dim = resnet_backbone(args.arch, args.small_images)
    online = Encoder(backbone, projector(dim, args.projector)).to(device)
    if device.type == "cuda":
        online = online.to(memory_format=torch.channels_last)
        if world > 1:    # torch's SyncBatchNorm runs on GPUs only
            online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
    target = copy.deepcopy(online).requires_grad_(False) if args.method == "intl-m" else None
    model = online
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            online, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:     # the crop shapes never change: compiled once (DDP splits it at its buckets)
        model = torch.compile(model, mode=args.compile)
    optimizer = torch.optim.SGD(param_groups(online, args.wd), lr=0, momentum=0.9,
                                fused=device.type == "cuda")    # one kernel for all parameters
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return online, target, model, optimizer, scaler


def resume_from(path, online, target, optimizer, scaler, aug, args, rank):
    """Restore everything a checkpoint holds; returns (epoch, global step)."""
    if not os.path.exists(path):
        fail(f"--resume {path}: no such file")
    ckpt = load_checkpoint(path)
    try:
        online.load_state_dict(ckpt["model"])
        if target is not None:
            target.load_state_dict(ckpt["target"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for g in optimizer.param_groups:   # fused on GPUs: this run's choice, not the file's
            g["fused"] = optimizer.defaults["fused"]
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])], aug)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        fail(f"checkpoint {path} does not match this run ({args.arch}, {args.method}, "
             f"--projector {args.projector}): {str(e).splitlines()[0]}")
    return ckpt["epoch"], ckpt["step"]


AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def train_step(model, online, target, optimizer, scaler, views, m, beta, args):
    """One step of §7: EMA target, INTL loss, backward, SGD; nothing in it waits for the GPU.
    `model` runs the forward (`online`, or its DDP / compiled wrapper); `online` owns the weights."""
    if target is not None:
        update_momentum(target, online, m)
    with torch.autocast(views[0].device.type, dtype=AMP[args.amp], enabled=args.amp != "off"):
        loss, n, tl, last = intl_loss(model, target, views, beta, args.iters, args.whiten)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, n, tl, last


def setup(args):
    """Processes, device, the crop recipe and β, shared by training and the benchmarks."""
    rank, world, device = setup_distributed(args.batch_size)
    small = args.small_images or args.data == "fashion-mnist"
    recipe = SMALL_IMAGES if small else (MULTI_CROP if args.multi_crop else TWO_VIEWS)
    if args.amp == "auto":
        args.amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    torch.backends.cudnn.benchmark = True    # fixed crop shapes: pick the fastest convolutions once
    k = args.batch_size if args.whiten == "channel" else int(args.projector.split("-")[-1])
    beta = args.beta if args.beta is not None else trace_loss_weight(k)
    return rank, world, device, recipe, k, beta


def channels_last(device):
    """channels_last is faster for convolutions on GPUs, slower on CPUs."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def to_views(batch, recipe, aug, device):
    """A loader batch -> the views on `device` (augmented there with --gpu-aug)."""
    if aug is not None:
        images, heights, widths = (t.to(device, non_blocking=True) for t in batch)
        batch = gpu_aug.multi_view(images, recipe, aug, heights, widths)
    return [v.to(device, non_blocking=True, memory_format=channels_last(device)) for v in batch]


def train(args):
    rank, world, device, recipe, k, beta = setup(args)
    log = print if rank == 0 else (lambda *a, **kw: None)
    online, target, model, optimizer, scaler = build_training(args, device, world)
    seed = args.seed + rank      # augmentation differs across ranks
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    # --gpu-aug's generator, seeded from this rank's stream as the loader seeds its workers
    aug = torch.Generator(device).manual_seed(int(torch.randint(2**62, ()))) if args.gpu_aug else None
    loader = train_loader(args, recipe, rank, world, device)
    lr = args.lr * args.batch_size / 256
    total_steps, warmup_steps = args.epochs * len(loader), args.warmup_epochs * len(loader)

    start_epoch, step = 0, 0
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    resume = args.resume or (ckpt_path if os.path.exists(ckpt_path) else None)
    if resume:
        start_epoch, step = resume_from(resume, online, target, optimizer, scaler, aug, args, rank)
        log(f"resumed from {resume} at epoch {start_epoch}, step {step}")
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)

    log(f"INTL: {args.method}, {args.arch}, {len(recipe)} views{' (GPU augmentation)' if aug else ''}, "
        f"{world} process(es) on {device.type}, global batch {args.batch_size}, beta {beta:.4f}, "
        f"{len(loader.dataset)} images, {len(loader)} steps/epoch, amp {args.amp}")
    for epoch in range(start_epoch, min(args.epochs, args.stop_epoch or args.epochs)):
        loader.sampler.set_epoch(epoch)
        model.train()
        if target is not None:
            target.train()
        t_last, t_data, wait, seen = time.time(), time.time(), 0.0, 0
        for i, (batch, _) in enumerate(loader):
            wait += time.time() - t_data          # waiting for the loader only
            views = to_views(batch, recipe, aug, device)
            for g in optimizer.param_groups:
                g["lr"] = learning_rate(step, total_steps, warmup_steps, lr)
            loss, n, tl, last = train_step(model, online, target, optimizer, scaler, views,
                                           momentum_at(step, total_steps, args.momentum), beta, args)
            step += 1
            seen += args.batch_size
            if step % args.print_freq == 0 or i == len(loader) - 1:   # .item() syncs: only here
                dt = time.time() - t_last
                rec = {"epoch": epoch, "step": step, "loss": loss.item(), "nmse": n.item(),
                       "trace_loss": tl.item(), "lr": optimizer.param_groups[0]["lr"],
                       "img_per_s": seen / dt, "data_wait": wait / dt}
                log(f"ep {epoch + 1}/{args.epochs} step {i + 1}/{len(loader)} loss {rec['loss']:.4f} "
                    f"(nmse {rec['nmse']:.4f} tl {rec['trace_loss']:.3f}) lr {rec['lr']:.4g} "
                    f"{rec['img_per_s']:.0f} img/s, data wait {100 * rec['data_wait']:.0f}%", flush=True)
                write_log(args, rank, rec)
                t_last, wait, seen = time.time(), 0.0, 0
            t_data = time.time()

        z, y = last   # the epoch's last batch, before and after IterNorm (read before any later
        #               step: CUDA graphs reuse their output memory)
        spec = {"epoch": epoch + 1, "step": step, "projector": spectrum(z, args.whiten),
                "iternorm": spectrum(y, args.whiten)}
        log(f"epoch {epoch + 1}: spectrum cond/erank projector {spec['projector']['cond']:.3g}/"
            f"{spec['projector']['erank']:.1f}, IterNorm output {spec['iternorm']['cond']:.3g}/"
            f"{spec['iternorm']['erank']:.1f} of {k}", flush=True)
        write_log(args, rank, spec)
        rngs = [rng_state(aug)]         # every rank's, so that each resumes its own stream
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(aug))
        if rank == 0:
            save_atomic({"model": online.state_dict(),
                         "target": target.state_dict() if target is not None else None,
                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch + 1, "step": step, "args": vars(args), "rng": rngs},
                        ckpt_path)
            save_atomic(online.backbone.state_dict(), os.path.join(args.output_dir, "backbone.pth"))
    if world > 1:
        dist.destroy_process_group()
    return online.backbone, rank


def write_log(args, rank, rec):
    """One JSON object per line in OUTPUT_DIR/log.jsonl, from rank 0."""
    if rank == 0:
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------- main
QUICK_START = ["--data", "fashion-mnist", "--arch", "resnet18", "--projector", "1024-1024-1024",
               "--batch-size", "256", "--lr", "0.05", "--wd", "1e-4", "--epochs", "1",
               "--warmup-epochs", "0", "--subset", "40000", "--workers", "1",
               "--print-freq", "10", "--output-dir", "runs/quick-start"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="DIR with DIR/train/<class>/<image> (ImageNet layout), or fashion-mnist")
    p.add_argument("--subset", type=int, default=0, help="train on a fixed random subset of N images (0: all)")
    p.add_argument("--method", choices=["intl", "intl-m"], default="intl",
                   help="INTL, or INTL-M with a momentum target encoding the first view")
    p.add_argument("--whiten", choices=["channel", "batch"], default="channel",
                   help="whiten the samples (channel) or the features (batch)")
    p.add_argument("--iters", type=int, default=4, help="Newton iterations T")
    p.add_argument("--beta", type=float, default=None, help="trace-loss weight β (None: 0.01 (log2 k - 3), k the global batch or the embedding dim)")
    p.add_argument("--momentum", type=float, default=0.996, help="INTL-M start momentum m0")
    p.add_argument("--arch", default="resnet50", help="a torchvision ResNet")
    p.add_argument("--small-images", action="store_true", help="32-px data: 3x3 stem and the 32-px crops")
    p.add_argument("--projector", default="8192-8192-8192", help="projector widths")
    p.add_argument("--multi-crop", action="store_true", help="6 crops: 2x224, 192, 160, 128, 96")
    p.add_argument("--epochs", type=int, default=100, help="pretraining epochs")
    p.add_argument("--stop-epoch", type=int, default=0,
                   help="stop after this epoch (schedules still span --epochs); resume later")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size")
    p.add_argument("--lr", type=float, default=0.3, help="base lr per 256 images (lr = LR × batch/256)")
    p.add_argument("--wd", type=float, default=1e-5, help="weight decay (weights only)")
    p.add_argument("--warmup-epochs", type=int, default=2, help="linear warm-up epochs")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="auto: bf16 on GPUs that support it, else off")
    p.add_argument("--gpu-aug", action="store_true",
                   help="workers only decode; the crops are drawn batched on the device (gpu_aug.py)")
    p.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the encoder in this mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--benchmark", choices=["step", "aug"],
                   help="time training steps (synthetic crops; real ones with --data DIR) or the augmentation")
    p.add_argument("--bench-steps", type=int, default=20, help="timed steps (images for aug) per repeat")
    p.add_argument("--workers", type=int, default=8, help="data workers per process")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights (augmentation: seed + rank)")
    p.add_argument("--print-freq", type=int, default=50, help="steps between progress lines")
    p.add_argument("--output-dir", default="runs/intl",
                   help="checkpoint.pth, backbone.pth and log.jsonl go here")
    p.add_argument("--resume", help="checkpoint to resume (None: OUTPUT_DIR/checkpoint.pth if present)")
    p.error = lambda msg: fail(f"{msg} (see --help)")     # one line, not the whole usage
    args = p.parse_args(argv)
    if not args.data and not args.benchmark:
        fail("--data is required (a folder in ImageNet layout, or fashion-mnist)")
    for name in ["epochs", "batch_size", "iters", "print_freq", "bench_steps"]:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be positive")
    return args


def main():
    quick = len(sys.argv) == 1
    if quick:
        print("quick start: python intl.py " + " ".join(QUICK_START), flush=True)
    args = parse_args(QUICK_START if quick else None)
    if args.benchmark:
        import benchmark    # speed figures, apart from the method
        return benchmark.main(args)
    backbone, rank = train(args)
    if quick and rank == 0:
        from eval_linear import quick_start_knn    # evaluation lives there; it imports this file
        quick_start_knn(backbone, args)


if __name__ == "__main__":
    main()

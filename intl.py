"""INTL: IterNorm with trace loss -- "Modulate Your Spectrum in Self-Supervised Learning"
(Weng et al., ICLR 2024, arXiv 2305.16789), the whole pretraining method in one file.

    python intl.py                                    # quick start: Fashion-MNIST on this machine
    torchrun --nproc_per_node=8 intl.py --data /imagenet --method intl-m --multi-crop

Read top to bottom beside the paper: IterNorm (and the Spectral Transformation it instantiates)
-> trace loss -> INTL objective (and INTL-M) -> networks -> augmentation -> data -> training
loop -> main. The plumbing apart from the method is in utils.py: the data files, checkpoints and
their resume, what a long run survives (unreadable files, preemption, a non-finite loss, a full
disk) and the online monitor's k-NN and linear probe.

Where the paper leaves a detail open, the code does what the authors' implementation does, so
that losses and checkpoints compare with theirs: IterNorm centres each whitened variable over its
observations and divides the covariance by (observations - 1), with no epsilon; the trace loss
uses the unbiased variance; beta = 0.01 (log2 k - 3); the learning rate is counted from step 1;
the momentum schedule, the crop scales of multi-crop, Pillow's Gaussian blur and the CIFAR
defaults (every parameter decayed, fp32) are theirs. Speed lives beside the method: --gpu-aug
draws the crops on the GPU (gpu_aug.py); benchmark.py times it.
"""
import argparse
import copy
import json
import math
import os
import random
import sys
import time
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import ImageFilter
from torchvision import transforms as T

import utils
from utils import fail


# ----------------------------------------------------------------------------- IterNorm
def whitened_variables(z, whiten):
    """The matrix whose ROWS are whitened: Z centred over its d features (channel whitening,
    the m samples are the variables) or Z^T centred over its m samples (batch whitening)."""
    if whiten == "channel":
        return z - z.mean(dim=1, keepdim=True)
    return (z - z.mean(dim=0, keepdim=True)).T


def newton_iterations(sigma_n, iters):
    """P_k = 1.5 P_{k-1} - 0.5 P_{k-1}^3 Σ_N, P_0 = I: P_T -> Σ_N^{-1/2}."""
    p = torch.eye(sigma_n.shape[0], dtype=sigma_n.dtype, device=sigma_n.device)
    for _ in range(iters):
        p = torch.addmm(p, torch.linalg.matrix_power(p, 3), sigma_n, beta=1.5, alpha=-0.5)
    return p


def iter_norm(z, iters=4, whiten="channel"):
    """Ŷ = P_T(Σ/trΣ) Zc / sqrt(trΣ), in float32 (or float64) even under autocast.

    x (k variables × n observations) is whitened by the k × k covariance Σ = x x^T/(n-1).
    P_T is a polynomial in Σ, so p(x x^T) x = x p(x^T x): when k > n the n × n Gram matrix
    gives the same output at O(n²k) instead of O(k³)."""
    with torch.autocast(z.device.type, enabled=False):
        x = whitened_variables(z.to(torch.promote_types(z.dtype, torch.float32)), whiten)
        k, n = x.shape
        use_gram = k > n
        cov = (x.T @ x if use_gram else x @ x.T) / (n - 1)   # Σ, or the Gram matrix: same trace
        trace = cov.diagonal().sum()
        p = newton_iterations(cov / trace, iters)
        y = (x @ p if use_gram else p @ x) / trace.sqrt()
        return y if whiten == "channel" else y.T


def spectral_transform(z, power=0.5, whiten="channel", eps=1e-12):
    """Spectral Transformation Ŷ = U Λ^-p U^T Zc / sqrt(trΣ), Σ/trΣ = U Λ U^T, in float64.

    λ is clamped at eps before the power: a (near-)zero eigenvalue is treated as eps, which keeps
    the output finite (its direction has no variance to amplify) and caps λ^-p at eps^-p."""
    with torch.autocast(z.device.type, enabled=False):
        x = whitened_variables(z.double(), whiten)
        cov = x @ x.T / (x.shape[1] - 1)
        trace = cov.diagonal().sum()
        lam, u = torch.linalg.eigh(cov / trace)
        y = (u * lam.clamp_min(eps) ** -power) @ u.T @ x / trace.sqrt()
        return (y if whiten == "channel" else y.T).to(torch.promote_types(z.dtype, torch.float32))


# ----------------------------------------------------------------------------- trace loss
def trace_loss(y, whiten="channel"):
    """TL(Ŷ) = Σ_j (v_j - 1)², v_j the unbiased variance of whitened variable j."""
    v = y.var(dim=1 if whiten == "channel" else 0)
    return ((v - 1) ** 2).sum()


def trace_loss_weight(k):
    """β = 0.01 (log2 k - 3), k = number of whitened variables."""
    return 0.01 * (math.log2(k) - 3)


# ----------------------------------------------------------------------------- INTL objective
def nmse(a, b):
    """2 - 2 mean_i cos(a_i, b_i)."""
    return 2 - 2 * F.cosine_similarity(a, b, dim=1).mean()


def intl_loss(zs, z_target=None, beta=0.05, whiten="channel", transform=iter_norm):
    """INTL: 1/(V-1) Σ_i [nmse(Ŷ_i, Ŷ_0) + β (TL(Ŷ_i) + TL(Ŷ_0))], Ŷ_v = transform(Z_v);
    INTL-M (z_target given): 1/(V-1) Σ_i [nmse(Ŷ_i, Ŷ_target) + β TL(Ŷ_i)], no gradient to the target.

    zs: the embeddings [m, d] of each view. Returns the loss and its parts (detached): the
    mean nmse and the mean (unweighted) trace loss."""
    ys = [transform(z, whiten=whiten) for z in zs]
    if z_target is None:
        y0, ys = ys[0], ys[1:]
        tl0 = trace_loss(y0, whiten)
        tls = [trace_loss(y, whiten) + tl0 for y in ys]
    else:
        with torch.no_grad():
            y0 = transform(z_target, whiten=whiten)
        tls = [trace_loss(y, whiten) for y in ys]
    distance = torch.stack([nmse(y, y0) for y in ys]).mean()
    tl = torch.stack(tls).mean()
    return distance + beta * tl, distance.detach(), tl.detach()


def momentum_at(step, total_steps, m0):
    """m = 1 - (1 - m0)(cos(π t / t_total) + 1)/2: m0 at the start, 1 at the end."""
    return 1 - (1 - m0) * (math.cos(math.pi * step / total_steps) + 1) / 2


@torch.no_grad()
def update_momentum(target, online, m):
    """θ_target <- m θ_target + (1 - m) θ_online, parameters only."""
    t, o = list(target.parameters()), list(online.parameters())
    torch._foreach_mul_(t, m)
    torch._foreach_add_(t, o, alpha=1 - m)


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


def spectrum(z, whiten="channel", with_eigenvalues=False):
    """Condition number λmax/λmin (capped at 1e12: singular) and effective rank
    exp(entropy(λ/Σλ)) of the covariance of the whitened variables -- the paper's
    view of collapse -- and, if asked, its eigenvalues λ, largest first."""
    x = whitened_variables(z.detach().double().cpu(), whiten)
    k, n = x.shape
    cov = (x @ x.T if k <= n else x.T @ x) / (n - 1)
    if not torch.isfinite(cov).all():      # the batch of a skipped step (loss not finite)
        return {"cond": math.nan, "erank": math.nan}
    lam = torch.linalg.eigvalsh(cov).clamp_min(0)
    lam = torch.cat([lam, lam.new_zeros(k - len(lam))])   # the Gram misses k - n zeros
    p = lam / lam.sum()
    erank = torch.exp(-(p * p.clamp_min(1e-300).log()).sum()).item()
    cond = (lam.max() / lam.min().clamp_min(lam.max() * 1e-12)).item()
    out = {"cond": cond, "erank": erank}
    if with_eigenvalues:
        out["eigenvalues"] = [float(f"{v:.5g}") for v in lam.flip(0).tolist()]
    return out


# ----------------------------------------------------------------------------- networks
RESNETS = [n for n in torchvision.models.list_models(module=torchvision.models)
           if n.startswith(("resnet", "wide_resnet", "resnext"))]


def resnet_backbone(arch, small_images=False):
    """torchvision ResNet without its classifier; last BN of each block zero-initialised
    except for ResNet-18; 3×3 stride-1 stem and no max-pool for 32-px images."""
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
    """Linear(no bias)-BN-ReLU for each hidden width, then Linear(bias)."""
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


# ----------------------------------------------------------------------------- augmentation
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)          # ImageNet's
CIFAR_NORM = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
              "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


class Crop(NamedTuple):
    """One crop of the recipe; gpu_aug.py reads the same fields, so the two paths agree."""
    size: int
    scale: tuple
    p_blur: float
    p_solarize: float
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)   # ColorJitter's brightness, contrast, saturation, hue
    p_jitter: float = 0.8
    p_gray: float = 0.2
    sigma: tuple = (0.1, 2.0)              # blur radius range
    mean: tuple = MEAN
    std: tuple = STD


TWO_VIEWS = [Crop(224, (0.08, 1.0), 1.0, 0.0), Crop(224, (0.08, 1.0), 0.1, 0.2)]
MULTI_CROP = [Crop(224, (0.2, 1.0), 0.5, 0.1), Crop(224, (0.2, 1.0), 0.5, 0.1)] + [
    Crop(s, (round(0.2 * s / 224, 3), round(s / 224, 3)), 0.5, 0.1) for s in (192, 160, 128, 96)]
SMALL_IMAGES = [Crop(32, (0.08, 1.0), 0.0, 0.0), Crop(32, (0.08, 1.0), 0.0, 0.2)]


def gaussian_blur(img, sigma=(0.1, 2.0)):
    """Pillow's GaussianBlur(radius=σ) (three extended box blurs), σ ~ U(sigma) drawn as
    T.GaussianBlur draws it."""
    s = torch.empty(1).uniform_(*sigma).item()
    return img.filter(ImageFilter.GaussianBlur(radius=s))


def crop_transform(crop):
    """One crop of the recipe on a PIL image, in torchvision's order; the blur is Pillow's."""
    return T.Compose([
        T.RandomResizedCrop(crop.size, scale=crop.scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(*crop.jitter)], p=crop.p_jitter),
        T.RandomGrayscale(p=crop.p_gray),
        T.RandomApply([partial(gaussian_blur, sigma=crop.sigma)], p=crop.p_blur),
        T.RandomSolarize(128, p=crop.p_solarize),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(crop.mean, crop.std),
    ])


def apply_each(crops, img):
    return [crop(img) for crop in crops]


def views_transform(recipe):
    """PIL image -> list of augmented views (picklable, so data workers can spawn)."""
    return partial(apply_each, [crop_transform(c) for c in recipe])


def eval_side(args):
    """The evaluation view's side: 224, 32 for 32-px data, 48 for Fashion-MNIST via the ImageNet stem,
    whose 32-px crops show an object 1.4x (median) to 1.6x (mean) larger than the whole image does."""
    if args.data == "fashion-mnist" and not args.small_images:   # (and at 32 px its last block is 1 px)
        return 48
    return 32 if args.small_images or args.data in utils.SMALL_DATA else 224


def eval_transform(side=224, mean=MEAN, std=STD):
    """Centre view: Resize(256) (torchvision's default, bilinear) + CenterCrop(224); 32 px as is; else bicubic."""
    resize = ([T.Resize(256), T.CenterCrop(224)] if side == 224 else [] if side == 32 else
              [T.Resize(side, interpolation=T.InterpolationMode.BICUBIC)])
    return T.Compose(resize + [T.ToTensor(), T.Normalize(mean, std)])


# ----------------------------------------------------------------------------- data
def train_loader(args, recipe, rank, world, device):
    """Each rank reads its share of a global batch; the sampler reshuffles every epoch.
    With --gpu-aug the workers only decode (capped in size) and pad."""
    if args.gpu_aug:
        import gpu_aug
        dataset = utils.labelled_images(args.data, True, T.PILToTensor(), gpu_aug.load_capped)
    else:
        dataset = utils.labelled_images(args.data, True, views_transform(recipe))
    dataset = utils.random_subset(dataset, args.subset)
    # drop_last: N // batch steps per epoch on any number of processes (no padding repeats); an
    # epoch can start part-way (a mid-epoch checkpoint); batches end with their unreadable files
    sampler = utils.ResumableSampler(dataset, world, rank, seed=args.seed, drop_last=True)
    per_rank = args.batch_size // world
    if len(sampler) < per_rank:
        fail(f"{len(dataset)} images are fewer than one batch of {args.batch_size}")
    return torch.utils.data.DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=args.workers,
        collate_fn=partial(utils.collate, inner=gpu_aug.pad_collate) if args.gpu_aug else utils.collate,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0,
        worker_init_fn=utils.ignore_stop_signals,   # workers' seeds: drawn from the rank's stream
        generator=torch.Generator().manual_seed(int(torch.randint(2**62, ()))))


def monitor_data(args, n_bank=10000, n_queries=2000):
    """The online monitor's labelled data, centre views: a fixed random n_bank training images
    as the bank, n_queries test (val) images as queries; None for a folder without val/."""
    if args.data not in utils.SMALL_DATA and not os.path.isdir(os.path.join(args.data, "val")):
        return None
    tf = eval_transform(eval_side(args), *CIFAR_NORM.get(args.data, (MEAN, STD)))
    return (utils.random_subset(utils.labelled_images(args.data, True, tf), n_bank),
            utils.random_subset(utils.labelled_images(args.data, False, tf), n_queries))


# ----------------------------------------------------------------------------- training loop
def learning_rate(step, total_steps, warmup_steps, lr):
    """lr (t+1)/W for t < W, then a per-step cosine that ends at exactly 0.001 × lr:
    q = ½(1 + cos(π (t - W + 1)/(T - W))), lr q + 0.001 lr (1 - q); t counts from 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps + 1) / max(1, total_steps - warmup_steps)))
    return lr * q + 0.001 * lr * (1 - q)


def param_groups(model, wd, decay_all=False):
    """Weight decay on weights only, none on biases and BN parameters (1-d); on every
    parameter with decay_all (the authors' CIFAR setting)."""
    decay = [p for p in model.parameters() if p.ndim > 1 or decay_all]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and not decay_all]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(args, device, world):
    """The online encoder, the forward wrapper that runs it (DDP, compiled if asked) and the
    INTL-M momentum target. Seeded alike on every rank, from a forked generator: the per-rank
    augmentation streams are untouched, whichever is set up first."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        backbone, dim = resnet_backbone(args.arch, args.small_images)
        online = Encoder(backbone, projector(dim, args.projector)).to(device)
    if device.type == "cuda":
        online = online.to(memory_format=torch.channels_last)
        if world > 1:    # torch's SyncBatchNorm runs on GPUs only
            online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
    target = copy.deepcopy(online).requires_grad_(False) if args.method == "intl-m" else None
    forward = online
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(
            online, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:     # the crop shapes never change: compiled once (DDP splits it at its buckets)
        forward = torch.compile(forward, mode=args.compile)
    return online, forward, target


def build_optimizer(online, args, device):
    """SGD with momentum 0.9 (fused on GPUs) and the GradScaler that fp16 needs."""
    optimizer = torch.optim.SGD(param_groups(online, args.wd, decay_all=args.data in CIFAR_NORM),
                                lr=0, momentum=0.9, fused=device.type == "cuda")
    utils.zero_momentum(optimizer)     # buffers exist before a first step that may be skipped
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return optimizer, scaler


def autocast_dtype(amp, device, data):
    """--amp as a dtype (None: fp32). auto: bf16 on GPUs that have it, except on CIFAR, where
    the authors trained in fp32."""
    if amp == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported() and data not in CIFAR_NORM
        return torch.bfloat16 if bf16 else None
    if amp == "fp16" and device.type == "cpu":
        fail("--amp fp16 on the CPU is many times slower than float32 (no fast fp16 kernels there): use --amp off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def train_step(forward, online, target, optimizer, scaler, views, m, beta, amp, args):
    """One step: EMA target, every view's embedding (gathered over ranks), the INTL objective,
    backward, SGD; nothing in it waits for the GPU. `forward` is `online` or its DDP / compiled
    wrapper; `online` owns the weights. Returns the loss, its parts and one view's embedding."""
    if target is not None:
        update_momentum(target, online, m)
    with torch.autocast(views[0].device.type, dtype=amp, enabled=amp is not None):
        z_target = None
        if target is not None:       # INTL-M: the target encodes the first view only
            with torch.no_grad():
                z_target = gather(target(views[:1])[0])
            views = views[1:]
        zs = [gather(z) for z in forward(views)]
        loss, distance, tl = intl_loss(zs, z_target, beta, args.whiten, whitening(args))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if scaler.is_enabled():     # fp16: the scaler skips the update when the gradients overflow
        scaler.step(optimizer)
        scaler.update()
    else:                       # a non-finite loss skips the update, decided on the device
        utils.step_if_finite(optimizer, loss)
    return loss, distance, tl, zs[-1].detach()


def crop_recipe(args):
    """The crops of each image: CIFAR's and Fashion-MNIST's 32-px pair, or 2 or 6 ImageNet crops."""
    if args.data in CIFAR_NORM:
        return [c._replace(mean=CIFAR_NORM[args.data][0], std=CIFAR_NORM[args.data][1])
                for c in SMALL_IMAGES]
    if args.small_images or args.data == "fashion-mnist":
        return SMALL_IMAGES
    return MULTI_CROP if args.multi_crop else TWO_VIEWS


def whitened_count(args):
    """k, the number of whitened variables: the global batch (channel) or the embedding dim."""
    return args.batch_size if args.whiten == "channel" else int(args.projector.split("-")[-1])


def whitening(args):
    """The transform of each view's embedding: IterNorm with T = --iters Newton iterations, the
    Spectral Transformation λ^-p (p = --power), or none (the identity: plain nmse, the collapse baseline)."""
    if args.transform == "power":
        return partial(spectral_transform, power=args.power)
    return partial(iter_norm, iters=args.iters) if args.transform == "iternorm" else lambda z, whiten=None: z


def channels_last(device):
    """channels_last is faster for convolutions on GPUs, slower on CPUs."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def to_views(batch, recipe, aug, device):
    """A loader batch -> the views on `device` (augmented there with --gpu-aug)."""
    if aug is not None:
        import gpu_aug
        images, heights, widths = (t.to(device, non_blocking=True) for t in batch)
        batch = gpu_aug.multi_view(images, recipe, aug, heights, widths)
    return [v.to(device, non_blocking=True, memory_format=channels_last(device)) for v in batch]


def train(args):
    rank, world, device = utils.setup_distributed(args.batch_size)
    log = print if rank == 0 else (lambda *a, **kw: None)
    if rank == 0:
        utils.make_output_dir(args.output_dir)
    recipe, amp, k = crop_recipe(args), autocast_dtype(args.amp, device, args.data), whitened_count(args)
    beta = (trace_loss_weight(k) if args.transform != "none" else 0.0) if args.beta is None else args.beta
    seed = args.seed + rank      # augmentation differs across ranks; the weights do not (build_model)
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    loader = train_loader(args, recipe, rank, world, device)    # a bad --data fails before the model
    online, forward, target = build_model(args, device, world)
    optimizer, scaler = build_optimizer(online, args, device)
    # --gpu-aug's generator, seeded from this rank's stream as the loader seeds its workers
    aug = torch.Generator(device).manual_seed(int(torch.randint(2**62, ()))) if args.gpu_aug else None
    labelled = monitor_data(args) if args.monitor_every and rank == 0 else None
    steps = len(loader)          # per epoch
    lr = args.lr * args.batch_size / 256
    total_steps, warmup_steps = args.epochs * steps, args.warmup_epochs * steps

    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    start_epoch, step = utils.resume_if_any(ckpt_path, online, target, optimizer, scaler, aug, args, rank, steps)
    # utils.py: stop signals, unreadable files, non-finite losses; the ranks agree on a CPU group
    stop, unreadable, group = utils.StopSignals(), utils.Unreadable(args.max_bad_files), utils.host_group()
    nonfinite = torch.zeros(3, device=device)   # skipped steps, current and longest run
    save = partial(utils.save_checkpoint, ckpt_path, online, target, optimizer, scaler, aug, nonfinite,
                   args, rank, world, group, steps)
    done, last_save = step - start_epoch * steps, time.time()   # done > 0: resumed mid-epoch

    log(f"INTL: {args.method}, {args.arch}, {len(recipe)} views{' (GPU augmentation)' if aug else ''}, "
        f"{world} process(es) on {device.type}, global batch {args.batch_size}, beta {beta:.4f}, "
        f"{len(loader.dataset)} images, {steps} steps/epoch, autocast {amp or 'off'}", flush=True)
    if start_epoch >= min(args.epochs, args.stop_epoch or args.epochs):
        log(f"nothing to train: {args.resume or ckpt_path} is at epoch {start_epoch}"
            + (f", --stop-epoch is {args.stop_epoch}" if args.stop_epoch and args.stop_epoch < args.epochs
               else f" of {args.epochs}: the run is finished"))
    for epoch in range(start_epoch, min(args.epochs, args.stop_epoch or args.epochs)):
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip, bad_files = done * loader.batch_size, 0   # seen before the checkpoint
        nonfinite[0] = 0
        forward.train()
        if target is not None:
            target.train()
        t_last, t_data, wait, seen = time.time(), time.time(), 0.0, 0
        for i, (batch, _, problems) in enumerate(loader, start=done):
            wait += time.time() - t_data          # waiting for the loader only
            views = to_views(batch, recipe, aug, device)
            for g in optimizer.param_groups:
                g["lr"] = learning_rate(step, total_steps, warmup_steps, lr)
            loss, distance, tl, embedding = train_step(
                forward, online, target, optimizer, scaler, views,
                momentum_at(step, total_steps, args.momentum), beta, amp, args)
            utils.count_nonfinite(nonfinite, loss)
            step += 1
            seen += args.batch_size
            due = args.save_every_minutes and time.time() - last_save > 60 * args.save_every_minutes
            stopping, due, bad = utils.agree([stop.signum, due, unreadable.add(problems)], group)
            bad_files += bad
            unreadable.check(bad_files, len(loader.dataset), rank)
            if step % args.print_freq == 0 or i == steps - 1:   # .item() syncs: only here
                dt = time.time() - t_last
                rec = {"epoch": epoch, "step": step, "loss": loss.item(), "nmse": distance.item(),
                       "trace_loss": tl.item(), "lr": optimizer.param_groups[0]["lr"],
                       "img_per_s": seen / dt, "data_wait": wait / dt}
                log(f"ep {epoch + 1}/{args.epochs} step {i + 1}/{steps} loss {rec['loss']:.4f} "
                    f"(nmse {rec['nmse']:.4f} tl {rec['trace_loss']:.3f}) lr {rec['lr']:.4g} "
                    f"{rec['img_per_s']:.0f} img/s, data wait {100 * rec['data_wait']:.0f}%", flush=True)
                utils.write_log(args, rank, rec)
                utils.check_nonfinite(nonfinite, args.max_nonfinite, step, rec["lr"], rank)
                t_last, wait, seen = time.time(), 0.0, 0
            if (stopping or due) and i < steps - 1:     # mid-epoch (an epoch's end saves anyway)
                save(epoch, step)
                last_save = time.time()
                if stopping:
                    stop.exit(rank, step, ckpt_path, group)
            t_data = time.time()
        done = 0

        # the epoch's last batch, before and after the transform (read before any later step:
        # CUDA graphs reuse their output memory)
        skipped = int(nonfinite[0])
        rec = {"epoch": epoch + 1, "step": step, "projector": spectrum(embedding, args.whiten, True),
               "iternorm": spectrum(whitening(args)(embedding, whiten=args.whiten), args.whiten, True),
               "unreadable": bad_files, "nonfinite": skipped}
        utils.write_log(args, rank, {"epoch": epoch + 1, "before": rec["projector"].pop("eigenvalues"),
                               "after": rec["iternorm"].pop("eigenvalues")}, "spectrum.jsonl")
        if labelled and (epoch + 1) % args.monitor_every == 0:
            rec.update(utils.monitor(online.backbone, labelled, device))
        log(f"epoch {epoch + 1}: spectrum cond/erank projector {rec['projector']['cond']:.3g}/"
            f"{rec['projector']['erank']:.1f}, {args.transform} output {rec['iternorm']['cond']:.3g}/"
            f"{rec['iternorm']['erank']:.1f} of {k}"
            + (f"; top-1 5-NN {rec['knn5_top1']:.1f}%, linear {rec['linear_top1']:.1f}%" if "knn5_top1" in rec else "")
            + (f", {bad_files} unreadable images replaced" if bad_files else "")
            + (f", {skipped} steps skipped (loss not finite)" if skipped else ""), flush=True)
        utils.write_log(args, rank, rec)
        save(epoch + 1, step)
        last_save = time.time()
        if rank == 0:
            utils.save_atomic(online.backbone.state_dict(), os.path.join(args.output_dir, "backbone.pth"))
        if stopping:
            stop.exit(rank, step, ckpt_path, group)
    stop.restore()
    utils.leave_process_group()
    return online.backbone, rank


# ----------------------------------------------------------------------------- main
QUICK_START = ["--data", "fashion-mnist", "--arch", "resnet18", "--projector", "1024-1024-1024", "--batch-size", "256",
               "--lr", "0.05", "--wd", "1e-4", "--epochs", "1", "--warmup-epochs", "0", "--subset", "20000",
               "--workers", "1", "--print-freq", "10", "--monitor-every", "1", "--output-dir", "runs/quick-start"]


def parse_args(argv=None, need_data=True):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="DIR with DIR/train/<class>/<image> (ImageNet layout), fashion-mnist, "
                                  "cifar10 or cifar100 (the last two imply --small-images)")
    p.add_argument("--subset", type=int, default=0, help="train on a fixed random subset of N images (0: all)")
    p.add_argument("--method", choices=["intl", "intl-m"], default="intl",
                   help="INTL, or INTL-M with a momentum target encoding the first view")
    p.add_argument("--whiten", choices=["channel", "batch"], default="channel",
                   help="whiten the samples (channel) or the features (batch)")
    p.add_argument("--iters", type=int, default=4, help="Newton iterations T")
    p.add_argument("--transform", choices=["iternorm", "power", "none"], default="iternorm",
                   help="IterNorm (INTL), the Spectral Transformation λ^-p by float64 eigendecomposition, or "
                        "none: plain nmse on the projector output, the collapse baseline (β defaults to 0)")
    p.add_argument("--power", type=float, default=0.5, help="p of --transform power (0.5: ZCA whitening)")
    p.add_argument("--beta", type=float, default=None, help="trace-loss weight β (None: 0.01 (log2 k - 3), k the "
                   "global batch or the embedding dim; 0 for --transform none)")
    p.add_argument("--momentum", type=float, default=0.996, help="INTL-M start momentum m0")
    p.add_argument("--arch", default="resnet50", help="a torchvision ResNet")
    p.add_argument("--small-images", action="store_true", help="32-px data: 3x3 stem and the 32-px crops")
    p.add_argument("--projector", default="8192-8192-8192", help="projector widths")
    p.add_argument("--multi-crop", action="store_true", help="6 crops: 2x224, 192, 160, 128, 96")
    p.add_argument("--epochs", type=int, default=100, help="pretraining epochs")
    p.add_argument("--stop-epoch", type=int, default=0, help="stop after this epoch (schedules span --epochs)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size")
    p.add_argument("--lr", type=float, default=0.3, help="base lr per 256 images (lr = LR × batch/256)")
    p.add_argument("--wd", type=float, default=1e-5, help="weight decay (weights only)")
    p.add_argument("--warmup-epochs", type=int, default=2, help="linear warm-up epochs")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="auto: bf16 on GPUs that support it, else off")
    p.add_argument("--gpu-aug", action="store_true", help="workers only decode; crops drawn on the device (gpu_aug.py)")
    p.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the encoder in this mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--workers", type=int, default=min(8, utils.CPU_CORES), help="data workers per process")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights (augmentation: seed + rank)")
    p.add_argument("--print-freq", type=int, default=50, help="steps between progress lines")
    p.add_argument("--monitor-every", type=int, default=0, help="every N epochs, 5-NN and linear-probe top-1 of the "
                   "backbone on labelled data (the test split, or DIR/val) as an online monitor (0: never)")
    p.add_argument("--output-dir", default="runs/intl", help="checkpoint.pth, backbone.pth and log.jsonl go here")
    p.add_argument("--resume", help="checkpoint to resume (None: OUTPUT_DIR/checkpoint.pth if present)")
    p.add_argument("--allow-changed-args", action="store_true", help="resume a checkpoint made with other settings")
    p.add_argument("--save-every-minutes", type=float, default=0, help="also save mid-epoch this often (against kill -9)")
    p.add_argument("--max-bad-files", type=float, default=0.01, help="stop past this fraction of unreadable images")
    p.add_argument("--max-nonfinite", type=int, default=20, help="stop after N non-finite losses in a row (skipped)")
    p.error = lambda msg: fail(f"{msg} (see --help)")     # one line, not the whole usage
    args = p.parse_args(argv)
    if not args.data and need_data:
        fail("--data is required (a folder in ImageNet layout, fashion-mnist, cifar10 or cifar100)")
    utils.check_ranges(args, {"positive": "epochs batch_size iters print_freq lr",
                              "0 or more": "subset stop_epoch warmup_epochs workers wd monitor_every", "in [0, 1]": "momentum"})
    widths = args.projector.split("-")
    if not all(w.isdigit() and int(w) > 0 for w in widths) or int(widths[-1]) < 2:
        fail(f"--projector {args.projector}: widths are positive integers joined by '-', the last "
             f"(the embedding) at least 2, e.g. 8192-8192-8192")
    args.small_images = args.small_images or args.data in CIFAR_NORM    # their 3x3 stem
    return args


def quick_start():
    """INTL beside the same run without a transform, each on Fashion-MNIST for a minute or two,
    then the network at random init: the effective rank of each embedding, and the 5-NN and
    linear-probe top-1 of each backbone (the online monitor)."""
    rows = {}
    for name, extra in [("INTL", []), ("no transform", ["--transform", "none", "--output-dir", "runs/quick-start-none"])]:
        print(f"quick start, {name}: python intl.py {' '.join(QUICK_START + extra)}", flush=True)
        args = parse_args(QUICK_START + extra)
        backbone, _ = train(args)
        with open(os.path.join(args.output_dir, "log.jsonl")) as f:
            rows[name] = [json.loads(line) for line in f][-1]       # the epoch's record
    device = next(backbone.parameters()).device
    with torch.random.fork_rng(devices=[]):   # the weights both runs started from
        torch.manual_seed(args.seed)
        random_init = resnet_backbone(args.arch, args.small_images)[0].to(device)
    rows["random init"] = utils.monitor(random_init, monitor_data(args), device)
    k = whitened_count(args)
    print(f"\n{f'seed {args.seed}':14} {'effective rank of the embedding':>32} {'5-NN':>6} {'linear':>7}")
    for name, r in rows.items():
        erank = f"{r['projector']['erank']:.1f} of {k}" if "projector" in r else "-"
        print(f"{name:14} {erank:>32} {r['knn5_top1']:5.1f}% {r['linear_top1']:6.1f}%")
    a, b, r = rows.values()
    print(f"what to look at: the effective rank, {b['projector']['erank']:.1f} of {k} without a transform against "
          f"{a['projector']['erank']:.1f} with IterNorm and the trace loss; and the linear probe against a random "
          f"network's, {b['linear_top1'] - r['linear_top1']:+.1f} points without against "
          f"{a['linear_top1'] - r['linear_top1']:+.1f} with", flush=True)


def main():
    train(parse_args()) if len(sys.argv) > 1 else quick_start()


if __name__ == "__main__":
    main()

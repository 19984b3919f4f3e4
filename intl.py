"""INTL: IterNorm with trace loss -- "Modulate Your Spectrum in Self-Supervised Learning"
(Weng et al., ICLR 2024, arXiv 2305.16789), the whole pretraining method in one file.

    python intl.py                                          # quick start: Fashion-MNIST, a CPU
    torchrun --nproc_per_node=8 intl.py --data /imagenet    # the paper's 100-epoch ImageNet row

Read top to bottom beside the paper: IterNorm, the Spectral Transformation, trace loss, the INTL
objective, INTL-M's momentum target, networks, augmentation, data, optimisation, the spectrum and
the online monitor, the training loop, settings. Plumbing is in utils.py. Where the paper leaves
a detail open, the code does what the authors' implementation does (divisors, no epsilon, β, the
schedules, multi-crop scales, Pillow's blur, the CIFAR defaults), so results compare with theirs.
"""
import argparse
import copy
import json
import math
import os
import sys
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import ImageFilter
from torchvision import transforms as T

import utils
from utils import fail


# ------------------------------------------------------------ IterNorm
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
    x (k variables × n observations) has the covariance Σ = x x^T/(n-1); P_T is a polynomial, so
    p(x x^T) x = x p(x^T x): for k > n the n × n Gram matrix gives Ŷ at O(n²k), not O(k³)."""
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
    """Spectral Transformation Ŷ = U Λ^-p U^T Zc / sqrt(trΣ), Σ/trΣ = U Λ U^T, in float64;
    λ clamped at eps, so that a null direction (nothing to amplify) stays finite."""
    with torch.autocast(z.device.type, enabled=False):
        x = whitened_variables(z.double(), whiten)
        cov = x @ x.T / (x.shape[1] - 1)
        trace = cov.diagonal().sum()
        lam, u = torch.linalg.eigh(cov / trace)
        y = (u * lam.clamp_min(eps) ** -power) @ u.T @ x / trace.sqrt()
        return (y if whiten == "channel" else y.T).to(torch.promote_types(z.dtype, torch.float32))


# ------------------------------------------------------------ trace loss
def trace_loss(y, whiten="channel"):
    """TL(Ŷ) = Σ_j (v_j - 1)², v_j the unbiased variance of whitened variable j."""
    v = y.var(dim=1 if whiten == "channel" else 0)
    return ((v - 1) ** 2).sum()


def trace_loss_weight(k):
    """β = 0.01 (log2 k - 3), k = number of whitened variables."""
    return 0.01 * (math.log2(k) - 3)


# ------------------------------------------------------------ INTL objective
def nmse(a, b):
    """2 - 2 mean_i cos(a_i, b_i)."""
    return 2 - 2 * F.cosine_similarity(a, b, dim=1).mean()


def intl_loss(zs, z_target=None, beta=0.05, whiten="channel", transform=iter_norm):
    """INTL: 1/(V-1) Σ_i [nmse(Ŷ_i, Ŷ_0) + β (TL(Ŷ_i) + TL(Ŷ_0))], Ŷ_v = transform(Z_v);
    INTL-M (z_target given): 1/(V-1) Σ_i [nmse(Ŷ_i, Ŷ_target) + β TL(Ŷ_i)], no gradient to it.
    zs: each view's embeddings [m, d]. Returns the loss, its mean nmse and mean trace loss."""
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


# ------------------------------------------------------------ INTL-M: the momentum target
def momentum_at(step, total_steps, m0):
    """m = 1 - (1 - m0)(cos(π t / t_total) + 1)/2: m0 at the start, 1 at the end."""
    return 1 - (1 - m0) * (math.cos(math.pi * step / total_steps) + 1) / 2


@torch.no_grad()
def update_momentum(target, online, m):
    """θ_target <- m θ_target + (1 - m) θ_online, parameters only."""
    theta = list(target.parameters())
    torch._foreach_mul_(theta, m)
    torch._foreach_add_(theta, list(online.parameters()), alpha=1 - m)


# ------------------------------------------------------------ networks
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


# ------------------------------------------------------------ augmentation
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


TWO_VIEWS = [Crop(224, scale=(0.08, 1.0), p_blur=1.0, p_solarize=0.0),
             Crop(224, scale=(0.08, 1.0), p_blur=0.1, p_solarize=0.2)]
# 2 × 224 px, then 192, 160, 128 and 96 px with the scale range (0.2, 1.0) × size / 224
MULTI_CROP = [Crop(size, scale=(round(0.2 * size / 224, 3), round(size / 224, 3)), p_blur=0.5,
                   p_solarize=0.1) for size in (224, 224, 192, 160, 128, 96)]
TWO_VIEWS_32PX = [Crop(32, scale=(0.08, 1.0), p_blur=0.0, p_solarize=0.0),
                  Crop(32, scale=(0.08, 1.0), p_blur=0.0, p_solarize=0.2)]


def gaussian_blur(img, sigma=(0.1, 2.0)):
    """Pillow's GaussianBlur(radius=σ) (three extended box blurs), σ ~ U(sigma) drawn as
    T.GaussianBlur draws it."""
    s = torch.empty(1).uniform_(*sigma).item()
    return img.filter(ImageFilter.GaussianBlur(radius=s))


def crop_transform(crop):
    """One crop of the recipe on a PIL image, in torchvision's order; the blur is Pillow's."""
    bicubic = T.InterpolationMode.BICUBIC
    return T.Compose([
        T.RandomResizedCrop(crop.size, scale=crop.scale, interpolation=bicubic),
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


# ------------------------------------------------------------ data
def train_loader(args, rank, world, device):
    """The training images, each as its views (with --gpu-aug: decoded, capped in size and
    padded only), each rank reading its share of a global batch (utils.train_loader)."""
    collate = utils.collate
    if args.gpu_aug:
        import gpu_aug
        dataset = utils.labelled_images(args.data, True, T.PILToTensor(), gpu_aug.load_capped)
        collate = partial(utils.collate, inner=gpu_aug.pad_collate)
    else:
        dataset = utils.labelled_images(args.data, True, views_transform(args.recipe))
    dataset = utils.random_subset(dataset, args.subset)
    return utils.train_loader(dataset, args.batch_size, rank, world, args.seed, args.workers,
                              device, collate)


def to_views(batch, recipe, aug, device):
    """A loader batch -> the views on `device` (augmented there with --gpu-aug)."""
    if aug is not None:
        import gpu_aug
        images, heights, widths = (t.to(device, non_blocking=True) for t in batch)
        batch = gpu_aug.multi_view(images, recipe, aug, heights, widths)
    layout = utils.memory_format(device)
    return [v.to(device, non_blocking=True, memory_format=layout) for v in batch]


# ------------------------------------------------------------ optimisation
def learning_rate(step, total_steps, warmup_steps, lr):
    """lr (t+1)/W for t < W, then a per-step cosine that ends at exactly 0.001 × lr:
    q = ½(1 + cos(π (t - W + 1)/(T - W))), lr q + 0.001 lr (1 - q); t counts from 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps + 1) / max(1, total_steps - warmup_steps)
    q = 0.5 * (1 + math.cos(math.pi * t))
    return lr * q + 0.001 * lr * (1 - q)


def param_groups(model, wd, decay_all=False):
    """Weight decay on weights only, none on biases and BN parameters (1-d); on every
    parameter with decay_all (the authors' CIFAR setting)."""
    decay = [p for p in model.parameters() if p.ndim > 1 or decay_all]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and not decay_all]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def build_state(args, device, world):
    """The online encoder (in DDP, compiled, as asked), INTL-M's target, SGD (momentum 0.9, fused
    on GPUs), fp16's GradScaler and --gpu-aug's generator. The weights are seeded alike on every
    rank, from a forked generator: the per-rank augmentation streams are untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        backbone, dim = resnet_backbone(args.arch, args.small_images)
        online = Encoder(backbone, projector(dim, args.projector))
    online = online.to(device, memory_format=utils.memory_format(device))
    if world > 1:        # each BN normalises over the global batch, on GPUs and CPUs alike
        online = utils.convert_sync_batchnorm(online)
    target = copy.deepcopy(online).requires_grad_(False) if args.method == "intl-m" else None
    model = utils.distributed_data_parallel(online, device) if world > 1 else online
    if args.compile:     # the crop shapes never change: compiled once (DDP splits at its buckets)
        utils.warn_if_cuda_graphs_under_ddp(args.compile, world)
        model = torch.compile(model, mode=args.compile)
    groups = param_groups(online, args.wd, decay_all=args.decay_all)
    optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9, fused=device.type == "cuda")
    utils.zero_momentum(optimizer)     # buffers exist before a first step that may be skipped
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    aug = None       # --gpu-aug's generator, seeded from this rank's stream as the loader's
    if args.gpu_aug:
        aug = torch.Generator(device).manual_seed(int(torch.randint(2**62, ())))
    amp = utils.autocast_dtype(args.amp, device)
    return utils.TrainState(model, target, optimizer, scaler, aug, amp, device)


def whitening(args):
    """Each view's transform: IterNorm (T = --iters), the Spectral Transformation λ^-p (p =
    --power), or none (the identity: the collapse baseline)."""
    if args.transform == "power":
        return partial(spectral_transform, power=args.power)
    if args.transform == "iternorm":
        return partial(iter_norm, iters=args.iters)
    return lambda z, whiten=None: z


def train_step(state, views, m, args):
    """One step: EMA target, each view's embedding (gathered over ranks), the INTL objective,
    backward, SGD, nothing waiting for the GPU; a non-finite loss changes no weight, optimizer
    state or BN statistic, the target's neither. Returns the loss, its parts, the last embedding."""
    online, target = utils.unwrap(state.model), state.target
    if state.undo is None:      # what a skipped step puts back: BN statistics, the target pre-EMA
        target_state = target.state_dict().values() if target is not None else []
        state.undo = utils.undo_memory([*online.buffers(), *target_state])
    utils.snapshot(state.undo)
    if target is not None:
        update_momentum(target, online, m)
    with torch.autocast(views[0].device.type, dtype=state.amp, enabled=state.amp is not None):
        z_target = None
        if target is not None:       # INTL-M: the target encodes the first view only
            with torch.no_grad():
                z_target = utils.gather(target(views[:1])[0])
            views = views[1:]
        zs = [utils.gather(z) for z in state.model(views)]   # the global batch on every rank
        loss, distance, tl = intl_loss(zs, z_target, args.beta, args.whiten, whitening(args))
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    utils.restore_if_not_finite(state.undo, loss)     # (after the backward, which reads them)
    if state.scaler.is_enabled():   # fp16: the scaler skips the update when gradients overflow
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:                           # a non-finite loss skips the update, decided on the device
        utils.step_if_finite(state.optimizer, loss)
    return loss, distance, tl, zs[-1].detach()


# ------------------------------------------------------------ the spectrum and the online monitor
def spectrum(z, whiten="channel"):
    """The paper's view of collapse: the eigenvalues of the whitened variables' covariance, their
    condition number and effective rank (utils.spectrum)."""
    return utils.spectrum(whitened_variables(z.detach().double().cpu(), whiten))


def monitor_data(args, n_bank=10000, n_queries=2000):
    """The online monitor's bank and queries, in the evaluation view (utils.monitor_pair)."""
    view = utils.eval_transform(utils.eval_side(args.data, args.small_images),
                                *CIFAR_NORM.get(args.data, (MEAN, STD)))
    return utils.monitor_pair(args.data, view, n_bank, n_queries)


def epoch_record(embedding, labelled, epoch, args, state, stop=None):
    """The spectrum of the epoch's last embedding before and after the transform, and the
    monitor's top-1 every --monitor-every epochs (none if a stop signal comes during it)."""
    transformed = embedding
    if torch.isfinite(embedding).all():     # else the batch of a skipped step (loss not finite)
        transformed = whitening(args)(embedding, whiten=args.whiten)
    rec = {"epoch": epoch, "projector": spectrum(embedding, args.whiten),
           "transformed": spectrum(transformed, args.whiten)}
    if labelled and epoch % args.monitor_every == 0:
        backbone = utils.unwrap(state.model).backbone
        rec.update(utils.monitor(backbone, labelled, embedding.device, args.workers, stop))
    return rec


# ------------------------------------------------------------ the training loop
def train_one_epoch(state, loader, epoch, step, args, guard, progress):
    """One pass: batch -> views -> lr and momentum -> step -> log, the guard saving and stopping
    where a long run needs it. Returns the global step and the last view's embedding."""
    state.train()
    loader.sampler.set_epoch(epoch)
    steps = len(loader)                              # a whole epoch's, whatever is skipped
    total, warmup = args.epochs * steps, args.warmup_epochs * steps
    first = step - epoch * steps                     # > 0: resumed mid-epoch
    loader.sampler.skip = first * loader.batch_size  # the images seen before the checkpoint
    for i, (batch, _, problems) in progress.batches(loader, epoch, first):
        views = to_views(batch, args.recipe, state.aug, state.device)
        lr = learning_rate(step, total, warmup, args.lr * args.batch_size / 256)
        for g in state.optimizer.param_groups:
            g["lr"] = lr
        m = momentum_at(step, total, args.target_momentum)
        loss, distance, tl, embedding = train_step(state, views, m, args)
        step += 1
        progress.step(i, step, args.batch_size, loss=loss, nmse=distance, trace_loss=tl, lr=lr)
        guard.after_step(epoch, step, loss, problems, last=i == steps - 1)
    return step, embedding


def train(args):
    """Pretrain with INTL on every process torchrun starts (or this one); returns the backbone."""
    rank, world, device = utils.setup_distributed(args.batch_size, args.dist_timeout)
    utils.seed_all(args.seed + rank)   # augmentation differs across ranks; weights do not
    loader = train_loader(args, rank, world, device)    # a bad --data fails before the model
    state = build_state(args, device, world)
    labelled = monitor_data(args) if args.monitor_every and rank == 0 else None
    settings = {**utils.plain(vars(args)), "steps_per_epoch": len(loader)}
    with utils.RunFolder(args.output_dir, rank, settings, device) as folder:
        ckpt = utils.Checkpoints(args.output_dir, state, settings, FREE_ON_RESUME, network,
                                 exports, rank, world, utils.host_group(), device)
        guard = utils.Guard(ckpt, len(loader.dataset), args.max_bad_files, args.max_nonfinite,
                            args.save_every_minutes, args.print_freq, args.nonfinite_hint)
        epoch, step = ckpt.resume(args.resume, args.restart, args.allow_changed_args)
        progress = utils.Progress(args.output_dir, rank, len(loader), args.epochs,
                                  args.print_freq, args.tensorboard)
        progress.print(f"INTL: {network(settings)}, {len(args.recipe)} views, {world} process(es) "
                       f"on {device.type}, batch {args.batch_size}, beta {args.beta:.4f}, "
                       f"{len(loader.dataset)} images, autocast {state.amp or 'off'}")
        last = args.stop_epoch or args.epochs
        if epoch >= last:
            progress.print(f"nothing to train: {args.output_dir} is at epoch {epoch} of {last}")
            ckpt.export()   # backbone.pth as the checkpoint holds it, whatever cut a save short
        folder.start()
        for epoch in range(epoch, last):
            step, embedding = train_one_epoch(state, loader, epoch, step, args, guard, progress)
            counts = guard.end_epoch(epoch + 1, step)
            rec = epoch_record(embedding, labelled, epoch + 1, args, state, guard.stop)
            progress.epoch({**rec, "step": step, **counts}, args.k, args.transform)
            guard.stop_if_asked(step)
        guard.close()
        progress.finish()
        if last == args.epochs:     # the whole schedule, not a --stop-epoch
            folder.finish({"epochs": args.epochs, "step": step})
    utils.leave_process_group()
    return utils.unwrap(state.model).backbone


# ------------------------------------------------------------ settings
FREE_ON_RESUME = {"allow_changed_args", "save_every_minutes", "monitor_every", "max_bad_files",
                  "max_nonfinite", "dist_timeout", "tensorboard", "print_freq", "output_dir", "amp",
                  "stop_epoch", "workers", "restart", "compile", "gpu_aug", "resume", "seed"}


def network(settings):
    """The network a run trains, in words: a checkpoint resumes only into the same."""
    stem = " (small images)" if settings.get("small_images") else ""
    method, projector = settings["method"].upper(), settings["projector"]
    return f"{method} {settings['arch']}{stem} --projector {projector}"


def exports(state):
    """The files saved beside each epoch's checkpoint: the backbone, loadable on a CPU."""
    backbone = utils.unwrap(state.model).backbone
    return {"backbone.pth": {k: v.cpu() for k, v in backbone.state_dict().items()}}


def parse_args(argv=None, need_data=True):
    p = utils.argument_parser(__doc__.split("\n\n")[0] + "\n\n`python intl.py` alone is the quick "
        "start. On an image folder the defaults are the paper's 100-epoch ImageNet row (INTL-M, "
        "multi-crop, lr 0.5, ResNet-50, batch 256); on 32-px data its small-data recipe (INTL, two "
        "32-px crops, lr 0.3; on CIFAR wd 1e-4 on every parameter, m0 0.999, float32).")
    add = p.add_argument
    add("--data", required=need_data, help="DIR with DIR/train/<class>/<image> (ImageNet layout), "
        "or fashion-mnist, cifar10, cifar100 (32-px images)")
    add("--subset", type=int, default=0, help="a fixed random subset of N images (0: all)")
    add("--method", choices=["intl", "intl-m"], help="INTL, or INTL-M with a momentum target "
        "encoding the first view (default: intl-m on a folder, intl on 32-px data)")
    add("--whiten", choices=["channel", "batch"], default="channel",
        help="whiten the samples (channel) or the features (batch)")
    add("--iters", type=int, default=4, help="Newton iterations T of IterNorm")
    add("--transform", choices=["iternorm", "power", "none"], default="iternorm",
        help="IterNorm (INTL), the Spectral Transformation λ^-p by float64 eigendecomposition, "
        "or none: plain nmse, the collapse baseline (β then 0)")
    add("--power", type=float, help="p of --transform power (default 0.5: ZCA whitening)")
    add("--beta", type=float, help="trace-loss weight β (default 0.01 (log2 k - 3), k the "
        "global batch, or the embedding dim with --whiten batch; 0 with --transform none)")
    add("--target-momentum", type=float, help="INTL-M: the momentum target's EMA start value "
        "m0, rising to 1 on a cosine (default 0.996; 0.999 on CIFAR)")
    add("--arch", default="resnet50", help="a torchvision ResNet")
    add("--small-images", action="store_true", help="32-px images: 3x3 stride-1 stem, no max-pool")
    add("--projector", default="8192-8192-8192", help="widths, the last the embedding's")
    add("--multi-crop", action=argparse.BooleanOptionalAction, help="6 crops: 2x224, 192, 160, "
        "128, 96 px (default on an image folder); --no-multi-crop: 2 x 224 px")
    add("--epochs", type=int, default=100, help="pretraining epochs")
    add("--stop-epoch", type=int, default=0, help="stop after this epoch (0: the last)")
    add("--batch-size", type=int, default=256, help="global batch size")
    add("--lr", type=float, help="base lr per 256 images: lr = LR x batch/256 (default 0.5 on "
        "a folder, 0.3 on 32-px data)")
    add("--wd", type=float, help="weight decay of the weights (default 1e-5); on CIFAR of "
        "every parameter, biases and BN too, as the authors (default there 1e-4)")
    add("--warmup-epochs", type=int, default=2, help="linear warm-up epochs")
    add("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="autocast; auto: "
        "bf16 on GPUs with native bf16, except on CIFAR (float32, as the authors), else off")
    add("--gpu-aug", action="store_true", help="workers only decode; crops drawn on the device")
    add("--compile", nargs="?", const="default", choices=["default", "reduce-overhead",
        "max-autotune"], help="torch.compile the encoder (the last two also use CUDA graphs)")
    add("--workers", type=int, default=utils.default_workers(), help="data workers per process "
        "(default: the node's CPU cores shared among its processes, at most 8)")
    add("--seed", type=int, default=0, help="seed of the weights; of augmentation: seed + rank")
    add("--dist-timeout", type=float, default=30, help="minutes a process waits for the others "
        "(a first --compile takes minutes) before the run stops")
    add("--print-freq", type=int, default=50, help="steps between progress lines")
    add("--monitor-every", type=int, default=0, help="every N epochs, 5-NN and linear-probe "
        "top-1 of the backbone on labelled data (test split, or DIR/val) as a monitor (0: never)")
    add("--output-dir", default="runs/intl", help="the run folder: checkpoint.pth, backbone.pth, "
        "args.json, log.txt, log.jsonl, spectrum.jsonl, done")
    add("--resume", help="checkpoint to resume (default: OUTPUT_DIR/checkpoint.pth if there)")
    add("--restart", action="store_true", help="start afresh even if OUTPUT_DIR has a checkpoint")
    add("--allow-changed-args", action="store_true", help="resume with other settings than the "
        "checkpoint's")
    add("--save-every-minutes", type=float, default=0, help="also save mid-epoch this often, "
        "against kill -9 (0: at each epoch's end only)")
    add("--max-bad-files", type=float, default=0.01, help="stop past this fraction unreadable")
    add("--max-nonfinite", type=int, default=20, help="stop after N non-finite losses in a row")
    add("--tensorboard", action="store_true", help="also write the logged figures to "
        "OUTPUT_DIR/tensorboard (needs the tensorboard package)")
    return derive_settings(p.parse_args(argv))


def derive_settings(args):
    """Everything a run derives from its arguments, worked out once: the paper's row for the
    data, the crop recipe, k and β; settings that do not fit are refused in one line."""
    cifar = args.data in CIFAR_NORM
    small = args.data in utils.SMALL_DATA or args.small_images      # 32-px images
    utils.check_ranges(args, {
        "positive": "epochs batch_size iters print_freq lr max_nonfinite dist_timeout",
        "0 or more": "subset stop_epoch warmup_epochs workers wd monitor_every save_every_minutes",
        "in [0, 1]": "target_momentum max_bad_files"})
    widths = args.projector.split("-")
    if not all(w.isdigit() and int(w) > 0 for w in widths) or int(widths[-1]) < 2:
        fail(f"--projector {args.projector}: widths are positive integers joined by '-', the last "
             f"(the embedding) at least 2, e.g. 8192-8192-8192")
    if args.power is not None and args.transform != "power":
        fail(f"--power applies to --transform power, not {args.transform}")
    args.method = args.method or ("intl" if small else "intl-m")
    if args.target_momentum is not None and args.method == "intl":
        fail("--target-momentum is INTL-M's momentum target: add --method intl-m")
    if args.multi_crop and small:
        fail(f"--multi-crop is the 224-px recipe; {args.data} trains two 32-px crops")
    if args.epochs <= args.warmup_epochs:
        fail(f"--warmup-epochs {args.warmup_epochs} is not below --epochs {args.epochs}: the lr "
             f"would never leave its warm-up (set a smaller --warmup-epochs)")
    args.small_images = args.small_images or cifar      # their 3x3 stem
    args.multi_crop = not small if args.multi_crop is None else args.multi_crop
    args.lr = args.lr or (0.3 if small else 0.5)
    args.wd = (1e-4 if cifar else 1e-5) if args.wd is None else args.wd
    args.target_momentum = args.target_momentum or (0.999 if cifar else 0.996)
    args.power = 0.5 if args.power is None else args.power
    args.decay_all = cifar                  # the authors' CIFAR optimiser decays every parameter
    args.amp = "off" if cifar and args.amp == "auto" else args.amp    # and runs in float32
    args.recipe = MULTI_CROP if args.multi_crop else TWO_VIEWS
    if small:        # on CIFAR normalised by the data set's own mean and std
        mean, std = CIFAR_NORM.get(args.data, (MEAN, STD))
        args.recipe = [c._replace(mean=mean, std=std) for c in TWO_VIEWS_32PX]
    # k, the number of whitened variables: the global batch (channel) or the embedding dim
    args.k = args.batch_size if args.whiten == "channel" else int(widths[-1])
    if args.beta is None:
        args.beta = trace_loss_weight(args.k) if args.transform != "none" else 0.0
    if args.beta < 0:
        utils.warn(f"β = 0.01 (log2 k - 3) = {args.beta:.3g} for k = {args.k} whitened variables "
                   f"is negative: the trace loss then rewards variances far from 1; use k >= 8")
    args.nonfinite_hint = "lower --lr"
    if args.transform == "iternorm" and args.iters > 8:     # 4 in the paper
        args.nonfinite_hint = f"lower --iters ({args.iters}: float32 overflows past about 12)"
        utils.warn(f"--iters {args.iters}: past about 12 Newton iterations, float32 rounding in "
                   f"the covariance's null directions grows until the loss overflows")
    return args


QUICK_START = ["--data", "fashion-mnist", "--arch", "resnet18", "--projector", "1024-1024-1024",
               "--batch-size", "256", "--lr", "0.05", "--wd", "1e-4", "--epochs", "1",
               "--warmup-epochs", "0", "--subset", "20000", "--workers", "1", "--print-freq", "10",
               "--monitor-every", "1", "--output-dir", "runs/quick-start"]


def quick_start():
    """INTL beside the same run without a transform, each on Fashion-MNIST for a minute or two,
    then the network at random init: the effective rank of each embedding, and the 5-NN and
    linear-probe top-1 of each backbone (the online monitor)."""
    rows, baseline = {}, ["--transform", "none", "--output-dir", "runs/quick-start-none"]
    for name, extra in [("INTL", []), ("no transform", baseline)]:
        print(f"quick start, {name}: python intl.py {' '.join(QUICK_START + extra)}", flush=True)
        args = parse_args(QUICK_START + extra)
        backbone = train(args)
        with open(os.path.join(args.output_dir, "log.jsonl")) as f:
            rows[name] = json.loads(f.readlines()[-1])       # the epoch's record
    device = next(backbone.parameters()).device
    with torch.random.fork_rng(devices=[]):   # the weights both runs started from
        torch.manual_seed(args.seed)
        random_init = resnet_backbone(args.arch, args.small_images)[0].to(device)
    rows["random init"] = utils.monitor(random_init, monitor_data(args), device)
    print(f"\n{f'seed {args.seed}':14} {'effective rank of the embedding':>32}   5-NN  linear")
    for name, r in rows.items():
        erank = f"{r['projector']['erank']:.1f} of {args.k}" if "projector" in r else "-"
        print(f"{name:14} {erank:>32} {r['knn5_top1']:5.1f}% {r['linear_top1']:6.1f}%")
    intl, none, rand = rows.values()
    print(f"what to look at: the effective rank, {none['projector']['erank']:.1f} of {args.k} "
          f"without a transform against {intl['projector']['erank']:.1f} with IterNorm and the "
          f"trace loss; and the linear probe against a random network's, "
          f"{none['linear_top1'] - rand['linear_top1']:+.1f} points without against "
          f"{intl['linear_top1'] - rand['linear_top1']:+.1f} with", flush=True)


def main():
    return train(parse_args()) if len(sys.argv) > 1 else quick_start()


if __name__ == "__main__":
    utils.exit_on_ctrl_c(main)

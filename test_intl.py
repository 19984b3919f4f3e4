"""Tests for intl.py, eval_linear.py and run_imagenet.sh: every equation against an independent
float64 computation, DDP against one process, resume against a straight run, the command
lines on real image files, the ImageNet recipes against the paper's table, and the batched
augmentation against torchvision's ops and samplers."""
import argparse
import contextlib
import copy
import errno
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

import benchmark
import eval_linear
import gpu_aug
import intl
import utils
from intl import MEAN, STD, resnet_backbone

HERE = os.path.dirname(os.path.abspath(__file__))
# torchrun picks a free port itself (c10d rendezvous on port 0): no race for a port
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
torch.set_num_threads(2)


# ----------------------------------------------------------------------------- references
def reference_iternorm(z, iters, whiten):
    """IterNorm written out literally: the d × d (or m × m) covariance, no Gram shortcut."""
    m, d = z.shape
    if whiten == "channel":
        zc = z - z.mean(dim=1, keepdim=True)
        sigma = zc @ zc.T / (d - 1)
    else:
        zc = z - z.mean(dim=0, keepdim=True)
        sigma = zc.T @ zc / (m - 1)
    tr = torch.trace(sigma)
    p = torch.eye(len(sigma), dtype=z.dtype)
    for _ in range(iters):
        p = 1.5 * p - 0.5 * p @ p @ p @ (sigma / tr)
    return p @ zc / tr.sqrt() if whiten == "channel" else zc @ p / tr.sqrt()


def reference_trace_loss(y, whiten):
    cov = torch.cov(y if whiten == "channel" else y.T)   # rows are variables, divisor n - 1
    return ((torch.diagonal(cov) - 1) ** 2).sum()


def reference_nmse(a, b):
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return 2 - 2 * (a * b).sum(dim=1).mean()


def with_eigenvalues(lam, n, whiten, seed=0):
    """An input Z whose whitened-variable covariance has exactly the eigenvalues lam."""
    g = torch.Generator().manual_seed(seed)
    k = len(lam)
    u, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    # n orthonormal directions orthogonal to the all-ones vector, so centring is a no-op
    a = torch.cat([torch.ones(n, 1, dtype=torch.float64), torch.randn(n, k, generator=g, dtype=torch.float64)], 1)
    v = torch.linalg.qr(a)[0][:, 1:]
    x = u @ torch.diag((lam * (n - 1)).sqrt()) @ v.T      # k × n, x x^T/(n-1) = U diag(lam) U^T
    shift = torch.randn(k, 1, generator=g, dtype=torch.float64)
    return (x + shift) if whiten == "channel" else (x + shift).T


# ----------------------------------------------------------------------------- IterNorm
@pytest.mark.parametrize("whiten", ["channel", "batch"])
@pytest.mark.parametrize("iters", [1, 4, 8])
def test_iternorm_spectrum_is_lambda_p_squared(whiten, iters):
    lam = torch.tensor([3.0, 1.5, 1.0, 0.6, 0.3, 0.1], dtype=torch.float64)
    z = with_eigenvalues(lam, 40, whiten)
    y = intl.iter_norm(z, iters, whiten)
    x = intl.whitened_variables(y, whiten)
    got = torch.linalg.eigvalsh(x @ x.T / (x.shape[1] - 1))
    lam_n, p = lam / lam.sum(), torch.ones_like(lam)
    for _ in range(iters):               # the scalar Newton map
        p = 1.5 * p - 0.5 * p ** 3 * lam_n
    want = torch.sort(lam_n * p ** 2).values
    assert torch.allclose(got, want, rtol=1e-8, atol=0)
    assert not torch.allclose(got, torch.sort(lam_n).values, rtol=1e-3)   # the map did something


@pytest.mark.parametrize("whiten", ["channel", "batch"])
def test_iternorm_converges_to_zca(whiten):
    lam = torch.tensor([1.2, 1.0, 0.9, 0.8, 0.7], dtype=torch.float64)
    z = with_eigenvalues(lam, 30, whiten, seed=1)
    y = intl.iter_norm(z, 60, whiten)
    x = intl.whitened_variables(z, whiten)
    e, u = torch.linalg.eigh(x @ x.T / (x.shape[1] - 1))
    zca = u @ torch.diag(e.rsqrt()) @ u.T @ x           # Σ^{-1/2} Zc
    assert torch.allclose(y if whiten == "channel" else y.T, zca, atol=1e-10)


# ----------------------------------------------------------------------------- IterNorm: the Gram path
@pytest.mark.parametrize("whiten", ["channel", "batch"])
@pytest.mark.parametrize("m,d", [(8, 50), (50, 8)])
def test_gram_path_equals_direct_covariance(whiten, m, d):
    z = torch.randn(m, d, dtype=torch.float64)
    for iters in (1, 4):
        assert torch.allclose(intl.iter_norm(z, iters, whiten), reference_iternorm(z, iters, whiten),
                              rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- Spectral Transformation
@pytest.mark.parametrize("whiten", ["channel", "batch"])
def test_spectral_transform_half_power_is_zca_whitening(whiten):
    shape = (12, 20) if whiten == "channel" else (20, 12)    # fewer variables than observations
    z = torch.randn(*shape, dtype=torch.float64) @ torch.randn(shape[1], shape[1], dtype=torch.float64)
    x = (z - z.mean(1, keepdims=True)) if whiten == "channel" else (z - z.mean(0, keepdims=True)).T
    sigma = x.numpy() @ x.numpy().T / (x.shape[1] - 1)
    lam, u = np.linalg.eigh(sigma)                      # ZCA: Σ^-1/2 x, unnormalised
    zca = torch.from_numpy(u @ np.diag(lam ** -0.5) @ u.T @ x.numpy())
    y = intl.spectral_transform(z, 0.5, whiten)
    assert torch.allclose(y, zca if whiten == "channel" else zca.T, atol=1e-9)


@pytest.mark.parametrize("whiten", ["channel", "batch"])
def test_spectral_transform_zero_power_only_rescales(whiten):
    z = torch.randn(10, 16, dtype=torch.float64)
    zc = z - z.mean(1 if whiten == "channel" else 0, keepdims=True)
    trace = (zc ** 2).sum() / ((16 if whiten == "channel" else 10) - 1)
    assert torch.allclose(intl.spectral_transform(z, 0.0, whiten), zc / trace.sqrt(), atol=1e-12)


@pytest.mark.parametrize("whiten", ["channel", "batch"])
@pytest.mark.parametrize("power", [0.25, 0.75])
def test_spectral_transform_output_spectrum_is_lambda_to_1_minus_2p(whiten, power):
    lam = torch.tensor([3.0, 1.5, 1.0, 0.6, 0.3, 0.1], dtype=torch.float64)
    y = intl.spectral_transform(with_eigenvalues(lam, 40, whiten), power, whiten)
    x = intl.whitened_variables(y, whiten)
    got = torch.linalg.eigvalsh(x @ x.T / (x.shape[1] - 1))
    assert torch.allclose(got, torch.sort((lam / lam.sum()) ** (1 - 2 * power)).values, rtol=1e-9, atol=0)


@pytest.mark.parametrize("whiten", ["channel", "batch"])
def test_spectral_transform_gradient_matches_finite_differences(whiten):
    lam = torch.tensor([3.0, 1.5, 0.8, 0.4, 0.1], dtype=torch.float64)     # well separated
    z = with_eigenvalues(lam, 8, whiten).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: intl.spectral_transform(t, 0.25, whiten), (z,))


def test_spectral_transform_clamps_null_eigenvalues_to_stay_finite():
    # 16 samples of 4 features: channel whitening's 16 × 16 covariance has rank 3 (< 16)
    z = torch.randn(16, 4, dtype=torch.float64)
    assert not torch.isfinite(intl.spectral_transform(z, 0.5, eps=0.0)).all()    # 0^-p: the blow-up
    y = intl.spectral_transform(z, 0.5)
    assert torch.isfinite(y).all()
    x = intl.whitened_variables(y, "channel")
    got = torch.linalg.eigvalsh(x @ x.T / 3)
    # the 3 real directions are whitened (λ^0 = 1); the 13 null ones stay (numerically) empty
    assert torch.allclose(got[-3:], torch.ones(3, dtype=torch.float64), atol=1e-6) and got[:-3].abs().max() < 1e-6


@pytest.mark.parametrize("transform", ["power", "none"])
def test_end_to_end_transform_writes_the_spectrum_per_epoch(tmp_path, transform):
    data = image_folder(str(tmp_path / "data"))
    out = tmp_path / "out"
    p = run_intl("--data", data, *SMALL, "--batch-size", "4", "--epochs", "2", "--transform", transform,
                 "--output-dir", out)
    assert f"{transform} output" in p.stdout and ("beta 0.0000" in p.stdout) == (transform == "none")
    lines = [json.loads(line) for line in open(out / "spectrum.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        before, after = r["before"], r["after"]
        assert len(before) == len(after) == 4 and before == sorted(before, reverse=True) and before[0] > 0
        if transform == "none":        # the identity: the same eigenvalues
            assert after == before
        else:                          # ZCA (p = 0.5): every direction at 1
            assert after == pytest.approx([1, 1, 1, 1], rel=1e-3) and before[-1] < 0.5 * before[0]
    epochs = [json.loads(line) for line in open(out / "log.jsonl") if "iternorm" in line]
    assert epochs[0]["projector"]["erank"] > 1 and "eigenvalues" not in epochs[0]["projector"]


# ----------------------------------------------------------------------------- trace loss, β, the INTL objective and its gradient
@pytest.mark.parametrize("whiten", ["channel", "batch"])
def test_trace_loss_is_distance_of_cov_diagonal_from_one(whiten):
    y = torch.randn(12, 9, dtype=torch.float64) * 1.7 + 0.3
    assert torch.allclose(intl.trace_loss(y, whiten), reference_trace_loss(y, whiten), rtol=1e-12)


def test_beta_values_of_the_paper():
    assert intl.trace_loss_weight(256) == pytest.approx(0.05)
    assert intl.trace_loss_weight(512) == pytest.approx(0.06)
    assert intl.trace_loss_weight(4096) == pytest.approx(0.09)


@pytest.mark.parametrize("whiten", ["channel", "batch"])
def test_intl_objectives_equal_the_papers(whiten):
    torch.manual_seed(0)
    zs = [torch.randn(10, 7, dtype=torch.float64) for _ in range(3)]
    ys = [reference_iternorm(z, 4, whiten) for z in zs]
    tl = [reference_trace_loss(y, whiten) for y in ys]
    beta = 0.03
    want = sum(reference_nmse(ys[i], ys[0]) + beta * (tl[i] + tl[0]) for i in (1, 2)) / 2
    got, distance, trace = intl.intl_loss(zs, None, beta, whiten)
    assert torch.allclose(got, want, rtol=1e-10)
    assert torch.allclose(distance + beta * trace, want, rtol=1e-10) and not distance.requires_grad
    want_m = sum(reference_nmse(ys[i], ys[0]) + beta * tl[i] for i in (1, 2)) / 2
    got_m = intl.intl_loss(zs[1:], zs[0], beta, whiten)[0]        # INTL-M: zs[0] is the target's
    assert torch.allclose(got_m, want_m, rtol=1e-10)


@pytest.mark.parametrize("whiten", ["channel", "batch"])
@pytest.mark.parametrize("momentum", [False, True])
def test_intl_loss_gradcheck(whiten, momentum):
    torch.manual_seed(1)
    zs = [torch.randn(6, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    if momentum:    # the momentum target is a constant: no gradient reaches it
        target = zs[0].detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda b: intl.intl_loss([b], target, 0.05, whiten)[0], zs[1:])
        intl.intl_loss([zs[1]], target, 0.05, whiten)[0].backward()
        assert target.grad is None
    else:
        assert torch.autograd.gradcheck(lambda a, b: intl.intl_loss([a, b], None, 0.05, whiten)[0], zs)


# ----------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("whiten", ["channel", "batch"])
def test_iternorm_is_float32_under_bf16_autocast(whiten):
    z = torch.randn(64, 32)
    ref = intl.iter_norm(z, 4, whiten)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = intl.iter_norm(z, 4, whiten)
        y_half_input = intl.iter_norm(z.bfloat16(), 4, whiten)
    assert y.dtype == torch.float32 and y_half_input.dtype == torch.float32
    assert (y - ref).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- DDP
def tiny_encoder():
    """Normalisation-free (so per-rank batches see the same network as one process)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return intl.Encoder(backbone, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12)))


def loss_and_grads(method, views, model, online):
    target = None
    if method == "intl-m":
        target = copy.deepcopy(online)
        with torch.no_grad():
            for p in target.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    z_target = None
    if target is not None:
        with torch.no_grad():
            z_target = intl.gather(target(views[:1])[0])
        views = views[1:]
    loss = intl.intl_loss([intl.gather(z) for z in model(views)], z_target, 0.05)[0]
    loss.backward()
    return loss.item(), [p.grad.clone() for p in online.parameters()]


def ddp_worker(rank, store, method, views, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    online = tiny_encoder()
    model = nn.parallel.DistributedDataParallel(online)
    half = views[0].shape[0] // 2
    local = [v[rank * half:(rank + 1) * half] for v in views]
    loss, grads = loss_and_grads(method, local, model, online)
    torch.save((loss, grads), f"{out}.{rank}")
    utils.leave_process_group()


@pytest.mark.parametrize("method", ["intl", "intl-m"])
def test_ddp_two_processes_equal_one(method, tmp_path):
    torch.manual_seed(3)
    views = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    online = tiny_encoder()
    loss, grads = loss_and_grads(method, views, online, online)
    torch.multiprocessing.spawn(ddp_worker, args=(tmp_path / "store", method, views, str(tmp_path / "r")), nprocs=2)
    for rank in (0, 1):
        loss_r, grads_r = torch.load(tmp_path / f"r.{rank}")
        assert loss_r == pytest.approx(loss, rel=1e-5)
        for g, g_r in zip(grads, grads_r):
            assert (g - g_r).norm() <= 1e-5 * g.norm()


@pytest.mark.parametrize("aug", [[], ["--gpu-aug"]])
def test_torchrun_two_cpu_processes_train_end_to_end(aug, tmp_path):
    data = image_folder(str(tmp_path / "data"), n_per_class=4, size=32)
    cmd = [*TORCHRUN, "--nproc_per_node=2", os.path.join(HERE, "intl.py"), "--data", data, *SMALL, "--small-images", "--batch-size", "4",
           "--epochs", "1", "--method", "intl-m", "--output-dir", str(tmp_path / "out"), *aug]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in p.stdout and p.stdout.count("step ") == 2   # rank 0 prints alone
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=False)
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    if aug:     # each rank draws its own crops, and resumes its own generator
        assert not torch.equal(ckpt["rng"][0]["aug"], ckpt["rng"][1]["aug"])


# ----------------------------------------------------------------------------- crops, momentum, schedules
def test_multi_crop_gives_six_crops_of_the_spec_sizes():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (300, 260, 3), np.uint8))
    views = intl.views_transform(intl.MULTI_CROP)(img)
    assert [tuple(v.shape) for v in views] == [(3, s, s) for s in (224, 224, 192, 160, 128, 96)]
    assert [tuple(v.shape) for v in intl.views_transform(intl.TWO_VIEWS)(img)] == [(3, 224, 224)] * 2
    scales = [c.scale for c in intl.MULTI_CROP]     # the paper's table, written out
    assert scales == [(0.2, 1.0), (0.2, 1.0), (0.171, 0.857), (0.143, 0.714), (0.114, 0.571), (0.086, 0.429)]


def test_momentum_schedule_and_ema():
    assert intl.momentum_at(0, 1000, 0.996) == pytest.approx(0.996)
    assert intl.momentum_at(500, 1000, 0.996) == pytest.approx(0.998)
    assert intl.momentum_at(1000, 1000, 0.996) == pytest.approx(1.0)
    online, target = nn.Linear(4, 3), nn.Linear(4, 3)
    before = [p.clone() for p in target.parameters()]
    intl.update_momentum(target, online, 0.9)
    for t0, t, o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * o)


def test_learning_rate_counts_steps_from_one():
    lr, T_, W = 0.5, 1000, 100
    cosine = lambda t: 0.5 * (1 + math.cos(math.pi * (t - W + 1) / (T_ - W)))   # noqa: E731
    assert intl.learning_rate(0, T_, W, lr) == pytest.approx(lr / W)           # never lr 0
    assert intl.learning_rate(W - 1, T_, W, lr) == pytest.approx(lr)
    assert intl.learning_rate(W, T_, W, lr) == pytest.approx(lr * cosine(W) + 0.001 * lr * (1 - cosine(W)))
    assert intl.learning_rate(W, T_, W, lr) < lr
    assert intl.learning_rate(T_ - 1, T_, W, lr) == pytest.approx(0.001 * lr, rel=1e-12)
    assert intl.learning_rate(0, T_, 0, lr) < lr                                # no warm-up


def test_weight_decay_only_on_weights():
    enc = intl.Encoder(nn.Conv2d(3, 4, 3), intl.projector(4, "8-8"))
    decay, no_decay = intl.param_groups(enc, 1e-5)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(enc.parameters()))
    assert no_decay["weight_decay"] == 0
    decay, no_decay = intl.param_groups(enc, 1e-4, decay_all=True)      # the authors' CIFAR setting
    assert len(decay["params"]) == len(list(enc.parameters())) and not no_decay["params"]


def test_spectrum_of_whitened_output_is_flat():
    z = torch.randn(16, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.linspace(0.1, 3, 200, dtype=torch.float64))
    y = intl.iter_norm(z, 12, "channel")    # converged; far more iterations drift (Newton-Schulz is unstable)
    s = intl.spectrum(y)
    assert s["cond"] == pytest.approx(1, abs=1e-6) and s["erank"] == pytest.approx(16, rel=1e-6)
    assert intl.spectrum(z[:, :10], "batch")["cond"] < 1e12
    assert intl.spectrum(z[:, :20], "batch")["cond"] == pytest.approx(1e12)   # 20 > 16: singular


# ----------------------------------------------------------------------------- networks
def test_backbones_and_projector():
    net, dim = intl.resnet_backbone("resnet50")
    assert dim == 2048 and isinstance(net.fc, nn.Identity)
    assert all((b.bn3.weight == 0).all() for b in net.layer1)          # zero-init residual
    net18, dim18 = intl.resnet_backbone("resnet18", small_images=True)
    assert dim18 == 512 and net18.conv1.kernel_size == (3, 3) and net18.conv1.stride == (1, 1)
    assert isinstance(net18.maxpool, nn.Identity) and (net18.layer1[0].bn2.weight != 0).all()
    p = intl.projector(2048, "8192-8192-8192")
    kinds = [type(m).__name__ for m in p]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert p[0].bias is None and p[3].bias is None and p[6].bias is not None
    assert p[6].out_features == 8192


# ----------------------------------------------------------------------------- augmentation: Pillow's Gaussian blur
def pillow_blur_passes(x, sigma):
    """Pillow's GaussianBlur(sigma) on [C, H, W] 0-255 integers, computed as Pillow computes it:
    3 box passes along W, then 3 along H, of an extended radius, 24-bit fixed-point weights,
    edge pixels repeated, rounded to integers after each pass."""
    s2 = np.float32(sigma) ** 2 / np.float32(3)                     # Pillow's float arithmetic
    l = np.float32(math.floor((math.sqrt(12 * s2 + 1) - 1) / 2))
    radius = l + (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
    r, inner = int(radius), int(np.float32(2**24) / (np.float32(2) * radius + np.float32(1)))
    weights = {k: inner if abs(k) <= r else (2**24 - (2 * r + 1) * inner) // 2
               for k in range(-r - 1, r + 2)}
    x = x.long()
    for dim in [-1] * 3 + [-2] * 3:
        i = torch.arange(x.shape[dim])
        bulk = sum(w * x.index_select(dim, (i + k).clamp(0, len(i) - 1)) for k, w in weights.items())
        x = (bulk + 2**23) // 2**24
    return x


def pillow_blur(img, sigma):
    """img [3, H, W] uint8 through Pillow's own ImageFilter.GaussianBlur(sigma)."""
    blurred = Image.fromarray(img.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(sigma))
    return torch.from_numpy(np.array(blurred)).permute(2, 0, 1)


def textures(n, h, w, cell, seed=0):
    """uint8 images of random colours smoothly interpolated over cells of `cell` pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h // cell + 2, w // cell + 2, generator=g)
    x = F.interpolate(x, scale_factor=cell, mode="bicubic")[..., :h, :w]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


BLUR_SIGMAS = [0.1, 0.3, 0.5, 1.0, 1.5, 2.0]
BLUR_IMAGES = {"photo-like 64x48": lambda: synthetic_images(6, 64, 48),
               "photo-like 20x20": lambda: synthetic_images(6, 20, 20, seed=1),
               "photo-like 5x3": lambda: synthetic_images(6, 5, 3, seed=2),
               "texture 33x20": lambda: textures(6, 33, 20, 2),
               "texture 40x56": lambda: textures(6, 40, 56, 5, seed=1)}


def test_pil_path_blur_is_pillows_gaussian_blur():
    img = Image.fromarray(synthetic_images(1, 90, 120)[0].permute(1, 2, 0).numpy())
    for seed in range(6):
        torch.manual_seed(seed)
        ref = np.asarray(img.filter(ImageFilter.GaussianBlur(T.GaussianBlur.get_params(0.1, 2.0))))
        after_ref = torch.rand(1)
        torch.manual_seed(seed)
        ours = np.asarray(intl.gaussian_blur(img))
        assert torch.equal(torch.rand(1), after_ref)                   # the same draws
        assert np.array_equal(ours, ref), seed


@pytest.mark.parametrize("name", BLUR_IMAGES)
def test_pillow_blur_is_six_box_passes_rounded_to_uint8(name):
    """pillow_blur_passes: Pillow's blur to the bit, for every sigma and size."""
    for img, s in zip(BLUR_IMAGES[name](), BLUR_SIGMAS):
        assert torch.equal(pillow_blur_passes(img, s), pillow_blur(img, s).long()), s


@pytest.mark.parametrize("name", BLUR_IMAGES)
def test_gpu_aug_blur_is_pillows_to_the_bit(name):
    """gpu_aug's blur equals Pillow's GaussianBlur on uint8 images, for sigmas every 0.05 from
    0.1 to 2 and 40 drawn as sample_params draws them (float32), on every size of image."""
    img = BLUR_IMAGES[name]()
    drawn = gpu_aug.uniform(40, 0.1, 2.0, torch.Generator().manual_seed(0), "cpu")
    sigmas = torch.cat([torch.linspace(0.1, 2.0, 39), drawn])
    img = img[torch.arange(len(sigmas)) % len(img)]
    ours = gpu_aug.gaussian_blur(img.float() / 255, sigmas)
    assert ours.dtype == torch.float32
    for o, im, s in zip(ours, img, sigmas.tolist()):
        assert torch.equal(o, pillow_blur(im, s).float() / 255), s


# ----------------------------------------------------------------------------- data: CIFAR
def fake_cifar(root, name, n_per_batch=8, seed=0):
    """A small CIFAR folder in torchvision's on-disk format (pickled batches of 3072-byte rows,
    red plane, green plane, blue plane); returns the images as (N, 32, 32, 3) and the labels."""
    rng = np.random.RandomState(seed)
    folder, files, key = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"),
                          "cifar100": ("cifar-100-python", ["train", "test"], "fine_labels")}[name]
    os.makedirs(os.path.join(root, folder))
    out = {}
    for f in files:
        hwc = (rng.rand(n_per_batch, 32, 32, 3) * 255).astype(np.uint8)
        hwc[:, :16] //= 2                                   # not symmetric in any axis
        labels = rng.randint(0, 10 if name == "cifar10" else 100, n_per_batch).tolist()
        rows = hwc.transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)
        with open(os.path.join(root, folder, f), "wb") as fh:
            pickle.dump({key.encode(): labels, b"data": rows, b"filenames": [b"x.png"] * n_per_batch}, fh)
        out[f] = (hwc, labels)
    return out


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_batches_are_read_pixel_for_pixel(name, tmp_path, monkeypatch):
    written = fake_cifar(str(tmp_path / "data"), name)
    monkeypatch.chdir(tmp_path)
    images, labels = utils.load_cifar(name, train=True)
    train = [v for k, v in written.items() if "test" not in k]
    assert np.array_equal(images, np.concatenate([hwc for hwc, _ in train]))
    assert labels.tolist() == sum((lab for _, lab in train), [])
    test_images, _ = utils.load_cifar(name, train=False)
    img, label = utils.ArrayImages(test_images, labels, T.PILToTensor())[3]
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(written["test_batch" if name == "cifar10" else "test"][0][3]))


def test_cifar_missing_and_not_downloadable_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def offline(*a, **kw):
        raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(SystemExit) as e:
        utils.load_cifar("cifar100")
    assert "cifar100 is not in ./data/cifar-100-python" in str(e.value) and "\n" not in str(e.value)


def test_cifar_run_uses_the_authors_setting(tmp_path):
    """--data cifar10: the 3x3 stem, CIFAR-10's mean/std, weight decay on every parameter, fp32,
    and as many data workers as this machine has cores (no torch warning)."""
    fake_cifar(str(tmp_path / "data"), "cifar10")
    p = subprocess.run([sys.executable, os.path.join(HERE, "intl.py"), "--data", "cifar10", "--arch", "resnet18",
                        "--projector", "32-32", "--batch-size", "8", "--epochs", "1", "--wd", "1e-4",
                        "--output-dir", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "autocast off" in p.stdout and "5 steps/epoch" in p.stdout
    assert "suggested max number of worker" not in p.stderr
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=False)
    assert ckpt["model"]["backbone.conv1.weight"].shape[-1] == 3
    groups = ckpt["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == 1e-4 and len(groups[0]["params"]) == len(ckpt["model"]) - sum(
        "running" in k or "num_batches" in k for k in ckpt["model"])        # every parameter decays
    assert ckpt["args"]["workers"] == min(8, utils.CPU_CORES)
    recipe = intl.crop_recipe(argparse.Namespace(**ckpt["args"]))
    assert [c.mean for c in recipe] == [(0.4914, 0.4822, 0.4465)] * 2 and [c.p_solarize for c in recipe] == [0.0, 0.2]


def test_bad_data_fails_before_the_model_is_built(monkeypatch):
    def build_model(*a):
        raise AssertionError("the model was built before --data was checked")
    monkeypatch.setattr(intl, "build_model", build_model)
    with pytest.raises(SystemExit) as e:
        intl.train(intl.parse_args(["--data", "/nowhere/at/all"]))
    assert "not found" in str(e.value)


def test_cifar_features_see_the_cifar10_test_normalisation(tmp_path, monkeypatch):
    written = fake_cifar(str(tmp_path / "data"), "cifar100")
    monkeypatch.chdir(tmp_path)
    train, val, classes = eval_linear.datasets(eval_linear.parse_args(["--data", "cifar100"]), True)
    assert (len(train), len(val), classes) == (8, 8, 100)
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.247, 0.243, 0.261])
    # the CIFAR-10 mean/std for CIFAR-100 too, and no augmentation on the training images either
    for ds, name in [(val, "test"), (train, "train")]:
        hwc, labels = written[name]
        img = torch.from_numpy(hwc[3]).permute(2, 0, 1).float() / 255
        x, y = ds[3]
        assert y == labels[3] and torch.allclose(x, (img - mean[:, None, None]) / std[:, None, None], atol=1e-6)


# ----------------------------------------------------------------------------- data: Fashion-MNIST
def test_fashion_mnist_reads_the_real_files():
    assert os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"), \
        "install the Debian package dataset-fashion-mnist"
    images, labels = utils.load_fashion_mnist(train=True)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10
    assert 60 < images.mean() < 90                     # real clothing, not zeros or noise
    test_images, test_labels = utils.load_fashion_mnist(train=False)
    assert test_images.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10
    x, y = utils.ArrayImages(images, labels, torchvision.transforms.ToTensor())[0]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and y == labels[0]
    assert torch.equal((x[0, 2:30, 2:30] * 255).round().byte(), torch.from_numpy(images[0]))
    assert x[:, :2].sum() == 0                         # padded with black to 32 px


def test_knn_majority_vote():
    # raw features: class 0 lies near the query in Euclidean distance, class 1 in direction
    bank = torch.tensor([[1.0, 0.4], [1.2, 0.5], [5.0, 0.0], [6.0, 0.1]])
    labels = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[4.0, 0.0], [1.0, 0.5]])
    assert utils.knn_predict(bank, labels, q, k=2, chunk=1).tolist() == [1, 0]
    assert utils.knn_predict(bank, labels, q[:1] / 4, k=2).tolist() == [0]   # not by direction,
    assert utils.knn_predict(bank, labels, q[:1] / 4, k=2, temperature=0.07).tolist() == [1]   # as here
    # a 2-2 tie: the smallest label wins, even when the other class holds the nearest images
    tie = torch.tensor([[0.1, 0], [0.2, 0], [0.3, 0], [0.4, 0], [5.0, 0]])
    assert utils.knn_predict(tie, torch.tensor([3, 3, 1, 1, 0]), torch.zeros(1, 2), k=4).tolist() == [1]
    # fewer bank images than k: k is the bank size
    assert utils.knn_predict(bank, labels, q, k=20).tolist() == utils.knn_predict(bank, labels, q, k=4).tolist()


# ----------------------------------------------------------------------------- the training loop end to end
def image_folder(root, n_per_class=4, size=40):
    rng = np.random.RandomState(0)
    for c, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        d = os.path.join(root, "train", f"class{c}")
        os.makedirs(d)
        for i in range(n_per_class):
            img = (rng.rand(size, size, 3) * 80 + colour).clip(0, 255).astype(np.uint8)
            ext = "png" if c == 0 else "jpg"
            Image.fromarray(img).save(os.path.join(d, f"img{i}.{ext}"))
    return root


def in_process(main, args):
    """main(ARGS) in this process, as python runs a script: the exit code (an error's
    sys.exit(message) gives 1 and the message on stderr), stdout and stderr."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            print(e.code, file=sys.stderr) if isinstance(e.code, str) else None
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_intl(*args, env=None, check=True, alone=False):
    """python intl.py ARGS, in this process (the same code and seeds, without a new interpreter's
    seconds of imports) unless `alone` or `env` asks for a process of its own."""
    if env is None and not alone:
        p = in_process(lambda argv: intl.train(intl.parse_args(argv)), args)
    else:
        p = subprocess.run([sys.executable, os.path.join(HERE, "intl.py"), *map(str, args)],
                           capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    assert p.returncode == 0 or not check, p.stderr[-3000:]
    return p


SMALL = ["--arch", "resnet18", "--projector", "32-32-32", "--workers", "0", "--print-freq", "1"]


def test_end_to_end_two_epochs_on_an_image_folder(tmp_path):
    data = image_folder(str(tmp_path / "data"))
    out = tmp_path / "out"
    p = run_intl("--data", data, *SMALL, "--batch-size", "4", "--epochs", "2",
                 "--method", "intl-m", "--output-dir", out)
    assert "spectrum" in p.stdout and "img/s" in p.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4 and ckpt["target"] is not None
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(out / "backbone.pth"), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    steps = [r for r in log if "loss" in r]
    epochs = [r for r in log if "iternorm" in r]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    assert [r["epoch"] for r in epochs] == [1, 2] and epochs[0]["projector"]["erank"] > 1


def test_resume_is_bit_identical_to_a_straight_run(tmp_path):
    data = image_folder(str(tmp_path / "data"), n_per_class=6, size=32)
    args = ["--data", data, *SMALL, "--small-images", "--batch-size", "4", "--epochs", "2",
            "--method", "intl-m", "--warmup-epochs", "1"]
    run_intl(*args, "--output-dir", tmp_path / "straight")
    run_intl(*args, "--output-dir", tmp_path / "split", "--stop-epoch", "1")
    assert torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=False)["epoch"] == 1
    p = run_intl(*args, "--output-dir", tmp_path / "split")
    assert "resumed" in p.stdout
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=False)
    assert a["step"] == b["step"] == 6
    for part in ("model", "target"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])


# ----------------------------------------------------------------------------- bad input
def assert_one_line_error(p, *words):
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_bad_input_gives_one_line_errors(tmp_path):
    assert_one_line_error(run_intl("--data", tmp_path / "nowhere", check=False), "nowhere", "not found")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert_one_line_error(run_intl("--data", tmp_path / "empty", *SMALL, check=False), "no images")
    data = image_folder(str(tmp_path / "data"))
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    assert_one_line_error(run_intl("--data", data, "--batch-size", "5", env=env, check=False),
                          "--batch-size 5", "world size 2")
    assert_one_line_error(run_intl("--data", data, "--arch", "resnet7", "--batch-size", "4", check=False), "resnet7")
    assert_one_line_error(run_intl("--data", data, "--epochs", "x", check=False), "--epochs")


def test_bad_checkpoints_never_overwrite_a_good_one(tmp_path):
    data = image_folder(str(tmp_path / "data"))
    out = tmp_path / "out"
    args = ["--data", data, *SMALL, "--small-images", "--batch-size", "4", "--epochs", "2"]
    run_intl(*args, "--stop-epoch", "1", "--output-dir", out)
    good = sha(out / "checkpoint.pth")
    bad = tmp_path / "truncated.pth"
    bad.write_bytes((out / "checkpoint.pth").read_bytes()[:5000])
    p = run_intl(*args, "--output-dir", out, "--resume", bad, check=False)
    assert_one_line_error(p, "truncated.pth")
    p = run_intl(*args, "--output-dir", out, "--resume", tmp_path / "missing.pth", check=False)
    assert_one_line_error(p, "missing.pth")
    other = ["--data", data, *SMALL, "--arch", "resnet34", "--small-images", "--batch-size", "4"]
    p = run_intl(*other, "--epochs", "2", "--output-dir", out, check=False)
    assert_one_line_error(p, "does not match")
    assert sha(out / "checkpoint.pth") == good


# ----------------------------------------------------------------------------- resuming: only the run that made it
def resume_args(data, *extra):
    """7 images, batch 4: one step per epoch on one process and on two (7 // 4)."""
    return ["--data", str(data), "--arch", "resnet18", "--small-images", "--projector", "64-64", "--workers", "0",
            "--print-freq", "1", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "0", *map(str, extra)]


@pytest.fixture(scope="module")
def paused_run(tmp_path_factory):
    """A real one-process INTL checkpoint after epoch 1 of 2 (7 images), and its data folder."""
    root = tmp_path_factory.mktemp("paused")
    data = image_folder(str(root / "data"), n_per_class=4, size=32)
    os.remove(os.path.join(data, "train", "class1", "img3.jpg"))
    train_in_process(*resume_args(data, "--stop-epoch", "1", "--output-dir", root / "out"))
    return data, root / "out" / "checkpoint.pth"


def copy_checkpoint(paused_run, out):
    os.makedirs(out, exist_ok=True)
    (out / "checkpoint.pth").write_bytes(paused_run[1].read_bytes())
    return out


def on_one_thread(run, *argv):
    """run(argv) in this process (no interpreter start-up) on one thread, as torchrun's processes
    run: two threads on two busy cores spin, ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(list(map(str, argv)))
    finally:
        torch.set_num_threads(threads)


def train_in_process(*argv):
    """intl.py's training as its command line runs it."""
    return on_one_thread(lambda a: intl.train(intl.parse_args(a)), *argv)


def one_line_exit(call, *words):
    """`call` stops as utils.fail does: SystemExit with a one-line message holding `words`."""
    with pytest.raises(SystemExit) as e:
        call()
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_resume_with_other_settings_is_refused_unless_asked_and_then_rescaled(paused_run, tmp_path, capsys):
    data, _ = paused_run
    out = copy_checkpoint(paused_run, tmp_path / "out")
    good = sha(out / "checkpoint.pth")
    one_line_exit(lambda: train_in_process(*resume_args(data, "--output-dir", out, "--batch-size", "2", "--lr", "0.1")),
                  "batch-size 4 -> 2, lr 0.3 -> 0.1", "steps-per-epoch 1 -> 3", "--allow-changed-args")
    assert sha(out / "checkpoint.pth") == good
    # asked: the step moves to the same point of the schedule (epoch 1 of 2 = step 3 of 6), not 1 of 6
    train_in_process(*resume_args(data, "--output-dir", out, "--batch-size", "2", "--allow-changed-args"))
    assert "continuing after epoch 1 at step 3 of 6 (step 1 in the file)" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 6)
    lrs = [r["lr"] for r in read_log(out) if "lr" in r]
    assert lrs[-3:] == [intl.learning_rate(s, 6, 0, 0.3 * 2 / 256) for s in (3, 4, 5)]
    # finished: said, nothing trained, nothing written; settings that do not change the maths pass
    good = sha(out / "checkpoint.pth")
    train_in_process(*resume_args(data, "--output-dir", out, "--batch-size", "2", "--print-freq", "5", "--seed", "3"))
    assert "is at epoch 2 of 2: the run is finished" in capsys.readouterr().out
    assert sha(out / "checkpoint.pth") == good
    one_line_exit(lambda: train_in_process(*resume_args(data, "--output-dir", out, "--batch-size", "2",
                                                        "--epochs", "3")), "epochs 2 -> 3")


def torchrun(*args, cwd=None):
    """Two CPU processes (gloo) under the real launcher."""
    cmd = [*TORCHRUN, "--nproc_per_node=2", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=cwd)


def test_resuming_on_more_processes_gives_each_rank_its_own_stream(paused_run, tmp_path):
    data, _ = paused_run
    out = copy_checkpoint(paused_run, tmp_path / "out")
    p = torchrun(os.path.join(HERE, "intl.py"), *resume_args(data, "--output-dir", out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "2 process(es)" in p.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    a, b = ckpt["rng"]
    assert not torch.equal(a["torch"], b["torch"])
    assert not np.array_equal(a["numpy"][1], b["numpy"][1]) and a["python"] != b["python"]
    assert (ckpt["epoch"], ckpt["step"]) == (2, 2)          # the global batch and the schedule kept


def test_rank0_decides_to_resume_and_every_rank_continues_from_what_it_read(paused_run, tmp_path):
    """Two nodes without a shared disk: the same --output-dir is a folder of each node's own, and
    only node 0's holds the checkpoint. Each rank runs in its node's folder."""
    data, _ = paused_run
    for r in (0, 1):
        os.makedirs(tmp_path / f"node{r}" / "out")
    copy_checkpoint(paused_run, tmp_path / "node0" / "out")
    (tmp_path / "node.py").write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import intl\n"
        "os.chdir(f\"node{os.environ['RANK']}\")\n"
        "backbone, rank = intl.train(intl.parse_args(sys.argv[1:]))\n"
        "torch.save(dict(backbone.named_parameters()), f'weights.rank{rank}.pth')\n")
    p = torchrun("node.py", *resume_args(data, "--output-dir", "out"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from out/checkpoint.pth at epoch 1" in p.stdout
    ckpt = torch.load(tmp_path / "node0" / "out" / "checkpoint.pth", weights_only=False)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 2)
    w0, w1 = (torch.load(tmp_path / f"node{r}" / f"weights.rank{r}.pth") for r in (0, 1))
    for key in w0:      # DDP keeps the weights of ranks equal only if they started equal
        assert torch.equal(w0[key], w1[key]), key
    assert os.listdir(tmp_path / "node1" / "out") == []


def test_eval_refuses_a_checkpoint_made_from_another_backbone(folder, backbone_pth, tmp_path, capsys):
    out = tmp_path / "linear"
    linear = ["--epochs", "1", "--schedule", "cos"]
    on_one_thread(eval_linear.main, *common(folder, out, "--pretrained", str(backbone_pth), *linear))
    other = tmp_path / "other" / "backbone.pth"
    other.parent.mkdir()
    torch.save(probe_backbone(folder, seed=1).state_dict(), other)
    msg = one_line_exit(lambda: on_one_thread(eval_linear.main, *common(folder, out, "--pretrained", str(other), *linear)),
                        f"backbone {backbone_pth} (sha256 {sha(backbone_pth)[:12]}) -> {other} (sha256 {sha(other)[:12]})",
                        "--restart")
    assert torch.load(out / "checkpoint.pth")["args"]["pretrained"] == str(backbone_pth), msg
    # asked: it starts afresh from the new backbone, and says so
    on_one_thread(eval_linear.main, *common(folder, out, "--pretrained", str(other), *linear, "--restart"))
    assert "--restart: starting afresh" in capsys.readouterr().out
    assert torch.load(out / "checkpoint.pth")["args"]["pretrained_sha256"] == sha(other)
    # the same content at another path is the same backbone: resumed (and finished)
    moved = tmp_path / "moved.pth"
    moved.write_bytes(other.read_bytes())
    on_one_thread(eval_linear.main, *common(folder, out, "--pretrained", str(moved), *linear))
    assert "already finished" in capsys.readouterr().out


def test_every_bad_argument_and_wrong_file_is_one_line(paused_run, folder, tmp_path):
    data, ckpt_path = paused_run
    base = resume_args(data, "--output-dir", tmp_path / "out")
    bad = [(["--projector", "abc"], "--projector abc"), (["--projector", "64-"], "--projector 64-"),
           (["--projector", "0"], "--projector 0"), (["--projector", "64-1"], "(the embedding) at least 2"),
           (["--workers", "-1"], "--workers must be 0 or more"),
           (["--lr", "-1"], "--lr must be positive"), (["--lr", "nan"], "--lr must be positive"),
           (["--subset", "-20"], "--subset must be 0 or more"), (["--stop-epoch", "-1"], "--stop-epoch"),
           (["--momentum", "1.5"], "--momentum must be in [0, 1]")]
    for extra, words in bad:
        one_line_exit(lambda: intl.parse_args(base + extra), words)
    assert_one_line_error(run_intl(*base, "--projector", "64-", check=False), "--projector 64-")
    for extra, words in [(["--workers", "-1"], "--workers"), (["--lr", "-1"], "--lr"), (["--subset", "-20"], "--subset"),
                         (["--stop-epoch", "-1"], "--stop-epoch"), (["--epochs", "x"], "--epochs")]:
        one_line_exit(lambda: eval_linear.parse_args(["--data", str(data)] + extra), words)
    # the output folder is checked before any work
    (tmp_path / "a-file").write_text("")
    one_line_exit(lambda: train_in_process(*resume_args(data, "--output-dir", tmp_path / "a-file")),
                  "a-file: a file, not a folder")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    unwritable = locked if not os.access(locked, os.W_OK) else "/sys"    # root writes anywhere but in /sys
    one_line_exit(lambda: train_in_process(*resume_args(data, "--output-dir", unwritable)), f"--output-dir {unwritable}")
    # files of the wrong kind say what they are and what the run expected
    out = copy_checkpoint(paused_run, tmp_path / "kinds")
    one_line_exit(lambda: train_in_process(*resume_args(data, "--output-dir", out, "--method", "intl-m")),
                  "it holds INTL resnet18 (small images) --projector 64-64, this run builds INTL-M resnet18")
    one_line_exit(lambda: train_in_process(*resume_args(data, "--output-dir", out, "--projector", "32-64")),
                  "--projector 64-64, this run builds INTL resnet18 (small images) --projector 32-64")
    torch.save(resnet_backbone("resnet18", True)[0].state_dict(), tmp_path / "backbone.pth")
    one_line_exit(lambda: train_in_process(*resume_args(data, "--output-dir", out, "--resume", tmp_path / "backbone.pth")),
                  "holds a bare backbone", "not intl.py's checkpoint.pth")
    one_line_exit(lambda: on_one_thread(eval_linear.main, *common(folder, tmp_path / "e", "--resume", ckpt_path)),
                  "holds intl.py's checkpoint.pth, not eval_linear.py's")
    # --amp off -> fp16 is a valid switch: a fresh GradScaler, which then steps the resumed SGD
    args = intl.parse_args(resume_args(data, "--output-dir", out, "--amp", "fp16"))
    online, _, target = intl.build_model(args, torch.device("cpu"), 1)
    optimizer, scaler = intl.build_optimizer(online, args, torch.device("cpu"))
    assert utils.resume_from(ckpt_path, online, target, optimizer, scaler, None, args, 0, 1) == (1, 1)
    assert scaler.is_enabled() and scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    before = online.projector[0].weight.detach().clone()
    scaler.scale(online.projector(torch.randn(4, 512)).pow(2).sum()).backward()
    scaler.step(optimizer)
    assert not torch.equal(before, online.projector[0].weight)


# ----------------------------------------------------------------------------- what a long run survives
# unreadable files, a kill and a resume, divergence, a full disk, torchrun restarts
def png_header_only(path, width, height):
    """A PNG that declares width × height pixels (and holds none): over Pillow's bomb limit."""
    chunk = lambda kind, data: (len(data).to_bytes(4, "big") + kind + data      # noqa: E731
                                + zlib.crc32(kind + data).to_bytes(4, "big"))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def add_unreadable_files(d):
    """The four ways a file of a real folder fails to decode; returns their paths."""
    empty, truncated, text, bomb = (os.path.join(d, n) for n in ["empty.jpg", "cut.jpg", "notes.jpg", "huge.png"])
    open(empty, "wb").close()
    buf = io.BytesIO()
    Image.fromarray(synthetic_images(1, 64, 64)[0].permute(1, 2, 0).numpy()).save(buf, "JPEG")
    with open(truncated, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    with open(text, "w") as f:
        f.write("not an image\n")
    png_header_only(bomb, 20000, 20000)
    return [empty, truncated, text, bomb]


def test_unreadable_files_are_replaced_reported_once_and_counted(tmp_path):
    """Both loaders: each unreadable file's slot gets another image, its path and reason are
    reported once, the epoch counts them; past --max-bad-files the run stops in one line."""
    data = image_folder(str(tmp_path / "data"), n_per_class=2, size=32)
    bad = add_unreadable_files(os.path.join(data, "train", "class1"))   # 4 of 8 files
    out = tmp_path / "out"
    p = run_intl("--data", data, *SMALL, "--small-images", "--batch-size", "4", "--epochs", "1",
                 "--max-bad-files", "0.6", "--output-dir", out)
    for path, why in zip(bad, ["0 bytes", "truncated", "not an image", "decompression bomb"]):
        lines = [line for line in p.stderr.splitlines() if path in line]
        assert len(lines) == 1 and why in lines[0], p.stderr
    assert "4 unreadable images replaced" in p.stdout
    epoch = read_log(out)[-1]
    assert epoch["unreadable"] == 4 and torch.load(out / "checkpoint.pth", weights_only=False)["step"] == 2
    # --gpu-aug (load_capped, in a data worker) with the default limit, 1 %: a one-line stop
    p = run_intl("--data", data, *SMALL, "--small-images", "--batch-size", "4", "--epochs", "1",
                 "--gpu-aug", "--workers", "1", "--output-dir", tmp_path / "gpu", check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert last.startswith("error: ") and "of 8 images unreadable" in last and "--max-bad-files 0.01" in last


def test_eval_linear_replaces_and_counts_unreadable_files(folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    open(data / "train" / "n00000001" / "empty.png", "wb").close()
    png_header_only(data / "val" / "n00000002" / "huge.png", 20000, 20000)
    p = run_eval(common(data, tmp_path / "out", "--epochs", "1", "--max-bad-files", "0.1"))
    assert p.returncode == 0, p.stderr
    assert "2 unreadable images replaced" in p.stdout and p.stderr.count("warning: unreadable") == 2
    assert read_log(tmp_path / "out")[-1]["unreadable"] == 2


def vm_peak_mib(load):
    """Peak resident memory added while `load()` runs (Linux: the peak is reset first)."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    load()
    return status("VmHWM") - before


def test_16_bit_pngs_are_scaled_and_big_pngs_never_copied_at_full_size(tmp_path):
    grey = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)      # up to 65472
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    for img in [utils.load_rgb(str(tmp_path / "grey16.png")), gpu_aug.load_capped(str(tmp_path / "grey16.png"))]:
        assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 1], (grey >> 8).astype(np.uint8))
    # --gpu-aug's decoder on a 6000 × 4000 PNG (72 MB of pixels): no other full-size copy
    ramp = np.linspace(0, 255, 6000, dtype=np.float32)
    rgb = np.empty((4000, 6000, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = ramp[None, :], ramp[:4000, None], 90
    Image.fromarray(rgb).save(tmp_path / "big.png", compress_level=1)
    del rgb
    out = []
    peak = vm_peak_mib(lambda: out.append(gpu_aug.load_capped(str(tmp_path / "big.png"))))
    assert out[0].size == (512, 341) and peak < 1.8 * 72, peak     # 184 MiB with a full-size RGB copy


def test_hard_killed_run_resumes_mid_epoch_bit_identical_and_logs_each_step_once(tmp_path):
    """--save-every-minutes saves mid-epoch (here after every step); a kill -9 then loses at
    most that; the rerun skips what the epoch had seen, drops the log records written after the
    checkpoint and the partial files of a save that was cut short."""
    data = image_folder(str(tmp_path / "data"), n_per_class=6, size=32)   # 3 steps of 4
    args = ["--data", data, *SMALL, "--small-images", "--batch-size", "4", "--epochs", "1"]
    run_intl(*args, "--output-dir", tmp_path / "straight")
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "intl.py"), *map(str, args), "--output-dir", str(out),
                          "--save-every-minutes", "1e-6"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "checkpoint.pth").exists() and p.poll() is None:
        time.sleep(0.01)
    p.kill()
    p.wait()
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 0 and 1 <= ckpt["step"] < 3                   # mid-epoch
    (out / "checkpoint.pth.tmp4242").write_bytes(b"half a checkpoint")    # a kill during a save
    p = run_intl(*args, "--output-dir", out)
    assert f"resumed from {out / 'checkpoint.pth'} at epoch 0, step {ckpt['step']}" in p.stdout
    assert sorted(os.listdir(out)) == ["backbone.pth", "checkpoint.pth", "log.jsonl", "spectrum.jsonl"]
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False)
    b = torch.load(out / "checkpoint.pth", weights_only=False)
    assert a["step"] == b["step"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    steps = lambda d: [(r["step"], "loss" in r) for r in read_log(d)]     # noqa: E731
    assert steps(out) == steps(tmp_path / "straight") == [(1, True), (2, True), (3, True), (3, False)]
    assert [r["epoch"] for r in read_log(out, "spectrum.jsonl")] == [1]


@pytest.mark.parametrize("fused", [False, True])    # fused: skipped on the device, as on GPUs
def test_a_non_finite_loss_skips_its_update_and_k_in_a_row_stop_the_run(fused, capsys):
    args = argparse.Namespace(iters=4, whiten="channel", transform="iternorm")
    online = tiny_bn_encoder()
    optimizer = torch.optim.SGD(intl.param_groups(online, 1e-4), lr=0.1, momentum=0.9, fused=fused)
    utils.zero_momentum(optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    views = [torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(v)) for v in range(2)]
    counts = torch.zeros(3)
    for poison in [True, True, False, True]:
        before = [p.detach().clone() for p in online.parameters()]
        momentum = [b.clone() for b in optimizer.state_dict()["state"][0].values()]
        x = [v.clone() for v in views]
        if poison:
            x[1][0, 0, 0, 0] = float("nan")
        loss = intl.train_step(online, online, None, optimizer, scaler, x, 0.99, 0.05, None, args)[0]
        utils.count_nonfinite(counts, loss)
        changed = any(not torch.equal(a, p) for a, p in zip(before, online.parameters()))
        assert changed != poison and torch.isfinite(loss) != poison
        assert torch.equal(momentum[0], optimizer.state_dict()["state"][0]["momentum_buffer"]) == poison
    assert counts.tolist() == [3, 1, 2]                # skipped, current run, longest run
    utils.check_nonfinite(counts, 3, 4, 0.1, rank=0)   # no run of 3: goes on
    with pytest.raises(SystemExit) as e:
        utils.check_nonfinite(counts, 2, 4, 0.1, rank=0)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.count("\n") == 0 and "2 steps in a row, by step 4 (lr 0.1)" in err


def test_divergence_stops_in_one_line_and_never_saves_non_finite_weights(tmp_path):
    """--lr 1e9: the weights blow up within a few steps; the run stops in one line naming the
    step and the lr, and the checkpoint keeps the last finite weights."""
    data = image_folder(str(tmp_path / "data"), n_per_class=8, size=32)
    out = tmp_path / "out"
    p = run_intl("--data", data, *SMALL, "--small-images", "--batch-size", "4", "--epochs", "1", "--lr", "1e9",
                 "--warmup-epochs", "0", "--save-every-minutes", "1e-6", "--output-dir", out, check=False, alone=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    step = int(re.search(r"step (\d+) \(lr [0-9.e+]+\)", p.stderr).group(1))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert "not finite" in p.stderr and 1 <= ckpt["step"] < step
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_a_full_disk_stops_in_one_line_and_keeps_the_previous_save(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    utils.save_atomic({"w": torch.ones(3)}, str(path))
    good = sha(path)

    def fill_the_disk(obj, f):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(SystemExit) as e:
        utils.save_atomic({"w": torch.zeros(3)}, str(path))
    msg = str(e.value.code)
    assert msg.startswith("error: cannot save") and "disk is full" in msg and str(tmp_path) in msg
    assert "\n" not in msg and "previous one is intact" in msg
    assert os.listdir(tmp_path) == ["checkpoint.pth"] and sha(path) == good
    (tmp_path / "backbone.pth.tmp77").write_bytes(b"cut short")
    (tmp_path / "notes.tmp").write_bytes(b"not ours")
    utils.remove_partial_saves(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "notes.tmp"]


def worker_pids(pid):
    """RANK -> pid of each torchrun worker (the launcher's children)."""
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    ranks = {}
    for c in children:
        env = open(f"/proc/{c}/environ", "rb").read().split(b"\0")
        ranks[int(next(e for e in env if e.startswith(b"RANK="))[5:])] = int(c)
    return ranks


def test_torchrun_restarts_after_a_worker_is_killed_and_ends_as_an_uninterrupted_run(tmp_path):
    """kill PID (SIGTERM) of rank 1 only: both ranks finish the step, rank 0 saves the position,
    torchrun --max-restarts restarts them (c10d rendezvous), and the run resumes mid-epoch."""
    data = image_folder(str(tmp_path / "data"), n_per_class=4, size=32)    # 2 steps of 4 per epoch

    def torchrun(out, *extra):
        cmd = [*TORCHRUN, "--nproc_per_node=2", *extra, os.path.join(HERE, "intl.py"), "--data", data, *SMALL, "--small-images",
               "--batch-size", "4", "--epochs", "2", "--output-dir", str(out)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    p = torchrun(tmp_path / "straight")
    straight = p.communicate(timeout=600)[0]
    assert p.returncode == 0, straight[-3000:]
    p = torchrun(tmp_path / "restarted", "--max-restarts", "1")        # --standalone: c10d on a free port
    lines = []
    for line in p.stdout:               # rank 0 has caught the signals once it prints this
        lines.append(line)
        if line.startswith("INTL:"):
            os.kill(worker_pids(p.pid)[1], signal.SIGTERM)
            break
    out = "".join(lines) + p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    stop = re.search(r"stopped by a signal to another rank after step (\d+)", out)
    assert stop and out.count("stopped by") == 1, out[-3000:]
    assert f"at epoch 0, step {stop.group(1)}" in out                      # resumed mid-epoch
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "restarted" / "checkpoint.pth", weights_only=False)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_fp16_on_the_cpu_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        intl.autocast_dtype("fp16", torch.device("cpu"), str(tmp_path))
    assert str(e.value.code).startswith("error: --amp fp16 on the CPU") and "\n" not in str(e.value.code)


# ----------------------------------------------------------------------------- figures
def test_figures_from_a_real_fashion_mnist_run(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run_intl("--data", "fashion-mnist", "--subset", "8", *SMALL, "--batch-size", "4", "--epochs", "2",
             "--output-dir", run)
    figures = importlib.import_module("figures")
    for figure, runs in [("maths", []), ("spectrum", [run]), ("ablation", [run, run])]:
        out = tmp_path / "docs" / f"{figure}.png"
        figures.main([figure, *map(str, runs), "--out", str(out)])
        with Image.open(out) as img:
            img.load()                        # decodes
            assert img.width > 300 and img.height > 200
        assert os.path.getsize(out) < 200 * 1024
    with pytest.raises(SystemExit) as e:
        figures.main(["spectrum", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert "\n" not in str(e.value.code) and "spectrum.jsonl not found" in str(e.value.code)


def test_monitor_and_robustness_figures(tmp_path, monkeypatch, capsys):
    """The monitor figure's baselines against a brute-force 5-NN on the raw pixels; the robustness
    figure places each run by its name and marks the one that diverged."""
    figures = pytest.importorskip("figures")
    original = intl.monitor_data
    monkeypatch.setattr(intl, "monitor_data", lambda args: original(args, n_bank=40, n_queries=20))
    tiny = ["--data", "fashion-mnist", "--subset", "16", "--epochs", "1", "--arch", "resnet18", "--workers", "0",
            "--print-freq", "1", "--monitor-every", "1"]
    # names place the runs; the T row's (b256-d1024) is trained at batch 8, dim 16 here
    for name, b, d, t in [("b4-d16-t4", 4, 16, 4), ("b8-d16-t4", 8, 16, 4), ("b256-d1024-t4", 8, 16, 4),
                          ("b256-d1024-t2", 8, 16, 2)]:
        intl.train(intl.parse_args(tiny + ["--batch-size", str(b), "--projector", f"16-{d}", "--iters", str(t),
                                           "--output-dir", str(tmp_path / name)]))
    p = run_intl(*tiny, "--subset", "64", "--batch-size", "8", "--projector", "16-32", "--lr", "1e9",
                 "--max-nonfinite", "1", "--output-dir", tmp_path / "b8-d32-t4", check=False, alone=True)
    assert p.returncode == 1 and "not finite" in p.stderr
    fig = figures.robustness(argparse.Namespace(runs=[str(p) for p in sorted(tmp_path.iterdir())]))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 4 and texts.count("diverged") == 1          # 3 x 3 cells, 4 of them run
    last = read_log(tmp_path / "b4-d16-t4")[-1]
    assert f"{last['linear_top1']:.1f}\nrank {last['projector']['erank']:.0f}" in texts
    t_row = fig.axes[1].lines[0]                                        # linear probe against T
    assert list(t_row.get_xdata()) == [2, 4]
    assert list(t_row.get_ydata()) == [read_log(tmp_path / f"b256-d1024-t{t}")[-1]["linear_top1"] for t in (2, 4)]
    capsys.readouterr()
    fig = figures.monitor(argparse.Namespace(runs=[str(tmp_path / "b4-d16-t4")]))
    out = capsys.readouterr().out
    images, labels = utils.load_fashion_mnist(True)                   # the same images, as they are
    bank = [(intl.eval_transform(32)(Image.fromarray(np.pad(images[i], 2)).convert("RGB")), int(labels[i]))
            for i in torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:40].tolist()]
    images, labels = utils.load_fashion_mnist(False)
    queries = [(intl.eval_transform(32)(Image.fromarray(np.pad(images[i], 2)).convert("RGB")), int(labels[i]))
               for i in torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:20].tolist()]
    flat = lambda ds: torch.stack([x.flatten() for x, _ in ds])
    pred = brute_force_knn(flat(bank), torch.tensor([y for _, y in bank]), flat(queries), 5, None)
    raw = 100 * (pred == torch.tensor([y for _, y in queries])).double().mean().item()
    assert f"raw pixels: 5-NN top-1 (%) {raw:.2f}" in out
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 3      # the run, random init, raw pixels


# ============================================================================= eval_linear.py
COLOURS = {"n00000001": (200, 40, 40), "n00000002": (40, 200, 40), "n00000003": (40, 40, 200)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageNet layout, 32-px PNGs: three classes of noisy solid colours, which the random
    crops of the linear protocol leave as they are; 8 train / 4 val images each."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in [("train", 8), ("val", 4)]:
        for cls, colour in COLOURS.items():
            os.makedirs(root / split / cls)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 10, (32, 32, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(root / split / cls / f"{cls}_{i}.png")
    return root


def images(folder, split="train"):
    """The folder's images as one normalised batch."""
    paths = sorted(p for p in (folder / split).rglob("*.png"))
    x = torch.tensor(np.stack([np.asarray(Image.open(p)) for p in paths]), dtype=torch.float32)
    x = x.permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def probe_backbone(folder, seed=0):
    """A ResNet-18 (32-px stem) whose BN statistics come from the images, like a trained one:
    at random init (running var 1) the features are far too large for a linear probe."""
    torch.manual_seed(seed)
    net = resnet_backbone("resnet18", small_images=True)[0]
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None   # cumulative average
    with torch.no_grad():
        net.train()(images(folder))
    return net.eval()


@pytest.fixture(scope="module")
def backbone_pth(folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained") / "backbone.pth"
    torch.save(probe_backbone(folder).state_dict(), path)
    return path


def run_eval(args):
    """python eval_linear.py ARGS, in this process."""
    return in_process(eval_linear.main, args)


def common(folder, out, *extra):
    return ["--data", str(folder), "--arch", "resnet18", "--small-images", "--batch-size", "8",
            "--workers", "0", "--print-freq", "100", "--output-dir", str(out), *extra]


def read_log(out, name="log.jsonl"):
    with open(os.path.join(out, name)) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- linear protocol
def test_linear_end_to_end_and_resume(folder, backbone_pth, tmp_path):
    # 2 epochs: the step schedule would decay the lr after the first one
    linear = ["--pretrained", str(backbone_pth), "--epochs", "2", "--schedule", "cos"]
    straight = tmp_path / "straight"
    best = eval_linear.main(common(folder, straight, *linear))
    assert best["acc1"] >= 90, best   # chance is 33 %
    rec = read_log(straight)
    assert [r["epoch"] for r in rec] == [1, 2] and all("acc5" in r for r in rec)
    assert os.path.exists(straight / "best.pth")

    resumed = tmp_path / "resumed"
    eval_linear.main(common(folder, resumed, *linear, "--stop-epoch", "1"))
    assert torch.load(resumed / "checkpoint.pth")["epoch"] == 1
    eval_linear.main(common(folder, resumed, *linear))
    a, b = torch.load(straight / "checkpoint.pth"), torch.load(resumed / "checkpoint.pth")
    assert b["epoch"] == 2
    for key in ["fc.weight", "fc.bias"]:
        assert torch.equal(a["model"][key], b["model"][key])


def test_finetune_on_a_subset_list(folder, backbone_pth, tmp_path):
    listed = [f"{cls}_{i}.png" for cls in COLOURS for i in range(2)]
    (tmp_path / "subset.txt").write_text("\n".join(listed) + "\n")
    out = tmp_path / "semi"
    eval_linear.main(common(folder, out, "--pretrained", str(backbone_pth), "--weights", "finetune",
                            "--train-subset", str(tmp_path / "subset.txt"), "--epochs", "3"))
    state = torch.load(out / "checkpoint.pth")["model"]
    before = torch.load(backbone_pth)
    assert not torch.equal(state["layer4.1.conv2.weight"], before["layer4.1.conv2.weight"])
    # a constant lr by default: the classifier's 0.2 × batch/256 in every epoch
    assert [r["lr"] for r in read_log(out)] == pytest.approx([0.2 * 8 / 256] * 3, rel=1e-12)


def test_lr_schedules():
    assert [eval_linear.lr_factor(e, 100, "step") for e in (0, 59, 60, 79, 80, 99)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert eval_linear.lr_factor(0, 20, "cos") == 1 and eval_linear.lr_factor(10, 20, "cos") == pytest.approx(0.5)
    assert [eval_linear.lr_factor(e, 20, "const") for e in range(20)] == [1] * 20
    # defaults: constant for fine-tuning, step decay for the linear protocol on images
    assert eval_linear.parse_args(["--data", "/imagenet", "--weights", "finetune"]).schedule == "const"
    assert eval_linear.parse_args(["--data", "/imagenet"]).schedule == "step"


# ----------------------------------------------------------------------------- k-NN
def brute_force_knn(bank, labels, queries, k, temperature):
    """In float64, one query at a time: the Euclidean distances to every bank row (raw
    features) or their cosines, a full sort, votes counted in a Python dict."""
    bank, queries = bank.double().tolist(), queries.double().tolist()
    norm = lambda v: math.sqrt(sum(a * a for a in v))
    preds = []
    for q in queries:
        if temperature is None:    # nearest first: the negated distance
            scores = [-norm([a - b for a, b in zip(q, row)]) for row in bank]
        else:
            scores = [sum(a * b for a, b in zip(q, row)) / (norm(q) * norm(row)) for row in bank]
        order = sorted(range(len(bank)), key=lambda i: -scores[i])[:k]
        votes = {}
        for i in order:
            w = 1.0 if temperature is None else math.exp(scores[i] / temperature)
            votes[int(labels[i])] = votes.get(int(labels[i]), 0.0) + w
        preds.append(min(votes, key=lambda c: (-votes[c], c)))   # ties: the smallest label
    return torch.tensor(preds)


@pytest.mark.parametrize("n_bank, k, temperature", [(300, 5, None), (300, 20, 0.07), (12, 20, None),
                                                    (12, 20, 0.07)])
def test_knn_matches_brute_force(n_bank, k, temperature):
    g = torch.Generator().manual_seed(0)
    # raw features of unequal norms: Euclidean neighbours differ from cosine ones
    bank = torch.randn(n_bank, 16, generator=g, dtype=torch.float64) * torch.rand(n_bank, 1, generator=g) * 3
    labels = torch.randint(0, 7, (n_bank,), generator=g)
    queries = torch.randn(53, 16, generator=g, dtype=torch.float64) * 2
    expected = brute_force_knn(bank, labels, queries, k, temperature)
    if temperature is None and n_bank > k:   # the data hold vote ties (e.g. 2-2-1 or 1-1-1-1-1)
        votes = [torch.bincount(labels[(queries[i] - bank).norm(dim=1).argsort()[:k]]) for i in range(53)]
        assert sum((v == v.max()).sum() > 1 for v in votes) >= 5
    for chunk in (1, 10, 1024):
        assert torch.equal(utils.knn_predict(bank, labels, queries, k, temperature, chunk), expected)


@pytest.mark.parametrize("subset", [0, 12])
def test_knn_end_to_end(folder, backbone_pth, tmp_path, capsys, subset):
    """The whole bank of 24 images, and a bank of 12, fewer than the 20 of DINO's k-NN."""
    out = tmp_path / "knn"
    args = common(folder, out, "--pretrained", str(backbone_pth), "--knn", "--knn-chunk", "5",
                  "--subset", str(subset))
    args.remove("--small-images")     # implied by the 3×3 conv1 in the file
    result = eval_linear.main(args)
    net = probe_backbone(folder)
    with torch.no_grad():
        bank, queries = net(images(folder)), net(images(folder, "val"))
    labels = torch.arange(3).repeat_interleave(8)
    truth = torch.arange(3).repeat_interleave(4)
    if subset:
        kept = utils.random_subset(range(24), subset).indices
        bank, labels = bank[kept], labels[kept]
    printed = capsys.readouterr().out
    for key, k, t, label in [
            ("knn5_euclidean_majority_top1", 5, None, "5-NN Euclidean majority (raw features)"),
            ("knn20_cosine_weighted_top1", 20, 0.07, "20-NN cosine, exp(cos/0.07)-weighted (normalised features)")]:
        acc = 100 * (brute_force_knn(bank, labels, queries, k, t) == truth).double().mean().item()
        assert result[key] == pytest.approx(acc, abs=1e-9)
        assert f"{label} top-1 {acc:.2f}%" in printed
    assert read_log(out) == [result] and len(result) == 3 and result["unreadable"] == 0
    assert printed.count("note: the bank holds 12 images") == (1 if subset else 0)


# ----------------------------------------------------------------------------- checkpoint layouts
def args_for(path, arch="resnet18", momentum_encoder=False):
    return argparse.Namespace(pretrained=str(path), arch=arch, small_images=True, momentum_encoder=momentum_encoder)


def loaded_features(path, x, momentum_encoder=False):
    net = resnet_backbone("resnet18", small_images=True)[0]
    eval_linear.load_pretrained(net, args_for(path, momentum_encoder=momentum_encoder))
    with torch.no_grad():
        return net.eval()(x)


def test_four_layouts_give_identical_features(folder, tmp_path):
    online_net, target_net = probe_backbone(folder, seed=0), probe_backbone(folder, seed=1)
    online, target = online_net.state_dict(), target_net.state_dict()
    projector = {"0.weight": torch.randn(8, 512), "1.weight": torch.ones(8), "3.bias": torch.zeros(8)}
    prefixed = lambda state, p: {p + k: v for k, v in state.items()}
    files = {
        "ours-checkpoint": {"model": {**prefixed(online, "backbone."), **prefixed(projector, "projector.")},
                            "target": {**prefixed(target, "backbone."), **prefixed(projector, "projector.")},
                            "optimizer": {}, "scaler": {}, "epoch": 1, "step": 1,
                            "args": {"arch": "resnet18", "small_images": True, "method": "intl-m"}, "rng": []},
        "ours-backbone": online,
        "authors": {"epoch": 1, "arch": "resnet18", "optimizer": {},
                    "state_dict": {**prefixed(online, "module.backbone."),
                                   **prefixed(projector, "module.projection."),
                                   **prefixed(target, "module.momentum_backbone."),
                                   **prefixed(projector, "module.momentum_projection.")}},
        "torchvision": {**online, "fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)},
    }
    x = images(folder, "val")[::3]
    with torch.no_grad():
        want, want_target = online_net(x), target_net(x)
    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        assert torch.equal(loaded_features(tmp_path / f"{name}.pth", x), want), name
    for name in ["ours-checkpoint", "authors"]:
        assert torch.equal(loaded_features(tmp_path / f"{name}.pth", x, momentum_encoder=True), want_target)


def test_bad_checkpoints_are_one_line_errors(folder, backbone_pth, tmp_path):
    torch.save({"encoder.conv1.weight": torch.zeros(1), "head.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    assert_one_line_error(run_eval(common(folder, tmp_path / "o", "--pretrained", str(tmp_path / "odd.pth"))),
                          "unrecognised layout", "encoder", "head")
    assert_one_line_error(run_eval(common(folder, tmp_path / "o", "--pretrained", str(tmp_path / "nope.pth"))),
                          "nope.pth", "no such file")
    wrong_arch = common(folder, tmp_path / "o", "--pretrained", str(backbone_pth))
    wrong_arch[wrong_arch.index("resnet18")] = "resnet34"
    assert_one_line_error(run_eval(wrong_arch), "does not fit --arch resnet34")


# ----------------------------------------------------------------------------- subset lists
def test_subset_list_parsing(folder, tmp_path):
    root = str(folder / "train")
    classes = {c: i for i, c in enumerate(sorted(COLOURS))}
    (tmp_path / "ok.txt").write_text("n00000002_3.png\n\nn00000001_0.png  \n")
    assert eval_linear.subset_samples(str(tmp_path / "ok.txt"), root, classes) == [
        (os.path.join(root, "n00000002", "n00000002_3.png"), 1),
        (os.path.join(root, "n00000001", "n00000001_0.png"), 0)]
    (tmp_path / "missing.txt").write_text("n00000001_0.png\nn00000003_99.png\n")
    with pytest.raises(SystemExit) as e:
        eval_linear.subset_samples(str(tmp_path / "missing.txt"), root, classes)
    assert "n00000003_99.png" in str(e.value.code)
    proc = run_eval(common(folder, tmp_path / "o", "--weights", "finetune", "--train-subset",
                      str(tmp_path / "missing.txt")))
    assert_one_line_error(proc, "n00000003_99.png")


# ----------------------------------------------------------------------------- evaluation protocols
def test_centre_view_is_bilinear_resize_then_centre_crop():
    """torchvision's default Resize(256) (bilinear, antialiased) + CenterCrop(224), pixel for pixel."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))   # noise: every
    want = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])(img)
    got = intl.eval_transform()(img)                                          # interpolation differs
    assert got.shape == (3, 224, 224) and torch.equal(got, want)
    small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert torch.equal(intl.eval_transform(32)(small), T.Normalize(MEAN, STD)(T.ToTensor()(small)))
    up = small.resize((48, 48), Image.BICUBIC)
    assert torch.allclose(intl.eval_transform(48)(small), T.Normalize(MEAN, STD)(T.ToTensor()(up)), atol=0.05)


def test_fashion_mnist_is_evaluated_at_the_training_crops_magnification():
    """Through the ImageNet stem, 32-px data is evaluated at 48 px, between the median and the mean
    magnification of the recipe's own crops (RandomResizedCrop's sampled boxes); the 3x3 stem
    (CIFAR, --small-images) keeps 32 px, an image folder the 224-px centre view."""
    fm = intl.parse_args(["--data", "fashion-mnist"])
    crop = T.RandomResizedCrop(32, scale=intl.crop_recipe(fm)[0].scale)
    torch.manual_seed(0)
    boxes = [crop.get_params(torch.zeros(1, 32, 32), crop.scale, crop.ratio) for _ in range(20000)]
    magnification = [32 / np.sqrt(h * w) for _, _, h, w in boxes]
    assert 1.3 < np.median(magnification) < intl.eval_side(fm) / 32 < np.mean(magnification) < 1.7
    assert intl.monitor_data(fm, 4, 2)[0][0][0].shape == (3, 48, 48)
    for argv, side in [(["--data", "fashion-mnist", "--small-images"], 32), (["--data", "cifar10"], 32),
                       (["--data", "DIR"], 224)]:
        assert intl.eval_side(intl.parse_args(argv)) == side


def test_linear_probe_on_separable_features_and_its_exponential_lr():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 3
    y, yv = torch.randint(0, 4, (2500,), generator=g), torch.randint(0, 4, (500,), generator=g)
    x, xv = centres[y] + torch.randn(2500, 32, generator=g), centres[yv] + torch.randn(500, 32, generator=g)
    records = []
    torch.manual_seed(0)
    acc1, acc5 = utils.train_probe(x, y, xv, yv, 4, epochs=20, every=1, report=records.append)
    assert acc1 >= 98 and acc5 == 100 and (acc1, acc5) == (records[-1]["acc1"], records[-1]["acc5"])
    assert [r["epoch"] for r in records] == list(range(1, 21))
    # epoch e (from 0) of E runs at 1e-2 (1e-6 / 1e-2)^(e/E): the authors' per-epoch ExponentialLR
    assert [r["lr"] for r in records] == pytest.approx([1e-2 * 1e-4 ** (e / 20) for e in range(20)], rel=1e-12)
    assert records[0]["lr"] == 1e-2 and utils.exp_lr(20, 20, 1e-2) == pytest.approx(1e-6, rel=1e-12)
    assert records[-1]["loss"] < records[0]["loss"]


def test_monitor_scores_both_probes_and_leaves_the_random_streams():
    """utils.monitor: the 5-NN and the linear probe on the same features, and the training run's
    random streams as they were (it draws its own permutations from a forked generator)."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 12, generator=g) * 4
    labels = torch.randint(0, 3, (3100,), generator=g)       # 3 batches of 1000 a probe epoch
    points = centres[labels] + torch.randn(3100, 12, generator=g)
    bank, queries = list(zip(points[:3000], labels[:3000].tolist())), list(zip(points[3000:], labels[3000:].tolist()))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    scores = utils.monitor(nn.Flatten(), (bank, queries), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    pred = brute_force_knn(points[:3000], labels[:3000], points[3000:], 5, None)
    assert scores["knn5_top1"] == pytest.approx(100 * (pred == labels[3000:]).double().mean().item())
    assert scores["linear_top1"] >= 95


def test_features_protocol_end_to_end(folder, backbone_pth, tmp_path):
    """python eval_linear.py --protocol features: progress lines, log.jsonl, the probe's accuracy."""
    out = tmp_path / "features"
    args = common(folder, out, "--pretrained", str(backbone_pth), "--protocol", "features",
                  "--epochs", "40", "--print-freq", "10")
    args[args.index("--batch-size") + 1] = "1000"
    p = run_eval(args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "linear probe on features: 24 train / 12 val images, 512 features" in p.stdout
    assert p.stdout.count("top-5") == 5   # epochs 10, 20, 30, 40, and the result
    rec = read_log(out)
    assert [r.get("epoch") for r in rec[:4]] == [10, 20, 30, 40]
    assert [r["lr"] for r in rec[:4]] == pytest.approx([1e-2 * 1e-4 ** (e / 40) for e in (9, 19, 29, 39)])
    assert rec[4]["protocol"] == "features" and rec[4]["acc1"] == rec[3]["acc1"] >= 90   # chance: 33 %
    assert not os.path.exists(out / "checkpoint.pth")


def test_features_protocol_encodes_each_image_once(folder, backbone_pth, tmp_path, monkeypatch):
    """The backbone sees each training and val image once, whatever the epochs: the features
    are computed before the probe's first epoch and reused."""
    seen, make = [], eval_linear.resnet_backbone

    def counted_backbone(*args, **kwargs):
        net, dim = make(*args, **kwargs)
        net.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
        return net, dim
    monkeypatch.setattr(eval_linear, "resnet_backbone", counted_backbone)
    result = eval_linear.main(common(folder, tmp_path / "o", "--pretrained", str(backbone_pth),
                                     "--protocol", "features", "--epochs", "30", "--batch-size", "5"))
    assert sum(seen) == 24 + 12 and max(seen) == 5 and result["acc1"] >= 90


def test_protocol_defaults_and_bad_combinations(folder, tmp_path):
    parse = eval_linear.parse_args
    for data in ["fashion-mnist", "cifar10", "cifar100"]:
        a = parse(["--data", data])
        assert (a.protocol, a.epochs, a.batch_size, a.lr) == ("features", 500, 1000, 0.01)
    a = parse(["--data", str(folder)])
    assert (a.protocol, a.epochs, a.batch_size, a.lr, a.schedule) == ("images", 100, 256, 0.4, "step")
    a = parse(["--data", "fashion-mnist", "--weights", "finetune"])
    assert (a.protocol, a.epochs, a.schedule) == ("images", 20, "const")
    assert parse(["--data", "cifar10", "--protocol", "images"]).epochs == 100
    finetune = common(folder, tmp_path, "--protocol", "features", "--weights", "finetune")
    assert_one_line_error(run_eval(finetune), "--protocol features", "--weights finetune")
    assert_one_line_error(run_eval(common(folder, tmp_path, "--protocol", "features", "--schedule", "cos")),
                          "--schedule")


# ----------------------------------------------------------------------------- run_imagenet.sh
# the paper's rows, written out: epochs, lr, method, multi-crop, linear lr, backbone lr of
# fine-tuning (None: no semi-supervised stage), arch, projector, batch, weight decay
PAPER_ROWS = {"100": (100, 0.5, "intl-m", True, 0.4, 0.004, "resnet50", "8192-8192-8192", 256, 1e-5, 0.996),
              "200": (200, 0.4, "intl-m", True, 0.4, 0.004, "resnet50", "8192-8192-8192", 256, 1e-5, 0.996),
              "400": (400, 0.4, "intl-m", True, 0.4, 0.004, "resnet50", "8192-8192-8192", 256, 1e-5, 0.996),
              "800": (800, 0.3, "intl-m", True, 0.4, 0.004, "resnet50", "8192-8192-8192", 256, 1e-5, 0.996),
              "800-2view": (800, 0.3, "intl", False, 0.2, 0.006, "resnet50", "8192-8192-8192", 256, 1e-5, 0.996),
              "in100": (400, 0.5, "intl", False, 0.2, None, "resnet18", "4096-4096-8192", 128, 2.5e-5, 0.996),
              "cifar10": (1000, 0.3, "intl", False, None, None, "resnet18", "2048-2048-2048", 256, 1e-4, 0.999),
              "cifar100": (1000, 0.3, "intl", False, None, None, "resnet18", "2048-2048-2048", 256, 1e-4, 0.999)}


def dry_run(tmp_path, **env):
    env = {**os.environ, "DRY_RUN": "1", "DATA": "/data/imagenet", "OUT": str(tmp_path / "out"), **env}
    proc = subprocess.run(["bash", os.path.join(HERE, "run_imagenet.sh")], env=env,
                          capture_output=True, text=True, cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_run_imagenet_syntax():
    assert subprocess.run(["bash", "-n", os.path.join(HERE, "run_imagenet.sh")]).returncode == 0


@pytest.mark.parametrize("schedule", sorted(PAPER_ROWS))
def test_run_imagenet_hyper_parameters(schedule, tmp_path):
    epochs, lr, method, multi_crop, linear_lr, backbone_lr, arch, projector, batch, wd, m0 = PAPER_ROWS[schedule]
    cmds = dry_run(tmp_path, SCHEDULE=schedule, SUBSET_1="/lists/1percent.txt",
                   SUBSET_10="/lists/10percent.txt", NPROC="8", NNODES="4", NODE_RANK="2",
                   MASTER_ADDR="10.1.2.3", MASTER_PORT="1234",
                   **({"DATA": ""} if schedule.startswith("cifar") else {}))
    small = schedule in ("in100", "cifar10", "cifar100")          # k-NN reported, no SimCLR subsets
    assert [c[0] for c in cmds] == ["torchrun"] * (4 if backbone_lr else 3 if small else 2)
    for c in cmds:
        assert {"--nproc_per_node=8", "--nnodes=4", "--node_rank=2", "--master_addr=10.1.2.3",
                "--master_port=1234"} <= set(c)
        assert flag(c, "--arch") == arch
        assert flag(c, "--data") == (schedule if schedule.startswith("cifar") else "/data/imagenet")
    pretrain, linear, *rest = cmds
    assert "intl.py" in pretrain
    assert int(flag(pretrain, "--epochs")) == epochs and float(flag(pretrain, "--lr")) == lr
    assert flag(pretrain, "--method") == method and ("--multi-crop" in pretrain) == multi_crop
    assert flag(pretrain, "--projector") == projector and int(flag(pretrain, "--batch-size")) == batch
    assert float(flag(pretrain, "--wd")) == wd and float(flag(pretrain, "--momentum")) == m0
    assert "eval_linear.py" in linear and flag(linear, "--pretrained") == flag(pretrain, "--output-dir") + "/backbone.pth"
    if linear_lr:
        assert float(flag(linear, "--lr")) == linear_lr
    else:                                       # the small-data protocol on features
        assert flag(linear, "--protocol") == "features" and "--lr" not in linear
    if small:
        assert "--knn" in rest[0] and flag(rest[0], "--pretrained") == flag(linear, "--pretrained")
    for c, subset in zip(rest if backbone_lr else [], ["/lists/1percent.txt", "/lists/10percent.txt"]):
        assert flag(c, "--weights") == "finetune" and flag(c, "--train-subset") == subset
        assert int(flag(c, "--epochs")) == 20 and float(flag(c, "--lr-classifier")) == 0.2
        assert float(flag(c, "--lr-backbone")) == backbone_lr


def test_run_imagenet_skips_finished_stages(tmp_path):
    cmds = dry_run(tmp_path, SCHEDULE="100", NPROC="1")
    assert len(cmds) == 2   # no subset lists: no semi-supervised stage
    os.makedirs(tmp_path / "out" / "pretrain")
    (tmp_path / "out" / "pretrain" / "done").touch()
    assert dry_run(tmp_path, SCHEDULE="100", NPROC="1") == cmds[1:]


# ============================================================================= gpu_aug.py
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
TOL = 5e-5      # max |ours - torchvision| on the [0, 1] scale (a uint8 level is 1/255 = 4e-3)


def synthetic_images(n, h, w, seed=0):
    """Real-looking uint8 images: smooth colour gradients and waves, random tints, pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.linspace(0, 1, h)[:, None], torch.linspace(0, 1, w)[None]
    base = torch.stack([y * x, (1 - y) * x.sqrt(), 0.5 + 0.5 * torch.sin(9 * x + 4 * y)])
    out = base * torch.rand(n, 3, 1, 1, generator=g) + 0.1 * torch.randn(n, 3, h, w, generator=g)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def floats(n=6, size=48, seed=1):
    """Float [0, 1] crops as the colour ops see them (continuous values, saturated pixels too)."""
    x = gpu_aug.resized_crop(synthetic_images(n, 64, 80, seed), torch.tensor([[3, 5, 50, 60]] * n), size)
    return (1.2 * x - 0.1).clamp(0, 1)


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf = lambda s: np.searchsorted(s, grid, side="right") / len(s)  # noqa: E731
    return np.abs(cdf(a) - cdf(b)).max()


def ks_bound(n, m, alpha=1e-3):
    """Critical value of the two-sample KS statistic at level alpha (asymptotic)."""
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


def max_error(ours, reference):
    return max((o - r).abs().max().item() for o, r in zip(ours, reference))


# ------------------------------------------------------------------ ops = torchvision ops
@pytest.mark.parametrize("size", [24, 64, 160])      # shrink, both, enlarge
def test_resized_crop_equals_torchvision(size):
    img = synthetic_images(8, 120, 90)
    g = torch.Generator().manual_seed(size)
    boxes = gpu_aug.sample_crop_params(8, 120, 90, (0.08, 1.0), generator=g)
    boxes[0] = torch.tensor([0, 0, 120, 90])                      # the whole image
    boxes[1] = torch.tensor([7, 9, min(size, 80), min(size, 80)])   # for 24, 64: no resize
    ours = gpu_aug.resized_crop(img, boxes, size)
    ref = [TF.resized_crop(im.float() / 255, *b.tolist(), [size, size],
                           InterpolationMode.BICUBIC, antialias=True) for im, b in zip(img, boxes)]
    assert ours.shape == (8, 3, size, size) and ours.dtype == torch.float32
    assert max_error(ours, ref) < TOL
    if size <= 80:
        assert max_error(ours[1:2], [img[1, :, 7:7 + size, 9:9 + size] / 255]) < 1e-7  # a copy


def test_resized_crop_of_a_fashion_mnist_image():
    if not os.path.exists(FMNIST):
        pytest.skip("Fashion-MNIST not installed")
    img = torch.from_numpy(utils.read_idx(FMNIST)[:1]).expand(3, -1, -1)[None]    # [1, 3, 28, 28]
    for box, size in [((2, 3, 20, 24), 32), ((0, 0, 28, 28), 16), ((5, 1, 9, 13), 96)]:
        ours = gpu_aug.resized_crop(img, torch.tensor([box]), size)
        ref = TF.resized_crop(img[0].float() / 255, *box, [size, size], InterpolationMode.BICUBIC)
        assert max_error(ours, [ref]) < TOL


def test_padded_images_of_different_sizes_crop_as_each_alone():
    ims = [synthetic_images(1, h, w, seed=h)[0] for h, w in [(50, 70), (90, 40), (33, 33)]]
    batch, heights, widths = gpu_aug.pad_batch(ims)
    assert batch.shape == (3, 3, 90, 70) and heights.tolist() == [50, 90, 33]
    g = torch.Generator().manual_seed(0)
    boxes = gpu_aug.sample_crop_params(3, heights, widths, (0.08, 1.0), generator=g)
    ref = [TF.resized_crop(im.float() / 255, *b.tolist(), [40, 40], InterpolationMode.BICUBIC)
           for im, b in zip(ims, boxes)]
    assert max_error(gpu_aug.resized_crop(batch, boxes, 40), ref) < TOL
    views = gpu_aug.multi_view(ims, intl.TWO_VIEWS, torch.Generator().manual_seed(0))
    assert [v.shape for v in views] == [(3, 3, 224, 224)] * 2


@pytest.mark.parametrize("name, lo, hi", [("brightness", 0.0, 1.6), ("contrast", 0.0, 1.6),
                                          ("saturation", 0.0, 1.6), ("hue", -0.5, 0.5)])
def test_colour_jitter_ops_equal_torchvision(name, lo, hi):
    x = floats()
    f = torch.linspace(lo, hi, len(x))
    ours = getattr(gpu_aug, f"adjust_{name}")(x, f)
    ref = [getattr(TF, f"adjust_{name}")(im, v.item()) for im, v in zip(x, f)]
    assert max_error(ours, ref) < TOL
    grey = x.mean(1, keepdim=True).expand_as(x)           # grey pixels: hue must not touch them
    assert name != "hue" or max_error(gpu_aug.adjust_hue(grey, f), grey) < 1e-6


def test_colour_jitter_in_each_sample_order_equals_torchvision():
    x, n = floats(8), 8
    g = torch.Generator().manual_seed(3)
    p = gpu_aug.sample_params(n, 48, 48, intl.Crop(48, (0.08, 1.0), 0.5, 0.1), g)
    p["jitter"][:2] = torch.tensor([True, False])
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ref = []
    for i in range(n):
        im = x[i]
        for k in p["order"][i].tolist() if p["jitter"][i] else []:
            im = ops[k](im, p["factors"][k, i].item())
        ref.append(im)
    ours = gpu_aug.color_jitter(x, p["jitter"], p["factors"], p["order"])
    assert max_error(ours, ref) < TOL
    assert torch.equal(ours[1], x[1])                        # not jittered: untouched


def test_grayscale_solarize_flip_normalize_equal_torchvision():
    x = floats()
    assert max_error(gpu_aug.grayscale(x).expand_as(x), TF.rgb_to_grayscale(x, 3)) < 1e-6
    assert torch.equal(gpu_aug.solarize(x), TF.solarize(x, 128 / 255))
    assert max_error(gpu_aug.normalize(x, intl.MEAN, intl.STD), TF.normalize(x, intl.MEAN, intl.STD)) < 1e-6


def test_whole_crop_equals_torchvision_ops_in_sequence():
    """apply_params = resized crop, jitter, grayscale, blur, solarize, flip, normalise."""
    n, size = 12, 64
    img = synthetic_images(n, 100, 120)
    crop = intl.Crop(size, (0.08, 1.0), 0.5, 0.5)
    p = gpu_aug.sample_params(n, 100, 120, crop, torch.Generator().manual_seed(4))
    ours = gpu_aug.apply_params(img, p, crop)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    errors = []
    for i in range(n):
        im = TF.resized_crop(img[i].float() / 255, *p["boxes"][i].tolist(), [size, size],
                             InterpolationMode.BICUBIC).clamp(0, 1)
        for k in p["order"][i].tolist() if p["jitter"][i] else []:
            im = ops[k](im, p["factors"][k, i].item())
        im = TF.rgb_to_grayscale(im, 3) if p["gray"][i] else im
        if p["blur"][i]:                                # Pillow's own, on uint8 levels
            im = pillow_blur((im * 255).round().byte(), p["sigma"][i].item()).float() / 255
        im = TF.solarize(im, 128 / 255) if p["solarize"][i] else im
        im = TF.horizontal_flip(im) if p["flip"][i] else im
        errors.append((ours[i] - TF.normalize(im, intl.MEAN, intl.STD)).abs().flatten())
    errors = torch.cat(errors)
    # solarize is a step: a pixel within float error of 128/255 may go either way (none here);
    # so is the blur's rounding to uint8 levels (none here), but a level more or less in its
    # input moves Pillow's rounded passes by at most one level
    assert (errors > 1e-4).float().mean() < 1e-4 and errors.median() < 1e-6
    assert errors.max() < 1 / 255 / min(intl.STD) + 1e-4
    for key in ("jitter", "gray", "blur", "solarize", "flip"):    # every branch was exercised
        assert 0 < p[key].sum() < n, key


# ----------------------------------------------------------------------------- random parameters
@pytest.mark.parametrize("hw, scale", [((224, 224), (0.08, 1.0)), ((120, 300), (0.2, 1.0)),
                                       ((375, 500), (0.086, 0.429))])
def test_crop_boxes_are_distributed_as_torchvision(hw, scale):
    n, (H, W) = 3000, hw
    torch.manual_seed(0)
    draw = T.RandomResizedCrop.get_params
    ref = np.array([draw(torch.empty(1, H, W), list(scale), [3 / 4, 4 / 3]) for _ in range(n)],
                   dtype=float)
    ours = gpu_aug.sample_crop_params(n, H, W, scale, generator=torch.Generator().manual_seed(0))
    ours = ours.double().numpy()
    assert ((ours[:, 0] >= 0) & (ours[:, 0] + ours[:, 2] <= H)).all()
    assert ((ours[:, 1] >= 0) & (ours[:, 1] + ours[:, 3] <= W)).all()
    stats = lambda b: [b[:, 2] * b[:, 3] / (H * W), np.log(b[:, 3] / b[:, 2]),  # noqa: E731
                       (b[:, 0] + 0.5) / (H - b[:, 2] + 1), (b[:, 1] + 0.5) / (W - b[:, 3] + 1)]
    for name, a, b in zip(["area", "log ratio", "top", "left"], stats(ours), stats(ref)):
        assert ks_statistic(a, b) < ks_bound(n, n), name


@pytest.mark.parametrize("hw", [(10, 200), (200, 10), (50, 50)])
def test_crop_fallback_is_torchvision_central_crop(hw):
    """No try fits (scale near 1 on a thin image; impossible scale on a square): central crop."""
    scale = (0.9, 1.0) if hw != (50, 50) else (1.5, 2.0)
    ref = T.RandomResizedCrop.get_params(torch.empty(1, *hw), list(scale), [3 / 4, 4 / 3])
    ours = gpu_aug.sample_crop_params(5, *hw, scale, generator=torch.Generator().manual_seed(0))
    assert ours.tolist() == [list(ref)] * 5


@pytest.mark.parametrize("crop", [intl.TWO_VIEWS[0], intl.Crop(64, (0.08, 1.0), 0.5, 0.1, jitter=(0.1, 0.3, 0.5, 0.02))])
def test_jitter_factors_and_order_are_distributed_as_torchvision(crop):
    """gpu_aug draws the strengths the recipe names, as torchvision's ColorJitter of the PIL path."""
    n = 3000
    p = gpu_aug.sample_params(n, 64, 64, crop, torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    cj = intl.crop_transform(crop).transforms[1].transforms[0]        # the PIL path's ColorJitter
    ref = [cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue) for _ in range(n)]
    b, c, s, h = crop.jitter
    for k, (lo, hi) in enumerate([(1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)]):
        ours, theirs = p["factors"][k].numpy(), np.array([r[k + 1] for r in ref])
        assert lo <= ours.min() and ours.max() <= hi
        assert ks_statistic(ours, theirs) < ks_bound(n, n)
    # every one of the 24 orders equally likely, as randperm(4): chi-square, 23 dof, p = 1e-3
    assert p["order"].sort(1).values.eq(torch.arange(4)).all()      # permutations
    counts = (p["order"] @ torch.tensor([64, 16, 4, 1])).unique(return_counts=True)[1].double()
    assert len(counts) == 24 and ((counts - n / 24) ** 2 / (n / 24)).sum() < 49.7


def test_blur_sigma_is_distributed_as_torchvision():
    n = 3000
    p = gpu_aug.sample_params(n, 64, 64, intl.TWO_VIEWS[0], torch.Generator().manual_seed(2))
    torch.manual_seed(2)
    ref = np.array([T.GaussianBlur.get_params(0.1, 2.0) for _ in range(n)])
    assert 0.1 <= p["sigma"].min() and p["sigma"].max() <= 2.0
    assert ks_statistic(p["sigma"].numpy(), ref) < ks_bound(n, n)


@pytest.mark.parametrize("crop", [intl.TWO_VIEWS[0], intl.TWO_VIEWS[1], intl.MULTI_CROP[5],
                                  intl.Crop(32, (0.08, 1.0), 0.3, 0.6, p_jitter=0.4, p_gray=0.7)])
def test_apply_probabilities(crop):
    """Each op applies with the probability the recipe gives the PIL path's RandomApply."""
    n, pil = 20000, intl.crop_transform(crop).transforms
    p = gpu_aug.sample_params(n, 64, 64, crop, torch.Generator().manual_seed(5))
    for key, prob in [("jitter", pil[1].p), ("gray", pil[2].p), ("blur", pil[3].p), ("solarize", pil[4].p),
                      ("flip", pil[5].p)]:
        bound = 4.5 * math.sqrt(prob * (1 - prob) / n)             # 4.5 binomial sigmas
        assert abs(p[key].float().mean().item() - prob) <= bound, key


# ----------------------------------------------------------------------------- the recipes
def test_multi_crop_recipe_shapes_dtype_and_determinism():
    img = synthetic_images(2, 224, 224)
    views = gpu_aug.multi_view(img, intl.MULTI_CROP, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(2, 3, s, s) for s in (224, 224, 192, 160, 128, 96)]
    assert all(v.dtype == torch.float32 and v.isfinite().all() for v in views)
    mean, std = torch.tensor(intl.MEAN)[:, None, None], torch.tensor(intl.STD)[:, None, None]
    for v in views:                                     # un-normalised, pixels lie in [0, 1]
        pixels = v * std + mean
        assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    again = gpu_aug.multi_view(img, intl.MULTI_CROP, torch.Generator().manual_seed(0))
    other = gpu_aug.multi_view(img, intl.MULTI_CROP, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    assert not any(torch.equal(a, b) for a, b in zip(views, other))


def test_small_images_recipe():
    views = gpu_aug.multi_view(synthetic_images(3, 32, 32), intl.SMALL_IMAGES)
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2


@pytest.mark.gpu
def test_the_gpu_gives_the_same_views_and_never_waits_for_the_host():
    """Same parameters, same crop on the GPU as on the CPU (TF32 off); with a generator on the
    GPU, multi_view never synchronises with the host (CUDA's sync debug mode raises if it does)."""
    device, crop = "cuda", intl.Crop(96, (0.08, 1.0), 0.5, 0.5)
    img = synthetic_images(8, 160, 200)
    p = gpu_aug.sample_params(8, 160, 200, crop, torch.Generator().manual_seed(0))
    on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in p.items()}
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        ours = gpu_aug.apply_params(img.to(device), on_device, crop).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert (ours - gpu_aug.apply_params(img, p, crop)).abs().max() < 1e-3
    img, g = img.to(device), torch.Generator(device).manual_seed(0)
    views = gpu_aug.multi_view(img, intl.MULTI_CROP, g)        # warm up (cuBLAS, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = gpu_aug.multi_view(img, intl.MULTI_CROP, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [v.shape[-1] for v in views] == [224, 224, 192, 160, 128, 96]
    assert all(v.device.type == device for v in views)


# ============================================================================= speed: --gpu-aug, the step, benchmarks
def test_load_capped_shrinks_only_large_images(tmp_path):
    benchmark.scene(0, (1600, 1200)).save(tmp_path / "big.jpg", quality=90)
    small = benchmark.scene(1, (300, 200))
    small.save(tmp_path / "small.png")
    big = gpu_aug.load_capped(str(tmp_path / "big.jpg"))
    assert big.size == (512, 384) and big.mode == "RGB"
    full = Image.open(tmp_path / "big.jpg").convert("RGB").resize((512, 384), Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(big, float) - np.asarray(full, float)).mean() < 2   # draft: ~1 level
    assert np.array_equal(np.asarray(gpu_aug.load_capped(str(tmp_path / "small.png"))), np.asarray(small))


def varied_folder(root, n_per_class=6):
    """JPEG and PNG images of different sizes and shapes, two classes."""
    rng = np.random.RandomState(0)
    for c in range(2):
        os.makedirs(os.path.join(root, "train", f"class{c}"))
        for i in range(n_per_class):
            h, w = rng.randint(24, 90, 2)
            Image.fromarray(synthetic_images(1, h, w, seed=10 * c + i)[0].permute(1, 2, 0).numpy()).save(
                os.path.join(root, "train", f"class{c}", f"img{i}.{'png' if i % 2 else 'jpg'}"))
    return root


def test_gpu_aug_resume_is_bit_identical_to_a_straight_run(tmp_path):
    """--gpu-aug trains on images of mixed sizes, and its generator is part of the checkpoint."""
    data = varied_folder(str(tmp_path / "data"))
    args = ["--data", data, *SMALL, "--small-images", "--batch-size", "4", "--epochs", "2",
            "--method", "intl-m", "--gpu-aug"]
    p = run_intl(*args, "--output-dir", tmp_path / "straight")
    assert "GPU augmentation" in p.stdout
    run_intl(*args, "--output-dir", tmp_path / "split", "--stop-epoch", "1")
    run_intl(*args, "--output-dir", tmp_path / "split")
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=False)
    assert a["step"] == b["step"] == 6 and a["rng"][0]["aug"] is not None
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # another generator state gives other crops, hence other weights
    c = dict(a["rng"][0], aug=torch.Generator().manual_seed(123).get_state())
    torch.save(dict(a, epoch=1, step=3, rng=[c]), tmp_path / "other.pth")
    run_intl(*args, "--output-dir", tmp_path / "other", "--resume", tmp_path / "other.pth")
    d = torch.load(tmp_path / "other" / "checkpoint.pth", weights_only=False)
    assert not torch.equal(a["model"]["projector.0.weight"], d["model"]["projector.0.weight"])


def tiny_bn_encoder():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return intl.Encoder(backbone, intl.projector(8, "16-12"))


def step_on_tiny_encoder(amp="off", compile=False, device="cpu"):
    """A closure running one INTL-M train_step of a small BN network on fixed views, and the network."""
    args = argparse.Namespace(iters=4, whiten="channel", transform="iternorm")
    amp = {"off": None, "bf16": torch.bfloat16}[amp]
    online = tiny_bn_encoder().to(device)
    target = copy.deepcopy(online).requires_grad_(False)
    model = torch.compile(online) if compile else online
    optimizer = torch.optim.SGD(intl.param_groups(online, 1e-4), lr=0.1, momentum=0.9,
                                fused=device == "cuda")
    scaler = torch.amp.GradScaler(device, enabled=False)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(16, 3, 12, 12, generator=g).to(device) for _ in range(3)]
    return lambda: intl.train_step(model, online, target, optimizer, scaler, views, 0.99, 0.05, amp, args), online


def two_steps(amp="off", compile=False, steps=2):
    """Losses, the last gradients and the weights after `steps` INTL-M steps of train_step."""
    step, online = step_on_tiny_encoder(amp, compile)
    losses = [step()[0] for _ in range(steps)]
    return (torch.stack(losses).detach(), [p.grad for p in online.parameters()],
            [p.detach() for p in online.parameters()])


def test_compiled_and_bf16_steps_equal_the_eager_float32_step():
    losses, grads, weights = two_steps()
    c_losses, c_grads, c_weights = two_steps(compile=True)      # inductor on the CPU
    assert torch.allclose(c_losses, losses, rtol=1e-5)
    assert max_error(c_grads, grads) < 1e-4 and max_error(c_weights, weights) < 1e-5
    losses, grads, _ = two_steps(steps=1)
    b_losses, b_grads, _ = two_steps(amp="bf16", steps=1)
    assert torch.allclose(b_losses, losses, rtol=1e-2)          # bf16 keeps 8 bits of mantissa
    cos = lambda a, b: F.cosine_similarity(a.flatten(), b.flatten(), dim=0)  # noqa: E731
    assert cos(torch.cat([g.flatten() for g in b_grads]), torch.cat([g.flatten() for g in grads])) > 0.98
    assert all(cos(b, g) > 0.9 for b, g in zip(b_grads, grads))   # BN on 16 samples: noisy


@pytest.mark.gpu
def test_train_step_never_waits_for_the_host():
    """On the GPU the step queues its kernels and returns: CUDA's sync debug mode raises on
    any device-to-host wait (an .item(), a data-dependent shape)."""
    step, online = step_on_tiny_encoder(device="cuda")
    step()                                                      # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step()[0] for _ in range(2)]                  # only the steps are watched
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(x).all() for x in losses + list(online.parameters()))


def test_resume_keeps_this_runs_fused_optimizer(tmp_path):
    """A checkpoint of an unfused SGD (a CPU run) resumed by a fused one (a GPU run) stays fused,
    and an fp16 GradScaler steps it."""
    online = tiny_bn_encoder()
    unfused = torch.optim.SGD(intl.param_groups(online, 1e-4), lr=0.1, momentum=0.9)
    online(torch.randn(4, 3, 8, 8)[None].unbind())[0].sum().backward()
    unfused.step()
    torch.save({"model": online.state_dict(), "target": None, "optimizer": unfused.state_dict(),
                "scaler": torch.amp.GradScaler("cpu").state_dict(), "rng": [utils.rng_state()],
                "epoch": 1, "step": 1}, tmp_path / "c.pth")
    fused = torch.optim.SGD(intl.param_groups(online, 1e-4), lr=0.1, momentum=0.9, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    args = argparse.Namespace(arch="tiny", method="intl", projector="16-12")
    assert utils.resume_from(tmp_path / "c.pth", online, None, fused, scaler, None, args, 0, 1) == (1, 1)
    assert all(g["fused"] for g in fused.param_groups)
    scaler.scale(online(torch.randn(4, 3, 8, 8)[None].unbind())[0].sum()).backward()
    scaler.step(fused)


def last_json(p):
    return json.loads(p.stdout.strip().splitlines()[-1])


def timed(monkeypatch, module, name):
    """Wrap module.name so that the test keeps its own clock of every call: a list of seconds."""
    fn, times = getattr(module, name), []

    def clocked(*a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        times.append(time.perf_counter() - t)
        return out
    monkeypatch.setattr(module, name, clocked)
    return times


@pytest.mark.parametrize("data", [None, "pil", "gpu-aug"])
def test_benchmark_step_prints_its_figures(data, tmp_path, monkeypatch, capsys):
    """The step time it reports agrees with the test's own clock of train_step (on the CPU the
    step is synchronous, and synthetic views cost nothing else)."""
    flags = ["step", *SMALL, "--small-images", "--batch-size", "4", "--bench-steps", "2",
             "--method", "intl-m", "--output-dir", str(tmp_path), "--workers", "0"]
    if data:
        flags += ["--data", varied_folder(str(tmp_path / "data"))] + ["--gpu-aug"] * (data == "gpu-aug")
    steps = timed(monkeypatch, intl, "train_step")
    r = benchmark.main(flags)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == r
    assert r["data"] == data and r["views"] == [32, 32] and r["per_gpu_batch"] == 4
    # the same 5 repeats of 2 steps, after the warm-up's 2, by the test's clock
    ours_ms = 1000 * statistics.median(a + b for a, b in zip(steps[2::2], steps[3::2])) / 2
    assert 0.95 * ours_ms <= r["step_ms"] <= (1.5 * ours_ms + 20 if data else 1.1 * ours_ms + 2)
    assert 0 < r["head_ms"] < r["step_ms"] and 0 <= r["data_wait_share"] <= 1
    assert data or r["data_wait_share"] < 0.01                  # synthetic crops: no wait


def test_torchrun_benchmark_times_the_ddp_step(tmp_path):
    cmd = [*TORCHRUN, "--nproc_per_node=2", os.path.join(HERE, "benchmark.py"), "step", *SMALL,
           "--small-images", "--batch-size", "8", "--bench-steps", "2", "--method", "intl-m",
           "--output-dir", str(tmp_path), "--workers", "0"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    assert p.returncode == 0, p.stderr[-3000:]
    r = last_json(p)
    assert p.stdout.count('"benchmark"') == 1 and r["world"] == 2 and r["per_gpu_batch"] == 4
    # the 5 timed repeats of 2 global batches of 8 took less than the whole command did
    assert r["img_per_s"] >= benchmark.REPEATS * 2 * 8 / wall and 0 < r["head_share"] < 1


def test_benchmark_aug_prints_its_figures_and_the_grid(tmp_path, monkeypatch, capsys):
    """The per-core rates it reports agree with the test's own clock of the same work."""
    data = varied_folder(str(tmp_path / "data"))
    pil_calls = timed(monkeypatch, benchmark, "default_loader")
    r = benchmark.main(["aug", "--data", data, "--batch-size", "4", "--bench-steps", "2",
                        "--output-dir", str(tmp_path), "--workers", "0"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == r
    assert r["views"] == [224, 224] and r["images"] == 2
    files = benchmark.image_files(intl.parse_args(["--data", data]), 2, None)
    views = intl.views_transform(intl.TWO_VIEWS)
    t = time.perf_counter()
    for _ in range(3):
        for f in files:
            views(Image.open(f).convert("RGB"))
    ours = 6 / (time.perf_counter() - t)
    torch.set_num_threads(2)                                   # the benchmark timed one core
    assert ours / 4 < r["pil_img_per_s_per_core"] < 4 * ours and len(pil_calls) >= 2 * benchmark.REPEATS
    assert r["gpu_aug_cpu_img_per_s_per_core"] > r["pil_img_per_s_per_core"]   # decode + pad only
    assert Image.open(r["grid"]).size == (8 * 72 + 18, 2 * 72)


def test_gpu_check_runs_what_fits_and_prints_one_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # one eager row, one compiled and the aug row: a loaded 2-core machine gets to the first in time
    monkeypatch.setattr(benchmark, "CHECK", [benchmark.CHECK[i] for i in (1, 2, 5)])
    rows = benchmark.check(150, ["--arch", "resnet18", "--projector", "32-32-32", "--small-images",
                                 "--bench-steps", "1", "--batch-size", "4", "--workers", "0"])
    assert len(rows) == 3 and rows[0][2]["img_per_s"] > 0
    assert all(why.startswith("skipped") for _, mode, _, why in rows
               if mode in ("compile", "CUDA graphs"))                   # compiling needs minutes
    out = capsys.readouterr().out
    assert out.count("\n| ") == len(rows) + 2 + any(r[1] == "aug" and r[2] for r in rows)


def test_quick_start_prints_both_runs_and_the_table(tmp_path, capsys, monkeypatch):
    """python intl.py with no arguments: the quick start, shrunk here to a few steps; its INTL and
    no-transform runs, then the table: effective ranks from the logs, 5-NN figures (trained,
    without a transform and at random init) against a brute-force vote."""
    monkeypatch.chdir(tmp_path)
    flags = dict(zip(intl.QUICK_START[::2], intl.QUICK_START[1::2]))
    flags.update({"--subset": "64", "--batch-size": "32", "--projector": "64-64", "--workers": "0",
                  "--output-dir": "intl"})
    monkeypatch.setattr(intl, "QUICK_START", [x for kv in flags.items() for x in kv])
    monkeypatch.setattr(sys, "argv", ["intl.py"])
    pair = intl.monitor_data
    monkeypatch.setattr(intl, "monitor_data", lambda args: pair(args, n_bank=60, n_queries=20))
    intl.main()
    out = capsys.readouterr().out
    assert out.startswith("quick start, INTL: python intl.py --data fashion-mnist")
    assert "quick start, no transform: python intl.py --data fashion-mnist" in out and "--transform none" in out
    assert out.count("ep 1/1 step 2/2") == 2
    bank, queries = pair(intl.parse_args(intl.QUICK_START), n_bank=60, n_queries=20)
    truth = torch.tensor([y for _, y in queries])

    def top1(net):
        net.eval()
        with torch.no_grad():
            fb, fq = (net(torch.stack([x for x, _ in ds])) for ds in (bank, queries))
        pred = brute_force_knn(fb, torch.tensor([y for _, y in bank]), fq, 5, None)
        return 100 * (pred == truth).double().mean().item()
    nets, linear = {}, {}
    for name, run in [("INTL", "intl"), ("no transform", "runs/quick-start-none")]:
        nets[name], _ = resnet_backbone("resnet18")
        nets[name].load_state_dict(torch.load(tmp_path / run / "backbone.pth"))
        rec = read_log(tmp_path / run)[-1]
        linear[name] = rec["linear_top1"]
        assert rec["knn5_top1"] == pytest.approx(top1(nets[name]))
        assert re.search(rf"\n{name} +{rec['projector']['erank']:.1f} of 32 +{top1(nets[name]):.1f}% +"
                         rf"{linear[name]:.1f}%\n", out), (name, out)
    torch.manual_seed(0)
    nets["random init"], _ = resnet_backbone("resnet18")
    linear["random init"] = utils.monitor(nets["random init"], (bank, queries), torch.device("cpu"))["linear_top1"]
    assert re.search(rf"\nrandom init +- +{top1(nets['random init']):.1f}% +{linear['random init']:.1f}%\n", out), out
    last = out.strip().splitlines()[-1]
    assert last.startswith("what to look at: the effective rank, ")
    assert last.endswith(f"{linear['no transform'] - linear['random init']:+.1f} points without against "
                         f"{linear['INTL'] - linear['random init']:+.1f} with")


# ----------------------------------------------------------------------------- structure
PROJECT = ["utils", "gpu_aug", "intl", "eval_linear", "benchmark", "figures"]


def project_imports(module):
    """The project modules that `module`.py imports, anywhere in the file (lazy imports too)."""
    import ast
    tree = ast.parse(open(os.path.join(HERE, f"{module}.py")).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set(PROJECT)


def test_imports_point_one_way():
    """utils.py (a leaf) <- gpu_aug.py <- intl.py <- eval_linear.py, benchmark.py, figures.py
    (so no cycle); gpu_aug only for --gpu-aug; each module imports alone; intl.py is loaded once."""
    assert project_imports("utils") == set()
    assert project_imports("gpu_aug") == {"utils"}
    assert project_imports("intl") == {"gpu_aug", "utils"}
    for top in ("eval_linear", "benchmark", "figures"):
        assert project_imports(top) <= {"intl", "gpu_aug", "utils"}, top
    # each module imported alone (no other project module loaded), in one fresh interpreter
    alone = (f"import importlib, sys\nfor m in {PROJECT!r}:\n    for p in {PROJECT!r}:\n        sys.modules.pop(p, None)\n"
             f"    importlib.import_module(m)\n    print(m, sorted(set(sys.modules) & {set(PROJECT)!r}))")
    p = subprocess.run([sys.executable, "-c", alone], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    loaded = {line.split(" ", 1)[0]: eval(line.split(" ", 1)[1]) for line in p.stdout.splitlines()}
    assert loaded == {"utils": ["utils"], "gpu_aug": ["gpu_aug", "utils"], "intl": ["intl", "utils"],   # no gpu_aug
                      "eval_linear": ["eval_linear", "intl", "utils"], "figures": ["figures", "intl", "utils"],
                      "benchmark": ["benchmark", "gpu_aug", "intl", "utils"]}, loaded
    p = subprocess.run([sys.executable, "intl.py", "--data", "/nowhere"], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("\n") == 1              # nothing loads intl.py twice


def source_of(names):
    """The source of intl.py's top-level definitions `names`, in the file's order."""
    import ast
    text = open(os.path.join(HERE, "intl.py")).read()
    tree = ast.parse(text)
    out = []
    for node in tree.body:
        targets = [e for t in getattr(node, "targets", []) for e in getattr(t, "elts", [t])]   # MEAN, STD = ...
        defined = [node.name] if hasattr(node, "name") else [t.id for t in targets if hasattr(t, "id")]
        if set(defined) & set(names):
            start = node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno
            out.append("\n".join(text.splitlines()[start - 1:node.end_lineno]))
    assert len(out) == len(names), names
    return "\n\n\n".join(out)


PASTE_HEADER = """import math
from functools import partial
from typing import NamedTuple
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from PIL import Image, ImageFilter
"""


@pytest.mark.parametrize("snippet, names", [
    ("IterNorm", ["whitened_variables", "newton_iterations", "iter_norm"]),
    ("trace loss", ["trace_loss", "trace_loss_weight"]),
    ("INTL objective", ["whitened_variables", "newton_iterations", "iter_norm", "trace_loss", "nmse", "intl_loss"]),
    ("Spectral Transformation", ["whitened_variables", "spectral_transform"]),
    ("recipe", ["MEAN", "Crop", "TWO_VIEWS", "gaussian_blur", "crop_transform", "apply_each", "views_transform"])])
def test_snippets_run_when_pasted_alone(snippet, names, tmp_path):
    """What a lecturer copies runs in a fresh file with only torch, torchvision and PIL imported,
    and computes what intl.py computes."""
    use = {"IterNorm": "z = torch.randn(8, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))\n"
                       "print(iter_norm(z, 4, 'batch').sum().item())",
           "trace loss": "print(trace_loss(torch.eye(5) * 2).item(), trace_loss_weight(256))",
           "INTL objective": "g = torch.Generator().manual_seed(0)\n"
                             "zs = [torch.randn(8, 20, dtype=torch.float64, generator=g) for _ in range(3)]\n"
                             "print(intl_loss(zs[1:], zs[0], 0.05)[0].item(), intl_loss(zs)[0].item())",
           "Spectral Transformation": "z = torch.randn(8, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))\n"
                                      "print(spectral_transform(z, 0.25).sum().item())",
           "recipe": "torch.manual_seed(0)\nimg = Image.new('RGB', (60, 50), (200, 30, 90))\n"
                     "print(sum(v.sum().item() for v in views_transform(TWO_VIEWS)(img)))"}[snippet]
    path = tmp_path / "lecture.py"
    path.write_text(PASTE_HEADER + "\n\n" + source_of(names) + "\n\n\n" + use + "\n")
    p = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    namespace, want = {}, io.StringIO()            # as `from intl import *`, in this process
    exec(PASTE_HEADER, namespace)
    namespace.update(vars(intl))
    with contextlib.redirect_stdout(want):
        exec(use, namespace)
    assert p.stdout == want.getvalue() and p.stdout.strip()


def test_references_a_reader_can_find():
    """No section marks, no references to documents outside the repository: the paper's concepts by name."""
    tracked = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True).stdout.split()
    for name in [f for f in tracked if f.endswith((".py", ".sh", ".md"))] or ["intl.py", "README.md"]:
        text = open(os.path.join(HERE, name), encoding="utf-8").read()
        assert "\u00a7" not in text and not re.search(r"\bspec\b", text), name

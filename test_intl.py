"""Tests for intl.py, eval_linear.py and run_imagenet.sh: every equation against an independent
float64 computation, DDP against one process, resume against a straight run, the command
lines on real image files, the ImageNet recipes against the paper's table, and the batched
augmentation against torchvision's ops and samplers."""
import argparse
import contextlib
import copy
import dataclasses
import fcntl
import glob
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import resource
import shlex
import shutil
import signal
import socket
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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torchvision.transforms import InterpolationMode

import benchmark
import eval_linear
import figures
import gpu_aug
import intl
import utils
from intl import MEAN, STD, resnet_backbone

HERE = os.path.dirname(os.path.abspath(__file__))
# torchrun picks a free port itself (c10d rendezvous on port 0): no race for a port
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# two cores: two threads for one pytest process, one each for pytest-xdist's two (-n 2)
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)     # the scripts these tests start: the same sums


def write_idx(path, array):
    """A gzipped IDX file, the format Fashion-MNIST ships in: zeros, the type (uint8), the number
    of dims, each dim big-endian, then the data."""
    head = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + array.astype(np.uint8).tobytes())


def clothes(n, seed):
    """n 28 x 28 grey images of 10 classes, each class a bright block of its own shape and place
    over noise, with its labels: enough for the probes to learn something, in a second."""
    rng = np.random.RandomState(seed)
    labels = np.arange(n) % 10
    images = rng.randint(0, 60, (n, 28, 28))
    for i, c in enumerate(labels):
        top, left = 2 + 2 * (c % 5) + rng.randint(3), 2 + 4 * (c // 5) + rng.randint(3)
        images[i, top:top + 8 + c % 3 * 4, left:left + 14 - c % 4 * 2] += 120 + 10 * c
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="session", autouse=True)
def fashion_mnist_files(tmp_path_factory):
    """Fashion-MNIST for every test, in its own format: 600 training and 200 test images written
    here (intl.py finds them through FASHION_MNIST_DIR), so that no test needs the data set or a
    download. The real files, where CI installs them (REAL_FASHION_MNIST_DIR), are read by
    test_fashion_mnist_files_are_read_as_written."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    for split, n, seed in [("train", 600, 0), ("t10k", 200, 1)]:
        images, labels = clothes(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    before = os.environ.get("FASHION_MNIST_DIR")
    os.environ["FASHION_MNIST_DIR"] = str(folder)      # subprocesses too
    yield str(folder)
    os.environ.pop("FASHION_MNIST_DIR") if before is None else os.environ.update(FASHION_MNIST_DIR=before)


def hide_cuda(mp):
    """No GPU for this process (torch.cuda.is_available() is False) nor for the processes it
    starts (CUDA_VISIBLE_DEVICES="")."""
    mp.setenv("CUDA_VISIBLE_DEVICES", "")
    mp.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def cuda_hidden_unless_gpu(request, monkeypatch):
    """Tests not marked gpu run as on a CPU-only machine, also where CI has a GPU: the same
    devices, dtypes and code paths, whichever machine runs them. Tests marked gpu skip, saying
    why, where there is no GPU."""
    if request.node.get_closest_marker("gpu") is None:
        hide_cuda(monkeypatch)
    elif not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


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


# IterNorm through the n × n Gram matrix when the variables outnumber the observations
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
    out = tmp_path / "out"          # one batch of 16 32-px images an epoch, through the ImageNet stem
    p = run_intl("--data", "fashion-mnist", "--subset", "16", *SMALL, "--batch-size", "16",
                 "--epochs", "2", "--transform", transform, "--output-dir", out)
    assert f"{transform} output" in p.stdout and ("beta 0.0000" in p.stdout) == (transform == "none")
    assert ("beta 0.0100" in p.stdout) == (transform == "power") and p.stderr == ""
    lines = [json.loads(line) for line in open(out / "spectrum.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        before, after = r["before"], r["after"]
        assert len(before) == len(after) == 16 and before == sorted(before, reverse=True) and before[0] > 0
        if transform == "none":        # the identity: the same eigenvalues
            assert after == before
        else:                          # ZCA (p = 0.5): every direction at 1
            assert after == pytest.approx([1] * 16, rel=1e-3) and before[-1] < 0.5 * before[0]
    epochs = [json.loads(line) for line in open(out / "log.jsonl") if "transformed" in line]
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
def forked(worker, *args):
    """worker(rank, *args) in two processes forked from this one (no interpreter start-up, unlike
    torch.multiprocessing.spawn), each on one thread, as torchrun's two on two cores."""
    def run(rank):
        torch.set_num_threads(1)
        worker(rank, *args)
    ranks = [multiprocessing.get_context("fork").Process(target=run, args=(r,)) for r in (0, 1)]
    for r in ranks:
        r.start()
    for r in ranks:
        r.join(300)
    assert [r.exitcode for r in ranks] == [0, 0]


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
            z_target = utils.gather(target(views[:1])[0])
        views = views[1:]
    loss = intl.intl_loss([utils.gather(z) for z in model(views)], z_target, 0.05)[0]
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
    forked(ddp_worker, tmp_path / "store", method, views, str(tmp_path / "r"))
    for rank in (0, 1):
        loss_r, grads_r = torch.load(tmp_path / f"r.{rank}")
        assert loss_r == pytest.approx(loss, rel=1e-5)
        for g, g_r in zip(grads, grads_r):
            assert (g - g_r).norm() <= 1e-5 * g.norm()


@pytest.mark.parametrize("aug", [[], ["--gpu-aug"]])
def test_two_cpu_processes_train_end_to_end(aug, tmp_path):
    """Under the real launcher, torchrun; with --gpu-aug, two ranks forked as torchrun starts them."""
    data = image_folder(str(tmp_path / "data"), n_per_class=16, size=32)    # 2 steps of 16 (8 a rank)
    argv = ["--data", data, *SMALL, "--small-images", "--batch-size", "16", "--epochs", "1", "--method",
            "intl-m", "--output-dir", str(tmp_path / "out"), *aug]
    if not aug:
        p = subprocess.run([*TORCHRUN, "--nproc_per_node=2", os.path.join(HERE, "intl.py"), *argv],
                           capture_output=True, text=True, timeout=600)
        code, out, err = p.returncode, p.stdout, p.stderr
    else:
        ranks = two_ranks([(lambda a: train_in_process(*a), argv)], tmp_path / "r")
        code, out, err = ranks[0][0]["code"], ranks[0][0]["out"], ranks[0][0]["err"]
        assert ranks[1][0]["out"] == ""
    assert code == 0, err[-3000:]
    assert "2 process(es)" in out and out.count("step ") == 2   # rank 0 prints alone
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    if aug:     # each rank draws its own crops, and resumes its own generator
        assert not torch.equal(ckpt["rng"][0]["aug"], ckpt["rng"][1]["aug"])


# ----------------------------------------------------------------------------- synchronised BatchNorm
# Two gloo processes on the CPU, each with half of a global batch, against one process with plain
# nn.BatchNorm on the whole batch. One spawn runs every case (a spawn costs seconds).
BN_CASES = {"1d": (nn.BatchNorm1d, (12, 5), torch.contiguous_format),
            "2d": (nn.BatchNorm2d, (12, 3, 4, 5), torch.contiguous_format),
            "2d-channels-last": (nn.BatchNorm2d, (12, 3, 4, 5), torch.channels_last)}


def bn_case(name, dtype=torch.float64):
    """A BN layer whose parameters and running stats are not their initial values, a global batch
    of 12 whose channel means are not 0 (mean 2, sd 3), and the weights of the loss."""
    cls, shape, fmt = BN_CASES[name]
    g = torch.Generator().manual_seed(len(shape))
    bn = cls(shape[1]).to(torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.num_batches_tracked.fill_(3)
    x = (3 * torch.randn(shape, generator=g, dtype=torch.float64) + 2).to(dtype, memory_format=fmt)
    return bn, x, torch.randn(shape, generator=g, dtype=torch.float64)


def bn_step(bn, x, w, rows):
    """One training step of bn on x[rows], with loss mean(w y) over those rows: the mean of the
    two ranks' losses is the whole batch's loss, the objective DDP differentiates."""
    x = x[rows].detach().requires_grad_()
    y = bn(x)
    (w[rows] * y).mean().backward()
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
            **bn.state_dict()}


def bn_encoder():
    """tiny_encoder with a BN2d in the backbone and a BN1d in the projector."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    projector = nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12))
    return intl.Encoder(backbone, projector)


def bn_statistics(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}


class OpNames(TorchDispatchMode):
    """The name of every torch op run while it is active, and the largest tensor it touched."""
    def __init__(self):
        super().__init__()
        self.ops, self.sizes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket))
        self.sizes.append(max([t.numel() for t in tree_flatten((args, kwargs, out))[0] if torch.is_tensor(t)] or [0]))
        return out


def cpu_path_ops(name):
    """(op, the largest tensor's size) of one forward and of one backward of a synchronised
    float32 layer on case `name`, and the size of its input."""
    bn, x, w = bn_case(name, torch.float32)
    bn, x, dy = utils.convert_sync_batchnorm(bn.float()), x.requires_grad_(), w.float()
    with OpNames() as forward:
        y = bn(x)
    with OpNames() as backward:
        torch.autograd.grad(y, [x, bn.weight, bn.bias], dy)
    return [list(zip(pas.ops, pas.sizes)) for pas in (forward, backward)], x.numel()


def tiny_backbone(arch, small_images=False):
    """A stand-in for intl.resnet_backbone: conv, BN, ReLU, pool; 8 features."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten()), 8


def multi_crop_step_ops(world, rank=0):
    """The ops of an INTL-M multi-crop train_step on what intl.build_state builds for `world`
    processes (with intl.resnet_backbone made tiny_backbone), a global batch of 16: the third
    step, after the one-off work of the first two (the BN snapshot's memory, DDP's buckets)."""
    args = intl.parse_args(["--data", "DIR", "--method", "intl-m", "--multi-crop", "--projector", "16-12",
                            "--batch-size", "16", "--beta", "0.05"])
    state = intl.build_state(args, torch.device("cpu"), world)
    g = torch.Generator().manual_seed(rank)
    views = [torch.randn(16 // world, 3, size, size, generator=g) for size in (12, 12, 10, 9, 8, 6)]
    for _ in range(2):
        intl.train_step(state, views, 0.99, args)
    with OpNames() as step:
        intl.train_step(state, views, 0.99, args)
    return step.ops


def sync_bn_worker(rank, store, views, out):
    torch.set_num_threads(1)        # two processes on two cores (as torchrun's run)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    res = {}
    for name in BN_CASES:
        bn, x, w = bn_case(name)
        res[name] = bn_step(utils.convert_sync_batchnorm(bn), x, w, slice(6 * rank, 6 * rank + 6))
    bn, x, w = bn_case("2d")
    bn.momentum = None                                          # the cumulative average
    res["momentum None"] = bn_step(utils.convert_sync_batchnorm(bn), x, w, slice(6 * rank, 6 * rank + 6))
    bn, x, w = bn_case("2d-channels-last", torch.bfloat16)     # as a conv under autocast gives it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res["bf16"] = bn_step(utils.convert_sync_batchnorm(bn).float(), x, w, slice(6 * rank, 6 * rank + 6))
    online = utils.convert_sync_batchnorm(bn_encoder())
    half = views[0].shape[0] // 2
    loss, grads = loss_and_grads("intl-m", [v[rank * half:(rank + 1) * half] for v in views],
                                 nn.parallel.DistributedDataParallel(online), online)
    res["encoder"] = loss, grads, bn_statistics(online)
    state = intl.build_state(intl.parse_args(["--data", "DIR", *SMALL, "--method", "intl-m"]), torch.device("cpu"), 2)
    online, target = utils.unwrap(state.model), state.target
    res["built"] = [[f"{type(m).__module__}.{type(m).__name__}" for m in net.modules()
                     if "BatchNorm" in type(m).__name__] for net in (online, target)]
    res["broadcast_buffers"] = state.model.broadcast_buffers
    res["ops"] = {name: cpu_path_ops(name) for name in ("1d", "2d-channels-last")}
    intl.resnet_backbone = tiny_backbone        # this process's own module
    res["step_ops"] = multi_crop_step_ops(2, rank)
    torch.save(res, f"{out}.{rank}")
    utils.leave_process_group()


@pytest.fixture(scope="module")
def sync_bn_ranks(tmp_path_factory):
    """What each of two gloo processes computed, and the global views of the encoder case."""
    d = tmp_path_factory.mktemp("syncbn")
    torch.manual_seed(3)
    views = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    forked(sync_bn_worker, d / "store", views, str(d / "r"))
    return [torch.load(d / f"r.{rank}") for rank in (0, 1)], views


@pytest.mark.parametrize("name", list(BN_CASES))
def test_sync_bn_two_processes_equal_one_on_the_whole_batch(name, sync_bn_ranks):
    """In float64, to 1e-12: output, running stats, count, and the gradients as DDP uses them (a
    rank's input gradient carries both ranks' losses, so it is 2x; weight and bias: the mean)."""
    assert_ranks_equal_one(name, [res[name] for res in sync_bn_ranks[0]], dict(rtol=1e-12, atol=1e-14))


def assert_ranks_equal_one(name, ranks, close):
    """Two ranks' bn_step on case `name` against one process's plain nn.BatchNorm, in float64."""
    bn, x, w = bn_case(name)
    one = bn_step(bn, x, w, slice(None))
    for r, res in enumerate(ranks):
        rows = slice(6 * r, 6 * r + 6)
        torch.testing.assert_close(res["y"], one["y"][rows], **close)
        torch.testing.assert_close(res["x_grad"] / 2, one["x_grad"][rows], **close)
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(res[k], one[k], **close)
        assert res["y"].is_contiguous(memory_format=BN_CASES[name][2])
        assert res["x_grad"].is_contiguous(memory_format=BN_CASES[name][2])
    for k in ("weight_grad", "bias_grad"):
        torch.testing.assert_close((ranks[0][k] + ranks[1][k]) / 2, one[k], **close)
    assert int(one["num_batches_tracked"]) == 4


def compiled_bn_worker(rank, store, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    res = {}
    for name in ("1d", "2d"):
        bn, x, w = bn_case(name)
        compiled = utils.convert_sync_batchnorm(bn)
        compiled.compile(backend="aot_eager", fullgraph=True)  # fullgraph: a graph break fails
        res[name] = bn_step(compiled, x, w, slice(6 * rank, 6 * rank + 6))
    torch.save(res, f"{out}.{rank}")
    utils.leave_process_group()


def test_sync_bn_compiled_whole_by_torch_compile_equals_one_process(tmp_path):
    """torch.compile traces the synchronised layer in one graph (fullgraph; aot_eager, the
    compiler's own kernels aside), forward and backward, and two processes still equal one."""
    forked(compiled_bn_worker, tmp_path / "store", str(tmp_path / "r"))
    ranks = [torch.load(tmp_path / f"r.{rank}") for rank in (0, 1)]
    for name in ("1d", "2d"):
        assert_ranks_equal_one(name, [res[name] for res in ranks], dict(rtol=1e-12, atol=1e-14))


def test_sync_bn_with_momentum_none_keeps_the_cumulative_average(sync_bn_ranks):
    """momentum None: the running statistics average every batch seen (1/4 here: 3 before), as
    nn.BatchNorm's, the count never read on the host."""
    bn, x, w = bn_case("2d")
    bn.momentum = None
    one = bn_step(bn, x, w, slice(None))
    for res in (res["momentum None"] for res in sync_bn_ranks[0]):
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(res[k], one[k], rtol=1e-12, atol=1e-14)


def test_sync_bn_under_bf16_autocast_keeps_float32_statistics(sync_bn_ranks):
    """bf16 input: y and the input gradient in bf16, the statistics as float32 sums of the same
    bf16 values (a float64 reference, to 1e-6; accumulating in bf16 fails it)."""
    bn, x, w = bn_case("2d-channels-last", torch.bfloat16)
    one = bn_step(bn, x.double(), w, slice(None))
    for r, res in enumerate(res["bf16"] for res in sync_bn_ranks[0]):
        rows = slice(6 * r, 6 * r + 6)
        assert res["y"].dtype == res["x_grad"].dtype == torch.bfloat16
        assert res["running_mean"].dtype == torch.float32
        for k in ("running_mean", "running_var"):
            torch.testing.assert_close(res[k].double(), one[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res["y"].double(), one["y"][rows], rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(res["x_grad"].double() / 2, one["x_grad"][rows], rtol=1e-2, atol=1e-4)


def test_encoder_with_bn_in_two_processes_equals_one(sync_bn_ranks):
    """INTL-M with BN in the backbone and the projector: loss, every gradient and BN statistics."""
    ranks, views = sync_bn_ranks
    online = bn_encoder()
    loss, grads = loss_and_grads("intl-m", views, online, online)
    for loss_r, grads_r, stats_r in (res["encoder"] for res in ranks):
        assert loss_r == pytest.approx(loss, rel=1e-5)
        for g, g_r in zip(grads, grads_r, strict=True):
            assert (g - g_r).norm() <= 1e-5 * g.norm()
        for k, v in bn_statistics(online).items():
            torch.testing.assert_close(stats_r[k], v, rtol=1e-5, atol=1e-6)


def test_intl_builds_every_bn_synchronised_for_two_cpu_processes(sync_bn_ranks):
    """intl.py's online encoder and INTL-M target on two gloo processes: backbone and projector."""
    for online, target in (res["built"] for res in sync_bn_ranks[0]):
        assert online == target == ["utils.SyncBatchNorm"] * 22     # ResNet-18's 20, the projector's 2


def test_sync_bn_is_plain_bn_in_one_process_and_loads_into_torchvision():
    """No process group: training and eval steps bit-identical to nn.BatchNorm; every BN converted,
    and the state_dict loads, key for key, into a plain torchvision ResNet-18."""
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=4)
    sync = utils.convert_sync_batchnorm(copy.deepcopy(plain))
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in sync.modules())
    assert sum(isinstance(m, utils.SyncBatchNorm) for m in sync.modules()) == 20
    x = torch.randn(2, 3, 32, 32)
    same = on_one_thread(lambda _: [torch.equal(plain.train(t)(x), sync.train(t)(x)) for t in (True, False)])
    assert same == [True, True]
    loaded = torchvision.models.resnet18(num_classes=4)
    loaded.load_state_dict(sync.state_dict())       # strict: the same keys
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), plain.state_dict().values()))


def test_sync_bn_cpu_path_runs_a_few_torch_ops_per_layer_whatever_its_size(sync_bn_ranks):
    """Per layer and pass, counted by torch's dispatcher (plain nn.BatchNorm: 3 forward, 1
    backward). Forward, at most 13: the count's increment; this rank's statistics (1 pass over x);
    its [mean, mean of x²] (2); the all-reduce; the global mean and variance (4: average, split,
    subtract, clamp); the running statistics (3: the unbiased variance, two lerps); the
    normalisation (1 pass). Backward, at most 18: this rank's sums of dy and dy x̂ (1 pass over x
    and dy); stack, all-reduce (2); while it runs, s = w / sqrt(var + eps) and s dy (3, 1 reshape,
    1 pass); then average, split (2), the slope and shift (4), dx's other two terms (2 reshapes, 2
    passes). One all-reduce each way; 2 and 4 ops touch x's size."""
    for (forward, backward), n in (sync_bn_ranks[0][0]["ops"][name] for name in ("1d", "2d-channels-last")):
        assert len(forward) <= 13 and len(backward) <= 18, (forward, backward)
        for ops, passes in ((forward, 2), (backward, 4)):
            assert [op for op, _ in ops].count("c10d.allreduce_") == 1
            assert sum(size >= n for _, size in ops) == passes, ops


def test_ddp_under_sync_bn_broadcasts_no_buffers_and_compile_modes_with_cuda_graphs_warn(
        sync_bn_ranks, monkeypatch, capsys):
    """Two processes: DDP without its per-step buffer broadcast (SyncBatchNorm keeps the BN
    statistics equal). torch.compile's CUDA-graph modes with 2 processes: one line naming the open
    torch issues; mode default, or one process, says nothing."""
    assert [res["broadcast_buffers"] for res in sync_bn_ranks[0]] == [False, False]
    monkeypatch.setattr(intl, "resnet_backbone", tiny_backbone)
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda module, **kw: module)
    monkeypatch.setattr(torch, "compile", lambda model, mode: model)       # compiling takes seconds
    for mode, world, warned in [("reduce-overhead", 2, True), ("max-autotune", 2, True),
                                ("default", 2, False), ("reduce-overhead", 1, False)]:
        intl.build_state(intl.parse_args(["--data", "DIR", "--projector", "16-12", "--compile", mode]),
                         torch.device("cpu"), world)
        err = capsys.readouterr().err
        if warned:
            assert err.count("\n") == 1 and err.startswith(f"warning: torch.compile mode {mode}"), err
            assert "pytorch#139207" in err and "pytorch#140395" in err
        else:
            assert err == "", err


def test_train_step_multi_crop_in_two_processes_runs_at_most_1_35x_the_ops_of_one(sync_bn_ranks, monkeypatch):
    """One INTL-M multi-crop train_step (6 views; a backbone and a projector with a BN each), ops
    counted by torch's dispatcher: 1.29x here. The second process adds, per BN pass, the
    synchronised layer's own ops (at most 10 more forward, 17 backward: the test above), one
    gather per view, DDP's gradient all-reduce, and nothing per buffer or parameter; so 1.35.
    Each collective is accounted for: an all-gather per view (6); an all-reduce per BN pass (12
    forward, the target's 2 among them, and 10 backward), per gathered online view's gradient (5)
    and DDP's one bucket; no broadcast (of buffers, or anything else)."""
    monkeypatch.setattr(intl, "resnet_backbone", tiny_backbone)
    one = on_one_thread(lambda _: multi_crop_step_ops(1))       # as each of the two processes
    for two in (res["step_ops"] for res in sync_bn_ranks[0]):
        assert len(two) <= 1.35 * len(one), (len(two), len(one))
        assert two.count("c10d.allgather_") == 6 and two.count("c10d.allreduce_") == 12 + 10 + 5 + 1
        assert not any("broadcast" in op for op in two)


def test_bn_snapshot_and_restore_take_a_few_foreach_ops_into_memory_allocated_once():
    """60 BN buffers (ResNet-18's count) and a target's: the snapshot is one foreach copy per dtype
    (float32 statistics, int64 counts) into memory allocated once, the restore three ops per dtype
    and the loss's check; a non-finite step's statistics (NaN here) go back to the copies, a
    finite one's stay."""
    online = nn.Sequential(*[nn.BatchNorm1d(4) for _ in range(20)])     # ResNet-18's count
    target = copy.deepcopy(online)
    buffers = lambda: torch.cat([b.double().flatten() for net in (online, target) for b in net.buffers()])  # noqa: E731
    saved = utils.undo_memory([*online.buffers(), *target.buffers()])
    for loss in (torch.tensor(float("nan")), torch.tensor(1.0)):
        with OpNames() as taken:
            utils.snapshot(saved)
        before = buffers()
        for b in [*online.buffers(), *target.buffers()]:               # as a training step would
            b.add_(1)
        online[0].running_mean[0] = float("nan")
        after = buffers()
        with OpNames() as restored:
            utils.restore_if_not_finite(saved, loss)
        restore = restored.ops[restored.ops.index("aten._foreach_copy_"):]         # after isfinite's 7
        assert taken.ops == ["aten._foreach_copy_"] * 2 and len(restored.ops) <= 7 + 3 * 2
        assert restore == ["aten._foreach_copy_", "aten.where", "aten._foreach_copy_"] * 2, restored.ops
        want = after if torch.isfinite(loss) else before
        torch.testing.assert_close(buffers(), want, rtol=0, atol=0, equal_nan=True)


def test_benchmark_syncbn_prints_host_times_and_the_ratio_to_plain_bn(monkeypatch, capsys):
    """On the CPU: plain nn.BatchNorm and ours in a one-process gloo group it creates and leaves;
    torch's needs CUDA; the time inside our two gloo calls (each start and wait timed) and outside
    them. Two tiny layers: the figures, not their size, are checked here."""
    monkeypatch.setattr(benchmark, "SYNCBN_SHAPES", {"cpu": [(4, 3), (4, 3, 2, 2)]})
    calls = (torch.distributed.all_reduce, torch.distributed.all_gather_single, utils.start_all_reduce)
    try:
        r = benchmark.main(["syncbn", "--bench-steps", "2"])
    finally:
        torch.set_num_threads(THREADS)                             # it times one core
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == r and r["repeats"] >= 5
    assert out.count("torch's nn.SyncBatchNorm: needs CUDA") == 2 and "one-process gloo group" in out
    for row in r["layers"]:
        assert row["plain_us"] > 0 and row["ours_us"] > 0 and "torch_us" not in row
        assert row["ours_over_plain"] == pytest.approx(row["ours_us"] / row["plain_us"], rel=0.02)
        assert row["collectives_us"] > 0 and row["outside_us"] > 0
        assert row["outside_over_plain"] == pytest.approx(row["outside_us"] / row["plain_us"], rel=0.02)
    assert not torch.distributed.is_initialized()
    assert (torch.distributed.all_reduce, torch.distributed.all_gather_single, utils.start_all_reduce) == calls


def cuda_path_worker(rank, store, out):
    """Two gloo ranks on the one GPU: the CUDA path follows the input's device, whatever the backend."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    res = {}
    for name in BN_CASES:
        bn, x, w = bn_case(name)
        step = bn_step(utils.convert_sync_batchnorm(bn).cuda(), x.cuda(), w.cuda(), slice(6 * rank, 6 * rank + 6))
        res[name] = {k: v.cpu() for k, v in step.items()}
    torch.save(res, f"{out}.{rank}")
    utils.leave_process_group()


@pytest.mark.gpu
def test_sync_bn_cuda_path_two_processes_equal_one_on_the_whole_batch(tmp_path):
    """torch's fused kernels with the counts made on the device, in float64 against one process's
    nn.BatchNorm on the CPU; to 1e-10, the GPU summing in another order."""
    torch.multiprocessing.spawn(cuda_path_worker, args=(tmp_path / "store", str(tmp_path / "r")), nprocs=2)
    ranks = [torch.load(tmp_path / f"r.{rank}") for rank in (0, 1)]
    for name in BN_CASES:
        assert_ranks_equal_one(name, [res[name] for res in ranks], dict(rtol=1e-10, atol=1e-12))


def against_torch_worker(rank, store, out):
    """Rank `rank` on GPU `rank` over NCCL: ours and torch's nn.SyncBatchNorm on the same cases;
    then ours once more under CUDA's sync-debug mode, which raises on any wait for the GPU."""
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=2)
    rows, res = slice(6 * rank, 6 * rank + 6), {}
    for name, dtype, momentum in [("1d", torch.float32, 0.1), ("2d-channels-last", torch.float32, None),
                                  ("2d-channels-last", torch.bfloat16, 0.1)]:     # bf16: as under autocast
        bn, x, w = bn_case(name, dtype)
        bn = bn.float()
        bn.momentum = momentum
        layers = [utils.convert_sync_batchnorm(copy.deepcopy(bn)), nn.SyncBatchNorm.convert_sync_batchnorm(bn)]
        res[name, str(dtype), momentum] = [{k: v.cpu() for k, v in bn_step(layer.cuda(), x.cuda(), w.cuda(), rows).items()}
                                           for layer in layers]
    bn, x, w = bn_case("2d-channels-last", torch.bfloat16)
    ours, x, w = utils.convert_sync_batchnorm(bn.float()).cuda(), x.cuda(), w.cuda()
    bn_step(ours, x, w, rows)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bn_step(ours, x, w, rows)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.save(res, f"{out}.{rank}")
    utils.leave_process_group()


@pytest.mark.gpu
def test_sync_bn_cuda_path_equals_torchs_sync_batchnorm_on_two_gpus(tmp_path):
    """Outputs, input, weight and bias gradients, running statistics and counts equal torch's
    nn.SyncBatchNorm (the same kernels) in float32 and bf16, momentum 0.1 and None; and ours
    never waits for the GPU (torch's waits once per layer for its counts)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    torch.multiprocessing.spawn(against_torch_worker, args=(tmp_path / "store", str(tmp_path / "r")), nprocs=2)
    for rank in (0, 1):
        for case, (ours, theirs) in torch.load(tmp_path / f"r.{rank}").items():
            for k, v in theirs.items():
                torch.testing.assert_close(ours[k], v, msg=lambda m: f"{case} {k}: {m}")
                assert ours[k].dtype == v.dtype and ours[k].stride() == v.stride(), (case, k)


# ----------------------------------------------------------------------------- crops, momentum, schedules
def test_multi_crop_gives_six_crops_of_the_papers_sizes():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (300, 260, 3), np.uint8))
    views = intl.views_transform(intl.MULTI_CROP)(img)
    assert [tuple(v.shape) for v in views] == [(3, s, s) for s in (224, 224, 192, 160, 128, 96)]
    assert [tuple(v.shape) for v in intl.views_transform(intl.TWO_VIEWS)(img)] == [(3, 224, 224)] * 2
    scales = [c.scale for c in intl.MULTI_CROP]     # the paper's table, written out
    assert scales == [(0.2, 1.0), (0.2, 1.0), (0.171, 0.857), (0.143, 0.714), (0.114, 0.571), (0.086, 0.429)]


def test_momentum_schedule_and_ema():
    total, m0 = 1000, 0.996          # m rises from m0 to 1 on a cosine, not a line
    steps = [0, 250, 500, 750, 1000, *np.random.RandomState(0).randint(1, total, 6).tolist()]
    want = 1 - (1 - m0) * (np.cos(np.pi * np.array(steps, np.float64) / total) + 1) / 2
    got = [intl.momentum_at(t, total, m0) for t in steps]
    assert got == pytest.approx(want.tolist(), rel=1e-12, abs=0)
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


# ----------------------------------------------------------------------------- the wiring around the equations
def test_ema_averages_parameters_and_leaves_batchnorm_statistics_alone():
    """INTL-M's target: θ <- m θ + (1 - m) θ_online for the parameters; its BN running statistics
    are its own (from its own forwards), never averaged with the online encoder's."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5),
                           nn.BatchNorm1d(5)).double()
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p))
        online(torch.randn(8, 3, 6, 6, dtype=torch.float64))            # different running stats
        target(torch.randn(8, 3, 6, 6, dtype=torch.float64) * 3 + 1)
        online(torch.randn(8, 3, 6, 6, dtype=torch.float64))            # and batch counts
    theta_t, theta_o = [p.clone() for p in target.parameters()], [p.clone() for p in online.parameters()]
    buffers_t, buffers_o = [b.clone() for b in target.buffers()], [b.clone() for b in online.buffers()]
    assert not any(torch.equal(a, b) for a, b in zip(buffers_t, buffers_o))
    intl.update_momentum(target, online, 0.9)
    for b, before in zip(target.buffers(), buffers_t):
        assert torch.equal(b, before)
    for p, t, o in zip(target.parameters(), theta_t, theta_o):
        assert torch.allclose(p, 0.9 * t + 0.1 * o, rtol=1e-14, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), theta_o))
    assert all(torch.equal(a, b) for a, b in zip(online.buffers(), buffers_o))


def recorded_calls(module, calls):
    """Each forward of `module`: the list of views it received and its parameters at that moment."""
    def record(mod, inputs):
        calls.append((list(inputs[0]), [p.detach().clone() for p in mod.parameters()]))
    return module.register_forward_pre_hook(record)


@pytest.mark.parametrize("whiten", ["channel", "batch"])
def test_train_step_wires_views_target_and_settings(whiten):
    """One INTL-M step of train_step on three views: the EMA runs before the forward, the target
    encodes exactly views[0], the online encoder views[1:], and the loss is the INTL-M objective
    of those embeddings with the run's β, whitening and T = --iters (7 here, not IterNorm's 4)."""
    args = intl.parse_args(["--data", "fashion-mnist", "--method", "intl-m", "--batch-size", "16",
                            "--projector", "16-8", "--iters", "7", "--beta", "0.3", "--whiten", whiten])
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    online = intl.Encoder(backbone, intl.projector(4, args.projector)).double()
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():                    # a target that has drifted from the online encoder
        for p in target.parameters():
            p.add_(0.5 * torch.randn_like(p))
    state = utils.TrainState(online, target, torch.optim.SGD(online.parameters(), lr=0.1, momentum=0.9),
                             torch.amp.GradScaler("cpu", enabled=False), None, None, torch.device("cpu"))
    views = [torch.randn(16, 3, 6, 6, dtype=torch.float64) for _ in range(3)]
    m = 0.7
    ema = copy.deepcopy(target)              # the target as the step must use it: EMA first
    with torch.no_grad():
        for e, o in zip(ema.parameters(), online.parameters()):
            e.copy_(m * e + (1 - m) * o)
    reference = copy.deepcopy(online)
    target_calls, online_calls = [], []
    hooks = [recorded_calls(target, target_calls), recorded_calls(online, online_calls)]
    loss = intl.train_step(state, views, m, args)[0]
    for h in hooks:
        h.remove()
    assert len(target_calls) == 1 and len(online_calls) == 1
    seen, theta = target_calls[0]
    assert len(seen) == 1 and torch.equal(seen[0], views[0])      # the views all differ
    encoded = online_calls[0][0]
    assert len(encoded) == 2 and all(torch.equal(a, b) for a, b in zip(encoded, views[1:]))
    for p, want in zip(theta, ema.parameters()):
        assert torch.allclose(p, want, rtol=1e-14, atol=0)
    with torch.no_grad():
        z_target = ema([views[0]])[0]
    zs = reference(views[1:])
    def objective(iters):
        transform = lambda z, whiten: intl.iter_norm(z, iters, whiten)     # noqa: E731
        return intl.intl_loss(zs, z_target, 0.3, whiten, transform)[0]
    assert torch.allclose(loss, objective(7), rtol=1e-10, atol=0)
    assert not torch.allclose(loss, objective(4), rtol=1e-6, atol=0)


def test_iters_reach_iternorm():
    """--iters is the T of the transform every view goes through (IterNorm's default is 4)."""
    z = torch.randn(12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) @ \
        torch.diag(torch.linspace(0.2, 3, 10, dtype=torch.float64))
    transform = intl.whitening(intl.parse_args(["--data", "fashion-mnist", "--iters", "7"]))
    for w in ("channel", "batch"):
        assert torch.equal(transform(z, whiten=w), intl.iter_norm(z, iters=7, whiten=w))
        assert not torch.allclose(transform(z, whiten=w), intl.iter_norm(z, iters=4, whiten=w), atol=1e-6)


def test_whitened_count_decides_beta():
    """k is the global batch under channel whitening, the embedding dim under batch whitening;
    β = 0.01 (log2 k - 3), 0 without a transform, and a given --beta is kept."""
    parse = lambda *flags: intl.parse_args(["--data", "fashion-mnist", *flags])   # noqa: E731
    args = parse("--whiten", "batch", "--projector", "32-32-64", "--batch-size", "16")
    assert args.k == 64 and args.beta == pytest.approx(0.01 * (math.log2(64) - 3), rel=1e-12)
    args = parse("--whiten", "channel", "--projector", "32-32-64", "--batch-size", "32")
    assert args.k == 32 and args.beta == pytest.approx(0.01 * (math.log2(32) - 3), rel=1e-12)
    assert parse("--transform", "none", "--batch-size", "32").beta == 0
    assert parse("--beta", "0.123", "--whiten", "batch", "--projector", "8-512").beta == 0.123
    assert parse("--beta", "0.123", "--transform", "none").beta == 0.123


def test_cifar_trains_in_float32_on_a_bf16_gpu(monkeypatch, tmp_path):
    """--amp auto on a GPU with native bf16: bf16 on an image folder (and Fashion-MNIST), float32
    on CIFAR as the authors trained it, unless bf16 is asked for; checked on a CPU by letting
    torch believe in such a GPU."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    gpu = torch.device("cuda")
    dtype = lambda *argv: utils.autocast_dtype(intl.parse_args(list(argv)).amp, gpu)   # noqa: E731
    assert dtype("--data", "cifar10") is None and dtype("--data", "cifar100") is None
    assert dtype("--data", str(tmp_path)) is torch.bfloat16
    assert dtype("--data", "fashion-mnist") is torch.bfloat16
    assert dtype("--data", "cifar10", "--amp", "bf16") is torch.bfloat16


# settings derived from the data, the devices and workers a run gets, images as they decode,
# the monitor's workers and --help
TINY = ["--data", "fashion-mnist", "--subset", "32", "--arch", "resnet18", "--projector", "32-32-32",
        "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
        "--print-freq", "1"]
# 32 of the session's Fashion-MNIST images in two steps of 16 (β > 0), two 32-px crops through
# the ImageNet stem: an epoch in about two seconds on one thread of a busy 2-core CPU, where the
# 3x3 stem of --small-images takes ten times as long


def tiny_run(*argv, check=True):
    """python intl.py TINY ARGV (later flags win), in this process on one thread: the exit code,
    stdout and stderr, as in_process gives them."""
    p = in_process(lambda a: train_in_process(*a), [*TINY, *argv])
    assert p.returncode == 0 or not check, p.stderr[-3000:]
    return p


def test_the_bare_command_trains_the_papers_100_epoch_row_and_32_px_data_its_small_data_row():
    row = intl.parse_args(["--data", "/imagenet"])
    assert (row.method, row.multi_crop, row.lr, row.epochs) == ("intl-m", True, 0.5, 100)
    assert (row.batch_size, row.wd, row.target_momentum, row.warmup_epochs) == (256, 1e-5, 0.996, 2)
    assert (row.arch, row.projector) == ("resnet50", "8192-8192-8192")
    assert row.recipe == intl.MULTI_CROP
    assert [c.size for c in row.recipe] == [224, 224, 192, 160, 128, 96]
    assert row.beta == pytest.approx(0.05) and row.amp == "auto" and not row.decay_all  # k = 256
    for data in ["fashion-mnist", "cifar10"]:
        small = intl.parse_args(["--data", data])
        assert (small.method, small.multi_crop, small.lr) == ("intl", False, 0.3)
        assert [c.size for c in small.recipe] == [32, 32]
    cifar, fmnist = intl.parse_args(["--data", "cifar10"]), intl.parse_args(["--data", "fashion-mnist"])
    assert (cifar.wd, cifar.target_momentum, cifar.amp) == (1e-4, 0.999, "off")
    assert cifar.decay_all and cifar.small_images            # every parameter decays; the 3x3 stem
    assert [c.mean for c in cifar.recipe] == [(0.4914, 0.4822, 0.4465)] * 2   # CIFAR-10's own
    assert (fmnist.wd, fmnist.amp, fmnist.decay_all) == (1e-5, "auto", False)
    assert fmnist.recipe == intl.TWO_VIEWS_32PX
    assert intl.parse_args(["--data", "/imagenet", "--no-multi-crop"]).recipe == intl.TWO_VIEWS


def test_workers_default_shares_the_nodes_cores_among_its_processes(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    for n in [1, 2, 3, cores, 4 * cores]:       # torchrun sets LOCAL_WORLD_SIZE: processes on this node
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(n))
        share = max(1, min(8, cores // n))
        assert utils.default_workers() == share
        assert intl.parse_args(["--data", "fashion-mnist"]).workers == share


def test_more_processes_than_visible_gpus_is_one_line_naming_both_counts(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    one_line_exit(lambda: utils.cuda_device(local_rank=3, visible=2),
                  "4 processes on this node but 2 GPU(s) visible", "--nproc_per_node to at most 2")
    assert utils.cuda_device(local_rank=1, visible=2) == torch.device("cuda", 1)


def test_auto_autocast_asks_for_native_bf16_and_cifar_trains_in_float32(monkeypatch):
    cuda = torch.device("cuda")
    # a GPU that emulates bf16 (before Ampere): supported only when emulation counts
    emulated, native = (lambda including_emulation=True: including_emulation), (lambda **_: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated)
    assert utils.autocast_dtype("auto", cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native)
    assert utils.autocast_dtype("auto", cuda) is torch.bfloat16
    assert utils.autocast_dtype("auto", torch.device("cpu")) is None
    for data, dtype in [("cifar10", None), ("cifar100", None), ("fashion-mnist", torch.bfloat16)]:
        assert utils.autocast_dtype(intl.parse_args(["--data", data]).amp, cuda) is dtype, data
    asked = intl.parse_args(["--data", "cifar10", "--amp", "bf16"]).amp     # asked for: given
    assert utils.autocast_dtype(asked, cuda) is torch.bfloat16


def test_settings_that_do_not_fit_are_refused_or_warned_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)        # no ./fmnist here, and ./data holds an empty CIFAR-10 folder
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    refused = [(["--power", "0.3"], "--power applies to --transform power, not iternorm"),
               (["--method", "intl", "--target-momentum", "0.99"], "--target-momentum is",
                "--method intl-m"),
               (["--multi-crop"], "--multi-crop is the 224-px recipe", "fashion-mnist"),
               (["--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs 2 is not below --epochs 2"),
               (["--max-bad-files", "-1"], "--max-bad-files must be in [0, 1], not -1.0"),
               (["--max-bad-files", "5"], "--max-bad-files must be in [0, 1], not 5.0"),
               (["--save-every-minutes", "-1"], "--save-every-minutes must be 0 or more"),
               (["--data", "fmnist"], "did you mean --data fashion-mnist?"),
               (["--data", "cifar10"], "data/cifar-10-batches-py has no data_batch_1",
                "remove the folder so that cifar10 downloads again")]
    for extra, *words in refused:
        p = tiny_run(*extra, "--output-dir", "out", check=False)
        assert_one_line_error(p, *words)
        assert p.returncode == 1 and not os.path.exists("out"), extra
    warned = [(["--batch-size", "4"], "k = 4 whitened variables is negative", "use k >= 8"),
              (["--iters", "20"], "--iters 20: past about 12 Newton iterations")]
    for extra, *words in warned:
        p = in_process(intl.parse_args, [*TINY, *extra])
        lines = p.stderr.splitlines()
        assert p.returncode == 0 and len(lines) == 1 and lines[0].startswith("warning: "), p.stderr
        assert all(w in lines[0] for w in words), lines[0]
    # a run that diverges stops with a line that names the likely cause: --iters past 8, else --lr
    diverged = torch.tensor([3.0, 3.0, 3.0])       # 3 non-finite losses in a row
    for extra, cause in [(["--iters", "20"], "lower --iters (20: float32 overflows"),
                         ([], "lower --lr")]:
        args = intl.parse_args([*TINY, *extra])
        p = in_process(lambda _: utils.check_nonfinite(diverged, 3, 9, 0.1, 0, args.nonfinite_hint), [])
        assert_one_line_error(p, "not finite for 3 steps in a row, by step 9", cause)
        assert ("--lr" in p.stderr) == (not extra), p.stderr


def test_a_run_that_fails_to_start_leaves_no_folder_it_created(tmp_path):
    out = tmp_path / "runs" / "out"
    p = tiny_run("--resume", tmp_path / "missing.pth", "--output-dir", out, check=False)
    assert_one_line_error(p, f"--resume {tmp_path / 'missing.pth'}: no such file")
    assert not out.exists()


def test_mode_i_images_of_8_bit_levels_keep_them_and_16_bit_pngs_are_scaled(tmp_path):
    levels = np.arange(32 * 48, dtype=np.int32).reshape(32, 48) % 256
    Image.fromarray(levels).save(tmp_path / "levels.tif")          # a 32-bit greyscale TIFF
    assert Image.open(tmp_path / "levels.tif").mode == "I"
    rgb = np.asarray(utils.load_rgb(str(tmp_path / "levels.tif")))
    assert rgb.shape == (32, 48, 3) and all(np.array_equal(rgb[..., c], levels) for c in range(3))
    for top in [65535, 255]:       # a 16-bit PNG, also a dark one: each level / 256
        grey = np.linspace(0, top, 32 * 48).astype(np.uint16).reshape(32, 48)
        Image.fromarray(grey).save(tmp_path / "grey16.png")
        rgb = np.asarray(utils.load_rgb(str(tmp_path / "grey16.png")))
        assert all(np.array_equal(rgb[..., c], grey // 256) for c in range(3)), top


def test_tests_not_marked_gpu_see_no_gpu_nor_do_their_subprocesses():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    code = "import os, torch; print(repr(os.environ['CUDA_VISIBLE_DEVICES']), torch.cuda.device_count())"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.stdout.split() == ["''", "0"], p.stderr[-3000:]


class ReadersRecorded(torch.utils.data.Dataset):
    """Labelled tensors; each read appends the id of the process that reads it to a file."""

    def __init__(self, x, y, log):
        self.x, self.y, self.log = x, y, log

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.x[i], int(self.y[i])


def test_the_monitor_extracts_features_with_the_runs_workers(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 3, 8, 8, generator=g) + y[:, None, None, None]      # classes apart
    pair = lambda log: (ReadersRecorded(x[:40], y[:40], log),       # noqa: E731
                        ReadersRecorded(x[40:], y[40:], log))
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    alone = on_one_thread(lambda _: utils.monitor(backbone, pair(tmp_path / "alone"),
                                                  torch.device("cpu"), workers=0))
    args = intl.parse_args([*TINY, "--workers", "2", "--monitor-every", "1"])
    embedding = torch.randn(16, 32, generator=g)
    state = utils.TrainState(nn.ModuleDict({"backbone": backbone}))      # what holds the backbone
    rec = on_one_thread(lambda _: intl.epoch_record(embedding, pair(tmp_path / "run"), 1, args, state))
    assert (rec["knn5_top1"], rec["linear_top1"]) == (alone["knn5_top1"], alone["linear_top1"])
    readers = lambda log: set(open(log).read().split())     # noqa: E731
    assert readers(tmp_path / "alone") == {str(os.getpid())}
    assert readers(tmp_path / "run") and str(os.getpid()) not in readers(tmp_path / "run")


def flag_helps(printed):
    """{first long flag: its help} of each entry of a --help output (the lines after 'options:'
    that start with '  -', and the indented lines below them)."""
    entries, flag = {}, None
    for line in printed.split("options:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            invocation, _, text = line.strip().partition("  ")
            flag = re.findall(r"(?<![\w-])--[a-z][\w-]*", invocation)[0]
            entries[flag] = text.strip()
        elif line.strip():
            entries[flag] += " " + line.strip()
    return {k: v.strip() for k, v in entries.items()}


def test_intl_help_names_the_quick_start_and_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        intl.parse_args(["--help"])
    printed = capsys.readouterr().out
    assert e.value.code == 0
    assert "`python intl.py` alone is the quick start" in " ".join(printed.split())
    helps = flag_helps(printed)
    usage = printed.split("options:")[0]
    assert len(helps) == 1 + usage.count("[--") + 1       # -h, the optional [--flags], --data
    assert all(helps.values()), [flag for flag, text in helps.items() if not text]
    assert "(default: None)" not in printed and "(default: False)" not in printed
    assert "{default,reduce-overhead,max-autotune}" in printed
    assert helps["--compile"].endswith("(the last two also use CUDA graphs)")


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
               "texture 40x56": lambda: textures(6, 40, 56, 5, seed=1),
               # only levels 0 and 255: the largest sums, where an int32 could overflow
               "black and white 9x7": lambda: 255 * (textures(6, 9, 7, 1) > 127).byte(),
               "photo-like 30x1": lambda: synthetic_images(6, 30, 1, seed=3)}


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


class OutputDtypes(TorchDispatchMode):
    """Records the dtype of every tensor that every torch op outputs while it is active."""
    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.dtypes |= {t.dtype for t in tree_flatten(out)[0] if torch.is_tensor(t)}
        return out


def test_gpu_aug_blur_computes_no_float64():
    """The blur runs in int32 (fast on GPUs whose float64 is slow), float32 only at its ends."""
    x, sigma = synthetic_images(4, 20, 24).float() / 255, torch.tensor([0.1, 0.7, 1.3, 2.0])
    with OutputDtypes() as seen:
        gpu_aug.gaussian_blur(x, sigma)
    assert torch.float64 not in seen.dtypes and {torch.int32, torch.float32} <= seen.dtypes, seen.dtypes


# ----------------------------------------------------------------------------- data: CIFAR and Fashion-MNIST
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
    fake_cifar(str(tmp_path / "data"), "cifar10")        # 40 training images: 2 batches of 16
    p = subprocess.run([sys.executable, os.path.join(HERE, "intl.py"), "--data", "cifar10", "--arch", "resnet18",
                        "--projector", "32-32", "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0",
                        "--output-dir", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "INTL resnet18 (small images)" in p.stdout and "autocast off" in p.stdout
    assert "ep 1/1 step 2/2" in p.stdout
    assert "suggested max number of worker" not in p.stderr
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth")
    assert ckpt["model"]["backbone.conv1.weight"].shape[-1] == 3
    groups = ckpt["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == 1e-4 and len(groups[0]["params"]) == len(ckpt["model"]) - sum(
        "running" in k or "num_batches" in k for k in ckpt["model"])        # every parameter decays
    assert ckpt["args"]["workers"] == min(8, utils.CPU_CORES) and ckpt["args"]["lr"] == 0.3
    recipe = ckpt["args"]["recipe"]                     # stored plain: dicts and lists
    assert [c["mean"] for c in recipe] == [[0.4914, 0.4822, 0.4465]] * 2
    assert [c["std"] for c in recipe] == [[0.2470, 0.2435, 0.2616]] * 2
    assert [c["size"] for c in recipe] == [32, 32] and [c["p_solarize"] for c in recipe] == [0.0, 0.2]


def test_bad_data_fails_before_the_model_is_built(monkeypatch):
    def build_state(*a):
        raise AssertionError("the model was built before --data was checked")
    monkeypatch.setattr(intl, "build_state", build_state)
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


# Fashion-MNIST
def test_fashion_mnist_files_are_read_as_written(fashion_mnist_files):
    """The IDX reader gives back what was written, pixel for pixel; the 28-px images come padded
    to 32 with black. Where REAL_FASHION_MNIST_DIR names the real files (CI installs the Debian
    package dataset-fashion-mnist), they are read too: 60000 + 10000 images of real clothing."""
    images, labels = utils.load_fashion_mnist(train=True)
    want_images, want_labels = clothes(600, 0)
    assert images.dtype == np.uint8 and np.array_equal(images, want_images)
    assert np.array_equal(labels, want_labels)
    x, y = utils.ArrayImages(images, labels, torchvision.transforms.ToTensor())[0]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and y == labels[0]
    assert torch.equal((x[0, 2:30, 2:30] * 255).round().byte(), torch.from_numpy(images[0]))
    assert x[:, :2].sum() == 0
    real = os.environ.get("REAL_FASHION_MNIST_DIR")
    if real:
        train = utils.read_idx(os.path.join(real, "train-images-idx3-ubyte.gz"))
        train_labels = utils.read_idx(os.path.join(real, "train-labels-idx1-ubyte.gz"))
        test = utils.read_idx(os.path.join(real, "t10k-images-idx3-ubyte.gz"))
        assert train.shape == (60000, 28, 28) and test.shape == (10000, 28, 28)
        assert np.bincount(train_labels).tolist() == [6000] * 10
        assert 60 < train.mean() < 90                     # real clothing, not zeros or noise


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


SMALL = ["--arch", "resnet18", "--projector", "32-32-32", "--workers", "0", "--print-freq", "1",
         "--method", "intl", "--no-multi-crop", "--warmup-epochs", "0"]


def test_end_to_end_two_epochs_of_intl_m(tmp_path):
    out = tmp_path / "out"          # 2 batches of 16 32-px images an epoch, through the ImageNet stem
    p = run_intl("--data", "fashion-mnist", "--subset", "32", *SMALL, "--batch-size", "16",
                 "--epochs", "2", "--method", "intl-m", "--output-dir", out)
    assert "spectrum" in p.stdout and "img/s" in p.stdout and p.stderr == ""
    ckpt = torch.load(out / "checkpoint.pth")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4 and ckpt["target"] is not None
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(out / "backbone.pth"), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert sorted(os.listdir(out)) == ["args.json", "backbone.pth", "checkpoint.pth", "done", "log.jsonl",
                                       "log.txt", "run.lock", "spectrum.jsonl"]
    assert json.load(open(out / "done"))["epochs"] == 2       # the whole schedule: the run is done
    assert json.load(open(out / "args.json"))["batch_size"] == 16 and "ep 2/2 step 2/2" in open(out / "log.txt").read()
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    steps = [r for r in log if "loss" in r]
    epochs = [r for r in log if "transformed" in r]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    assert [r["epoch"] for r in epochs] == [1, 2] and epochs[0]["projector"]["erank"] > 1


def test_resume_is_bit_identical_to_a_straight_run(tmp_path):
    args = ["--data", "fashion-mnist", "--subset", "16", *SMALL, "--batch-size", "16", "--epochs",
            "2", "--method", "intl-m", "--warmup-epochs", "1"]      # a step of 16 an epoch
    run_intl(*args, "--output-dir", tmp_path / "straight")
    run_intl(*args, "--output-dir", tmp_path / "split", "--stop-epoch", "1")
    assert torch.load(tmp_path / "split" / "checkpoint.pth")["epoch"] == 1
    p = run_intl(*args, "--output-dir", tmp_path / "split")
    assert "resumed" in p.stdout
    a = torch.load(tmp_path / "straight" / "checkpoint.pth")
    b = torch.load(tmp_path / "split" / "checkpoint.pth")
    assert a["step"] == b["step"] == 2
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
    data = image_folder(str(tmp_path / "data"), n_per_class=8)      # 16 images: a batch of 16
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    assert_one_line_error(run_intl("--data", data, "--batch-size", "17", env=env, check=False),
                          "--batch-size 17", "world size 2")
    assert_one_line_error(run_intl("--data", data, "--arch", "resnet7", "--batch-size", "16", check=False), "resnet7")
    assert_one_line_error(run_intl("--data", data, "--epochs", "x", check=False), "--epochs")
    # a folder given for a file, and one empty class folder, say so
    assert_one_line_error(run_intl("--data", data, *SMALL, "--batch-size", "16", "--resume", tmp_path,
                                   "--output-dir", tmp_path / "out", check=False),
                          f"--resume {tmp_path} is a directory, not a checkpoint file")
    assert_one_line_error(run_eval(["--data", data, "--pretrained", tmp_path]),
                          f"--pretrained {tmp_path}: is a directory, not a checkpoint file")
    os.makedirs(os.path.join(data, "train", "class2"))
    assert_one_line_error(run_intl("--data", data, *SMALL, check=False),
                          f"{os.path.join(data, 'train', 'class2')} holds no images", "2 of 3 class folders do")


def test_ctrl_c_is_one_line_before_a_run_has_set_up_its_handlers_and_after(folder, tmp_path, monkeypatch):
    """A KeyboardInterrupt before the stop signals are handled (loading the data, say) ends the
    script in one line; a real SIGINT during an evaluation's feature pass ends it within the batch,
    in one line, with exit code 130."""
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        utils.exit_on_ctrl_c(interrupted)
    assert e.value.code == "stopped by Ctrl-C before the run had started: nothing to save"
    real = utils.features

    def signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    monkeypatch.setattr(eval_linear, "features", signalled)
    p = run_eval(common(folder, tmp_path / "knn", "--knn"))
    assert p.returncode == 130 and p.stderr.strip().splitlines() == [
        "stopped by SIGINT during the train features: nothing is saved (they are computed again): run the "
        "same command to start again"], p.stderr


def test_bad_checkpoints_never_overwrite_a_good_one(tmp_path):
    data = image_folder(str(tmp_path / "data"), n_per_class=8)
    out = tmp_path / "out"
    args = ["--data", data, *SMALL, "--small-images", "--batch-size", "16", "--epochs", "2"]
    run_intl(*args, "--stop-epoch", "1", "--output-dir", out)
    good = sha(out / "checkpoint.pth")
    bad = tmp_path / "truncated.pth"
    bad.write_bytes((out / "checkpoint.pth").read_bytes()[:5000])
    p = run_intl(*args, "--output-dir", out, "--resume", bad, check=False)
    assert_one_line_error(p, "truncated.pth")
    p = run_intl(*args, "--output-dir", out, "--resume", tmp_path / "missing.pth", check=False)
    assert_one_line_error(p, "missing.pth")
    other = ["--data", data, *SMALL, "--arch", "resnet34", "--small-images", "--batch-size", "16"]
    p = run_intl(*other, "--epochs", "2", "--output-dir", out, check=False)
    assert_one_line_error(p, "does not match")
    assert sha(out / "checkpoint.pth") == good
    assert json.load(open(out / "args.json"))["arch"] == "resnet18"       # the refused run's not written


# ----------------------------------------------------------------------------- resuming: only the run that made it
def resume_args(data, *extra):
    """31 32-px Fashion-MNIST images (through the ImageNet stem: fast), batch 16: one step per
    epoch on one process and on two (31 // 16, and 15 // 8 a rank). `data`: unused, the folder
    other checks of these tests read."""
    return ["--data", "fashion-mnist", "--subset", "31", "--arch", "resnet18", "--projector", "64-64",
            "--workers", "0", "--print-freq", "1", "--batch-size", "16", "--epochs", "2",
            "--warmup-epochs", "0", *map(str, extra)]


@pytest.fixture(scope="module")
def paused_run(tmp_path_factory):
    """A real one-process INTL checkpoint after epoch 1 of 2 (31 images), and its data folder."""
    root = tmp_path_factory.mktemp("paused")
    data = image_folder(str(root / "data"), n_per_class=16, size=32)
    os.remove(os.path.join(data, "train", "class1", "img15.jpg"))
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
    one_line_exit(lambda: train_in_process(*resume_args(data, "--output-dir", out, "--batch-size", "8", "--lr", "0.1")),
                  "batch-size 16 -> 8, lr 0.3 -> 0.1", "steps-per-epoch 1 -> 3", "--allow-changed-args")
    assert sha(out / "checkpoint.pth") == good
    # asked: the step moves to the same point of the schedule (epoch 1 of 2 = step 3 of 6), not 1 of 6
    train_in_process(*resume_args(data, "--output-dir", out, "--batch-size", "8", "--allow-changed-args"))
    assert "continuing after epoch 1 at step 3 (step 1 in the file)" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["step"]) == (2, 6)
    lrs = [r["lr"] for r in read_log(out) if "lr" in r]
    assert lrs[-3:] == [intl.learning_rate(s, 6, 0, 0.3 * 8 / 256) for s in (3, 4, 5)]
    # finished: said, nothing trained, nothing written; settings that do not change the maths pass
    good = sha(out / "checkpoint.pth")
    train_in_process(*resume_args(data, "--output-dir", out, "--batch-size", "8", "--print-freq", "5", "--seed", "3"))
    assert f"nothing to train: {out} is at epoch 2 of 2" in capsys.readouterr().out
    assert sha(out / "checkpoint.pth") == good
    one_line_exit(lambda: train_in_process(*resume_args(data, "--output-dir", out, "--batch-size", "8",
                                                        "--epochs", "3")), "epochs 2 -> 3")


def test_resuming_on_more_processes_gives_each_rank_its_own_stream(paused_run, tmp_path):
    data, _ = paused_run
    out = copy_checkpoint(paused_run, tmp_path / "out")
    p = two_ranks([(lambda a: train_in_process(*a), resume_args(data, "--output-dir", out))], tmp_path / "r")[0][0]
    assert p["code"] == 0, p["err"][-3000:]
    assert "resumed from" in p["out"] and "2 process(es)" in p["out"]
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

    def node(argv):         # in its node's folder; the weights it ends with, to compare
        rank = os.environ["RANK"]
        os.chdir(tmp_path / f"node{rank}")
        backbone = intl.train(intl.parse_args(argv))
        torch.save(dict(backbone.named_parameters()), tmp_path / f"node{rank}" / f"weights.rank{rank}.pth")
    p = two_ranks([(node, resume_args(data, "--output-dir", "out"))], tmp_path / "r")[0][0]
    assert p["code"] == 0, p["err"][-3000:]
    assert "resumed from out/checkpoint.pth at epoch 1" in p["out"]
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
                        f"it holds the linear protocol of the backbone with sha256 {sha(backbone_pth)[:12]}",
                        f"this run: the linear protocol of the backbone with sha256 {sha(other)[:12]}", "--restart")
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
           (["--target-momentum", "1.5"], "--target-momentum must be in [0, 1]")]
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
                  "it holds INTL resnet18 --projector 64-64; this run: INTL-M resnet18")
    one_line_exit(lambda: train_in_process(*resume_args(data, "--output-dir", out, "--projector", "32-64")),
                  "--projector 64-64; this run: INTL resnet18 --projector 32-64")
    torch.save(resnet_backbone("resnet18", True)[0].state_dict(), tmp_path / "backbone.pth")
    one_line_exit(lambda: train_in_process(*resume_args(data, "--output-dir", out, "--resume", tmp_path / "backbone.pth")),
                  "holds a bare backbone", "not a run's checkpoint.pth")
    one_line_exit(lambda: on_one_thread(eval_linear.main, *common(folder, tmp_path / "e", "--resume", ckpt_path)),
                  "it holds INTL resnet18 --projector 64-64; this run: the linear protocol of a random resnet18")
    # --amp off -> fp16 is a valid switch: a fresh GradScaler, which then steps the resumed SGD
    # (fp16 is refused on a CPU: the state is built as a GPU builds it, its GradScaler enabled)
    args = intl.parse_args(resume_args(data, "--output-dir", out))
    state = intl.build_state(args, torch.device("cpu"), 1)
    state.scaler, args.amp = torch.amp.GradScaler("cpu"), "fp16"
    assert resume_into(state, args, ckpt_path) == (1, 1)
    online, optimizer, scaler = state.model, state.optimizer, state.scaler
    assert scaler.is_enabled() and scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    before = online.projector[0].weight.detach().clone()
    scaler.scale(online.projector(torch.randn(4, 512)).pow(2).sum()).backward()
    for g in optimizer.param_groups:    # as the loop sets it each step (a resume keeps this run's)
        g["lr"] = 0.1
    scaler.step(optimizer)
    assert not torch.equal(before, online.projector[0].weight)


def resume_into(state, args, path, steps_per_epoch=1):
    """Checkpoints.load of PATH into STATE, as intl.train resumes a run of ARGS: (epoch, step)."""
    settings = {**utils.plain(vars(args)), "steps_per_epoch": steps_per_epoch}
    ckpt = utils.Checkpoints(args.output_dir, state, settings, intl.FREE_ON_RESUME, intl.network, intl.exports,
                             0, 1, None, state.device)
    return ckpt.load(str(path))


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
    data = image_folder(str(tmp_path / "data"), n_per_class=6, size=32)
    bad = add_unreadable_files(os.path.join(data, "train", "class1"))   # 4 of 16 files: one batch
    out = tmp_path / "out"
    # 4 of 16 in each epoch, under 0.3 of an epoch's images; 8 in two, over 0.3 of one epoch's
    p = run_intl("--data", data, *SMALL, "--small-images", "--batch-size", "16", "--epochs", "2",
                 "--max-bad-files", "0.3", "--output-dir", out)
    assert len(p.stderr.splitlines()) == 4                              # a line for each, nothing else
    for path, why in zip(bad, ["0 bytes", "truncated", "not an image", "decompression bomb"]):
        lines = [line for line in p.stderr.splitlines() if path in line]
        assert len(lines) == 1 and why in lines[0], p.stderr
    assert p.stdout.count("4 unreadable images replaced") == 2
    assert [r["unreadable"] for r in read_log(out) if "unreadable" in r] == [4, 4]      # per epoch
    assert torch.load(out / "checkpoint.pth")["step"] == 2
    # --gpu-aug (load_capped, in a data worker) with the default limit, 1 %: a one-line stop
    p = run_intl("--data", data, *SMALL, "--small-images", "--batch-size", "16", "--epochs", "1",
                 "--gpu-aug", "--workers", "1", "--output-dir", tmp_path / "gpu", check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert last.startswith("error: ") and "of 16 images unreadable" in last and "--max-bad-files 0.01" in last


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
    data = image_folder(str(tmp_path / "data"), n_per_class=16, size=32)   # 2 steps of 16
    args = ["--data", data, *SMALL, "--small-images", "--batch-size", "16", "--epochs", "1"]
    on_one_thread(lambda a: run_intl(*a), *args, "--output-dir", tmp_path / "straight")   # as the child
    out = tmp_path / "killed"
    p = run_in_child([*args, "--output-dir", out, "--save-every-minutes", "1e-6"], tmp_path / "killed.txt")
    while not (out / "checkpoint.pth").exists() and p.is_alive():
        time.sleep(0.01)
    p.kill()
    p.join()
    ckpt = torch.load(out / "checkpoint.pth")
    assert ckpt["epoch"] == 0 and ckpt["step"] == 1                       # mid-epoch
    (out / "checkpoint.pth.tmp4242").write_bytes(b"half a checkpoint")    # a kill during a save
    with open(out / "log.jsonl", "a") as f:     # a record after the checkpoint, one cut by the kill
        f.write(json.dumps({"epoch": 0, "step": 2, "loss": 9.9}) + "\n" + '{"epoch": 0, "st')
    p = on_one_thread(lambda a: run_intl(*a), *args, "--output-dir", out)
    assert f"resumed from {out / 'checkpoint.pth'} at epoch 0, step {ckpt['step']}" in p.stdout
    assert sorted(os.listdir(out)) == ["args.json", "backbone.pth", "checkpoint.pth", "done", "log.jsonl",
                                       "log.txt", "run.lock", "spectrum.jsonl"]
    a = torch.load(tmp_path / "straight" / "checkpoint.pth")
    b = torch.load(out / "checkpoint.pth")
    assert a["step"] == b["step"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    steps = lambda d: [(r["step"], "loss" in r) for r in read_log(d)]     # noqa: E731
    assert steps(out) == steps(tmp_path / "straight") == [(1, True), (2, True), (2, False)]
    assert [r["epoch"] for r in read_log(out, "spectrum.jsonl")] == [1]


@pytest.mark.parametrize("fused", [False, True])    # fused: skipped on the device, as on GPUs
def test_a_non_finite_loss_skips_its_update_and_k_in_a_row_stop_the_run(fused, capsys):
    args = intl.parse_args(["--data", "fashion-mnist", "--batch-size", "16"])      # INTL, beta 0.01
    online = tiny_bn_encoder()
    optimizer = torch.optim.SGD(intl.param_groups(online, 1e-4), lr=0.1, momentum=0.9, fused=fused)
    utils.zero_momentum(optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = utils.TrainState(online, None, optimizer, scaler, device=torch.device("cpu"))
    views = [torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(v)) for v in range(2)]
    counts = torch.zeros(3)
    for poison in [True, True, False, True]:
        before = [p.detach().clone() for p in online.parameters()]
        stats = bn_statistics(online)
        momentum = [b.clone() for b in optimizer.state_dict()["state"][0].values()]
        x = [v.clone() for v in views]
        if poison:
            x[1][0, 0, 0, 0] = float("nan")
        loss = intl.train_step(state, x, 0.99, args)[0]
        utils.count_nonfinite(counts, loss)
        changed = any(not torch.equal(a, p) for a, p in zip(before, online.parameters()))
        assert changed != poison and torch.isfinite(loss) != poison
        assert all(torch.equal(v, stats[k]) for k, v in bn_statistics(online).items()) == poison
        assert torch.equal(momentum[0], optimizer.state_dict()["state"][0]["momentum_buffer"]) == poison
    assert counts.tolist() == [3, 1, 2]                # skipped, current run, longest run
    utils.check_nonfinite(counts, 3, 4, 0.1, rank=0)   # no run of 3: goes on
    one_line_exit(lambda: utils.check_nonfinite(counts, 2, 4, 0.1, rank=0), "2 steps in a row, by step 4 (lr 0.1)")


def test_divergence_stops_in_one_line_and_never_saves_non_finite_weights(tmp_path):
    """--lr 1e9: the weights blow up within a few steps; the run stops in one line naming the
    step and the lr, and the checkpoint keeps the last finite weights."""
    data = image_folder(str(tmp_path / "data"), n_per_class=32, size=32)       # 4 steps of 16
    out = tmp_path / "out"
    p = run_intl("--data", data, *SMALL, "--small-images", "--batch-size", "16", "--epochs", "1", "--lr", "1e9",
                 "--warmup-epochs", "0", "--save-every-minutes", "1e-6", "--output-dir", out, check=False, alone=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    step = int(re.search(r"step (\d+) \(lr [0-9.e+]+\)", p.stderr).group(1))
    ckpt = torch.load(out / "checkpoint.pth")
    assert "not finite" in p.stderr and 1 <= ckpt["step"] < step
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


@contextlib.contextmanager
def file_size_limit(limit):
    """The real fault, in this process: a write past `limit` bytes of a file fails (EFBIG), as one
    on a full disk does (ENOSPC). RLIMIT_FSIZE, with SIGXFSZ ignored so that the write fails, not
    the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def pad_to(path, size, line):
    """PATH grows to `size` bytes with copies of a whole line (a long run's log)."""
    with open(path, "a") as f:
        f.write(line * ((size - os.path.getsize(path)) // len(line)))


def full_disk_at(path, limit, run, saved, words):
    """`run` under a file-size limit stops in one line (WORDS), with no partial file or line: the
    files it had written stay as they were, and so do the checkpoint and the other `saved` files."""
    before = {f: sha(f) for f in saved if f.exists()}
    logs = {f: f.read_bytes() for f in path.parent.glob("*.jsonl")}
    with file_size_limit(limit):
        p = run()
    assert_one_line_error(p, f"{path}: the disk is full", *words)
    assert {f: sha(f) for f in saved if f.exists()} == before
    assert not list(path.parent.glob("*.tmp*"))
    for f, data in logs.items():            # each log as it was, but for whole lines added
        assert f.read_bytes().startswith(data) and f.read_bytes().endswith(b"\n"), f
    assert (path.parent / "log.txt").read_bytes().endswith(b"\n")
    return p


def test_a_full_disk_at_each_kind_of_training_write_stops_in_one_line_and_loses_nothing(tmp_path):
    """intl.py resumed at epoch 1 of 2, the disk full at a progress line (log.txt), at log.jsonl,
    at the epoch's backbone.pth and at its checkpoint.pth: each time one line, nothing partial,
    the epoch-1 checkpoint kept; a last rerun ends the run, each step's record logged once."""
    out = tmp_path / "out"
    tiny_run("--epochs", "2", "--stop-epoch", "1", "--output-dir", out)
    run = lambda: tiny_run("--epochs", "2", "--output-dir", out, check=False)      # noqa: E731
    saved, log = [out / "checkpoint.pth", out / "backbone.pth"], (out / "log.jsonl").read_text()
    pad_to(out / "log.txt", 2**20 - 40, "an earlier line of the console\n")
    full_disk_at(out / "log.txt", 2**20, run, saved, ["free space and run the same command"])
    (out / "log.txt").write_text("")
    (out / "log.jsonl").write_text(log)     # as the rerun leaves it: up to the checkpoint's step
    pad_to(out / "log.jsonl", 2**20 - 20, json.dumps({"epoch": 0, "step": 1, "note": "x" * 200}) + "\n")
    full_disk_at(out / "log.jsonl", 2**20, run, saved, ["free space and run the same command"])
    (out / "log.jsonl").write_text(log)
    backbone, checkpoint = os.path.getsize(out / "backbone.pth"), os.path.getsize(out / "checkpoint.pth")
    full_disk_at(out / "backbone.pth", backbone // 2, run, saved, ["the previous one is intact"])
    (out / "log.jsonl").write_text(log)
    full_disk_at(out / "checkpoint.pth", (backbone + checkpoint) // 2, run, saved[:1], ["the previous one is intact"])
    assert torch.load(out / "checkpoint.pth")["epoch"] == 1 and not (out / "done").exists()
    assert run().returncode == 0 and (out / "done").exists()
    assert [(r["step"], "loss" in r) for r in read_log(out)] == [(1, True), (2, True), (2, False), (3, True),
                                                                 (4, True), (4, False)]


def test_a_full_disk_at_each_kind_of_evaluation_write_stops_in_one_line_and_loses_nothing(
        folder, backbone_pth, tmp_path):
    """eval_linear.py's linear protocol, the disk full at best.pth and at checkpoint.pth (of the
    first epoch), at a progress line and at log.jsonl (resumed at epoch 1 of 2): one line, nothing
    partial, each record once when it has run to its end."""
    args = lambda out, *extra: common(folder, out, "--pretrained", backbone_pth, "--epochs", "2",     # noqa: E731
                                      "--print-freq", "1", *extra)
    out = tmp_path / "out"
    assert run_eval(args(out, "--stop-epoch", "1")).returncode == 0
    best, checkpoint = os.path.getsize(out / "best.pth"), os.path.getsize(out / "checkpoint.pth")
    assert checkpoint > best + 4096     # the classifier's momentum, the random streams
    fresh = tmp_path / "fresh"
    full_disk_at(fresh / "best.pth", best // 2, lambda: run_eval(args(fresh)), [], ["nothing was saved"])
    assert not (fresh / "checkpoint.pth").exists()
    fresh = tmp_path / "fresh-2"
    full_disk_at(fresh / "checkpoint.pth", best + 2048, lambda: run_eval(args(fresh)), [], ["nothing was saved"])
    assert (fresh / "best.pth").exists()
    saved, log = [out / "checkpoint.pth", out / "best.pth"], (out / "log.jsonl").read_text()
    pad_to(out / "log.txt", 2**20 - 40, "an earlier line of the console\n")
    full_disk_at(out / "log.txt", 2**20, lambda: run_eval(args(out)), saved, ["free space and run the same command"])
    (out / "log.txt").write_text("")
    (out / "log.jsonl").write_text(log)
    pad_to(out / "log.jsonl", 2**20 - 20, json.dumps({"epoch": 0, "step": 1, "note": "x" * 200}) + "\n")
    full_disk_at(out / "log.jsonl", 2**20, lambda: run_eval(args(out)), saved, ["free space and run the same command"])
    (out / "log.jsonl").write_text(log)
    assert run_eval(args(out)).returncode == 0
    assert [(r["epoch"], r["step"], "acc1" in r) for r in read_log(out)] == [
        (0, 1, False), (0, 2, False), (0, 3, False), (1, 3, True), (1, 4, False), (1, 5, False), (1, 6, False),
        (2, 6, True)]


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
    argv = ["--data", "fashion-mnist", "--subset", "32", *SMALL, "--batch-size", "16", "--epochs", "2"]

    def torchrun(out, *extra):      # 2 steps of 16 32-px images per epoch (the ImageNet stem: fast)
        cmd = [*TORCHRUN, "--nproc_per_node=2", *extra, os.path.join(HERE, "intl.py"), *argv,
               "--output-dir", str(out)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    straight = two_ranks([(lambda a: train_in_process(*a), [*argv, "--output-dir", tmp_path / "straight"])],
                         tmp_path / "r")           # (forked as torchrun starts them: the same two ranks)
    assert straight[0][0]["code"] == 0, straight[0][0]["err"][-3000:]
    p = torchrun(tmp_path / "restarted", "--max-restarts", "1")        # --standalone: c10d on a free port
    lines = []
    for line in p.stdout:               # rank 0 has caught the signals once it prints this
        lines.append(line)
        if re.match(r"\d\d:\d\d:\d\d INTL:", line):          # after the time of day
            os.kill(worker_pids(p.pid)[1], signal.SIGTERM)
            break
    out = "".join(lines) + p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    stop = re.search(r"stopped by a signal to another rank after step (\d+)", out)
    assert stop and out.count("stopped by") == 1, out[-3000:]
    assert f"at epoch 0, step {stop.group(1)}" in out                      # resumed mid-epoch
    a = torch.load(tmp_path / "straight" / "checkpoint.pth")
    b = torch.load(tmp_path / "restarted" / "checkpoint.pth")
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def rank_worker(rank, ports, scenarios, log, recorded):
    """Rank RANK of two processes forked from this one, as torchrun starts them: each scenario's run
    in turn; (exit code, stderr, seconds) of each, and what `recorded` holds then, to LOG.RANK."""
    torch.set_num_threads(1)
    results = []
    for port, (main, argv) in zip(ports, scenarios):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        start = time.time()
        p = in_process(main, argv)
        results.append({"code": p.returncode, "out": p.stdout, "err": p.stderr, "seconds": time.time() - start,
                        "recorded": copy.deepcopy(recorded)})
    torch.save(results, f"{log}.{rank}")


def two_ranks(scenarios, log, recorded=None):
    """Each (main, argv) of `scenarios` run by two gloo ranks forked from this process (no
    interpreter start-up; this process's monkeypatches hold there): per rank, per scenario, the
    exit code, stdout, stderr, seconds and what `recorded` held at its end."""
    scenarios = [(main, list(map(str, argv))) for main, argv in scenarios]
    ports = [free_port() for _ in scenarios]
    ranks = [multiprocessing.get_context("fork").Process(
        target=rank_worker, args=(r, ports, scenarios, log, recorded)) for r in (0, 1)]
    for r in ranks:
        r.start()
    for r in ranks:
        r.join(300)
    assert [r.exitcode for r in ranks] == [0, 0]
    return [torch.load(f"{log}.{r}", weights_only=False) for r in (0, 1)]


def free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_stop_together_within_seconds_with_rank_0s_line(folder, tmp_path):
    """Two gloo processes, and a stop that one rank decides: rank 0 finds the folder in use, one
    rank's shard holds an unreadable file (past --max-bad-files 0), the checkpoint to resume is
    corrupt. Each time both exit 1 within seconds (a rank left in a collective would wait for
    --dist-timeout, 30 s here), rank 0 with the one line, rank 1 without an error of its own."""
    locked, knn, resumed = tmp_path / "locked", tmp_path / "knn", tmp_path / "resumed"
    locked.mkdir()
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    open(data / "train" / "n00000002" / "empty.png", "wb").close()
    corrupt = tmp_path / "corrupt.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:3000])
    train = lambda argv: train_in_process(*argv)      # noqa: E731
    wait = ["--dist-timeout", "0.5"]
    scenarios = [(train, [*TINY, "--output-dir", locked, *wait]),
                 (eval_linear.main, [*common(data, knn, "--knn", "--max-bad-files", "0"), *wait]),
                 (train, [*TINY, "--output-dir", resumed, "--resume", corrupt, *wait])]
    with open(locked / "run.lock", "w") as held:
        held.write("process 4242 on elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rank0, rank1 = two_ranks(scenarios, tmp_path / "results")
    for r0, r1, words in zip(rank0, rank1, [
            [f"--output-dir {locked} is in use by process 4242"],
            ["1 of 25 images unreadable in the train images", "--max-bad-files 0"],
            [f"cannot read checkpoint {corrupt}"]]):
        assert (r0["code"], r1["code"]) == (1, 1) and max(r0["seconds"], r1["seconds"]) < 20, (r0, r1)
        lines = [line for line in r0["err"].strip().splitlines() if not line.startswith("warning: unreadable")]
        assert len(lines) == 1 and all(w in lines[0] for w in words), r0["err"]
        assert "error" not in r1["err"] and "Traceback" not in r1["err"], r1["err"]


def test_fp16_on_the_cpu_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        utils.autocast_dtype("fp16", torch.device("cpu"))
    assert str(e.value.code).startswith("error: --amp fp16 on the CPU") and "\n" not in str(e.value.code)
    data = image_folder(str(tmp_path / "data"), n_per_class=8, size=32)     # and a run: no folder made
    p = run_intl("--data", data, *SMALL, "--small-images", "--batch-size", "16", "--amp", "fp16",
                 "--output-dir", tmp_path / "out", check=False)
    assert_one_line_error(p, "--amp fp16 on the CPU")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the wiring: what the loop hands on, what a save keeps
def record_the_loop(monkeypatch, signal_before=None):
    """What intl.py's loop hands each step (the lr of every parameter group, m, the views' shapes)
    and each epoch's sampler order on this rank, recorded as the loop runs; with signal_before =
    {N: signal}, a real signal to this process on rank 0 just before its N-th step (counted over
    the runs that follow)."""
    steps, orders = [], []
    real_step, real_order = intl.train_step, utils.ResumableSampler.__iter__

    def step(state, views, m, args):
        steps.append({"lr": [g["lr"] for g in state.optimizer.param_groups], "m": m,
                      "shapes": [tuple(v.shape) for v in views]})
        if (signal_before or {}).get(len(steps)) and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal_before[len(steps)])
        return real_step(state, views, m, args)

    def order(sampler):
        seen = list(real_order(sampler))
        orders.append((sampler.epoch, sampler.rank, sampler.skip, seen))
        return iter(seen)
    monkeypatch.setattr(intl, "train_step", step)
    monkeypatch.setattr(utils.ResumableSampler, "__iter__", order)
    return steps, orders


def distributed_order(n, epoch, rank, world, seed=0):
    """torch's DistributedSampler's order for an epoch: the independent reference."""
    sampler = torch.utils.data.DistributedSampler(range(n), world, rank, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("method", ["intl", "intl-m"])
def test_each_step_gets_the_closed_form_lr_and_momentum_over_the_whole_run_and_a_resume(
        method, tmp_path, monkeypatch):
    """3 epochs of 2 steps, 1 of warm-up, cut by SIGTERM before step 3 and resumed: the 6 steps
    get, once each, the lr of learning_rate and the m of momentum_at at their global step t of 6
    (not of an epoch's 2), in every parameter group, and the 2 views of 16 images; each epoch a
    new order, DistributedSampler's for that epoch, the resumed epoch going on from its 17th
    image."""
    steps, orders = record_the_loop(monkeypatch, {3: signal.SIGTERM})
    argv = ["--method", method, "--epochs", "3", "--warmup-epochs", "1", "--lr", "0.4",
            *(["--target-momentum", "0.9"] if method == "intl-m" else []), "--output-dir", tmp_path / "out"]
    assert tiny_run(*argv, check=False).returncode == 128 + signal.SIGTERM
    tiny_run(*argv)
    m0 = 0.9 if method == "intl-m" else 0.996
    assert [s["lr"] for s in steps] == [[intl.learning_rate(t, 6, 2, 0.4 * 16 / 256)] * 2 for t in range(6)]
    assert [s["m"] for s in steps] == [intl.momentum_at(t, 6, m0) for t in range(6)]
    assert [s["shapes"] for s in steps] == [[(16, 3, 32, 32)] * 2] * 6
    assert [(e, r, skip) for e, r, skip, _ in orders] == [(0, 0, 0), (1, 0, 0), (1, 0, 16), (2, 0, 0)]
    full = [distributed_order(32, e, 0, 1) for e in range(3)]
    assert [o for *_, o in orders] == [full[0], full[1], full[1][16:], full[2]]
    assert full[0] != full[1] != full[2]


def test_two_ranks_each_read_their_share_in_distributed_samplers_order_and_resume_it(tmp_path, monkeypatch):
    """Two ranks, 2 epochs of 2 steps (8 images a rank a step), SIGTERM to rank 0 before its step 1:
    both stop after it (rank 1 by agreement), and the rerun goes on: each rank's order each epoch
    is DistributedSampler's for its rank, and the resumed epoch starts at its rank's 9th image."""
    steps, orders = record_the_loop(monkeypatch, {1: signal.SIGTERM})
    argv = [*TINY, "--epochs", "2", "--warmup-epochs", "1", "--output-dir", tmp_path / "out"]
    train = lambda a: train_in_process(*a)       # noqa: E731
    ranks = two_ranks([(train, argv), (train, argv)], tmp_path / "ranks", (steps, orders))
    for rank, (cut, resumed) in enumerate(ranks):
        assert (cut["code"], resumed["code"]) == (128 + signal.SIGTERM, 0), (cut["err"], resumed["err"])
        steps_seen, seen = resumed["recorded"]
        full = [distributed_order(32, e, rank, 2) for e in range(2)]
        assert [(e, r, skip, o) for e, r, skip, o in seen] == [
            (0, rank, 0, full[0]), (0, rank, 8, full[0][8:]), (1, rank, 0, full[1])]
        assert [s["lr"] for s in steps_seen] == [[intl.learning_rate(t, 4, 2, 0.3 * 16 / 256)] * 2
                                                 for t in range(4)]
        assert [s["shapes"] for s in steps_seen] == [[(8, 3, 32, 32)] * 2] * 4
    assert "stopped by SIGTERM after step 1" in ranks[0][0]["err"] and ranks[1][0]["err"] == ""


def same(a, b, where):
    """a equals b, tensor for tensor (values, dtypes, and the strides of an optimizer's buffers)."""
    if isinstance(a, nn.Module):
        return same(a.state_dict(), b.state_dict(), where)
    if isinstance(a, torch.optim.Optimizer):
        for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
            assert a.state[p]["momentum_buffer"].stride() == b.state[q]["momentum_buffer"].stride() == p.stride()
        return same(a.state_dict(), b.state_dict(), where)
    if isinstance(a, (torch.amp.GradScaler, torch.Generator)):
        return same(a.state_dict() if hasattr(a, "state_dict") else a.get_state(),
                    b.state_dict() if hasattr(b, "state_dict") else b.get_state(), where)
    flat_a, spec_a = tree_flatten(a)
    flat_b, spec_b = tree_flatten(b)
    assert spec_a == spec_b, where
    for x, y in zip(flat_a, flat_b):
        assert (torch.equal(x, y) and x.dtype == y.dtype) if torch.is_tensor(x) else x == y, where


def test_progress_lines_give_the_eta_of_the_epoch_and_of_the_run_at_the_epochs_rate(tmp_path, monkeypatch):
    """3 epochs of 4 steps, 10 s a step by a fake clock, resumed at epoch 2's third step: each line's
    ETA is the epoch's mean step time so far times the steps left in the epoch, and in the run."""
    clock, lines = [1000.0], []
    monkeypatch.setattr(utils.time, "time", lambda: clock[0])
    progress = utils.Progress(str(tmp_path), 0, 4, 3, 1)
    progress.print = lines.append
    for i, _ in progress.batches(range(2), 1, 2):          # epoch index 1, from its step index 2
        clock[0] += 10
        progress.step(i, 4 + i + 1, 16, loss=torch.tensor(1.5), lr=0.1)
    assert [re.search(r"ETA epoch (\S+), run (\S+)$", line).groups() for line in lines] == [
        ("0:00:10", "0:00:50"), ("0:00:00", "0:00:40")]
    assert [(r["epoch"], r["step"], r["loss"], r["img_per_s"]) for r in read_log(tmp_path)] == [
        (1, 7, 1.5, 1.6), (1, 8, 1.5, 1.6)]


def test_an_evaluation_in_two_ranks_skips_a_step_everywhere_when_one_ranks_loss_is_not_finite(
        folder, backbone_pth, tmp_path, monkeypatch):
    """The linear protocol on two ranks (forked as torchrun starts them), a NaN image in rank 1's
    first batch only: the global batch's loss is not finite, so both ranks skip that step (DDP's
    averaged gradient holds the NaN), and the run ends as it should; the records say so."""
    real, calls = eval_linear.train_step, [0]

    def step(state, x, y):
        calls[0] += 1
        if calls[0] == 1 and os.environ["RANK"] == "1":
            x = x.clone()
            x[0] = float("nan")
        return real(state, x, y)
    monkeypatch.setattr(eval_linear, "train_step", step)
    out = tmp_path / "out"
    ranks = two_ranks([(eval_linear.main, common(folder, out, "--pretrained", backbone_pth, "--epochs", "1",
                                                 "--print-freq", "1"))], tmp_path / "r")
    assert [r[0]["code"] for r in ranks] == [0, 0], ranks[0][0]["err"]
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 3] and log[0]["loss"] is None and log[1]["loss"] > 0
    assert log[-1]["nonfinite"] == 1 and "2 process(es)" in (out / "log.txt").read_text()


@pytest.mark.parametrize("script", ["intl", "eval_linear"])
def test_a_checkpoint_round_trips_every_field_of_the_state_and_every_random_stream(
        script, folder, tmp_path):
    """A state moved off its start (two steps, a GradScaler at another scale, counters, a best
    accuracy), saved and loaded into a state built afresh: every field of utils.TrainState that a
    checkpoint holds (all but `undo`), compared tensor for tensor, so that a field added later is
    covered too; every random stream (torch's, numpy's, Python's, --gpu-aug's) as it was at the
    save; the epoch and the step (the sampler's point in the epoch)."""
    args = intl.parse_args([*TINY, "--method", "intl-m", "--gpu-aug", "--output-dir", str(tmp_path)])
    if script == "intl":
        build = lambda: intl.build_state(args, torch.device("cpu"), 1)      # noqa: E731
        settings, free, describe, exports = utils.plain(vars(args)), intl.FREE_ON_RESUME, intl.network, intl.exports
    else:
        args = eval_linear.parse_args(common(folder, tmp_path, "--weights", "finetune"))
        args.pretrained_sha256 = None
        build = lambda: eval_linear.build_state(probe_backbone(folder), 512, 3, args, torch.device("cpu"), 1)  # noqa
        settings = {**utils.plain(vars(args)), "classes": 3}
        free, describe, exports = eval_linear.FREE_ON_RESUME, eval_linear.describe, eval_linear.exports
    state = build()
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    state.scaler.scale(torch.ones(()))
    state.scaler.update(2.0 ** 7)
    state.best = {"acc1": 42.5, "acc5": 99.0, "epoch": 3}
    state.counters = {"nonfinite": torch.tensor([2.0, 1.0, 2.0]), "unreadable": 5}
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):          # the optimizer's buffers and the BN statistics move
        out = state.model([x, x]) if script == "intl" else [state.model(x)]
        state.optimizer.zero_grad()
        sum(o.square().mean() for o in out).backward()
        state.optimizer.step()
    random_draws(state.aug)
    streams = utils.rng_state(state.aug)
    ckpt = utils.Checkpoints(str(tmp_path), state, settings, free, describe, exports, 0, 1, None, torch.device("cpu"))
    ckpt.save(epoch=3, step=7)
    fresh = build()                         # (which moves the streams on, as do the draws below)
    fresh.scaler = torch.amp.GradScaler("cpu")
    fresh.counters = {"nonfinite": torch.zeros(3), "unreadable": 0}
    fresh.best = {"acc1": 0.0, "acc5": 0.0, "epoch": 0}
    random_draws(fresh.aug)
    loaded = utils.Checkpoints(str(tmp_path), fresh, settings, free, describe, exports, 0, 1, None,
                               torch.device("cpu"))
    assert loaded.load(str(tmp_path / "checkpoint.pth")) == (3, 7)
    fields = [f.name for f in dataclasses.fields(utils.TrainState) if f.name != "undo"]
    assert {"model", "target", "optimizer", "scaler", "aug", "best", "counters"} <= set(fields)
    for name in fields:
        if getattr(state, name) is not None or name == "target":
            same(getattr(state, name), getattr(fresh, name), name)
    same(utils.rng_state(fresh.aug), streams, "random streams")


# ----------------------------------------------------------------------------- faults of long runs and the run folder
# a skipped last step, a cut-off export, two runs on one folder, a checkpoint that would run
# code, what a run folder holds, the random streams of a resume, each rank reading the checkpoint
class NaNAtSteps(torch.utils.data.Dataset):
    """Training images as a loader without workers reads them on this rank, `batch` a step: the
    last image of each step in `steps` (counted from 1 over the run) gets a NaN pixel, so that its
    loss is not finite. With `saves`, rank 0 copies the run's checkpoint to SAVES/at-read-N.pth
    as it reads image N of `copies`: the state before and after a step."""

    def __init__(self, images, batch, steps, saves=None, copies=()):
        self.images, self.batch, self.steps, self.saves, self.copies = images, batch, steps, saves, copies
        self.reads = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        n, self.reads = self.reads, self.reads + 1
        if n in self.copies and os.environ.get("RANK", "0") == "0":
            shutil.copy(self.saves / "out" / "checkpoint.pth", self.saves / f"at-read-{n}.pth")
        views, label = self.images[i]
        if n // self.batch + 1 in self.steps and n % self.batch == self.batch - 1:
            views[1][0, 0, 0] = float("nan")
        return views, label


def nan_at_steps(monkeypatch, *args, **kw):
    read = utils.labelled_images
    monkeypatch.setattr(utils, "labelled_images", lambda *a, **k: NaNAtSteps(read(*a, **k), *args, **kw))


@pytest.mark.parametrize("method, ranks", [("intl", 1), ("intl-m", 1), ("intl-m", 2)])
def test_a_non_finite_last_step_changes_no_state_and_the_run_goes_on(method, ranks, tmp_path, monkeypatch):
    """A NaN in the last batch of epoch 1 (of 2): that step leaves the online network's and the
    target's weights and BN statistics, the optimizer's buffers and the run's counters as they
    were, but for the skipped-step count; the epoch's record says so, and epoch 2 trains."""
    out, per_rank = tmp_path / "out", 16 // ranks
    nan_at_steps(monkeypatch, per_rank, {2}, tmp_path, (per_rank, 2 * per_rank))
    argv = [*TINY, "--method", method, "--epochs", "2", "--save-every-minutes", "1e-6", "--output-dir", out]
    if ranks == 1:
        p = tiny_run(*argv[len(TINY):])     # (saves after every step)
        stdout = p.stdout
    else:
        ran = two_ranks([(lambda a: train_in_process(*a), argv)], tmp_path / "ranks")
        assert [r[0]["code"] for r in ran] == [0, 0], [r[0]["err"] for r in ran]
        stdout = (out / "log.txt").read_text()
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 2, 3, 4, 4] and log[1]["loss"] is None    # JSON's null
    before, after = (torch.load(tmp_path / f"at-read-{n}.pth", weights_only=True) for n in (per_rank, 2 * per_rank))
    assert (before["epoch"], before["step"], after["epoch"], after["step"]) == (0, 1, 1, 2)
    nets = ["model"] + (["target"] if method == "intl-m" else [])
    for net in nets:                      # weights and BN buffers, the counts too
        assert before[net].keys() == after[net].keys()
        assert len([k for k in before[net] if "running_" in k or "num_batches" in k]) == 3 * 22
        for key, value in before[net].items():
            assert torch.equal(value, after[net][key]), (net, key)
    momentum = lambda c: [s["momentum_buffer"] for s in c["optimizer"]["state"].values()]  # noqa
    assert len(momentum(before)) == len(before["model"]) - 3 * 22
    assert all(torch.equal(a, b) for a, b in zip(momentum(before), momentum(after)))
    # the counters: one step skipped (a run of 1), as the epoch-end save resets the epoch's count
    assert before["counters"]["nonfinite"].tolist() == [0, 0, 0] and after["counters"]["nonfinite"].tolist() == [0, 1, 1]
    epoch1, epoch2 = log[2], log[5]
    assert epoch1["projector"] == epoch1["transformed"] == {"cond": None, "erank": None}
    assert epoch1["nonfinite"] == 1 and epoch2["nonfinite"] == 0 and epoch2["projector"]["erank"] > 1
    assert "epoch 1: spectrum cond/erank projector -, iternorm output - of 16" in stdout
    assert "1 steps skipped (loss not finite)" in stdout
    spectra = read_log(out, "spectrum.jsonl")
    assert spectra[0] == {"epoch": 1, "before": [], "after": []} and len(spectra[1]["after"]) == 16
    final = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (final["epoch"], final["step"]) == (2, 4)
    for net in nets:
        assert not torch.equal(final[net]["backbone.bn1.running_mean"], after[net]["backbone.bn1.running_mean"])


@pytest.mark.parametrize("nan_steps, stop", [({1, 2, 4, 5, 7, 8}, None), ({3, 4, 5, 6, 7, 8}, 6)])
def test_non_finite_losses_stop_the_run_after_k_in_a_row_at_the_next_check(nan_steps, stop, tmp_path, monkeypatch):
    """--max-nonfinite 3, checked every --print-freq 2 steps, 4 steps an epoch: runs of 2 broken
    by a finite loss never stop the run (3 skipped in each epoch); a run of 3 that ends at step 5
    stops it at the check of step 6, not at the epoch's save (step 8), in one line, without
    saving."""
    nan_at_steps(monkeypatch, 16, nan_steps)
    out = tmp_path / "out"
    p = tiny_run("--subset", "64", "--epochs", "2", "--max-nonfinite", "3", "--print-freq", "2",
                 "--output-dir", out, check=False)
    if stop is None:
        assert p.returncode == 0, p.stderr
        assert [r["nonfinite"] for r in read_log(out) if "nonfinite" in r] == [3, 3]
    else:
        assert_one_line_error(p, f"not finite for 3 steps in a row, by step {stop}", "lower --lr")
        assert torch.load(out / "checkpoint.pth")["step"] == 4       # epoch 1's: nothing saved since


def test_saves_come_every_save_every_minutes_by_the_clock_and_progress_every_print_freq_steps(
        tmp_path, monkeypatch):
    """A clock that moves 25 s a step, --save-every-minutes 1, 4 steps an epoch: a mid-epoch save
    once 60 s have passed since the last save (steps 3 and 7), each epoch's at its end (4, 8);
    --print-freq 3: a progress record at steps 3 and 6 and at each epoch's last."""
    clock, saves = [1e9], []
    real_step, real_save = intl.train_step, utils.Checkpoints.save

    def step(*args):
        clock[0] += 25
        return real_step(*args)

    def save(self, epoch, step, exports=False):
        saves.append((epoch, step))
        return real_save(self, epoch, step, exports)
    monkeypatch.setattr(intl, "train_step", step)
    monkeypatch.setattr(utils.Checkpoints, "save", save)
    monkeypatch.setattr(utils.time, "time", lambda: clock[0])
    out = tmp_path / "out"
    tiny_run("--subset", "64", "--epochs", "2", "--save-every-minutes", "1", "--print-freq", "3", "--output-dir", out)
    assert saves == [(0, 3), (1, 4), (1, 7), (2, 8)]
    assert [r["step"] for r in read_log(out) if "loss" in r] == [3, 4, 6, 8]


def test_a_stop_signal_during_the_monitor_stops_the_run_within_its_batch(tmp_path, monkeypatch):
    """SIGTERM as the online monitor starts at the end of epoch 1 (of 2): its pass stops after the
    batch in flight, the epoch's record is written without the monitor's figures, and the run
    exits with the epoch's checkpoint, without a step of epoch 2 or a second save."""
    read, batches = utils.features, []

    def signalled(backbone, dataset, device, *args, after_batch=None, **kw):
        if not batches:
            os.kill(os.getpid(), signal.SIGTERM)
        return read(backbone, dataset, device, *args, after_batch=lambda p: batches.append(1) or after_batch(p), **kw)
    monkeypatch.setattr(utils, "features", signalled)
    out = tmp_path / "out"
    p = tiny_run("--epochs", "2", "--monitor-every", "1", "--output-dir", out, check=False)
    assert p.returncode == 128 + signal.SIGTERM and p.stderr.strip().splitlines() == [
        f"stopped by SIGTERM after step 2: {out / 'checkpoint.pth'} holds this point; run the same command to resume"]
    assert batches == [1]           # the bank's first batch; the queries' pass never started
    ckpt = torch.load(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 2] and "knn5_top1" not in log[-1] and log[-1]["epoch"] == 1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run of one epoch with --tensorboard: its folder and its console (in_process)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    with pytest.MonkeyPatch.context() as mp:
        hide_cuda(mp)
        started = time.time()
        p = tiny_run("--tensorboard", "--output-dir", out)
    return out, p, started


def test_a_rerun_restores_a_backbone_pth_cut_off_by_a_kill(finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    whole = (out / "backbone.pth").read_bytes()
    (out / "backbone.pth").write_bytes(whole[: len(whole) // 3])    # as a kill -9 mid-write leaves it
    p = tiny_run("--output-dir", out)
    assert f"nothing to train: {out} is at epoch 1 of 1" in p.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    backbone = torch.load(out / "backbone.pth", weights_only=True)     # where the tensors were saved
    trained = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    assert backbone.keys() == trained.keys()
    assert all(torch.equal(backbone[k], v) for k, v in trained.items())
    assert all(t.device.type == "cpu" for t in backbone.values())


def test_a_refused_rerun_leaves_the_run_folders_settings_as_they_were(finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    settings = (out / "args.json").read_text()
    p = tiny_run("--lr", "0.1", "--output-dir", out, check=False)   # not the checkpoint's lr
    assert_one_line_error(p, "was made with other settings (lr 0.3 -> 0.1)")
    assert (out / "args.json").read_text() == settings
    assert (out / "log.txt").read_text().splitlines()[-1] == p.stderr.strip()    # the attempt is logged


def run_in_child(argv, log):
    """python intl.py ARGV in a process of its own, forked from this one (no interpreter start-up),
    its output to LOG; returns the started multiprocessing.Process (exitcode: the script's)."""
    def child():
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
        torch.set_num_threads(1)        # (more OpenMP threads in a forked child can deadlock)
        intl.train(intl.parse_args([str(a) for a in argv]))
    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    return p


def wait_for_text(path, text, process, timeout=300):
    """Until the file at PATH holds TEXT; fails if PROCESS ends first."""
    start = time.time()
    while not (path.exists() and text in path.read_text()):
        assert process.is_alive() and time.time() - start < timeout, f"no {text!r} in {path}"
        time.sleep(0.02)


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    args = [*TINY, "--epochs", "2", "--output-dir", out]
    a = run_in_child([*args, "--stop-epoch", "1"], tmp_path / "a.txt")
    wait_for_text(out / "run.lock", f"process {a.pid}", a)     # A holds the folder
    os.kill(a.pid, signal.SIGSTOP)                              # and keeps it while B tries
    try:
        assert a.is_alive()
        b = tiny_run("--epochs", "2", "--output-dir", out, check=False)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert_one_line_error(b, f"--output-dir {out} is in use by process {a.pid} on {os.uname().nodename}")
    a.join(300)
    assert a.exitcode == 0, (tmp_path / "a.txt").read_text()[-3000:]
    assert [(r["step"], "loss" in r) for r in read_log(out)] == [(1, True), (2, True), (2, False)]
    # SIGKILL: its lock file stays, its lock goes with the process; the rerun resumes
    d = run_in_child(args, tmp_path / "d.txt")
    wait_for_text(out / "run.lock", f"process {d.pid}", d)
    os.kill(d.pid, signal.SIGKILL)
    d.join(60)
    assert d.exitcode == -signal.SIGKILL and f"process {d.pid}" in (out / "run.lock").read_text()
    p = tiny_run("--epochs", "2", "--output-dir", out)
    assert f"resumed from {out / 'checkpoint.pth'} at epoch 1, step 2" in p.stdout
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 4)
    assert [r["step"] for r in read_log(out)] == [1, 2, 2, 3, 4, 4]


class RunsCode:
    """What a malicious checkpoint holds: an object whose unpickling calls open(MARKER, "w")."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_whose_unpickling_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker, evil = tmp_path / "it-ran", tmp_path / "checkpoint.pth"
    torch.save({"model": {}, "step": 2, "epoch": 1, "rng": [RunsCode(str(marker))]}, evil)
    torch.load(evil, weights_only=False)        # the file does what it says: unpickled, it runs
    assert marker.exists()
    marker.unlink()
    p = tiny_run("--resume", evil, "--output-dir", tmp_path / "out", check=False)
    assert_one_line_error(p, f"{evil} holds Python objects", "could run code, so it is not loaded")
    p = in_process(eval_linear.main, ["--data", "fashion-mnist", "--arch", "resnet18", "--knn",
                                      "--pretrained", evil, "--output-dir", tmp_path / "eval"])
    assert_one_line_error(p, f"{evil} holds Python objects", "could run code, so it is not loaded")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_run_folder_holds_its_settings_its_console_and_timed_records(finished_run):
    out, p, started = finished_run
    settings = json.load(open(out / "args.json"))
    assert (settings["method"], settings["lr"], settings["k"]) == ("intl", 0.3, 16)
    assert settings["beta"] == pytest.approx(0.01 * (math.log2(16) - 3))
    assert [(c["size"], c["p_solarize"]) for c in settings["recipe"]] == [(32, 0.0), (32, 0.2)]
    assert (settings["steps_per_epoch"], settings["world_size"]) == (2, 1)
    assert (settings["torch"], settings["torchvision"]) == (torch.__version__, torchvision.__version__)
    assert (out / "log.txt").read_text() == p.stdout       # the console, line for line
    lines = p.stdout.splitlines()
    assert lines[0].split(" ", 1)[1].startswith("INTL: INTL resnet18 --projector 32-32-32, 2 views")
    steps = [line for line in lines if " step " in line]
    clock = r"\d+:\d\d:\d\d"
    assert len(steps) == 2
    assert all(re.search(f"elapsed {clock}, ETA epoch {clock}, run {clock}$", s) for s in steps)
    assert "epoch 1: spectrum cond/erank projector" in lines[-2]
    assert re.search(f"total time {clock}$", lines[-1])
    times = [r["time"] for r in read_log(out)]
    assert len(times) == 3 and started <= times[0] <= times[1] <= times[2] <= time.time()


def test_tensorboard_holds_the_logged_figures_and_without_it_the_run_says_how_to_install_it(
        finished_run, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = finished_run[0]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    log = read_log(out)
    logged = lambda name: [(e.step, e.value) for e in events.Scalars(name)]    # noqa: E731
    for name in ["loss", "nmse", "trace_loss", "lr"]:
        assert logged(name) == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in log if name in r]
    for part, figure in [("projector", "erank"), ("transformed", "cond")]:
        assert logged(f"{part}/{figure}") == [(2, pytest.approx(log[-1][part][figure], rel=1e-6))]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # the package not installed
    p = tiny_run("--tensorboard", "--output-dir", tmp_path / "out", check=False)
    assert_one_line_error(p, "--tensorboard needs the tensorboard package: pip install tensorboard")
    assert not (tmp_path / "out").exists()


def random_draws(aug):
    """A draw of each stream a rank's run takes from: torch's, numpy's, Python's, --gpu-aug's."""
    return torch.rand(4), np.random.rand(4), random.random(), torch.rand(4, generator=aug)


def test_saved_random_streams_restore_exactly_from_a_weights_only_file(tmp_path):
    cpu, aug = torch.device("cpu"), torch.Generator().manual_seed(5)
    state = utils.rng_state(aug, cpu)
    assert state["cuda"] is None        # no GPU stream here; on a GPU, only its own (no per-GPU list)
    first = random_draws(aug)
    torch.save([state], tmp_path / "rng.pth")
    loaded = torch.load(tmp_path / "rng.pth", weights_only=True)[0]
    for saved in [state, loaded]:
        random_draws(aug)               # the streams move on
        utils.set_rng_state(saved, aug, cpu)
        again = random_draws(aug)
        assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
        assert first[2] == again[2] and torch.equal(first[3], again[3])


@pytest.mark.gpu
def test_saved_random_streams_hold_this_gpus_stream_only():
    device = torch.device("cuda", torch.cuda.current_device())
    state = utils.rng_state(None, device)
    assert torch.is_tensor(state["cuda"])           # this GPU's stream, not a list of every GPU's
    assert torch.equal(state["cuda"], torch.cuda.get_rng_state(device))
    first = torch.rand(4, device=device)
    torch.rand(4, device=device)
    utils.set_rng_state(state, None, device)
    assert torch.equal(torch.rand(4, device=device), first)


def mapped_from(t, path):
    """Whether tensor t's memory lies in a mapping of the file at PATH (Linux's /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == path:
                low, high = (int(a, 16) for a in fields[0].split("-"))
                if low <= t.data_ptr() < high:
                    return True
    return False


def read_everywhere_worker(rank, store, cases, out):
    """Rank RANK of two gloo processes: reads ./checkpoint.pth from each case's folder for this
    rank (utils.read_everywhere) and saves what it got, and whether the file is mapped there."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    group, got = utils.host_group(), {}
    for case, folders in cases.items():
        os.chdir(folders[rank])
        ckpt = utils.read_everywhere("checkpoint.pth", group)
        mapped = [mapped_from(t, os.path.realpath("checkpoint.pth")) for t in ckpt["model"].values()]
        got[case] = {k: v.clone() for k, v in ckpt["model"].items()}, ckpt["step"], mapped
    torch.save(got, f"{out}.{rank}")
    utils.leave_process_group()


def test_each_rank_reads_a_shared_checkpoint_itself_memory_mapped_else_gets_rank_0s(tmp_path):
    g = torch.Generator().manual_seed(0)
    saved = {"model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)},
             "step": 7}
    # other files by the same name, as a node's own folder may hold from an earlier run: of
    # another size, and of the same size (two saves of one run are)
    other = {"model": {"w": torch.zeros(3)}, "step": 1}
    stale = {"model": {"w": torch.zeros(64, 32), "b": torch.zeros(32)}, "step": 3}
    folders = [("shared", saved), ("node0", saved), ("other", other), ("stale", stale), ("empty", None)]
    for folder, ckpt in folders:
        (tmp_path / folder).mkdir()
        if ckpt:
            torch.save(ckpt, tmp_path / folder / "checkpoint.pth")
    size = lambda folder: os.path.getsize(tmp_path / folder / "checkpoint.pth")      # noqa: E731
    assert size("stale") == size("node0")
    cases = {"one folder": ["shared", "shared"], "rank 1 sees another file": ["node0", "other"],
             "rank 1 sees a stale one of the same size": ["node0", "stale"],
             "rank 1 sees none": ["node0", "empty"]}
    cases = {case: [tmp_path / f for f in folders] for case, folders in cases.items()}
    torch.multiprocessing.start_processes(read_everywhere_worker, nprocs=2, start_method="fork",
                                          args=(tmp_path / "store", cases, str(tmp_path / "r")))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"r.{rank}", weights_only=True)
        for case in cases:
            model, step, mapped = got[case]
            assert step == 7 and model.keys() == saved["model"].keys(), (rank, case)
            assert all(torch.equal(model[k], saved["model"][k]) for k in model), (rank, case)
            # read in place where every rank sees rank 0's file; else rank 0's copy, sent
            assert mapped == [case == "one folder"] * 2, (rank, case)


# ----------------------------------------------------------------------------- figures
def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def lines_by_label(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def write_run(run, transformed_key="transformed", monitored=True, seed=0):
    """A run folder's log.jsonl as intl.py writes it, 2 epochs of 2 steps, its values drawn at random;
    the records written."""
    rng = np.random.default_rng(seed)
    recs = []
    for epoch in (1, 2):
        for step in (2 * epoch - 1, 2 * epoch):
            nmse, tl = rng.uniform(0.5, 2), rng.uniform(0.01, 1)
            recs.append({"epoch": epoch - 1, "step": step, "loss": nmse + 0.02 * tl, "nmse": nmse, "trace_loss": tl,
                         "lr": 0.1, "img_per_s": 100.0, "data_wait": 0.01, "time": 1.0 * step})
        rec = {"epoch": epoch, "step": 2 * epoch, "projector": {"cond": 50.0, "erank": rng.uniform(2, 30)},
               transformed_key: {"cond": 2.0, "erank": rng.uniform(2, 30)}, "unreadable": 0, "nonfinite": 0}
        if monitored:
            rec.update(knn5_top1=rng.uniform(10, 90), linear_top1=rng.uniform(10, 90))
        recs.append(rec)
    write_jsonl(os.path.join(run, "log.jsonl"), recs)
    return recs


def test_figures_run_plots_each_runs_logged_curves(tmp_path):
    """Loss, nmse and trace loss per step, the two effective ranks and the monitor per epoch; a run
    from before the rename ("iternorm") and without the monitor beside one of today."""
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    logs = {"new": write_run(new), "old": write_run(old, "iternorm", monitored=False, seed=1)}
    fig = figures.run_curves(argparse.Namespace(runs=[new, old]))
    loss, rank, top1 = (lines_by_label(ax) for ax in fig.axes)
    for name, recs in logs.items():
        steps, ends = [r for r in recs if "loss" in r], [r for r in recs if "projector" in r]
        for key, what in [("loss", "loss"), ("nmse", "nmse"), ("trace_loss", "trace loss")]:
            assert loss[f"{name}: {what}"] == ([r["step"] for r in steps], [r[key] for r in steps])
        after = "transformed" if name == "new" else "iternorm"
        assert rank[f"{name}: projector output"] == ([1, 2], [r["projector"]["erank"] for r in ends])
        assert rank[f"{name}: transformed output"] == ([1, 2], [r[after]["erank"] for r in ends])
    ends = [r for r in logs["new"] if "projector" in r]
    assert top1 == {"new: 5-NN": ([1, 2], [r["knn5_top1"] for r in ends]),
                    "new: linear probe": ([1, 2], [r["linear_top1"] for r in ends])}
    out = tmp_path / "run.png"
    figures.main(["run", new, old, "--out", str(out)])
    with Image.open(out) as img:
        img.load()
        assert img.width > 600 and img.height > 200
    assert len(figures.run_curves(argparse.Namespace(runs=[old])).axes) == 2      # no monitor: no panel for it


def iternorm_output_eigenvalues(lam, iters):
    """The eigenvalue that intl.iter_norm gives each eigenvalue lam (summing to 1) of a covariance:
    the output covariance read along the input's eigenvectors."""
    z = with_eigenvalues(torch.tensor(lam, dtype=torch.float64), 60, "batch")
    x, y = (intl.whitened_variables(v, "batch") for v in (z, intl.iter_norm(z, iters, "batch")))
    e, u = torch.linalg.eigh(torch.cov(x))
    out = torch.diagonal(u.T @ torch.cov(y) @ u)
    return [out[torch.argmin((e - v).abs())].item() for v in lam]


def test_figures_spectrum_ablation_and_maths_plot_what_they_name(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    spectra = [{"epoch": e, "before": list(np.random.default_rng(e).uniform(0.1, 5, 8)),
                "after": list(np.random.default_rng(10 + e).uniform(0.5, 1.5, 8))} for e in (1, 2)]
    write_jsonl(os.path.join(a, "spectrum.jsonl"), spectra)
    fig = figures.spectrum(argparse.Namespace(runs=[a]))
    for ax, key in zip(fig.axes, ["before", "after"]):
        for line, rec in zip(ax.lines, spectra):
            lam = np.array(rec[key])
            assert np.allclose(line.get_ydata(), lam / lam.sum(), rtol=1e-12) and list(line.get_xdata()) == list(range(1, 9))
    logs = {"a": write_run(a), "b": write_run(b, "iternorm", seed=1)}
    fig = figures.ablation(argparse.Namespace(runs=[a, b]))
    assert [ax.get_title() for ax in fig.axes] == ["effective rank, projector output", "effective rank, after the transform",
                                                   "5-NN top-1 (%)", "linear probe top-1 (%)"]
    for ax, value in zip(fig.axes, [lambda r, name: r["projector"]["erank"],
                                    lambda r, name: r["transformed" if name == "a" else "iternorm"]["erank"],
                                    lambda r, name: r["knn5_top1"], lambda r, name: r["linear_top1"]]):
        assert lines_by_label(ax) == {name: ([1, 2], [value(r, name) for r in recs if "projector" in r])
                                      for name, recs in logs.items()}
    # the IterNorm panel against intl.iter_norm's own output, at eigenvalues on the plotted grid
    panel = lines_by_label(figures.maths(None).axes[0])
    for iters in (1, 4, 8):
        x, y = panel[f"T = {iters}"]
        pick = [0, 60, 120, 170]
        lam = [x[i] for i in pick]
        got = iternorm_output_eigenvalues(lam + [1 - sum(lam)], iters)[:4]
        assert np.allclose(got, [y[i] for i in pick], rtol=1e-8)
    with pytest.raises(SystemExit) as e:
        figures.main(["spectrum", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert "\n" not in str(e.value.code) and "spectrum.jsonl not found" in str(e.value.code)


# python figures.py ARGS where `import matplotlib` fails
WITHOUT_MATPLOTLIB = ("import runpy, sys\nsys.modules['matplotlib'] = None\nsys.path.insert(0, {here!r})\n"
                      "sys.argv = ['figures.py', *sys.argv[1:]]\nrunpy.run_path({script!r}, run_name='__main__')")


@pytest.mark.parametrize("argv", [["--help"], ["maths", "--out", "maths.png"]])
def test_figures_without_matplotlib_say_how_to_install_it_in_one_line(argv, tmp_path):
    """--help still helps (exit 0) and ends with the line; drawing stops with it alone (exit 1)."""
    p = subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB.format(here=HERE, script=os.path.join(HERE, "figures.py")), *argv],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = [line for line in (p.stdout + p.stderr).splitlines() if "pip install" in line]
    assert len(lines) == 1 and lines[0].endswith("is not installed: pip install matplotlib"), p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    if argv == ["--help"]:
        assert p.returncode == 0 and p.stdout.startswith("usage: figures.py") and p.stderr == ""
    else:
        assert p.returncode == 1 and p.stderr.strip() == lines[0] and not (tmp_path / "maths.png").exists()


def test_figures_run_and_monitor_of_a_real_run(folder, tmp_path, capsys):
    """What intl.py writes, drawn: the run's curves are its log.jsonl; the monitor's baselines
    include a brute-force 5-NN on the raw pixels of the same labelled images."""
    run = tmp_path / "run"
    intl.train(intl.parse_args(["--data", str(folder), "--small-images", "--subset", "8", *SMALL, "--batch-size",
                                "4", "--epochs", "1", "--monitor-every", "1", "--output-dir", str(run)]))
    log = read_log(run)
    steps, ends = [r for r in log if "loss" in r], [r for r in log if "projector" in r]
    loss, rank, top1 = (lines_by_label(ax) for ax in figures.run_curves(argparse.Namespace(runs=[str(run)])).axes)
    assert loss["run: loss"] == ([r["step"] for r in steps], [r["loss"] for r in steps]) and len(steps) == 2
    assert rank["run: projector output"] == ([1], [ends[0]["projector"]["erank"]])
    assert top1["run: linear probe"] == ([1], [ends[0]["linear_top1"]])
    capsys.readouterr()
    fig = figures.monitor(argparse.Namespace(runs=[str(run)]))
    out = capsys.readouterr().out
    assert fig.axes[0].lines[0].get_ydata().tolist() == [ends[0]["knn5_top1"]]
    classes = sorted(COLOURS)
    label = lambda split: torch.tensor([classes.index(p.parent.name) for p in sorted((folder / split).rglob("*.png"))])
    pred = brute_force_knn(images(folder).flatten(1), label("train"), images(folder, "val").flatten(1), 5, None)
    raw = 100 * (pred == label("val")).double().mean().item()
    assert f"raw pixels: 5-NN top-1 (%) {raw:.2f}" in out
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 3      # the run, random init, raw pixels


def test_figures_robustness_places_each_run_by_its_name(tmp_path):
    """Each run on the batch x embedding grid (T = 4) and on the T row, by its name; the run that
    stopped on a non-finite loss, before its epoch ended, marked as diverged."""
    finished = {"b4-d16-t4": 61.5, "b8-d16-t4": 63.25, "b256-d1024-t4": 70.0, "b256-d1024-t2": 55.5}
    for i, (name, top1) in enumerate(finished.items()):
        write_jsonl(tmp_path / name / "log.jsonl",
                    [{"epoch": 0, "step": 1, "loss": 1.5, "nmse": 1.5, "trace_loss": 0.1},
                     {"epoch": 1, "step": 1, "projector": {"cond": 9.0, "erank": 3.0 + i}, "transformed": {"cond": 1.5,
                      "erank": 7.0}, "unreadable": 0, "nonfinite": 0, "knn5_top1": top1 - 5, "linear_top1": top1}])
    write_jsonl(tmp_path / "b8-d32-t4" / "log.jsonl", [{"epoch": 0, "step": 1, "loss": float("nan"), "nmse": 1.0,
                                                        "trace_loss": float("nan")}])
    fig = figures.robustness(argparse.Namespace(runs=[str(p) for p in sorted(tmp_path.iterdir())]))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 4 and texts.count("diverged") == 1          # 3 x 3 cells, 4 of them run
    assert "61.5\nrank 3" in texts and "63.2\nrank 4" in texts
    t_row = fig.axes[1].lines
    assert list(t_row[0].get_xdata()) == [2, 4] and list(t_row[0].get_ydata()) == [55.5, 70.0]
    assert list(t_row[1].get_ydata()) == [6.0, 5.0]                   # effective rank, by T


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


def epoch_records(out, name="log.jsonl"):
    """An evaluation's records of its epochs (after its val pass), without those of its steps."""
    return [r for r in read_log(out, name) if "acc1" in r]


# ----------------------------------------------------------------------------- linear protocol
def test_an_evaluation_holds_its_run_folder_as_training_does(folder, backbone_pth, tmp_path):
    """eval_linear.py in utils.RunFolder: a folder in use is refused in one line; args.json holds the
    settings, log.txt the console, whose progress lines carry the time of day, the elapsed time
    and the ETA of the epoch and of the run; every record has its time; --tensorboard holds them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "linear"
    out.mkdir()
    args = common(folder, out, "--pretrained", backbone_pth, "--epochs", "2", "--print-freq", "1", "--tensorboard")
    with open(out / "run.lock", "w") as held:
        held.write("process 4242 on elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_one_line_error(run_eval(args), f"--output-dir {out} is in use by process 4242 on elsewhere")
    started = time.time()
    p = run_eval(args)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    settings = json.load(open(out / "args.json"))
    assert (settings["weights"], settings["lr_classifier"], settings["classes"], settings["world_size"]) == \
        ("freeze", 0.4, 3, 1)
    assert (settings["pretrained_sha256"], settings["torch"]) == (sha(backbone_pth), torch.__version__)
    assert (out / "log.txt").read_text() == p.stdout
    clock = r"\d+:\d\d:\d\d"
    steps = re.findall(rf"^{clock} ep (\d)/2 step (\d)/3 loss \S+ lr \S+ \d+ img/s, data wait \d+%, "
                       rf"elapsed {clock}, ETA epoch {clock}, run {clock}$", p.stdout, re.M)
    assert steps == [(e, s) for e in "12" for s in "123"], p.stdout
    log = read_log(out)
    assert all(started <= r["time"] <= time.time() for r in log) and len(log) == 8
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for name in ["loss", "acc1"]:
        assert [(e.step, e.value) for e in events.Scalars(name)] == \
            [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in log if name in r and r[name] is not None]
    accs, done = [r["acc1"] for r in epoch_records(out)], json.load(open(out / "done"))
    assert done["acc1"] == max(accs) and done["best_epoch"] == accs.index(max(accs)) + 1    # the first


def signal_before_step(monkeypatch, signals):
    """Real signals to this process, each just before eval_linear's step of the given number (a
    dict), counted over the runs that follow."""
    step, calls = eval_linear.train_step, [0]

    def signalled(*args):
        calls[0] += 1
        if calls[0] in signals:
            os.kill(os.getpid(), signals[calls[0]])
        return step(*args)
    monkeypatch.setattr(eval_linear, "train_step", signalled)


@pytest.mark.parametrize("weights", ["freeze", "finetune"])
def test_an_evaluation_cut_by_signals_mid_epoch_ends_bit_identical_to_a_straight_one(
        weights, folder, backbone_pth, tmp_path, monkeypatch):
    """SIGTERM before step 2 (of 3 an epoch), then SIGUSR1 before the resumed run's second step (5):
    each step finishes, the point in the epoch is saved and the run exits 128 + the signal in one
    line; then SIGTERM as epoch 2's val pass starts: the epoch's steps are saved, its val pass
    redone. The last rerun ends as the straight run: the same weights and optimizer, the same
    best.pth and accuracy, and each log record once."""
    listed = [f"{cls}_{i}.png" for cls in COLOURS for i in range(3)]      # 9 images: 3 steps of 4
    (tmp_path / "subset.txt").write_text("\n".join(listed) + "\n")
    mode = ["--weights", "finetune", "--train-subset", tmp_path / "subset.txt", "--batch-size", "4"] \
        if weights == "finetune" else []
    args = lambda out: common(folder, out, "--pretrained", backbone_pth, "--epochs", "2", "--print-freq", "1",
                              *mode)     # noqa: E731
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert run_eval(args(straight)).returncode == 0
    signal_before_step(monkeypatch, {2: signal.SIGTERM, 5: signal.SIGUSR1})
    for signum, step in [(signal.SIGTERM, 2), (signal.SIGUSR1, 5)]:
        p = run_eval(args(cut))
        assert p.returncode == 128 + signum and p.stderr.strip().splitlines() == [
            f"stopped by {signal.Signals(signum).name} after step {step}: {cut / 'checkpoint.pth'} holds this "
            f"point; run the same command to resume"], p.stderr
        assert torch.load(cut / "checkpoint.pth")["step"] == step and not (cut / "done").exists()
    real_evaluate = eval_linear.evaluate

    def evaluate(*a):       # SIGTERM as epoch 2's val pass starts: its steps are saved, it is redone
        monkeypatch.setattr(eval_linear, "evaluate", real_evaluate)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*a)
    monkeypatch.setattr(eval_linear, "evaluate", evaluate)
    p = run_eval(args(cut))
    assert p.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM after step 6" in p.stderr, p.stderr
    assert (torch.load(cut / "checkpoint.pth")["epoch"], torch.load(cut / "checkpoint.pth")["step"]) == (1, 6)
    assert run_eval(args(cut)).returncode == 0
    a, b = torch.load(straight / "checkpoint.pth"), torch.load(cut / "checkpoint.pth")
    assert a["step"] == b["step"] == 6 and a["best"] == b["best"]
    flat = lambda c: tree_flatten([c["model"], c["optimizer"]])[0]      # noqa: E731
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat(a), flat(b), strict=True))
    best_a, best_b = torch.load(straight / "best.pth"), torch.load(cut / "best.pth")
    assert best_a.keys() == best_b.keys() and all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    if weights == "finetune":      # the backbone trained too
        assert not torch.equal(best_b["layer4.1.conv2.weight"], torch.load(backbone_pth)["layer4.1.conv2.weight"])
    without_time = lambda out: [{k: v for k, v in r.items() if k not in ("time", "img_per_s", "data_wait")}  # noqa
                                for r in read_log(out)]
    assert without_time(cut) == without_time(straight)
    assert [r["step"] for r in read_log(cut)] == [1, 2, 3, 3, 4, 5, 6, 6]


def test_a_diverged_evaluation_stops_in_one_line_and_saves_nothing_non_finite(folder, backbone_pth, tmp_path):
    """--lr-classifier 1e38: the first step's update overflows, the losses after it are not finite
    and their steps skipped; two in a row stop the run, non-zero, in one line naming
    --lr-classifier; no file holds a non-finite number. inf and 0 are refused at once."""
    out = tmp_path / "nan"
    p = run_eval(common(folder, out, "--pretrained", backbone_pth, "--epochs", "2", "--print-freq", "1",
                        "--max-nonfinite", "2", "--lr-classifier", "1e38"))
    assert_one_line_error(p, "not finite", "lower --lr-classifier")
    for name in ["checkpoint.pth", "best.pth"]:
        if (out / name).exists():
            tensors = [t for t in tree_flatten(torch.load(out / name))[0] if torch.is_tensor(t)]
            assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), name
    assert "NaN" not in (out / "log.jsonl").read_text() and not (out / "done").exists()
    assert any(r["loss"] is None for r in read_log(out) if "loss" in r)      # JSON's null
    for flag, value in [("--lr-classifier", "inf"), ("--lr-backbone", "0"), ("--lr-classifier", "nan")]:
        one_line_exit(lambda: eval_linear.parse_args(["--data", str(folder), flag, value]), f"{flag} must be positive")


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
    named = {"path": str(backbone_pth), "sha256": sha(backbone_pth)[:12], "momentum_encoder": False}
    (record,) = read_log(out)
    assert record.pop("time") > 0 and record == {**result, "backbone": named}
    assert len(result) == 3 and result["unreadable"] == 0 and json.load(open(out / "done")).items() >= result.items()
    assert printed.count("note: the bank holds 12 images") == (1 if subset else 0)


def shard_scoring_worker(rank, port, store, argv, val, model, out):
    """Rank `rank` of two: a k-NN run (eval_linear.main, as torchrun starts it), then evaluate()
    of a fixed linear protocol's classifier in a process group of its own."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    scored, knn_predict = [], eval_linear.knn_predict          # how many queries each call scores
    eval_linear.knn_predict = lambda bank, labels, q, *a: scored.append(len(q)) or knn_predict(bank, labels, q, *a)
    knn = eval_linear.main(argv)
    model.head.register_forward_hook(lambda m, inputs, y: scored.append(len(inputs[0])))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    args = eval_linear.parse_args(argv)
    run = eval_linear.Run(rank, 2, torch.device("cpu"), args, utils.Progress(str(out), rank, 1, 1, 100),
                          utils.StopSignals(), utils.Unreadable(0.01))
    result = eval_linear.evaluate(model, val, run)
    torch.save({"knn": knn, "evaluate": result, "scored": scored}, out / f"r.{rank}")
    utils.leave_process_group()


def test_two_ranks_score_their_shards_of_the_val_set_as_one_process_scores_it(folder, tmp_path):
    """Each rank scores its own shard of the val set, the hits summed over the ranks (no rank
    scores the whole set): k-NN's top-1 on two ranks against the brute-force closed form on the
    whole set, and evaluate()'s top-1 and top-5 of a fixed classifier on 11 val images (so one
    shard is padded) against the same classifier on all 11 in this process."""
    torch.save(probe_backbone(folder).state_dict(), tmp_path / "backbone.pth")
    argv = common(folder, tmp_path / "knn", "--pretrained", str(tmp_path / "backbone.pth"), "--knn")
    argv.remove("--small-images")     # implied by the 3×3 conv1 in the file
    args = eval_linear.parse_args(argv)
    val = torch.utils.data.Subset(eval_linear.datasets(args, small_images=True)[1], range(11))
    torch.manual_seed(1)
    head = nn.Linear(512, 3)
    model = eval_linear.Classifier(probe_backbone(folder), head, finetune=False)
    forked(shard_scoring_worker, free_port(), tmp_path / "store", argv, val, model, tmp_path)
    ranks = [torch.load(tmp_path / f"r.{rank}", weights_only=False) for rank in (0, 1)]
    net = probe_backbone(folder)
    with torch.no_grad():
        bank, queries = net(images(folder)), net(images(folder, "val"))
        f, y = utils.features(net, val, torch.device("cpu"))
        top = head(f).topk(3, dim=1).indices == y[:, None]
    labels, truth = torch.arange(3).repeat_interleave(8), torch.arange(3).repeat_interleave(4)
    for key, k, t in [("knn5_euclidean_majority_top1", 5, None), ("knn20_cosine_weighted_top1", 20, 0.07)]:
        acc = 100 * (brute_force_knn(bank, labels, queries, k, t) == truth).double().mean().item()
        assert ranks[0]["knn"][key] == pytest.approx(acc, abs=1e-9)
    assert ranks[0]["knn"]["unreadable"] == 0 and ranks[1]["knn"] is not None
    want = (100 * top[:, 0].double().mean().item(), 100 * top.any(dim=1).double().mean().item(), 0)
    for r in ranks:
        assert r["evaluate"] == pytest.approx(want, abs=1e-9)
    assert [r["scored"] for r in ranks] == [[6, 6, 6], [6, 6, 5]]     # 12 queries twice; 11 images


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


# ----------------------------------------------------------------------------- detectron2 weights
def randomised(state):
    """Every floating-point tensor drawn afresh (BN buffers too): a key mapped to the wrong name
    could not hold the same values by chance, as identical initial buffers would."""
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


def detectron2_names_by_pattern(key):
    """detectron2's ResNet names, written from its module layout (stem.conv1 with its norm; stage
    N+1 for layerN; convK with convK.norm; shortcut with shortcut.norm), independently of the code."""
    block = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key)
    if block is None:
        return "stem." + re.sub(r"^bn1\.", "conv1.norm.", key)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", block[3])
    rest = re.sub(r"^downsample\.0\.", "shortcut.", re.sub(r"^downsample\.1\.", "shortcut.norm.", rest))
    return f"res{int(block[1]) + 1}.{block[2]}.{rest}"


def exported(source, out, *extra):
    """eval_linear.py --pretrained SOURCE --export-detectron2 OUT (no --data), then OUT unpickled."""
    p = run_eval(["--pretrained", source, "--export-detectron2", out, *extra])
    assert p.returncode == 0, p.stderr
    assert f"wrote {out}" in p.stdout and not [f for f in os.listdir(os.path.dirname(out)) if ".tmp" in f]
    with open(out, "rb") as f:
        return pickle.load(f)


def test_detectron2_export_maps_every_tensor_to_detectron2s_name(tmp_path):
    """Two layouts (the authors' ResNet-50 checkpoint, our INTL-M checkpoint.pth of a ResNet-18 and
    its momentum encoder): each backbone tensor under its detectron2 name, equal, in float32."""
    r50 = randomised(torchvision.models.resnet50().state_dict())
    torch.save({"arch": "resnet50", "state_dict": {**{f"module.backbone.{k}": v for k, v in r50.items()},
                                                    "module.projection.0.weight": torch.ones(4, 2048)}},
               tmp_path / "authors.pth")
    online = randomised(resnet_backbone("resnet18")[0].state_dict())
    target = {k: v + 1 if v.is_floating_point() else v for k, v in online.items()}
    torch.save({"model": {f"backbone.{k}": v for k, v in online.items()},
                "target": {f"backbone.{k}": v for k, v in target.items()}, "step": 1, "epoch": 1,
                "args": {"arch": "resnet18", "method": "intl-m"}}, tmp_path / "checkpoint.pth")
    cases = [("authors.pth", r50, []), ("checkpoint.pth", online, []),
             ("checkpoint.pth", target, ["--momentum-encoder"])]
    for i, (name, state, extra) in enumerate(cases):
        pkl = exported(tmp_path / name, tmp_path / f"out{i}.pkl", *extra)
        assert pkl["__author__"] == "INTL" and pkl["matching_heuristics"] is True and len(pkl) == 3
        model = pkl["model"]
        kept = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
        assert len(model) == len(kept) and len(kept) < len(state)
        for k, v in kept.items():
            array = model[detectron2_names_by_pattern(k)]
            assert isinstance(array, np.ndarray) and array.dtype == np.float32, k
            assert np.array_equal(array, v.numpy()), k
    # names as detectron2's R-50 has them
    assert {"stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.shortcut.weight",
            "res2.0.shortcut.norm.running_mean", "res4.5.conv2.weight", "res5.2.conv3.norm.bias"} <= \
        set(exported(tmp_path / "authors.pth", tmp_path / "again.pkl")["model"])


def test_detectron2_export_bad_input_is_one_line(backbone_pth, tmp_path):
    assert_one_line_error(run_eval(["--pretrained", backbone_pth, "--export-detectron2", tmp_path / "a.pkl"]),
                          "3x3 stem", "detectron2")
    assert_one_line_error(run_eval(["--export-detectron2", tmp_path / "a.pkl"]), "needs --pretrained")
    torch.save(resnet_backbone("resnet18")[0].state_dict(), tmp_path / "r18.pth")
    assert_one_line_error(run_eval(["--pretrained", tmp_path / "r18.pth", "--export-detectron2",
                                    tmp_path / "missing" / "a.pkl"]), "missing/a.pkl")
    assert os.listdir(tmp_path) == ["r18.pth"]


def registered_roi_heads():
    """The classes detection/train_net.py registers with @ROI_HEADS_REGISTRY.register()."""
    import ast
    tree = ast.parse(open(os.path.join(HERE, "detection", "train_net.py")).read())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and any("ROI_HEADS_REGISTRY.register" in ast.unparse(d) for d in node.decorator_list)}


def config_chain(name):
    """The texts of a detectron2 config and of its _BASE_ files, the config first."""
    texts = []
    while name:
        path = os.path.join(HERE, "detection", name)
        assert os.path.isfile(path), f"_BASE_ {name} does not exist"
        texts.append(open(path).read())
        base = re.search(r"^_BASE_:\s*\"?([^\"\n]+)\"?\s*$", texts[-1], re.M)
        name = base and base[1]
    return texts


def merged(texts, yaml):
    """The configs of a chain merged, the config's values over its bases' (as detectron2 merges)."""
    def merge(base, over):
        return {**base, **{k: merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in over.items()}}
    cfg = {}
    for text in reversed(texts):
        cfg = merge(cfg, yaml.safe_load(text))
    return cfg


@pytest.mark.parametrize("name, iters, datasets", [
    ("coco_R_50_C4_2x.yaml", 180000, "coco_2017_train"), ("pascal_voc_R_50_C4_24k.yaml", 24000, "voc_2012_trainval")])
def test_detectron2_configs_name_their_bases_and_the_registered_head(name, iters, datasets):
    """Each config's _BASE_ exists and the chain names the ROI head train_net.py registers; parsed
    as YAML where PyYAML is installed: R50-C4, SyncBN, torchvision's input (RGB, our MEAN and STD
    × 255, stride in the 3x3 conv), the schedule."""
    texts = config_chain(name)
    assert registered_roi_heads() == {"Res5ROIHeadsExtraNorm"}
    settings = "\n".join(line.split("#")[0] for text in texts for line in text.splitlines())
    assert len(texts) == 2 and 'NAME: "Res5ROIHeadsExtraNorm"' in texts[-1] and "FPN" not in settings
    import yaml         # in the README's test install line (a test dependency, not the code's)
    cfg = merged(texts, yaml)
    model = cfg["MODEL"]
    assert model["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm" and model["RESNETS"]["DEPTH"] == 50
    assert model["RESNETS"]["NORM"] == "SyncBN" and model["RESNETS"]["STRIDE_IN_1X1"] is False
    assert cfg["INPUT"]["FORMAT"] == "RGB"
    assert "NAME" not in model.get("BACKBONE", {})     # detectron2's default: the plain ResNet, no FPN
    assert model["PIXEL_MEAN"] == pytest.approx([255 * m for m in MEAN], abs=1e-3)
    assert model["PIXEL_STD"] == pytest.approx([255 * s for s in STD], abs=1e-3)
    assert cfg["SOLVER"]["MAX_ITER"] == iters and datasets in cfg["DATASETS"]["TRAIN"]
    assert model["MASK_ON"] is (name.startswith("coco"))


# ----------------------------------------------------------------------------- flags that mean what they say
def test_lr_classifier_is_the_classifiers_lr_in_every_protocol(folder, backbone_pth, tmp_path):
    """The linear protocol's SGD runs at --lr-classifier × batch/256; --lr is the same flag."""
    for flag, lr in [("--lr-classifier", 0.2), ("--lr", 0.3)]:
        out = tmp_path / flag
        on_one_thread(eval_linear.main, *common(folder, out, "--pretrained", backbone_pth, "--epochs", "1", flag, lr))
        assert [r["lr"] for r in epoch_records(out)] == [pytest.approx(lr * 8 / 256, rel=1e-12)]
        group = torch.load(out / "checkpoint.pth")["optimizer"]["param_groups"][0]
        assert group["base_lr"] == pytest.approx(lr * 8 / 256, rel=1e-12)
    parse = lambda *a: eval_linear.parse_args(["--data", str(folder), *a]).lr_classifier
    assert (parse(), parse("--weights", "finetune"), parse("--protocol", "features")) == (0.4, 0.2, 0.01)
    assert parse("--protocol", "features", "--lr-classifier", "0.05") == 0.05


def help_entries(main_help):
    """{flag: its help text} from a --help output: an entry starts at a line '  -FLAG', its help
    follows the invocation after two spaces or on the indented lines below."""
    entries, lines = {}, main_help.split("options:\n", 1)[1].splitlines()
    for line in lines:
        if re.match(r"  -", line):
            invocation, _, text = line.strip().partition("  ")
            flag = entries.setdefault(invocation.split(",")[-1].split()[0], [])
            flag.append(text.strip())
        elif line.strip():
            flag.append(line.strip())
    return {k: " ".join(v).strip() for k, v in entries.items()}


def test_eval_linear_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit) as e:
        eval_linear.parse_args(["--help"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    entries = help_entries(printed)
    assert "(default: None)" not in printed and "--allow-changed-args" in entries and "--lr" in entries
    assert "(default: False)" not in printed and f"(default: {min(8, utils.CPU_CORES)})" not in printed
    for flag, text in entries.items():
        assert text, f"{flag} has no help"
        assert text.count("default") <= 1, f"{flag}: {text}"


def test_eval_linear_allow_changed_args_continues_with_this_runs_settings(folder, backbone_pth, tmp_path):
    out = tmp_path / "linear"
    run = lambda *extra: on_one_thread(eval_linear.main, *common(folder, out, "--pretrained", backbone_pth,
                                                                 "--epochs", "2", "--schedule", "cos", *extra))
    run("--stop-epoch", "1")
    one_line_exit(lambda: run("--lr-classifier", "0.2"), "lr-classifier 0.4 -> 0.2", "--allow-changed-args",
                  "--restart")
    run("--lr-classifier", "0.2", "--allow-changed-args")
    # epoch 2 of 2 under the cosine: half of this run's lr, not of the file's
    assert [r["lr"] for r in epoch_records(out)] == pytest.approx([0.4 * 8 / 256, 0.2 * 8 / 256 * 0.5], rel=1e-12)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["args"]["lr_classifier"] == 0.2
    # never another backbone: the checkpoint holds the backbone it was made from
    other = tmp_path / "other.pth"
    torch.save(probe_backbone(folder, seed=1).state_dict(), other)
    one_line_exit(lambda: on_one_thread(eval_linear.main, *common(folder, out, "--pretrained", other, "--epochs", "3",
                                                                  "--allow-changed-args")), "backbone", "--restart")


# ----------------------------------------------------------------------------- log.jsonl names the backbone; the step schedule
def test_eval_records_name_their_backbone_and_restart_starts_a_fresh_log(folder, backbone_pth, tmp_path):
    out = tmp_path / "linear"
    on_one_thread(eval_linear.main, *common(folder, out, "--pretrained", backbone_pth, "--epochs", "1"))
    first = {"path": str(backbone_pth), "sha256": sha(backbone_pth)[:12], "momentum_encoder": False}
    assert [r["backbone"] for r in epoch_records(out)] == [first]
    other = tmp_path / "other.pth"
    torch.save(probe_backbone(folder, seed=1).state_dict(), other)
    on_one_thread(eval_linear.main, *common(folder, out, "--pretrained", other, "--epochs", "1", "--restart"))
    assert [r["backbone"]["sha256"] for r in epoch_records(out)] == [sha(other)[:12]]
    assert [r["backbone"] for r in epoch_records(out, "log.jsonl.old")] == [first]
    on_one_thread(eval_linear.main, *common(folder, out, "--knn", "--restart"))     # no --pretrained
    assert [r["backbone"] for r in read_log(out)] == ["random"]


def test_linear_step_schedule_never_decays_at_epoch_0(folder, backbone_pth, tmp_path):
    """Milestones at 60 % and 80 % of the epochs, rounded, at epoch 1 at the earliest."""
    want = {1: [1], 2: [1, 0.1], 3: [1, 1, 0.01], 5: [1, 1, 1, 0.1, 0.01], 10: [1] * 6 + [0.1] * 2 + [0.01] * 2}
    for epochs, factors in want.items():
        assert [eval_linear.lr_factor(e, epochs, "step") for e in range(epochs)] == pytest.approx(factors)
    out = tmp_path / "one"
    on_one_thread(eval_linear.main, *common(folder, out, "--pretrained", backbone_pth, "--epochs", "1"))
    assert epoch_records(out)[0]["lr"] == pytest.approx(0.4 * 8 / 256, rel=1e-12)


# ----------------------------------------------------------------------------- progress of long passes
def test_eval_progress_reports_elapsed_time_and_the_eta_at_the_mean_rate(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(utils.time, "monotonic", lambda: now[0])
    lines, seen = [], []
    for item in utils.progress(range(20), 20, "pass", log=lines.append):
        seen.append(item)
        now[0] += 3 if item < 10 else 363       # 3 s an item, then 6 min 3 s
    assert seen == list(range(20)) and len(lines) == 10           # every 2 items, the last included
    pattern = r"pass (\d+)/20, elapsed (\d+):(\d\d):(\d\d), ETA (\d+):(\d\d):(\d\d) \(at \d\d:\d\d\)"
    parsed = [[int(v) for v in re.fullmatch(pattern, line).groups()] for line in lines]
    seconds = lambda h, m, s: 3600 * h + 60 * m + s
    for i, *t in parsed:
        elapsed = 3 * min(i, 10) + 363 * max(0, i - 10)
        assert seconds(*t[:3]) == elapsed and seconds(*t[3:]) == round(elapsed / i * (20 - i))
    assert parsed[-1][0] == 20 and parsed[-1][4:] == [0, 0, 0]
    assert utils.clock(3 * 3600 + 7 * 60 + 5.4) == "3:07:05" and utils.clock(100 * 3600) == "100:00:00"
    short = []     # fewer items than announced: still a line after the last
    list(utils.progress(range(3), 10, "short", log=short.append, every=2))
    assert [line.split(",")[0] for line in short] == ["short 2/10", "short 3/10"]


@pytest.mark.parametrize("mode", [["--knn"], ["--protocol", "features", "--epochs", "2"]])
def test_knn_and_features_protocol_print_extraction_progress(folder, backbone_pth, tmp_path, mode):
    """24 train and 12 val images in batches of 8: 3 and 2 batches, each pass ending on a line with its ETA."""
    p = run_eval(common(folder, tmp_path / "o", "--pretrained", backbone_pth, *mode))
    assert p.returncode == 0, p.stderr[-3000:]
    eta = r", elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d \(at \d\d:\d\d\)"
    for name, batches in [("train", 3), ("val", 2)]:
        found = re.findall(rf"^\d\d:\d\d:\d\d {name} features: batch (\d+)/{batches}{eta}$", p.stdout, re.M)
        assert found and found[-1] == str(batches), p.stdout


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
    got = utils.eval_transform(224, MEAN, STD)(img)                           # interpolation differs
    assert got.shape == (3, 224, 224) and torch.equal(got, want)
    small = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert torch.equal(utils.eval_transform(32, MEAN, STD)(small), T.Normalize(MEAN, STD)(T.ToTensor()(small)))
    up = small.resize((48, 48), Image.BICUBIC)
    assert torch.allclose(utils.eval_transform(48, MEAN, STD)(small), T.Normalize(MEAN, STD)(T.ToTensor()(up)),
                          atol=0.05)


def test_fashion_mnist_is_evaluated_at_the_training_crops_magnification():
    """Through the ImageNet stem, 32-px data is evaluated at 48 px, between the median and the mean
    magnification of the recipe's own crops (RandomResizedCrop's sampled boxes); the 3x3 stem
    (CIFAR, --small-images) keeps 32 px, an image folder the 224-px centre view."""
    fm = intl.parse_args(["--data", "fashion-mnist"])
    crop = T.RandomResizedCrop(32, scale=fm.recipe[0].scale)
    torch.manual_seed(0)
    boxes = [crop.get_params(torch.zeros(1, 32, 32), crop.scale, crop.ratio) for _ in range(20000)]
    magnification = [32 / np.sqrt(h * w) for _, _, h, w in boxes]
    assert 1.3 < np.median(magnification) < utils.eval_side(fm.data, fm.small_images) / 32 < np.mean(magnification) < 1.7
    assert intl.monitor_data(fm, 4, 2)[0][0][0].shape == (3, 48, 48)
    for argv, side in [(["--data", "fashion-mnist", "--small-images"], 32), (["--data", "cifar10"], 32),
                       (["--data", "DIR"], 224)]:
        args = intl.parse_args(argv)
        assert utils.eval_side(args.data, args.small_images) == side


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
        assert (a.protocol, a.epochs, a.batch_size, a.lr_classifier) == ("features", 500, 1000, 0.01)
    a = parse(["--data", str(folder)])
    assert (a.protocol, a.epochs, a.batch_size, a.lr_classifier, a.schedule) == ("images", 100, 256, 0.4, "step")
    a = parse(["--data", "fashion-mnist", "--weights", "finetune"])
    assert (a.protocol, a.epochs, a.schedule) == ("images", 20, "const")
    assert parse(["--data", "cifar10", "--protocol", "images"]).epochs == 100
    finetune = common(folder, tmp_path, "--protocol", "features", "--weights", "finetune")
    assert_one_line_error(run_eval(finetune), "--protocol features", "--weights finetune")
    assert_one_line_error(run_eval(common(folder, tmp_path, "--protocol", "features", "--schedule", "cos")),
                          "--schedule")


# ----------------------------------------------------------------------------- run_imagenet.sh
# the paper's rows, written out: epochs, lr, method, multi-crop, linear lr, backbone lr of
# fine-tuning (None: no semi-supervised stage), arch, projector, batch, weight decay, m0
PAPER_ROWS = {"100": (100, 0.5, "intl-m", True, 0.4, 0.004, "resnet50", "8192-8192-8192", 256, 1e-5, 0.996),
              "200": (200, 0.4, "intl-m", True, 0.4, 0.004, "resnet50", "8192-8192-8192", 256, 1e-5, 0.996),
              "400": (400, 0.4, "intl-m", True, 0.4, 0.004, "resnet50", "8192-8192-8192", 256, 1e-5, 0.996),
              "800": (800, 0.3, "intl-m", True, 0.4, 0.004, "resnet50", "8192-8192-8192", 256, 1e-5, 0.996),
              "800-2view": (800, 0.3, "intl", False, 0.2, 0.006, "resnet50", "8192-8192-8192", 256, 1e-5, 0.996),
              "in100": (400, 0.5, "intl", False, 0.2, None, "resnet18", "4096-4096-8192", 128, 2.5e-5, 0.996),
              "cifar10": (1000, 0.3, "intl", False, None, None, "resnet18", "2048-2048-2048", 256, 1e-4, 0.999),
              "cifar100": (1000, 0.3, "intl", False, None, None, "resnet18", "2048-2048-2048", 256, 1e-4, 0.999)}
# where each row's runs go by default, relative to where the script runs
RUN_FOLDERS = {"100": "runs/in1k-100ep", "200": "runs/in1k-200ep", "400": "runs/in1k-400ep", "800": "runs/in1k-800ep",
               "800-2view": "runs/in1k-800ep-2views", "in100": "runs/in100-400ep", "cifar10": "runs/cifar10-1000ep",
               "cifar100": "runs/cifar100-1000ep"}
PRETRAIN_EXTRA = ["--save-every-minutes", "30", "--gpu-aug", "--compile"]
EVAL_EXTRA = ["--workers", "3", "--print-freq", "7"]


def dry_run(tmp_path, **env):
    """The commands run_imagenet.sh prints with DRY_RUN=1, run from tmp_path (not the project's
    folder), each split into its words; ENV adds to the environment, None removes a variable."""
    env = {**os.environ, "DRY_RUN": "1", "DATA": "/data/imagenet", "OUT": str(tmp_path / "out"), **env}
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run(["bash", os.path.join(HERE, "run_imagenet.sh")], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def script(cmd, tmp_path):
    """The Python script a command runs, as found from where the command runs."""
    path = next(w for w in cmd if w.endswith(".py"))
    assert os.path.isfile(os.path.join(tmp_path, path)), path
    return os.path.basename(path)


@pytest.mark.parametrize("schedule", sorted(PAPER_ROWS))
def test_run_imagenet_hyper_parameters(schedule, tmp_path):
    epochs, lr, method, multi_crop, linear_lr, backbone_lr, arch, projector, batch, wd, m0 = PAPER_ROWS[schedule]
    cmds = dry_run(tmp_path, SCHEDULE=schedule, SUBSET_1="/lists/1percent.txt",
                   SUBSET_10="/lists/10percent.txt", NPROC="8", NNODES="4", NODE_RANK="2",
                   MASTER_ADDR="10.1.2.3", MASTER_PORT="1234", OUT=None, EXTRA_ARGS=" ".join(PRETRAIN_EXTRA),
                   EVAL_ARGS=" ".join(EVAL_EXTRA), **({"DATA": ""} if schedule.startswith("cifar") else {}))
    # pretraining, linear, k-NN, and the two subsets of the rows fine-tuned (ImageNet's, not 100's)
    assert [c[0] for c in cmds] == ["torchrun"] * (5 if backbone_lr else 3)
    for c in cmds:
        assert {"--nproc_per_node=8", "--nnodes=4", "--node_rank=2", "--master_addr=10.1.2.3",
                "--master_port=1234"} <= set(c)
        assert flag(c, "--arch") == arch
        assert flag(c, "--data") == (schedule if schedule.startswith("cifar") else "/data/imagenet")
        assert flag(c, "--output-dir").startswith(RUN_FOLDERS[schedule] + "/")
    pretrain, linear, *rest = cmds
    assert script(pretrain, tmp_path) == "intl.py" and pretrain[-len(PRETRAIN_EXTRA):] == PRETRAIN_EXTRA
    assert int(flag(pretrain, "--epochs")) == epochs and float(flag(pretrain, "--lr")) == lr
    assert flag(pretrain, "--method") == method and ("--multi-crop" in pretrain) == multi_crop
    # two views on ImageNet are asked for: intl.py's default on an image folder is multi-crop
    assert ("--no-multi-crop" in pretrain) == (not multi_crop and not schedule.startswith("cifar"))
    assert flag(pretrain, "--projector") == projector and int(flag(pretrain, "--batch-size")) == batch
    assert float(flag(pretrain, "--wd")) == wd
    # INTL has no momentum target: the flag (which intl.py refuses then) only on INTL-M rows
    assert (float(flag(pretrain, "--target-momentum")) == m0) if method == "intl-m" else "--target-momentum" not in pretrain
    assert flag(linear, "--pretrained") == flag(pretrain, "--output-dir") + "/backbone.pth"
    for c in [linear, *rest]:
        assert script(c, tmp_path) == "eval_linear.py" and c[-len(EVAL_EXTRA):] == EVAL_EXTRA
    if linear_lr:
        assert float(flag(linear, "--lr-classifier")) == linear_lr and "--lr" not in linear
    else:                                       # the small-data protocol on features
        assert flag(linear, "--protocol") == "features" and not {"--lr", "--lr-classifier"} & set(linear)
    assert "--knn" in rest[0] and flag(rest[0], "--pretrained") == flag(linear, "--pretrained")
    subsets = ["/lists/1percent.txt", "/lists/10percent.txt"] if backbone_lr else []
    for c, subset in zip(rest[1:], subsets, strict=True):
        assert flag(c, "--weights") == "finetune" and flag(c, "--train-subset") == subset
        assert int(flag(c, "--epochs")) == 20 and float(flag(c, "--lr-classifier")) == 0.2
        assert float(flag(c, "--lr-backbone")) == backbone_lr


def test_run_imagenet_skips_finished_stages(tmp_path):
    cmds = dry_run(tmp_path, SCHEDULE="100", NPROC="1")
    assert len(cmds) == 3   # no subset lists: no semi-supervised stage
    os.makedirs(tmp_path / "out" / "pretrain")
    (tmp_path / "out" / "pretrain" / "done").touch()
    assert dry_run(tmp_path, SCHEDULE="100", NPROC="1") == cmds[1:]


def test_run_imagenet_counts_a_process_per_visible_gpu(tmp_path):
    """CUDA_VISIBLE_DEVICES's entries when set, else the GPUs nvidia-smi lists (here stand-ins: one
    prints what nvidia-smi -L prints on a 4-GPU machine, MIG lines too, one fails as it does without
    a driver); NPROC first."""
    smi = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i}abc)\\n" for i in range(4))
    for gpus, body in [("4", f"printf '{smi}  MIG 3g.40gb Device 0: (UUID: MIG-1)\\n'"), ("0", "exit 9")]:
        os.makedirs(tmp_path / gpus)
        (tmp_path / gpus / "nvidia-smi").write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / gpus / "nvidia-smi").chmod(0o755)
    for gpus, visible, nproc, want in [("4", "2,5,7", None, 3), ("4", "GPU-1abc", None, 1), ("4", "", None, 4),
                                       ("4", None, None, 4), ("4", "2,5,7", "2", 2), ("0", None, None, 1)]:
        cmds = dry_run(tmp_path, PATH=f"{tmp_path / gpus}:{os.environ['PATH']}", CUDA_VISIBLE_DEVICES=visible,
                       NPROC=nproc)
        launcher = ["python3"] if want == 1 else ["torchrun", f"--nproc_per_node={want}"]   # one: no torchrun
        assert {tuple(c[:len(launcher)]) for c in cmds} == {tuple(launcher)}, (gpus, visible, nproc)


def benchmark_args(argv):
    own, rest = benchmark.parser().parse_known_args(argv)
    return intl.parse_args(rest, need_data=False) if own.mode in ("step", "aug") else own


# each script's own parser, as the script runs it
PARSERS = {"intl.py": intl.parse_args, "eval_linear.py": eval_linear.parse_args,
           "benchmark.py": benchmark_args, "figures.py": figures.parse_args}


def refusal(cmd):
    """'' if the script of a printed command (split into words) takes its arguments, else its
    one-line refusal: the script's own parser, in this process."""
    at = next(i for i, w in enumerate(cmd) if os.path.basename(w) in PARSERS)
    name, argv = os.path.basename(cmd[at]), cmd[at + 1:]
    if name == "intl.py" and not argv:
        return ""                                   # the quick start: no flags to parse
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            PARSERS[name](argv)
        except SystemExit as e:
            if e.code not in (0, None):
                return f"{shlex.join(cmd)}\n  -> {e.code}"
    return ""


@pytest.mark.parametrize("schedule", sorted(PAPER_ROWS))
def test_every_command_run_imagenet_prints_is_taken_by_its_script(schedule, tmp_path):
    """Each row's commands, with and without the subset lists, on one process and on 8, through
    the parser of the script each runs: a flag a row passes that its script refuses (e.g.
    --target-momentum on an INTL row) would stop that row at its first command."""
    data = {"DATA": ""} if schedule.startswith("cifar") else {}
    for env in [{"NPROC": "1"}, {"NPROC": "8", "SUBSET_1": "1percent.txt", "SUBSET_10": "10percent.txt"},
                {"NPROC": "1", "EXTRA_ARGS": " ".join(PRETRAIN_EXTRA), "EVAL_ARGS": " ".join(EVAL_EXTRA)}]:
        cmds = dry_run(tmp_path, SCHEDULE=schedule, **data, **env)
        assert len(cmds) >= 3 and [refusal(c) for c in cmds] == [""] * len(cmds)


def printed_commands(text, markdown=True):
    """Every command a page (or a docstring: every line) shows that runs one of the scripts, split
    into words: lines of its code blocks (continuation lines joined) and inline code, from `python`
    or `torchrun` on, up to a shell operator or a comment; placeholders get sample values."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) if markdown else [text]
    for i, b in enumerate(blocks):        # the block's shell variables, VAR="..." (lines joined)
        for name, value in re.findall(r'^(\w+)="([^"]*)"', b, re.M | re.S):
            blocks[i] = b.replace(f"${name}", " ".join(value.split()))
    lines = [line for b in blocks for line in re.sub(r"\\+\n", " ", b).splitlines()]
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)) if markdown else []
    for line in lines:
        if not re.search(r"\b(python3?|torchrun)\b.*\b(intl|eval_linear|benchmark|figures)\.py\b", line):
            continue            # not a command (a program's output, prose)
        for name, value in [("$NODE_RANK", "0"), ("$MASTER_ADDR", "node0"), ("$HOST", "node0"),
                            ("$d", "512"), ("$b", "256"), ("$t", "4"), ("--seed S", "--seed 0"),
                            ("[FLAGS]", "--transform power --power 0.25")]:
            line = line.replace(name, value)
        line = re.sub(r"\[(--[\w-]+)\]", r"\1", line)        # [--flag]: an optional flag, given
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        try:
            words, part = list(lex), []
        except ValueError:      # an unclosed quote: a usage line in words ("[intl.py's flags]")
            continue
        for w in words + [";"]:
            if w and set(w) <= set("&|;()<>"):
                runs = [i for i, v in enumerate(part) if v in ("python", "python3", "torchrun")]
                if runs and any(os.path.basename(v) in PARSERS for v in part):
                    cmd = part[runs[0]:]
                    yield [x for v in cmd for x in (["--data", "/imagenet"] if v == "..." else [v])]
                part = []
            else:
                part.append(w)


def test_every_command_the_docs_print_is_taken_by_its_script():
    """README.md, docs/*.md and detection/README.md: each command that runs intl.py, eval_linear.py,
    benchmark.py or figures.py passes that script's parser, its placeholders given sample values."""
    pages = ["README.md", "detection/README.md"] + sorted(
        os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "docs", "*.md")))
    seen = {}
    for page in pages:
        cmds = list(printed_commands(open(os.path.join(HERE, page)).read()))
        seen[page] = len(cmds)
        assert [refusal(c) for c in cmds] == [""] * len(cmds), page
    assert seen["README.md"] >= 6 and seen["detection/README.md"] >= 1, seen
    assert sum(seen.values()) >= 40, seen
    for module in [intl, eval_linear, benchmark, figures]:       # what --help and the file's head show
        cmds = list(printed_commands(module.__doc__, markdown=False))
        assert [refusal(c) for c in cmds] == [""] * len(cmds), module.__name__
        assert cmds or module is benchmark, module.__name__


# ----------------------------------------------------------------------------- the paper's rows, end to end
SYNSETS = ("n01440764", "n01443537")


def imagenet_folder(root, n_train=8, n_val=4, size=40):
    """train/ and val/ in ImageNet's layout, files named as ImageNet's and its SimCLR subset lists
    name them (n01440764_0.JPEG in train/n01440764/), and the 1 % and 10 % lists: 2 and 4 names."""
    rng = np.random.RandomState(0)
    names = []
    for split, n in [("train", n_train), ("val", n_val)]:
        for c, synset in enumerate(SYNSETS):
            os.makedirs(os.path.join(root, split, synset))
            for i in range(n):
                img = (rng.rand(size, size, 3) * 80 + (60 + 120 * c, 40, 200 - 120 * c)).clip(0, 255)
                name = f"{synset}_{i}.JPEG"
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(root, split, synset, name))
                names += [name] if split == "train" else []
    for pct, k in [(1, 1), (10, 2)]:
        with open(os.path.join(root, f"{pct}percent.txt"), "w") as f:
            f.write("".join(f"{synset}_{i}.JPEG\n" for synset in SYNSETS for i in range(k)))
    return root


def row(tmp_path, out, extra, evals, **env):
    """bash run_imagenet.sh on one process, from tmp_path, in a process group of its own (a
    scheduler's signal goes to the group)."""
    env = {**os.environ, "NPROC": "1", "OUT": str(out), "EXTRA_ARGS": extra, "EVAL_ARGS": evals,
           "OMP_NUM_THREADS": str(torch.get_num_threads()),     # as this process: the same sums
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", **env}
    return subprocess.Popen(["bash", os.path.join(HERE, "run_imagenet.sh")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finished(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def done(out, stage):
    with open(os.path.join(out, stage, "done")) as f:
        return json.load(f)


SHRINK = "--arch resnet18 --projector 16-16 --batch-size 8 --warmup-epochs 0 --workers 0 --print-freq 1"
EVAL_SHRINK = "--arch resnet18 --epochs 2 --batch-size 8 --workers 0 --print-freq 1"


def test_an_intl_m_multi_crop_row_runs_end_to_end_and_a_rerun_trains_nothing(tmp_path):
    """SCHEDULE=100 (INTL-M, the six crops of 224 to 96 px) on an 8-image folder: pretraining, the
    linear protocol, the k-NN and fine-tuning on both subset lists, each done; then the same
    command again runs nothing and says so."""
    data = imagenet_folder(str(tmp_path / "imagenet"), n_train=4, n_val=2)
    env = dict(SCHEDULE="100", DATA=data, SUBSET_1=f"{data}/1percent.txt", SUBSET_10=f"{data}/10percent.txt")
    out = tmp_path / "row"
    code, _, err = finished(row(tmp_path, out, SHRINK + " --epochs 1", EVAL_SHRINK, **env))
    assert code == 0 and "every stage" in err, err[-3000:]
    ckpt = torch.load(out / "pretrain" / "checkpoint.pth")
    assert ckpt["args"]["method"] == "intl-m" and ckpt["target"] is not None
    assert [c["size"] for c in ckpt["args"]["recipe"]] == [224, 224, 192, 160, 128, 96]
    assert done(out, "pretrain")["epochs"] == 1 and done(out, "linear")["epochs"] == 2
    assert set(done(out, "knn")) >= {"knn5_euclidean_majority_top1", "knn20_cosine_weighted_top1"}
    for pct, n in [(1, 2), (10, 4)]:
        args = json.load(open(out / f"semi-{pct}" / "args.json"))
        assert (args["weights"], args["lr_backbone"], args["classes"]) == ("finetune", 0.004, 2)
        assert done(out, f"semi-{pct}")["epochs"] == 2 and f"{n} train / 4 val" in open(out / f"semi-{pct}" / "log.txt").read()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, stdout, err = finished(row(tmp_path, out, SHRINK + " --epochs 1", EVAL_SHRINK, **env), timeout=60)
    assert code == 0 and err.count("is done") == 6, err         # 5 stages skipped, and the row
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def cut_during(proc, log, marker, timeout=600):
    """SIGTERM to the row's process group (what a scheduler sends) once its stage's log.txt shows
    `marker`: the stage in flight saves and exits, then the script with code 143."""
    end = time.time() + timeout
    while not (os.path.exists(log) and marker in open(log).read()):
        assert proc.poll() is None and time.time() < end, proc.communicate()
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGTERM)
    code, _, err = finished(proc)
    assert code == 143 and "stopped by SIGTERM" in err, err[-3000:]
    return err


def test_a_two_view_row_cut_by_sigterm_in_every_stage_ends_as_an_uncut_one(tmp_path):
    """SCHEDULE=800-2view (INTL, two views; 32-px crops here): first stopped by --stop-epoch 1, which
    leaves the pretraining not done (exit 75, nothing evaluated), then SIGTERM during a stage of
    each kind in turn (pretraining, linear protocol, k-NN, fine-tuning: semi-10's, semi-1 runs
    through); each rerun resumes the stage it cut. The end equals the same commands run straight:
    weights, best accuracy and every result."""
    data = imagenet_folder(str(tmp_path / "imagenet"), n_train=16, n_val=8)
    env = dict(SCHEDULE="800-2view", DATA=data, SUBSET_1=f"{data}/1percent.txt",
               SUBSET_10=f"{data}/10percent.txt")
    extra, evals = SHRINK + " --small-images --epochs 2", EVAL_SHRINK + " --batch-size 4"
    cut = tmp_path / "cut"
    code, _, err = finished(row(tmp_path, cut, extra + " --stop-epoch 1", evals, **env))
    assert code == 75 and "stopped before the end of its schedule" in err, err[-3000:]
    assert not (cut / "pretrain" / "done").exists() and not (cut / "linear").exists()
    for stage, marker in [("pretrain", "ep 2/2 step 1/4"), ("linear", "ep 1/2 step 1/"),
                          ("knn", "features: batch 1/"), ("semi-10", "ep 1/2 step 1/")]:
        cut_during(row(tmp_path, cut, extra, evals, **env), cut / stage / "log.txt", marker)
        assert not (cut / stage / "done").exists()
    code, _, err = finished(row(tmp_path, cut, extra, evals, **env))
    assert code == 0 and "every stage" in err, err[-3000:]
    straight = tmp_path / "straight"      # the same commands, run uninterrupted in this process
    for cmd in dry_run(tmp_path, OUT=str(straight), NPROC="1", EXTRA_ARGS=extra, EVAL_ARGS=evals, **env):
        script, argv = os.path.basename(cmd[1]), cmd[2:]
        main = (lambda a: intl.train(intl.parse_args(a))) if script == "intl.py" else eval_linear.main
        assert in_process(main, argv).returncode == 0, script
    for stage in ["pretrain", "linear", "knn", "semi-1", "semi-10"]:
        a, b = done(straight, stage), done(cut, stage)
        assert a.pop("time") and b.pop("time") and a == b, stage
        assert ("resumed from" in open(cut / stage / "log.txt").read()) == (stage not in ("knn", "semi-1"))
    for stage, name in [("pretrain", "checkpoint.pth"), ("linear", "best.pth"), ("semi-10", "checkpoint.pth")]:
        a, b = torch.load(straight / stage / name), torch.load(cut / stage / name)
        for key in ("model", "optimizer") if "checkpoint" in name else [None]:
            flat_a, flat_b = tree_flatten(a if key is None else a[key])[0], tree_flatten(b if key is None else b[key])[0]
            assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat_a, flat_b, strict=True))


def test_a_cifar_row_runs_end_to_end_on_files_in_cifars_format(tmp_path):
    """SCHEDULE=cifar10 reads ./data/cifar-10-batches-py: pretraining with the authors' CIFAR
    setting, the probe on features and the k-NN, each done."""
    fake_cifar(str(tmp_path / "data"), "cifar10", n_per_batch=4)
    out = tmp_path / "row"
    code, _, err = finished(row(tmp_path, out, SHRINK.replace("--arch resnet18 ", "") + " --epochs 1",
                                "--epochs 5 --batch-size 8 --workers 0", SCHEDULE="cifar10", DATA=""))
    assert code == 0 and "every stage" in err, err[-3000:]
    args = json.load(open(out / "pretrain" / "args.json"))
    assert (args["data"], args["small_images"], args["decay_all"], args["method"]) == ("cifar10", True, True, "intl")
    assert done(out, "linear")["protocol"] == "features" and "knn5_euclidean_majority_top1" in done(out, "knn")


# ============================================================================= gpu_aug.py
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


# ----------------------------------------------------------------------------- ops = torchvision ops
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
    img = torch.from_numpy(utils.load_fashion_mnist()[0][:1]).expand(3, -1, -1)[None]   # [1, 3, 28, 28]
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
    views = gpu_aug.multi_view(synthetic_images(3, 32, 32), intl.TWO_VIEWS_32PX)
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2


def same_views_up_to_a_level(a, b, max_share=0.01):
    """Normalised views a, b differ, un-normalised, by float error, or on at most max_share of
    their values by one grey level: an ulp on either side of a level boundary before the blur
    (then a few pixels move by one level, never more: its passes are rounded averages) or of
    solarize's threshold (it also moves the pixel by a level: 1 - 128/255 = 127/255)."""
    d = (a - b).abs() * torch.tensor(STD).view(3, 1, 1)          # on the [0, 1] scale
    close, one_level = d < 1e-4, (d - 1 / 255).abs() < 1e-4
    return bool((close | one_level).all()) and (~close).float().mean().item() <= max_share


@pytest.mark.gpu
def test_the_gpu_gives_the_same_views_and_never_waits_for_the_host():
    """Same parameters, same crop on the GPU as on the CPU, up to float rounding; with a
    generator on the GPU, multi_view never synchronises with the host (CUDA's sync debug mode
    raises if it does)."""
    device, crop = "cuda", intl.Crop(96, (0.08, 1.0), 0.5, 0.5)
    img = synthetic_images(8, 160, 200)
    p = gpu_aug.sample_params(8, 160, 200, crop, torch.Generator().manual_seed(0))
    on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in p.items()}
    ours = gpu_aug.apply_params(img.to(device), on_device, crop).cpu()
    assert same_views_up_to_a_level(ours, gpu_aug.apply_params(img, p, crop))
    img, g = img.to(device), torch.Generator(device).manual_seed(0)
    views = gpu_aug.multi_view(img, intl.MULTI_CROP, g)        # warm up (kernels)
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
    data = varied_folder(str(tmp_path / "data"), n_per_class=8)            # one batch of 16
    args = ["--data", data, *SMALL, "--small-images", "--batch-size", "16", "--epochs", "2",
            "--method", "intl-m", "--gpu-aug"]
    run_intl(*args, "--output-dir", tmp_path / "straight")
    assert json.load(open(tmp_path / "straight" / "args.json"))["gpu_aug"] is True
    run_intl(*args, "--output-dir", tmp_path / "split", "--stop-epoch", "1")
    run_intl(*args, "--output-dir", tmp_path / "split")
    a = torch.load(tmp_path / "straight" / "checkpoint.pth")
    b = torch.load(tmp_path / "split" / "checkpoint.pth")
    assert a["step"] == b["step"] == 2 and a["rng"][0]["aug"] is not None
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # another generator state gives other crops, hence other weights
    c = dict(a["rng"][0], aug=torch.Generator().manual_seed(123).get_state())
    torch.save(dict(a, epoch=1, step=1, rng=[c]), tmp_path / "other.pth")
    run_intl(*args, "--output-dir", tmp_path / "other", "--resume", tmp_path / "other.pth")
    d = torch.load(tmp_path / "other" / "checkpoint.pth")
    assert not torch.equal(a["model"]["projector.0.weight"], d["model"]["projector.0.weight"])


def tiny_bn_encoder():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return intl.Encoder(backbone, intl.projector(8, "16-12"))


def step_on_tiny_encoder(amp="off", compile=False, device="cpu"):
    """A closure running one INTL-M train_step of a small BN network on fixed views (a batch of
    16, β 0.05 as at the paper's batch of 256), and the network."""
    args = intl.parse_args(["--data", "fashion-mnist", "--method", "intl-m", "--batch-size", "16",
                            "--beta", "0.05"])
    online = tiny_bn_encoder().to(device)
    target = copy.deepcopy(online).requires_grad_(False)
    model = torch.compile(online) if compile else online
    optimizer = torch.optim.SGD(intl.param_groups(online, 1e-4), lr=0.1, momentum=0.9,
                                fused=device == "cuda")
    scaler = torch.amp.GradScaler(device, enabled=False)
    amp = utils.autocast_dtype(amp, torch.device(device))
    state = utils.TrainState(model, target, optimizer, scaler, None, amp, torch.device(device))
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(16, 3, 12, 12, generator=g).to(device) for _ in range(3)]
    return lambda: intl.train_step(state, views, 0.99, args), online


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
    """A checkpoint of an unfused SGD (a CPU run, contiguous weights) resumed by a fused one (a GPU
    run, its convolution weights channels_last) stays fused, gives each momentum buffer its
    parameter's values and layout (fused SGD needs equal strides), and an fp16 GradScaler steps it."""
    online = tiny_bn_encoder()
    unfused = torch.optim.SGD(intl.param_groups(online, 1e-4), lr=0.1, momentum=0.9)
    online(torch.randn(4, 3, 8, 8)[None].unbind())[0].sum().backward()
    unfused.step()
    torch.save({"model": online.state_dict(), "target": None, "optimizer": unfused.state_dict(),
                "scaler": torch.amp.GradScaler("cpu").state_dict(), "rng": [utils.rng_state()],
                "epoch": 1, "step": 1}, tmp_path / "c.pth")
    saved = [unfused.state[p]["momentum_buffer"].clone() for p in online.parameters()]
    online = tiny_bn_encoder().to(memory_format=torch.channels_last)        # as build_state on a GPU
    conv = online.backbone[0].weight
    assert conv.stride() != conv.contiguous().stride()                      # the layouts differ
    fused = torch.optim.SGD(intl.param_groups(online, 1e-4), lr=0.1, momentum=0.9, fused=True)
    utils.zero_momentum(fused)
    scaler = torch.amp.GradScaler("cpu")
    state = utils.TrainState(online, None, fused, scaler, device=torch.device("cpu"))
    args = argparse.Namespace(arch="tiny", method="intl", projector="16-12", output_dir=str(tmp_path))
    assert resume_into(state, args, tmp_path / "c.pth") == (1, 1)
    assert all(g["fused"] for g in fused.param_groups)
    for p, want in zip(online.parameters(), saved, strict=True):
        buffer = fused.state[p]["momentum_buffer"]
        assert torch.equal(buffer, want) and buffer.stride() == p.stride(), p.shape
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


def test_the_benchmark_times_the_ddp_step_of_two_ranks(tmp_path):
    """benchmark.py step in two ranks (forked as torchrun starts them): rank 0's one JSON line."""
    argv = ["step", *SMALL, "--small-images", "--batch-size", "8", "--bench-steps", "2", "--method", "intl-m",
            "--output-dir", str(tmp_path), "--workers", "0"]
    t = time.perf_counter()
    rank0, rank1 = (r[0] for r in two_ranks([(benchmark.main, argv)], tmp_path / "r"))
    wall = time.perf_counter() - t
    assert rank0["code"] == rank1["code"] == 0, rank0["err"][-3000:]
    r = json.loads(rank0["out"].strip().splitlines()[-1])
    assert rank0["out"].count('"benchmark"') == 1 and '"benchmark"' not in rank1["out"]
    assert r["world"] == 2 and r["per_gpu_batch"] == 4
    # the 5 timed repeats of 2 global batches of 8 took less than the whole command did
    assert r["img_per_s"] >= benchmark.REPEATS * 2 * 8 / wall and 0 < r["head_share"] < 1


def test_benchmark_aug_prints_its_figures_and_the_grid(tmp_path, monkeypatch, capsys):
    """The per-core rates it reports agree with the test's own clock of the same work."""
    data = varied_folder(str(tmp_path / "data"))
    pil_calls = timed(monkeypatch, benchmark, "default_loader")
    r = benchmark.main(["aug", "--data", data, "--batch-size", "4", "--bench-steps", "2",
                        "--output-dir", str(tmp_path), "--workers", "0", "--no-multi-crop"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == r
    assert r["views"] == [224, 224] and r["images"] == 2
    files = benchmark.image_files(intl.parse_args(["--data", data]), 2, None)
    views = intl.views_transform(intl.TWO_VIEWS)
    t = time.perf_counter()
    for _ in range(3):
        for f in files:
            views(Image.open(f).convert("RGB"))
    ours = 6 / (time.perf_counter() - t)
    torch.set_num_threads(THREADS)                             # the benchmark timed one core
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


def test_benchmark_help_lists_each_mode_and_its_flags():
    p = subprocess.run([sys.executable, os.path.join(HERE, "benchmark.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and not p.stderr, p.stderr
    for mode, flag in [("step", "--bench-steps N"), ("aug", "--bench-steps N"), ("check", "--seconds S")]:
        usage = f"usage: benchmark.py {mode} [-h] [{flag}]"
        assert usage in p.stdout, mode
        help_line = next(line for line in p.stdout[p.stdout.index(usage):].splitlines()[1:] if flag in line)
        assert len(help_line.split(flag)[1].strip()) > 10, help_line                 # it says something
    assert "(default: None)" not in p.stdout and not any(line.count("default") > 1 for line in p.stdout.splitlines())
    # its own flags stay with it; every other flag goes on to intl.py (step, aug) or to each run (check)
    own, rest = benchmark.parser().parse_known_args(["step", "--batch-size", "4", "--bench-steps", "3"])
    assert (own.mode, own.bench_steps, rest) == ("step", 3, ["--batch-size", "4"])
    own, rest = benchmark.parser().parse_known_args(["check", "--bench-steps", "1", "--seconds", "9", "--seed", "2"])
    assert (own.mode, own.seconds, rest) == ("check", 9, ["--bench-steps", "1", "--seed", "2"])


def test_fallbacks_from_cuda_graphs_are_counted_in_every_mode_that_captures_them():
    """torch.compile captures CUDA graphs in reduce-overhead and in max-autotune."""
    modes = [None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    assert [m for m in modes if benchmark.uses_cuda_graphs(m)] == ["reduce-overhead", "max-autotune"]


def test_quick_start_prints_both_runs_and_the_table(tmp_path, capsys, monkeypatch, fashion_mnist_files):
    """python intl.py with no arguments: the quick start, shrunk here to a few steps, on the
    Fashion-MNIST files fashion_mnist_files wrote; its INTL and no-transform runs, then the table:
    effective ranks from the logs, 5-NN figures (trained, without a transform and at random
    init) against a brute-force vote."""
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
    assert utils.fashion_mnist_dirs()[0] == fashion_mnist_files
    assert np.array_equal(bank.dataset.images, clothes(600, 0)[0])         # the files written here
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


DRAW = "z = torch.randn(8, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))\n"
SNIPPETS = {   # what a lecturer copies, the lines that use it, and what it printed when written down
    "IterNorm": (["whitened_variables", "newton_iterations", "iter_norm"],
                 DRAW + "y = iter_norm(z, 4, 'batch')\nprint(y.abs().sum().item(), y[0, 0].item())",
                 [67.54840, -1.250123]),
    "trace loss": (["trace_loss", "trace_loss_weight"],
                   "print(trace_loss(torch.eye(5) * 2).item(), trace_loss_weight(256))", [0.2, 0.05]),
    "INTL objective": (["whitened_variables", "newton_iterations", "iter_norm", "trace_loss", "nmse",
                        "intl_loss"],
                       "g = torch.Generator().manual_seed(0)\n"
                       "zs = [torch.randn(8, 20, dtype=torch.float64, generator=g) for _ in range(3)]\n"
                       "print(intl_loss(zs[1:], zs[0], 0.05)[0].item(), intl_loss(zs)[0].item())",
                       [2.097296, 2.111251]),
    "Spectral Transformation": (["whitened_variables", "spectral_transform"],
                                DRAW + "y = spectral_transform(z, 0.25)\n"
                                "print(y.abs().sum().item(), y[0, 0].item())", [70.80174, -1.117505]),
    "recipe": (["MEAN", "Crop", "TWO_VIEWS", "gaussian_blur", "crop_transform", "apply_each",
                "views_transform"],
               "torch.manual_seed(0)\nimg = Image.new('RGB', (60, 50), (200, 30, 90))\n"
               "for v in views_transform(TWO_VIEWS)(img):\n"
               "    print(*v.shape, *v.amin(dim=(1, 2)).tolist(), *v.amax(dim=(1, 2)).tolist())", None)}


@pytest.fixture(scope="module")
def pasted_snippets(tmp_path_factory):
    """Each snippet pasted alone into a file of its own; the files run one after another in one
    fresh interpreter, each as __main__ in a namespace of its own, with nothing of this project
    loaded (runpy): {snippet: (exit status, what it printed or its traceback)}."""
    folder = tmp_path_factory.mktemp("lecture")
    paths = {}
    for snippet, (names, use, _) in SNIPPETS.items():
        paths[snippet] = str(folder / f"{snippet.replace(' ', '_')}.py")
        open(paths[snippet], "w").write(PASTE_HEADER + "\n\n" + source_of(names) + "\n\n\n" + use + "\n")
    runner = ("import contextlib, io, json, runpy, sys, traceback\nout = {}\n"
              "for name, path in json.loads(sys.argv[1]).items():\n"
              "    printed = io.StringIO()\n"
              "    try:\n"
              "        with contextlib.redirect_stdout(printed):\n"
              "            runpy.run_path(path, run_name='__main__')\n"
              "        out[name] = [0, printed.getvalue()]\n"
              "    except BaseException:\n"
              "        out[name] = [1, traceback.format_exc()]\n"
              "    out[name][0] += 10 * any(m in sys.modules for m in ('intl', 'utils', 'gpu_aug'))\n"
              "print(json.dumps(out))")
    p = subprocess.run([sys.executable, "-c", runner, json.dumps(paths)], cwd=folder,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.splitlines()[-1])


@pytest.mark.parametrize("snippet", list(SNIPPETS))
def test_snippets_run_when_pasted_alone(snippet, pasted_snippets):
    """What a lecturer copies runs in a fresh file with only torch, torchvision and PIL imported,
    and prints the numbers intl.py printed when they were written down (to 6 significant digits,
    whatever the BLAS). The crops are random draws whose order torchvision may change and whose
    colours Pillow rounds: for them, what holds under any draw (a uniform image stays uniform, two
    224-px views of 8-bit colours normalised by ImageNet's mean and std)."""
    status, printed = pasted_snippets[snippet]
    assert status == 0, printed[-2000:]
    want = SNIPPETS[snippet][2]
    if want is not None:
        assert [float(v) for v in printed.split()] == pytest.approx(want, rel=1e-6, abs=0), printed
        return
    views = [[float(v) for v in line.split()] for line in printed.splitlines()]
    assert [v[:3] for v in views] == [[3, 224, 224]] * 2, printed
    mean, std = np.array(MEAN), np.array(STD)
    for v in views:
        low, high = np.array(v[3:6]), np.array(v[6:9])
        assert np.allclose(low, high, rtol=0, atol=1e-6), printed      # uniform, channel by channel
        level = (low * std + mean) * 255                              # the 8-bit colour
        assert np.allclose(level, level.round(), rtol=0, atol=1e-3) and (level.round() >= 0).all()
        assert (level.round() <= 255).all(), printed


def test_references_a_reader_can_find():
    """No section marks, no references to documents outside the repository: the paper's concepts by name."""
    tracked = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True).stdout.split()
    for name in [f for f in tracked if f.endswith((".py", ".sh", ".md"))] or ["intl.py", "README.md"]:
        text = open(os.path.join(HERE, name), encoding="utf-8").read()
        assert "\u00a7" not in text and not re.search(r"\bspec\b", text), name

"""Tests for gpu_aug.py: each op against torchvision's functional op on the same parameters,
the random parameters against torchvision's own samplers, and the recipes' shapes."""
import math
import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

import gpu_aug
import intl

torch.set_num_threads(2)
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
TOL = 5e-5      # max |ours - torchvision| on the [0, 1] scale (a uint8 level is 1/255 = 4e-3)


def images(n, h, w, seed=0):
    """Real-looking uint8 images: smooth colour gradients and waves, random tints, pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.linspace(0, 1, h)[:, None], torch.linspace(0, 1, w)[None]
    base = torch.stack([y * x, (1 - y) * x.sqrt(), 0.5 + 0.5 * torch.sin(9 * x + 4 * y)])
    out = base * torch.rand(n, 3, 1, 1, generator=g) + 0.1 * torch.randn(n, 3, h, w, generator=g)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def floats(n=6, size=48, seed=1):
    """Float [0, 1] crops as the colour ops see them (continuous values, saturated pixels too)."""
    x = gpu_aug.resized_crop(images(n, 64, 80, seed), torch.tensor([[3, 5, 50, 60]] * n), size)
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
    img = images(8, 120, 90)
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
    img = torch.from_numpy(intl.read_idx(FMNIST)[:1]).expand(3, -1, -1)[None]    # [1, 3, 28, 28]
    for box, size in [((2, 3, 20, 24), 32), ((0, 0, 28, 28), 16), ((5, 1, 9, 13), 96)]:
        ours = gpu_aug.resized_crop(img, torch.tensor([box]), size)
        ref = TF.resized_crop(img[0].float() / 255, *box, [size, size], InterpolationMode.BICUBIC)
        assert max_error(ours, [ref]) < TOL


def test_padded_images_of_different_sizes_crop_as_each_alone():
    ims = [images(1, h, w, seed=h)[0] for h, w in [(50, 70), (90, 40), (33, 33)]]
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
    p = gpu_aug.sample_params(n, 48, 48, (0.08, 1.0), 0.5, 0.1, g)
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
    assert max_error(gpu_aug.normalize(x), TF.normalize(x, intl.MEAN, intl.STD)) < 1e-6
    assert (gpu_aug.MEAN, gpu_aug.STD) == (intl.MEAN, intl.STD)


@pytest.mark.parametrize("size", [32, 48])
def test_gaussian_blur_equals_torchvision(size):
    x = floats(size=size)
    sigma = torch.tensor([0.1, 0.3, 0.7, 1.1, 1.6, 2.0])
    ours = gpu_aug.gaussian_blur(x, sigma)
    ref = [TF.gaussian_blur(im, [23, 23], [s.item()] * 2) for im, s in zip(x, sigma)]
    assert max_error(ours, ref) < TOL


def test_whole_crop_equals_torchvision_ops_in_sequence():
    """apply_params = resized crop, jitter, grayscale, blur, solarize, flip, normalise."""
    n, size = 12, 64
    img = images(n, 100, 120)
    p = gpu_aug.sample_params(n, 100, 120, (0.08, 1.0), 0.5, 0.5, torch.Generator().manual_seed(4))
    ours = gpu_aug.apply_params(img, p, size)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    errors = []
    for i in range(n):
        im = TF.resized_crop(img[i].float() / 255, *p["boxes"][i].tolist(), [size, size],
                             InterpolationMode.BICUBIC).clamp(0, 1)
        for k in p["order"][i].tolist() if p["jitter"][i] else []:
            im = ops[k](im, p["factors"][k, i].item())
        im = TF.rgb_to_grayscale(im, 3) if p["gray"][i] else im
        im = TF.gaussian_blur(im, [23, 23], [p["sigma"][i].item()] * 2) if p["blur"][i] else im
        im = TF.solarize(im, 128 / 255) if p["solarize"][i] else im
        im = TF.horizontal_flip(im) if p["flip"][i] else im
        errors.append((ours[i] - TF.normalize(im, intl.MEAN, intl.STD)).abs().flatten())
    errors = torch.cat(errors)
    # solarize is a step: a pixel within float error of 128/255 may go either way (none here)
    assert (errors > 1e-4).float().mean() < 1e-4 and errors.median() < 1e-6
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


def test_jitter_factors_and_order_are_distributed_as_torchvision():
    n = 3000
    p = gpu_aug.sample_params(n, 64, 64, (0.08, 1.0), 0.5, 0.1, torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    cj = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
    ref = [cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue) for _ in range(n)]
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        ours, theirs = p["factors"][k].numpy(), np.array([r[k + 1] for r in ref])
        assert lo <= ours.min() and ours.max() <= hi
        assert ks_statistic(ours, theirs) < ks_bound(n, n)
    # every one of the 24 orders equally likely, as randperm(4): chi-square, 23 dof, p = 1e-3
    assert p["order"].sort(1).values.eq(torch.arange(4)).all()      # permutations
    counts = (p["order"] @ torch.tensor([64, 16, 4, 1])).unique(return_counts=True)[1].double()
    assert len(counts) == 24 and ((counts - n / 24) ** 2 / (n / 24)).sum() < 49.7


def test_blur_sigma_is_distributed_as_torchvision():
    n = 3000
    p = gpu_aug.sample_params(n, 64, 64, (0.08, 1.0), 0.5, 0.1, torch.Generator().manual_seed(2))
    torch.manual_seed(2)
    ref = np.array([T.GaussianBlur.get_params(0.1, 2.0) for _ in range(n)])
    assert 0.1 <= p["sigma"].min() and p["sigma"].max() <= 2.0
    assert ks_statistic(p["sigma"].numpy(), ref) < ks_bound(n, n)


@pytest.mark.parametrize("crop", [intl.TWO_VIEWS[0], intl.TWO_VIEWS[1], intl.MULTI_CROP[5]])
def test_apply_probabilities(crop):
    n, (_, scale, p_blur, p_sol) = 20000, crop
    p = gpu_aug.sample_params(n, 64, 64, scale, p_blur, p_sol, torch.Generator().manual_seed(5))
    for key, prob in [("jitter", 0.8), ("gray", 0.2), ("blur", p_blur), ("solarize", p_sol),
                      ("flip", 0.5)]:
        bound = 4.5 * math.sqrt(prob * (1 - prob) / n)             # 4.5 binomial sigmas
        assert abs(p[key].float().mean().item() - prob) <= bound, key


# ----------------------------------------------------------------------------- the recipes
def test_multi_crop_recipe_shapes_dtype_and_determinism():
    img = images(2, 224, 224)
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
    views = gpu_aug.multi_view(images(3, 32, 32), intl.SMALL_IMAGES)
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2


@pytest.mark.parametrize("device", ["cpu"] + ["cuda"] * torch.cuda.is_available())
def test_each_device_gives_the_same_views_and_never_waits_for_the_host(device):
    """Same parameters, same crop on every device (TF32 off); with a generator on the GPU,
    multi_view never synchronises with the host (CUDA's sync debug mode raises if it does)."""
    img = images(8, 160, 200)
    p = gpu_aug.sample_params(8, 160, 200, (0.08, 1.0), 0.5, 0.5, torch.Generator().manual_seed(0))
    on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in p.items()}
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        ours = gpu_aug.apply_params(img.to(device), on_device, 96).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert (ours - gpu_aug.apply_params(img, p, 96)).abs().max() < 1e-3
    img, g = img.to(device), torch.Generator(device).manual_seed(0)
    views = gpu_aug.multi_view(img, intl.MULTI_CROP, g)        # warm up (cuBLAS, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            views = gpu_aug.multi_view(img, intl.MULTI_CROP, g)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert [v.shape[-1] for v in views] == [224, 224, 192, 160, 128, 96]
    assert all(v.device.type == device for v in views)

"""The augmentation recipe for a whole batch at once in pure torch, on the GPU (or the CPU).

intl.py's recipe with torchvision's semantics: resized crop (bicubic, antialiased) ->
ColorJitter in random order -> grayscale -> Pillow's Gaussian blur -> solarize -> flip p 0.5 ->
normalise, with the strengths and probabilities of each crop read from the recipe it is given
(intl.Crop's fields); the blur takes the crop to uint8 levels and then equals Pillow's
ImageFilter.GaussianBlur to the bit. Every random parameter is drawn per sample from a
torch.Generator; no loop over samples, and with the generator on the images' device, no wait
for the host:

    views = multi_view(uint8_images.cuda(), intl.MULTI_CROP, torch.Generator("cuda"))

Images: a uint8 (or [0, 1] float) tensor [N, 3, H, W], or a list of [3, H_i, W_i] images,
zero-padded into one tensor (each crop box stays inside its own image). For intl.py --gpu-aug,
data workers only decode (load_capped) and pad (pad_collate); the rest runs on the GPU.
"""
import math

import torch

import utils

GRAY = (0.2989, 0.587, 0.114)                               # torchvision's rgb_to_grayscale


# ----------------------------------------------------------------------------- random parameters
def uniform(shape, lo, hi, generator, device):
    """U(lo, hi) float32 samples from `generator` (drawn on its device), returned on `device`."""
    g_device = generator.device if generator is not None else device
    return torch.empty(shape, device=g_device).uniform_(lo, hi, generator=generator).to(device)


def column(v, n, device):
    """An int, or a tensor of one per sample, as a float64 column [n, 1] on `device`."""
    if torch.is_tensor(v):
        return v.to(device, torch.float64).expand(n).reshape(n, 1)
    return torch.full((n, 1), float(v), dtype=torch.float64, device=device)  # no host->device copy


def sample_crop_params(n, heights, widths, scale, ratio=(3 / 4, 4 / 3), generator=None):
    """Boxes [n, 4] = (top, left, h, w), each drawn as RandomResizedCrop.get_params draws one."""
    device = generator.device if generator is not None else torch.device("cpu")
    H, W = column(heights, n, device), column(widths, n, device)
    # get_params: 10 tries from float32 uniforms, then Python-float (float64) arithmetic
    area = H * W * uniform((n, 10), *scale, generator, device).double()
    log_ratio = torch.log(torch.tensor(ratio)).tolist()
    aspect = uniform((n, 10), *log_ratio, generator, device).exp().double()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # both round half even
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.int().argmax(1, keepdim=True)                  # argmax gives the first success
    h, w, found = h.gather(1, first), w.gather(1, first), ok.any(1, keepdim=True)
    # no success in 10 tries: the central crop, clipped to the ratio range
    h = torch.where(found, h, torch.where(W / H < min(ratio), (W / min(ratio)).round(), H))
    w = torch.where(found, w, torch.where(W / H > max(ratio), (H * max(ratio)).round(), W))
    u = torch.rand((n, 2), generator=generator, device=device, dtype=torch.float64)
    top = torch.where(found, u[:, :1] * (H - h + 1), (H - h) / 2).floor()
    left = torch.where(found, u[:, 1:] * (W - w + 1), (W - w) / 2).floor()
    return torch.cat([top, left, h, w], 1).long()


def sample_params(n, heights, widths, crop, generator=None, device="cpu"):
    """Every random parameter of one crop of the recipe, one per sample, in a dict."""
    u = lambda lo, hi, shape=(n,): uniform(shape, lo, hi, generator, device)  # noqa: E731
    b, c, s, h = crop.jitter
    return dict(
        boxes=sample_crop_params(n, heights, widths, crop.scale, generator=generator).to(device),
        jitter=u(0, 1) < crop.p_jitter,                        # RandomApply(ColorJitter)
        factors=torch.stack([u(1 - b, 1 + b), u(1 - c, 1 + c), u(1 - s, 1 + s), u(-h, h)]),
        order=u(0, 1, (n, 4)).argsort(1),                      # uniform permutations, as randperm
        gray=u(0, 1) < crop.p_gray,
        blur=u(0, 1) < crop.p_blur, sigma=u(*crop.sigma), any_blur=crop.p_blur > 0,
        solarize=u(0, 1) < crop.p_solarize,
        flip=u(0, 1) < 0.5)


# ---------------------------------------------------------------- crop: matrices; blur: taps
def cubic(x, a=-0.5):
    """Keys' cubic kernel; a = -0.5 in torch's (and PIL's) antialiased bicubic."""
    x = x.abs()
    return torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                       torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, torch.zeros_like(x)))


def resize_taps(start, length, size, n_in):
    """(weights, input index) [N, size, taps]: torch's antialiased bicubic resize of pixels
    [start, start + length) to `size` pixels."""
    start, length = start.double()[:, None, None], length.double()[:, None, None]
    scale = length / size                                # input pixels per output pixel
    stretch = scale.clamp(min=1)                         # antialias: the kernel widens to shrink
    center = scale * (torch.arange(size, device=start.device)[:, None] + 0.5)
    # torch's window of taps [lo, hi), clipped to the crop: <= 4 stretch + 1 <= 4 n_in / size + 1
    lo = (center - 2 * stretch + 0.5).floor().clamp(min=0)
    hi = torch.minimum((center + 2 * stretch + 0.5).floor(), length)
    j = lo + torch.arange(math.ceil(4 * max(n_in / size, 1)) + 1, device=start.device)
    w = cubic((j - center + 0.5) / stretch) * (j < hi)
    index = (j + start).clamp(max=n_in - 1).long()       # taps past `hi` weigh 0
    return (w / w.sum(-1, keepdim=True)).float(), index


def pillow_box_radius(sigma, passes=3):
    """Pillow's extended box radius for GaussianBlur(sigma): `passes` box blurs of it have
    variance sigma^2 (Gwosdek et al. 2011); a float or a tensor."""
    s2 = sigma * sigma / passes
    l = ((12 * s2 + 1) ** 0.5 - 1) // 2                   # integer part
    return l + (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))


def dense(w, j, n):
    """The [N, 1, rows, n] matrices whose rows have weights w at input indices j [N, rows, taps];
    repeated indices add."""
    return w.new_zeros(*w.shape[:2], n).scatter_add_(2, j.expand_as(w), w)[:, None]


def separable(x, rows, cols):
    """rows @ x @ cols^T per sample and channel, each matrix given by the taps of its rows:
    a separable filter as two batched float32 matmuls, zeros and all (GPUs run them at full
    rate; gathering each output's few taps instead moves far more memory per multiply)."""
    return dense(*rows, x.shape[-2]) @ x @ dense(*cols, x.shape[-1]).transpose(-1, -2)


def resized_crop(images, boxes, size):
    """Crop boxes (top, left, h, w), resize to size x size: torchvision's resized_crop(bicubic,
    antialias=True) on float images. uint8 images come out in [0, 1]."""
    top, left, h, w = boxes.unbind(1)
    rw, rj = resize_taps(top, h, size, images.shape[-2])
    rw = rw / 255 if images.dtype == torch.uint8 else rw      # scaling inside the linear map
    return separable(images.float(), (rw, rj), resize_taps(left, w, size, images.shape[-1]))


def box_weights(sigma, max_sigma=2.0):
    """Pillow's 24-bit fixed-point weights of one extended box pass of GaussianBlur(sigma),
    sigma <= max_sigma, at offsets 0, 1, .., h (the same at -k): int32 [N, 1, 1, 1] each."""
    h = int(pillow_box_radius(max_sigma)) + 1             # a pass reaches x - h .. x + h
    radius = pillow_box_radius(sigma.float()).view(-1, 1, 1, 1)   # float32, as Pillow's
    r = radius.int()
    inner = (2**24 / (2 * radius + 1)).int()              # float32 division, as Pillow's
    outer = (2**24 - (2 * r + 1) * inner) // 2            # the ends of the box: what is left
    return [torch.where(k <= r, inner, torch.where(k == r + 1, outer, 0)) for k in range(h + 1)]


def box_pass(c, weights, dim):
    """One of Pillow's box passes along `dim` of levels c - 128 (in place), rounded as Pillow
    rounds, (bulk + 2^23) >> 24; pixels past an edge: the edge pixel."""
    n, h = c.shape[dim], len(weights) - 1
    edges = [c.narrow(dim, 0, 1)] * h, [c.narrow(dim, n - 1, 1)] * h
    padded = torch.cat([*edges[0], c, *edges[1]], dim)   # the levels; c's buffer: the bulk
    at = lambda k: padded.narrow(dim, h + k, n)           # noqa: E731  (a view: no copy)
    # Pillow's uint32 bulk + 2^23 of the levels, less 128 x 2^24: it fits in an int32, and
    # >> 24 gives the rounded level less 128 (sum(w c) = sum(w levels) - 128 sum(w))
    total = weights[0] + 2 * sum(weights[1:])
    c.mul_(weights[0]).add_(2**23 - 128 * (2**24 - total))
    for k in range(1, h + 1):                 # in place, no temporaries: batches are big
        c.addcmul_(at(k), weights[k]).addcmul_(at(-k), weights[k])
    return c.bitwise_right_shift_(24)                     # arithmetic shift: floor


def gaussian_blur(x, sigma, max_sigma=2.0):
    """Pillow's ImageFilter.GaussianBlur(sigma) of x in [0, 1] taken to uint8 levels, one
    sigma <= max_sigma per sample: Pillow's box passes along W, then along H, in int32 as
    Pillow's integer sums, each rounded to uint8 as Pillow rounds it, so equal to the bit."""
    c = x.mul(255).round_().int().sub_(128)               # levels centred, see box_pass
    weights = box_weights(sigma, max_sigma)
    for dim in (-1, -1, -1, -2, -2, -2):
        c = box_pass(c, weights, dim)
    return c.add_(128).float().div_(255)


# ----------------------------------------------------------------------------- colour ops
def where(mask, y, x):
    """y for the samples in `mask`, x for the others."""
    return torch.where(mask.view(-1, 1, 1, 1), y, x)


def grayscale(x):
    """Luma [N, 1, H, W] with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b)[:, None]


def blend(x, y, f):
    """torchvision's _blend: f x + (1 - f) y, clipped to [0, 1]; f = 1 gives exactly x."""
    f = f.view(-1, 1, 1, 1)
    return (x * f + y * (1 - f)).clamp(0, 1)


def adjust_brightness(x, f):
    """torchvision's adjust_brightness: blend with black."""
    return blend(x, 0.0, f)


def adjust_contrast(x, f):
    """torchvision's adjust_contrast: blend with the mean luma."""
    return blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    """torchvision's adjust_saturation: blend with the luma."""
    return blend(x, grayscale(x), f)


def adjust_hue(x, f):
    """torchvision's adjust_hue: RGB -> HSV, hue + f (turns), HSV -> RGB."""
    r, g, b = x.unbind(1)
    minc, v = torch.aminmax(x, dim=1)
    delta = v - minc
    s = delta / torch.where(delta == 0, 1, v)
    d = torch.where(delta == 0, 1, delta)                 # grey pixels: s = 0, any hue will do
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = (h / 6 + f.view(-1, 1, 1)) % 1
    # HSV -> RGB without branches: channel = v - v s clip(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    k = [(n + 6 * h) % 6 for n in (5, 3, 1)]
    return torch.stack([v - v * s * torch.minimum(kc, 4 - kc).clamp(0, 1) for kc in k], 1)


def solarize(x):
    """torchvision's solarize at 128 on the 0-255 scale."""
    return torch.where(x >= 128 / 255, 1 - x, x)


def normalize(x, mean, std):
    """(x - mean) / std per channel (Python constants: no host->device copy)."""
    return torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], 1)


# ----------------------------------------------------------------------------- the recipe
def color_jitter(x, jitter, factors, order):
    """ColorJitter on the samples in `jitter`, each with its own factors and order of the 4 ops.
    Hue, the costly op, runs once: the blends each sample places before it, hue, the rest."""
    hue_at = (order == 3).int().argmax(1)
    for ks, before in ((range(3), True), (range(1, 4), False)):
        for k in ks:
            op = order[:, k].clamp(max=2)                  # brightness, contrast or saturation
            f = torch.where(jitter & ((k < hue_at) if before else (k > hue_at)),
                            factors.gather(0, op[None])[0], 1.0)   # 1: this step leaves x as is
            luma = grayscale(x)
            target = where(op == 1, luma.mean((1, 2, 3), keepdim=True).expand_as(luma), luma)
            x = blend(x, where(op == 0, torch.zeros_like(luma), target), f)
        if before:
            x = where(jitter, adjust_hue(x, factors[3]), x)
    return x


def apply_params(images, p, crop):
    """One crop of the recipe with the parameters of sample_params -> normalised float32."""
    x = resized_crop(images, p["boxes"], crop.size).clamp(0, 1)   # as the PIL path's uint8 crop
    x = color_jitter(x, p["jitter"], p["factors"], p["order"])
    x = where(p["gray"], grayscale(x).expand_as(x), x)
    if p["any_blur"]:                                           # p_blur = 0: skip its cost
        x = where(p["blur"], gaussian_blur(x, p["sigma"]), x)
    x = where(p["solarize"], solarize(x), x)
    return normalize(where(p["flip"], x.flip(-1), x), crop.mean, crop.std)


def augment(images, crop, generator=None, heights=None, widths=None):
    """One crop of the recipe (an intl.Crop) for each image of a batch [N, 3, H, W];
    heights, widths: the true sizes of zero-padded images."""
    heights = images.shape[-2] if heights is None else heights
    widths = images.shape[-1] if widths is None else widths
    p = sample_params(len(images), heights, widths, crop, generator, images.device)
    return apply_params(images, p, crop)


def multi_view(images, recipe, generator=None, heights=None, widths=None):
    """A batch (tensor, or list of differently sized images) -> one batch of views per crop of
    `recipe`, a list of intl.Crop; heights, widths: the true sizes of zero-padded images."""
    if isinstance(images, (list, tuple)):
        images, heights, widths = pad_batch(images)
    return [augment(images, crop, generator, heights, widths) for crop in recipe]


# ----------------------------------------------------------------------------- the data workers' side
MAX_SIDE = 512   # as FFCV's ImageNet files: bounds the padded batch and the resize matrices


def load_capped(path, max_side=MAX_SIDE):
    """Decode only, to at most max_side px a side (JPEGs reduced while decoding: utils.load_rgb).
    Crop boxes are relative, so their distribution is unchanged; only crops of larger
    images come from fewer pixels than the PIL path sees."""
    return utils.load_rgb(path, max_side)


def pad_batch(images):
    """A list of [3, H_i, W_i] images -> one zero-padded [N, 3, H, W] tensor, heights, widths."""
    sizes = torch.tensor([im.shape[-2:] for im in images])
    out = images[0].new_zeros(len(images), 3, *sizes.amax(0).tolist())
    for i, im in enumerate(images):                             # one copy per image, as collate
        out[i, :, :im.shape[-2], :im.shape[-1]] = im
    return out, sizes[:, 0], sizes[:, 1]


def pad_collate(batch):
    """DataLoader collate in the workers: ((padded uint8 images, heights, widths), labels)."""
    images, labels = zip(*batch)
    return pad_batch(images), torch.tensor(labels)

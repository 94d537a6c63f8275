"""Batched pretraining augmentation on the tiles' device (DESIGN sections 5 and 6, issue 3).

`make_views` turns a uint8 batch of tiles (B, T, T, 3) into the two views of DSF-WSI: per view a
context image (RandomResizedCrop of the whole tile) and `scale**2` target blocks (the tile split
into `scale x scale` blocks in raster order, each its own RandomResizedCrop and flip, put in the
slot order of the caller's permutation). Every sample draws its own parameters, every draw comes
from the `generator` given, and nothing loops over samples, so it runs on the GPU at batch size.

Order of work (DESIGN section 6, "crops first"): uint8 -> float once (the tile, and the tile
rearranged as B * n_blocks block images); the crops of both views by `torchvision.ops.roi_align`
in two batched calls, one for all contexts (on the tiles) and one for all target blocks (on the
block images, so no sample reads a neighbouring block), area-averaging through `sampling_ratio=-1`
(ceil(box / out) samples per output pixel and axis) with `aligned=True`, in uint8 units; colour
ops on the crops as per-sample 3x3 affine maps (the first one carrying the 1/255), grayscale and
flip in one colour pass, written straight into the output buffer (on a GPU one kernel compiled by
`torch.compile`, `fused=True`); blur (per-crop band matrices) and sharpen (shifted sums) only on
a fixed-size subset of crops that holds the ones that drew them (both filters are mirror
symmetric, so flipping before them equals flipping after); normalise, writing the model's dtype.

Colour ops (torchvision semantics unless stated). Each view of each sample draws two independent
colour parameter sets: one for its context, one shared by all of its target blocks (as if the
ops were applied to the whole tile before splitting, DESIGN section 5).

- ColorJitter(brightness, contrast, saturation, hue) with p `jitter_p`, factors uniform in
  [max(0, 1 - j), 1 + j] (hue in [-j, j]), the four ops in a random order per sample, each
  followed by a clamp to [0, 1] (as torchvision clamps after each blend). Brightness and
  saturation are 3x3 matrices; hue is a rotation of the chroma plane about the grey axis in YIQ
  space (`hue_matrix`, an approximation of torchvision's HSV shift: 0.8 x 2 pi x hue radians,
  which moves colours as far as the HSV shift does on average; red turns towards yellow for a
  positive factor). Contrast blends with the mean grey of the image: for the context the
  mean of its crop (torchvision applies colour after the crop), for targets the mean of the
  WHOLE tile, so all blocks of a view share it. The mean is taken once from the input and carried
  through the preceding ops analytically (exact where no clamping occurs).
- RandomGrayscale p `grayscale_p` (ITU-R 601 weights as torchvision), R = G = B exactly.
- With p `blur_sharpen_p` one of, with equal chance: Gaussian blur (kernel size from
  `blur_kernels`, sigma uniform in `blur_sigma`, reflect padding, as torchvision GaussianBlur) or
  sharpen (torchvision `adjust_sharpness` with `sharpness`, its 3x3 smoothing kernel and its
  unchanged 1 px border). These act on the output crops, so the kernel and sigma are in output
  pixels; the kernel sizes, given for the paper's 224 px, are scaled by out_size / 224 (odd, at
  least 3) while sigma is not. For targets, each block is filtered within its own crop.

Geometry: crop boxes are continuous (sub-pixel) rather than rounded to whole pixels;
RandomResizedCrop's ten tries of rejection sampling and its fallback are reproduced.

Fixed shapes (for `torch.compile` and to avoid host syncs): no shape depends on tensor values.
The blur and sharpen subsets have a fixed capacity, the expected number of crops plus four
standard deviations; in the rare batch where more crops drew a filter, the groups with the lowest
random priority stay unfiltered.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchvision.ops import roi_align

from dsf.config import defaults

#: torchvision's grayscale weights (rgb_to_grayscale), used by grayscale, saturation and contrast.
GRAY = (0.2989, 0.587, 0.114)
#: RGB -> YIQ (FCC NTSC); hue is a rotation of the (I, Q) plane.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ_INV = tuple(map(tuple, torch.linalg.inv(torch.tensor(_YIQ, dtype=torch.float64)).tolist()))
#: The YIQ rotation by a full 2 pi h moves colours about 25% further than torchvision's HSV
#: shift by h (HSV's hexagonal hue circle is shorter than the YIQ chroma circle); 0.8 of the
#: angle gives torchvision's mean shift on uniform random colours (0.098 against 0.100 at
#: h = 0.1) and halves the mean difference from it on H&E tissue (a region of CMU-1: 0.043 to
#: 0.019 at h = 0.1; its direction still differs somewhat).
_HUE_SCALE = 0.8
#: tries of RandomResizedCrop's rejection sampling (torchvision uses 10).
_CROP_TRIES = 10
#: subset capacity = expected count + this many standard deviations.
_CAPACITY_SD = 4.0


_P = defaults("pretrain")


@dataclass(frozen=True)
class AugmentConfig:
    """Pretraining augmentation settings (DESIGN section 5).

    The defaults of the settings a config can change are read from the `pretrain` section of
    the config schema (their one home); the blur/sharpen shape below is fixed by the method.
    """

    out_size: int = _P["out_size"]
    scale: int = 4  # blocks per side: n_blocks = scale**2 (from the patch store in training)
    crop_scale: tuple[float, float] = tuple(_P["crop_scale"])  # type: ignore[assignment]
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = tuple(_P["jitter"])  # type: ignore[assignment]
    jitter_p: float = _P["jitter_p"]
    grayscale_p: float = _P["grayscale_p"]
    blur_sharpen_p: float = _P["blur_sharpen_p"]  # then blur or sharpen with equal chance
    flip_p: float = _P["flip_p"]
    # the dataset's statistics (pretrain.mean/std, or computed by dsf.norm); these neutral
    # values (mid-grey, a quarter of the range) only serve tests and benchmarks
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    blur_kernels: tuple[int, ...] = (19, 21, 23)  # at out_size 224; scaled with out_size
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in output pixels
    sharpness: float = 2.0  # torchvision adjust_sharpness factor (the paper gives none)

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        r0, r1 = self.crop_ratio
        checks = [
            (self.out_size >= 1, "out_size must be >= 1"),
            (self.scale >= 1, "scale must be >= 1"),
            (0 < lo <= hi <= 1, "crop_scale must satisfy 0 < lo <= hi <= 1"),
            (0 < r0 <= r1, "crop_ratio must satisfy 0 < lo <= hi"),
            (all(j >= 0 for j in self.jitter[:3]), "jitter factors must be >= 0"),
            (0 <= self.jitter[3] <= 0.5, "hue jitter must be in [0, 0.5]"),
            (len(self.blur_kernels) >= 1, "blur_kernels must not be empty"),
            (all(k >= 1 and k % 2 for k in self.blur_kernels), "blur_kernels must be odd"),
            (0 < self.blur_sigma[0] <= self.blur_sigma[1], "blur_sigma must be 0 < lo <= hi"),
            (self.sharpness >= 0, "sharpness must be >= 0"),
            (max(self.kernel_sizes()) // 2 < self.out_size, "blur kernel too large for out_size"),
            (all(s > 0 for s in self.std), "std must be > 0"),
        ]
        for p in (self.jitter_p, self.grayscale_p, self.blur_sharpen_p, self.flip_p):
            checks.append((0 <= p <= 1, f"probabilities must be in [0, 1], got {p}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"AugmentConfig: {message}")

    @property
    def n_blocks(self) -> int:
        """Number of target blocks per view (scale x scale)."""
        return self.scale * self.scale

    def kernel_sizes(self) -> list[int]:
        """Blur kernel sizes scaled from the paper's 224 px to `out_size` (odd, >= 3)."""
        f = self.out_size / 224
        return [max(3, 2 * round((k * f - 1) / 2) + 1) for k in self.blur_kernels]


class Views(NamedTuple):
    """The two views of a batch (DESIGN section 5)."""

    context: Tensor  # (2, B, 3, out, out) float, normalised
    targets: Tensor  # (2, B, n_blocks, 3, out, out) float, normalised, shuffled slot order
    perms: (
        Tensor  # (2, B, n_blocks) long: slot j of view v of sample b is raster block perms[v,b,j]
    )


@dataclass
class Draws:
    """Every random parameter of one `make_views` call; index [view, sample, ...].

    Crop-level fields have a slot axis S = 1 + n_blocks (slot 0 the context); colour fields a
    group axis of 2 (0 the context, 1 all target blocks of the view).
    """

    boxes: Tensor  # (2, B, S, 4) float x1, y1, x2, y2 in pixels of the tile (slot 0) or block
    blocks: Tensor  # (2, B, n_blocks) long: raster block of each target slot (the perms)
    flip: Tensor  # (2, B, S) bool
    jitter: Tensor  # (2, B, 2) bool: ColorJitter applied
    factors: Tensor  # (2, B, 2, 4) float brightness, contrast, saturation, hue
    order: Tensor  # (2, B, 2, 4) long: op at each of the four jitter steps
    gray: Tensor  # (2, B, 2) bool
    blur: Tensor  # (2, B, 2) bool
    sharpen: Tensor  # (2, B, 2) bool (never together with blur)
    sigma: Tensor  # (2, B, 2) float blur sigma in output pixels
    ksize: Tensor  # (2, B, 2) long blur kernel size (odd)
    priority: Tensor  # (2, B, 2) float in [0, 1): order of the groups in the filter subsets


@functools.lru_cache(maxsize=64)
def _const(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A constant tensor, made once per device: a host-to-device copy would block the host."""
    return torch.tensor(values, dtype=dtype).to(device)


def _rand(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _crop_sizes(u_area: Tensor, u_ratio: Tensor, size: float, cfg: AugmentConfig) -> Tensor:
    """RandomResizedCrop's width/height (..., 2) of a square region of side `size`.

    Same rejection sampling as torchvision (first of `_CROP_TRIES` candidates that fits, else the
    centre fallback), vectorised over the leading axes; u_* are uniforms (..., tries).
    """
    lo, hi = cfg.crop_scale
    r0, r1 = cfg.crop_ratio
    area = size * size * (lo + (hi - lo) * u_area)
    ratio = torch.exp(math.log(r0) + (math.log(r1) - math.log(r0)) * u_ratio)
    w = torch.sqrt(area * ratio)
    h = torch.sqrt(area / ratio)
    fits = (w <= size) & (h <= size)
    first = fits.to(torch.uint8).argmax(-1, keepdim=True)  # index of the first fitting try
    w = w.gather(-1, first).squeeze(-1)
    h = h.gather(-1, first).squeeze(-1)
    # torchvision's fallback for a square region: clamp the aspect ratio into [r0, r1]
    fw, fh = (size, size / r0) if r0 > 1 else ((size * r1, size) if r1 < 1 else (size, size))
    found = fits.any(-1)
    w = torch.where(found, w, torch.full_like(w, fw)).clamp_(max=size)
    h = torch.where(found, h, torch.full_like(h, fh)).clamp_(max=size)
    return torch.stack([w, h], -1)


def draw(
    batch: int,
    tile: int,
    perms: Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Draws:
    """Draw every random parameter of one call (DESIGN section 5), in a fixed order."""
    device = torch.device(device) if device is not None else perms.device
    n = cfg.n_blocks
    s = 1 + n
    block = tile // cfg.scale
    # geometry: RandomResizedCrop per crop (of the tile or of its block), flip per crop
    u_area = _rand((2, batch, s, _CROP_TRIES), generator, device)
    u_ratio = _rand((2, batch, s, _CROP_TRIES), generator, device)
    u_pos = _rand((2, batch, s, 2), generator, device)
    flip = _rand((2, batch, s), generator, device) < cfg.flip_p
    wh = torch.cat(
        [
            _crop_sizes(u_area[:, :, :1], u_ratio[:, :, :1], float(tile), cfg),
            _crop_sizes(u_area[:, :, 1:], u_ratio[:, :, 1:], float(block), cfg),
        ],
        dim=2,
    )
    region = torch.where(torch.arange(s, device=device) == 0, float(tile), float(block))
    xy = u_pos * (region[:, None] - wh)
    boxes = torch.cat([xy, xy + wh], -1)  # slot j >= 1 lies in raster block perms[v, b, j - 1]

    # colour: one set per (view, sample, group)
    g = (2, batch, 2)
    jitter = _rand(g, generator, device) < cfg.jitter_p
    j = _const(cfg.jitter, device)
    lo = torch.cat([(1 - j[:3]).clamp(min=0), -j[3:]])
    hi = torch.cat([1 + j[:3], j[3:]])
    factors = lo + (hi - lo) * _rand((*g, 4), generator, device)
    order = _rand((*g, 4), generator, device).argsort(-1)
    gray = _rand(g, generator, device) < cfg.grayscale_p
    filt = _rand(g, generator, device) < cfg.blur_sharpen_p
    is_blur = _rand(g, generator, device) < 0.5
    s0, s1 = cfg.blur_sigma
    sigma = s0 + (s1 - s0) * _rand(g, generator, device)
    sizes = _const(tuple(cfg.kernel_sizes()), device, torch.long)
    pick = (_rand(g, generator, device) * len(sizes)).long().clamp_(max=len(sizes) - 1)
    priority = _rand(g, generator, device)
    return Draws(
        boxes=boxes,
        blocks=perms.to(device=device, dtype=torch.long),
        flip=flip,
        jitter=jitter,
        factors=factors,
        order=order,
        gray=gray,
        blur=filt & is_blur,
        sharpen=filt & ~is_blur,
        sigma=sigma,
        ksize=sizes[pick],
        priority=priority,
    )


def _crops(tiles: Tensor, draws: Draws, scale: int, out: int) -> tuple[Tensor, Tensor, Tensor]:
    """The crops, area-averaged and resized, in uint8 units (0-255): contexts (2 * B, 3, out,
    out) and target blocks (2 * B * n_blocks, 3, out, out), both in (view, sample, slot) order;
    and the mean colour (B, 3) of each whole tile in [0, 1].

    The context crops come from the whole tile; the block crops from the blocks as images of
    their own (so that no sample reads a neighbouring block, and borders are clamped as a resize
    of the block would), both by `roi_align` with adaptive sampling. The division by 255 is left
    to the colour pass (one pass less over the tiles).
    """
    batch, tile, _, ch = tiles.shape
    blk = tile // scale
    x = tiles.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    xb = tiles.reshape(batch, scale, blk, scale, blk, ch).permute(0, 1, 3, 5, 2, 4)
    xb = xb.to(torch.float32, memory_format=torch.contiguous_format).view(-1, ch, blk, blk)
    v, b, s, _ = draws.boxes.shape
    dev = tiles.device
    index = torch.arange(b, device=dev).view(1, b, 1).expand(v, b, 1)
    index = torch.cat([index, index * (s - 1) + draws.blocks], 2).to(x.dtype)
    rois = torch.cat([index[..., None], draws.boxes.to(x.dtype)], -1)
    contexts, blocks = (
        roi_align(img, r.reshape(-1, 5), out, 1.0, sampling_ratio=-1, aligned=True)
        for img, r in ((x, rois[:, :, :1]), (xb, rois[:, :, 1:]))
    )
    return contexts, blocks, x.mean((-2, -1)).div_(255)


def hue_matrix(h: Tensor) -> Tensor:
    """(..., 3, 3) RGB matrices of torchvision's hue shift by `h` (fractions of a turn), as a
    rotation of the YIQ chroma plane about the grey axis (luma kept; red turns towards yellow
    for h > 0, as in HSV). The angle is `_HUE_SCALE` x 2 pi h: see there."""
    dev, dt = h.device, h.dtype
    theta = -2 * math.pi * _HUE_SCALE * h
    cos, sin = torch.cos(theta), torch.sin(theta)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], -1)
    return _const(_YIQ_INV, dev, dt) @ rot.view(*cos.shape, 3, 3) @ _const(_YIQ, dev, dt)


def _jitter_maps(draws: Draws, mu: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per-group affine maps (A (2,B,2,3,3), t (2,B,2,3)) of the four ColorJitter steps.

    `mu` (2, B, 2, 3) is the mean colour of the contrast reference (context crop or whole tile);
    it is carried through the steps to give contrast's mean grey at its position in the order.
    """
    dev, dt = mu.device, mu.dtype
    eye = torch.eye(3, device=dev, dtype=dt)
    gw = _const(GRAY, dev, dt)
    b, c, s, h = draws.factors.to(dt).unbind(-1)
    m_b = b[..., None, None] * eye
    m_s = s[..., None, None] * eye + (1 - s)[..., None, None] * gw.expand(3, 3)
    m_h = hue_matrix(h)
    m_c = c[..., None, None] * eye
    maps = []
    for k in range(4):
        op = draws.order[..., k, None, None]
        grey = (mu * gw).sum(-1, keepdim=True)
        t = torch.where(op[..., 0] == 1, (1 - c[..., None]) * grey, 0).expand_as(mu)
        a = torch.where(op == 0, m_b, torch.where(op == 1, m_c, torch.where(op == 2, m_s, m_h)))
        on = draws.jitter[..., None]
        a = torch.where(on[..., None], a, eye)
        t = torch.where(on, t, 0)
        mu = (a @ mu[..., None]).squeeze(-1).add_(t).clamp_(0, 1)
        maps.append((a, t))
    return maps


def _capacity(q: float, batch: int, n: int) -> int:
    """Fixed subset size for crops whose group (1 context or n blocks) drew an op with p q."""
    total = 2 * batch * (1 + n)
    sd = math.sqrt(q * (1 - q) * 2 * batch * (1 + n * n))
    return max(0, min(total, math.ceil(q * total + _CAPACITY_SD * sd)))


@functools.lru_cache(maxsize=16)
def _reflect_taps(length: int, taps: int, device: torch.device) -> Tensor:
    """(taps, length, length) one-hot: tap k of output i reads input reflect(i + k - taps // 2)."""
    src = (
        torch.arange(length, device=device)[:, None] + torch.arange(taps, device=device) - taps // 2
    )
    src = src.abs()
    src = torch.where(src > length - 1, 2 * (length - 1) - src, src)
    onehot = src[..., None] == torch.arange(length, device=device)  # (length, taps, length)
    return onehot.permute(1, 0, 2).to(torch.float32, memory_format=torch.contiguous_format)


def _separable(x: Tensor, g: Tensor) -> Tensor:
    """Filter x (C, H, 3, W) by g along both axes: g @ x @ g^T per crop, g (C, L, L).

    Filters as matrix products (band matrices with the reflect border built in): no padding,
    no per-crop convolution weights, and on the CPU faster than grouped convolutions.
    """
    c, hh, ch, ww = x.shape
    y = x.reshape(c, hh * ch, ww) @ g.transpose(-1, -2)  # along W
    return (g @ y.view(c, hh, ch * ww)).view(c, hh, ch, ww)  # along H


def _filter(x: Tensor, draws: Draws, cfg: AugmentConfig, sharpen: bool) -> None:
    """Blur (or sharpen) in place the crops whose group drew it, on a fixed-size subset."""
    v, b, s, ch, hh, ww = x.shape
    q = cfg.blur_sharpen_p * 0.5
    if q == 0:
        return
    group = (torch.arange(s, device=x.device) > 0).long()  # slot -> colour group
    flag = (draws.sharpen if sharpen else draws.blur)[:, :, group].reshape(-1)
    priority = (draws.priority[:, :, group].reshape(-1) + 2 * flag).to(torch.float32)
    capacity = _capacity(q, b, s - 1)
    if capacity == 0:
        return
    idx = priority.topk(capacity).indices  # the flagged crops first, whole groups at a time
    flat = x.view(-1, ch, hh, ww)
    sub = flat.permute(0, 2, 1, 3).index_select(0, idx)  # (C, H, 3, W): rows of all channels
    if sharpen:
        # torchvision adjust_sharpness: blend with the [[1,1,1],[1,5,1],[1,1,1]]/13 smoothing of
        # the interior (the 1 px border stays), by shifted sums (a 3x3 box is separable)
        rows = sub[..., :-2] + sub[..., 1:-1] + sub[..., 2:]
        box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]  # 3x3 sums of the interior
        centre = sub[:, 1:-1, :, 1:-1]
        f = cfg.sharpness
        out = sub.clone()
        out[:, 1:-1, :, 1:-1] = (
            box.add_(centre, alpha=4).mul_((1 - f) / 13).add_(centre, alpha=f).clamp_(0, 1)
        )
    else:
        kmax = max(cfg.kernel_sizes())
        sigma = draws.sigma[:, :, group].reshape(-1)[idx].to(x.dtype)
        half = (draws.ksize[:, :, group].reshape(-1)[idx] // 2).to(x.dtype)
        o = torch.arange(kmax, device=x.device, dtype=x.dtype) - kmax // 2
        k = torch.exp(-0.5 * (o / sigma[:, None]) ** 2) * (o.abs() <= half[:, None])
        k = k / k.sum(-1, keepdim=True)
        taps = _reflect_taps(hh, kmax, x.device)
        g = (k @ taps.view(kmax, -1)).view(-1, hh, hh)  # per-crop band matrix
        out = _separable(sub, g)
    out = torch.where(flag[idx, None, None, None], out, sub).permute(0, 2, 1, 3)
    flat.index_copy_(0, idx, out)


def _colour_eager(x: Tensor, a: Tensor, t: Tensor, gray: Tensor, flip: Tensor, out: Tensor) -> None:
    """The colour pass by whole-tensor ops (the CPU path, and the reference of the fused one).

    x: crops (N, 3, H, W) as `roi_align` gives them; a (4, N, 3, 3) and t (4, N, 3): the four
    jitter steps y = clamp(a x + t) (the first step's `a` includes the 1/255); gray, flip (N,)
    bool. Writes grayscale and horizontal flip of the result into `out` (..., 3, H, W), N crops
    in row-major order. Flipping before blur and sharpen equals flipping after them (both
    filters are mirror-symmetric, reflect border included).
    """
    n, ch, hh, ww = x.shape
    flat = x.reshape(n, ch, hh * ww)
    for k in range(4):
        flat = torch.baddbmm(t[k, :, :, None], a[k], flat).clamp_(0, 1)
    gw = _const(GRAY, x.device, flat.dtype).view(1, ch)
    flat = torch.where(gray[:, None, None], (gw @ flat).expand_as(flat), flat)
    img = flat.view(out.shape)
    torch.where(flip.view(*out.shape[:-3], 1, 1, 1), img.flip(-1), img, out=out)


def _colour_pointwise(
    x: Tensor, a: Tensor, t: Tensor, gray: Tensor, flip: Tensor, out: Tensor
) -> None:
    """`_colour_eager` written pixel by pixel, for `torch.compile`: compiled, the four jitter
    steps, grayscale and flip become one kernel that reads each crop once and writes it once,
    where the eager ops pass over all crops about 20 times (DESIGN section 6). Run eagerly it
    is slower than `_colour_eager`, so it is only run compiled (`_colour_fused`)."""
    src = torch.where(flip[:, None, None, None], x.flip(-1), x)
    c = src.unbind(1)
    for k in range(4):
        ak, tk = a[k, :, :, :, None, None], t[k, :, :, None, None]
        c = [
            (ak[:, i, 0] * c[0] + ak[:, i, 1] * c[1] + ak[:, i, 2] * c[2] + tk[:, i]).clamp(0, 1)
            for i in range(3)
        ]
    g = GRAY[0] * c[0] + GRAY[1] * c[1] + GRAY[2] * c[2]
    grey = gray[:, None, None]
    out.copy_(torch.stack([torch.where(grey, g, ci) for ci in c], 1).view(out.shape))


@functools.cache
def _colour_fused() -> Any:
    """`_colour_pointwise` compiled (once per process; one graph per crop-batch shape)."""
    return torch.compile(_colour_pointwise, dynamic=False)


def _augment(
    tiles: Tensor,
    perms: Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator | None,
    fused: bool = False,
) -> tuple[Tensor, Draws]:
    """Crops, colour ops, flips and blur/sharpen, before normalisation: (2, B, S, 3, out, out)
    in [0, 1], slot 0 the context, slots 1.. the target blocks in perms order; and the draws.
    With `fused` the colour pass runs as one compiled kernel (`_colour_fused`)."""
    if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(
            f"tiles must be uint8 (B, T, T, 3), got {tiles.dtype} {tuple(tiles.shape)}"
        )
    batch, tile, tile_w, _ = tiles.shape
    if tile != tile_w or tile % cfg.scale:
        raise ValueError(f"tiles must be square with T divisible by scale {cfg.scale}: {tile_w}")
    if perms.shape != (2, batch, cfg.n_blocks):
        raise ValueError(f"perms must be (2, {batch}, {cfg.n_blocks}), got {tuple(perms.shape)}")
    draws = draw(batch, tile, perms, cfg, generator, tiles.device)
    contexts, blocks, tile_mean = _crops(tiles, draws, cfg.scale, cfg.out_size)
    v, n, ch, out = 2, cfg.n_blocks, 3, cfg.out_size
    # contrast reference colours: context crop mean, whole-tile mean for the targets
    ctx_mean = contexts.view(v, batch, ch, -1).mean(-1).div_(255)
    mu = torch.stack([ctx_mean, tile_mean.expand(v, batch, ch)], 2)
    maps = _jitter_maps(draws, mu)
    a = torch.stack([m[0] for m in maps])  # (4, 2, B, 2, 3, 3)
    a[0] /= 255  # the crops are in uint8 units
    t = torch.stack([m[1] for m in maps])  # (4, 2, B, 2, 3)
    crops = torch.empty((v, batch, 1 + n, ch, out, out), device=tiles.device)
    colour = _colour_fused() if fused else _colour_eager
    for group, x, slots, flip in (
        (0, contexts, slice(0, 1), draws.flip[:, :, :1]),
        (1, blocks, slice(1, None), draws.flip[:, :, 1:]),
    ):
        per = flip.shape[-1]  # crops per colour group: 1 context, n blocks
        ag = a[:, :, :, group, None].expand(-1, -1, -1, per, -1, -1).reshape(4, -1, ch, ch)
        tg = t[:, :, :, group, None].expand(-1, -1, -1, per, -1).reshape(4, -1, ch)
        gray = draws.gray[:, :, group, None].expand(-1, -1, per).reshape(-1)
        colour(x, ag, tg, gray, flip.reshape(-1), crops[:, :, slots])
    _filter(crops, draws, cfg, sharpen=False)
    _filter(crops, draws, cfg, sharpen=True)
    return crops, draws


def make_views(
    tiles: Tensor,
    perms: Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator | None = None,
    channels_last: bool = True,
    dtype: torch.dtype = torch.float32,
    fused: bool = False,
) -> Views:
    """Two augmented, normalised views of a uint8 tile batch (DESIGN section 5).

    tiles: uint8 (B, T, T, 3) on any device, T divisible by `cfg.scale`; perms: (2, B, n_blocks)
    permutations of the raster blocks (slot j of view v of sample b takes block perms[v, b, j]).
    `generator` (on the tiles' device) makes the call reproducible; None uses the global RNG.
    Computation is float32; the normalisation writes `dtype` (the AMP dtype the model's first
    convolution would cast to anyway, so a pass is saved). With `channels_last` the outputs
    have channels-last strides (context[v] and targets[v].flatten(0, 1) are channels_last
    4-D tensors, ready for a channels_last model); otherwise they are contiguous. With `fused`
    the colour pass is one `torch.compile`d kernel (for GPUs: equal to the eager ops up to
    float rounding; the first call compiles).
    """
    crops, _ = _augment(tiles, perms, cfg, generator, fused)
    v, b, s, ch, hh, ww = crops.shape
    dev = crops.device
    scale = 1 / _const(cfg.std, dev, crops.dtype).view(ch, 1, 1)
    shift = -_const(cfg.mean, dev, crops.dtype).view(ch, 1, 1) * scale
    out = []
    for part in (crops[:, :, 0], crops[:, :, 1:]):
        if channels_last:
            dst = torch.empty((*part.shape[:-3], hh, ww, ch), device=dev, dtype=dtype)
            dst = dst.movedim(-1, -3)
        else:
            dst = torch.empty(part.shape, device=dev, dtype=dtype)
        out.append(torch.addcmul(shift, part, scale, out=dst))
    return Views(out[0], out[1], perms.to(device=dev, dtype=torch.long))


def benchmark(
    batch: int = 8,
    tile: int = 256,
    out: int = 64,
    device: str | torch.device = "cpu",
    iters: int = 5,
) -> float:
    """Mean milliseconds per `make_views` call (both views, default config at `out` px) on
    random tiles of `tile` px, after one warm-up call (DESIGN section 6). Uses the current
    torch thread settings on the CPU; synchronises on CUDA."""
    dev = torch.device(device)
    cfg = AugmentConfig(out_size=out)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    tiles = torch.randint(0, 256, (batch, tile, tile, 3), dtype=torch.uint8, device=dev)
    perms = torch.rand(2, batch, cfg.n_blocks, generator=gen, device=dev).argsort(-1)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    make_views(tiles, perms, cfg, gen)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        make_views(tiles, perms, cfg, gen)
    sync()
    return (time.perf_counter() - start) * 1000 / iters

"""Tissue of each class drawn as stain concentrations: textures, nuclei, glands, layouts.

Structures have a fixed size in pixels, as at a fixed magnification, and are spread over the
whole image, so the class shows in any 1/12 tile of a 512x384 image. ``render`` turns a
layout into RGB through the stain model.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
from numpy.typing import ArrayLike

# --------------------------------------------------------------------------- textures


def _value_noise(h: int, w: int, cell: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise with features about ``cell`` px wide, zero mean and unit std."""
    gh, gw = int(np.ceil(h / cell)) + 4, int(np.ceil(w / cell)) + 4
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    up = cv2.resize(grid, (round(gw * cell), round(gh * cell)), interpolation=cv2.INTER_CUBIC)
    off = round(2 * cell)
    out = up[off : off + h, off : off + w]
    return (out - out.mean()) / (out.std() + 1e-6)


def fine_noise(h: int, w: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Blurred white noise (grain, chromatin), zero mean and unit std."""
    out = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
    return (out - out.mean()) / (out.std() + 1e-6)


def _fibres(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Wavy collagen-like streaks: noise smeared along one axis, then rotated and warped."""
    size = int(np.ceil(np.hypot(h, w))) + 40
    src = rng.standard_normal((size, size)).astype(np.float32)
    src = cv2.GaussianBlur(src, (0, 0), sigmaX=7.0, sigmaY=0.9)
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = xx - w / 2, yy - h / 2
    amp = rng.uniform(6, 14)
    dx = amp * _value_noise(h, w, 70, rng)
    dy = amp * _value_noise(h, w, 70, rng)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    map_x = size / 2 + u * c + v * s + dx
    map_y = size / 2 - u * s + v * c + dy
    out = cv2.remap(src, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return (out - out.mean()) / (out.std() + 1e-6)


def _fat(h: int, w: int, cell: float, rng: np.random.Generator) -> np.ndarray:
    """Membranes (1.0) of adipocyte-like polygonal cells, 0 inside them (a Voronoi diagram)."""
    ys = np.arange(-cell / 2, h + cell, cell)
    xs = np.arange(-cell / 2, w + cell, cell)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    gy = gy + rng.uniform(-0.4, 0.4, gy.shape) * cell
    gx = gx + rng.uniform(-0.4, 0.4, gx.shape) * cell
    keep = (gy >= 0) & (gy < h) & (gx >= 0) & (gx < w)
    seeds = np.ones((h, w), np.uint8)
    seeds[gy[keep].astype(int), gx[keep].astype(int)] = 0
    _, labels = cv2.distanceTransformWithLabels(
        seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP
    )
    edge = np.zeros((h, w), np.uint8)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    return edge.astype(np.float32)


# --------------------------------------------------------------------------- layout


def _pack_circles(
    h: int,
    w: int,
    r_range: tuple[float, float],
    gap: float,
    n_try: int,
    rng: np.random.Generator,
    margin: float = 0.5,
) -> np.ndarray:
    """Random non-overlapping circles by dart throwing, centres up to ``margin * r`` outside.

    Returns:
        float [N, 3] of (x, y, r).
    """
    r = rng.uniform(*r_range, n_try)
    r = np.sort(r)[::-1]  # big first, so the small ones fill the gaps
    x = rng.uniform(-margin * r_range[1], w + margin * r_range[1], n_try)
    y = rng.uniform(-margin * r_range[1], h + margin * r_range[1], n_try)
    out = np.empty((n_try, 3))
    n = 0
    for i in range(n_try):
        if n:
            d = np.hypot(out[:n, 0] - x[i], out[:n, 1] - y[i])
            if np.any(d < out[:n, 2] + r[i] + gap):
                continue
        out[n] = x[i], y[i], r[i]
        n += 1
    return out[:n]


class _Nuclei:
    """Ellipses (x, y, semi-axes, angle, darkness) gathered from all structures, drawn once."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def add(
        self,
        x: ArrayLike,
        y: ArrayLike,
        a: ArrayLike,
        b: ArrayLike,
        angle: ArrayLike,
        dark: ArrayLike,
    ) -> None:
        """Queue nuclei at (x, y) with semi-axes (a, b) px, rotated ``angle`` rad, darkness ~1."""
        self.parts.append(np.stack(np.broadcast_arrays(x, y, a, b, angle, dark)).reshape(6, -1))

    def draw(self, h: int, w: int, scale: float = 1.0) -> np.ndarray:
        """Float map of nuclear darkness (0 outside nuclei); ``scale`` grows every ellipse."""
        canvas = np.zeros((h, w), np.uint8)
        if not self.parts:
            return canvas.astype(np.float32)
        x, y, a, b, angle, dark = np.concatenate(self.parts, axis=1)
        sh = 4  # sub-pixel bits for cv2 drawing
        f = 1 << sh
        inside = (x > -20) & (x < w + 20) & (y > -20) & (y < h + 20)
        cx = np.round(x[inside] * f).astype(int)
        cy = np.round(y[inside] * f).astype(int)
        ax = np.maximum(np.round(a[inside] * scale * f), f).astype(int)
        ay = np.maximum(np.round(b[inside] * scale * f), f).astype(int)
        deg = np.degrees(angle[inside])
        val = np.clip(dark[inside] * 100, 1, 255).astype(int)
        for i in range(cx.size):
            cv2.ellipse(
                canvas, (cx[i], cy[i]), (ax[i], ay[i]), deg[i], 0, 360, int(val[i]), -1,
                cv2.LINE_8, sh,
            )  # fmt: skip
        return canvas.astype(np.float32) / 100


def ellipse_mask(h: int, w: int, glands: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
    """Filled ellipses for glands [N, 5] = (x, y, r, aspect, angle), radii times ``scale``."""
    mask = np.zeros((h, w), np.uint8)
    scale = np.broadcast_to(scale, (len(glands),))
    for (x, y, r, asp, ang), s in zip(glands, scale, strict=True):
        axes = (max(1, round(r * s * asp * 16)), max(1, round(r * s / asp * 16)))
        centre = (round(x * 16), round(y * 16))
        cv2.ellipse(mask, centre, axes, np.degrees(ang), 0, 360, 255, -1, cv2.LINE_AA, 4)
    return mask.astype(np.float32) / 255


def _to_glands(circles: np.ndarray, max_aspect: float, rng: np.random.Generator) -> np.ndarray:
    """Give circles an aspect ratio and orientation: [N, 5] = (x, y, r, aspect, angle)."""
    n = len(circles)
    asp = np.sqrt(rng.uniform(1.0, max_aspect, n))
    ang = rng.uniform(0, np.pi, n)
    return np.column_stack([circles[:, :3], asp, ang])


def _ring_nuclei(
    nuclei: _Nuclei,
    glands: np.ndarray,
    rel_radius: np.ndarray,
    nuc_r: tuple[float, float],
    spacing: float,
    flat: float,
    dark: tuple[float, float],
    rng: np.random.Generator,
) -> None:
    """Nuclei evenly spaced on an ellipse inside each gland, long axis along the ring."""
    for (x, y, r, asp, ang), rel in zip(glands, rel_radius, strict=True):
        ra, rb = r * rel * asp, r * rel / asp
        circumference = np.pi * (3 * (ra + rb) - np.sqrt((3 * ra + rb) * (ra + 3 * rb)))
        n = max(4, int(circumference / (spacing * np.mean(nuc_r) * 2)))
        t = (np.arange(n) + rng.uniform(-0.15, 0.15, n)) * 2 * np.pi / n + rng.uniform(
            0, 2 * np.pi
        )
        jitter = 1 + rng.normal(0, 0.04, n)
        px, py = ra * np.cos(t) * jitter, rb * np.sin(t) * jitter
        ca, sa = np.cos(ang), np.sin(ang)
        nx, ny = x + px * ca - py * sa, y + px * sa + py * ca
        tangent = np.arctan2(rb * np.cos(t), -ra * np.sin(t)) + ang
        size = rng.uniform(*nuc_r, n)
        nuclei.add(nx, ny, size * flat, size / flat, tangent, rng.uniform(*dark, n))


def _fill_nuclei(
    nuclei: _Nuclei,
    glands: np.ndarray,
    nuc_r: tuple[float, float],
    spacing: float,
    fill: float,
    rng: np.random.Generator,
) -> None:
    """Pack each gland with nuclei on a jittered hexagonal grid (solid in-situ growth)."""
    for x, y, r, asp, ang in glands:
        step = spacing * np.mean(nuc_r) * 2
        k = int(np.ceil(r * asp / step)) + 1
        gy, gx = np.mgrid[-k : k + 1, -k : k + 1].astype(float)
        gx = (gx + 0.5 * (gy % 2)) * step
        gy = gy * step * 0.866
        gx += rng.normal(0, 0.18 * step, gx.shape)
        gy += rng.normal(0, 0.18 * step, gy.shape)
        ca, sa = np.cos(-ang), np.sin(-ang)
        lx, ly = gx * ca - gy * sa, gx * sa + gy * ca
        inside = (lx / (r * asp)) ** 2 + (ly / (r / asp)) ** 2 < fill**2
        inside &= rng.random(inside.shape) > 0.06
        n = int(inside.sum())
        size = rng.uniform(*nuc_r, n)
        aspect = np.sqrt(rng.uniform(1.0, 1.5, n))
        nuclei.add(
            x + gx[inside], y + gy[inside], size * aspect, size / aspect,
            rng.uniform(0, np.pi, n), rng.uniform(0.75, 1.25, n),
        )  # fmt: skip


# --------------------------------------------------------------------------- classes


class _Tissue(NamedTuple):
    """Stain concentration maps before optics: haematoxylin, eosin."""

    h: np.ndarray
    e: np.ndarray


class _Layout(NamedTuple):
    """What one class draws, composed by ``render_with_stain``.

    Attributes:
        tissue: stroma, fat and bare slide as stain concentrations.
        nuclei: every nucleus, drawn last so nothing covers it.
        glands: [N, 5] (x, y, r, aspect, angle); drawn as purple-pink epithelium.
        lumen_rel: [N] lumen radius relative to its gland; lumens are cleared to white.
        holes: [M, 5] extra lumens, same columns (cribriform spaces).
        cells: draw pink cytoplasm around each nucleus (tumour cells outside glands).
    """

    tissue: _Tissue
    nuclei: _Nuclei
    glands: np.ndarray = np.zeros((0, 5))
    lumen_rel: np.ndarray = np.zeros(0)
    holes: np.ndarray = np.zeros((0, 5))
    cells: bool = False


def _stroma(h: int, w: int, density: float, rng: np.random.Generator) -> _Tissue:
    """Fibrous pink stroma with clefts and scattered thin fibroblast nuclei."""
    fib = _fibres(h, w, rng)
    low = _value_noise(h, w, 60, rng)
    e = density * (1 + 0.12 * low) * (0.68 + 0.32 * np.tanh(0.9 * fib))
    cleft = np.clip((-fib - 1.7) * 2.5, 0, 1)
    e = e * (1 - 0.9 * cleft)
    hm = np.full((h, w), 0.035, np.float32) * (1 - cleft)
    fibro = _Nuclei()
    n = int(h * w / 1800 * rng.uniform(0.6, 1.4))
    size = rng.uniform(1.2, 1.8, n)
    fibro.add(
        rng.uniform(0, w, n), rng.uniform(0, h, n), size * 2.6, size * 0.6,
        rng.uniform(0, np.pi, n), rng.uniform(0.5, 0.9, n),
    )  # fmt: skip
    hm = np.maximum(hm, fibro.draw(h, w))
    return _Tissue(hm.astype(np.float32), e.astype(np.float32))


def _normal(h: int, w: int, rng: np.random.Generator) -> _Layout:
    """Lobules of small acini (tiny lumens) in pale loose stroma, with fat and bare slide."""
    base = _stroma(h, w, rng.uniform(0.32, 0.45), rng)
    lobules = _pack_circles(h, w, (24, 38), 16, 60, rng, margin=0.3)
    lob_mask = np.zeros((h, w), np.uint8)
    acini = []
    for lx, ly, lr in lobules:
        cv2.circle(lob_mask, (round(lx), round(ly)), round(lr + 5), 1, -1)
        inner = _pack_circles(int(2 * lr), int(2 * lr), (5.5, 8.5), 1.0, 120, rng, margin=0)
        inner = inner[np.hypot(inner[:, 0] - lr, inner[:, 1] - lr) < lr - inner[:, 2] * 0.3]
        inner[:, :2] += (lx - lr, ly - lr)
        acini.append(inner)
    glands = _to_glands(np.concatenate(acini), 1.4, rng)
    lob = cv2.GaussianBlur(lob_mask.astype(np.float32), (0, 0), 5)
    near_lobule = lob > 0.05
    # Bare slide and fat away from the lobules.
    slide = (_value_noise(h, w, 90, rng) > rng.uniform(0.3, 0.8)) & ~near_lobule
    fat_region = (_value_noise(h, w, 70, rng) > rng.uniform(-0.2, 0.4)) & ~near_lobule & ~slide
    fat = _fat(h, w, rng.uniform(14, 22), rng)
    keep = np.where(fat_region, 0.55 * cv2.dilate(fat, np.ones((2, 2), np.uint8)), 1.0)
    keep = np.where(slide, 0.0, keep).astype(np.float32)
    # Intralobular stroma is looser, paler and has more cells.
    tissue = _Tissue(base.h * keep + 0.04 * lob, base.e * keep * (1 - 0.3 * lob))
    nuclei = _Nuclei()
    lumen_rel = rng.uniform(0.2, 0.38, len(glands))
    _ring_nuclei(nuclei, glands, (lumen_rel + 1) / 2, (2.0, 2.6), 1.0, 1.0, (0.9, 1.3), rng)
    return _Layout(tissue, nuclei, glands, lumen_rel)


def _benign(h: int, w: int, rng: np.random.Generator) -> _Layout:
    """Many larger glands with open lumens and one regular layer of nuclei, little fat."""
    tissue = _stroma(h, w, rng.uniform(0.4, 0.58), rng)
    circles = _pack_circles(h, w, (13, 28), rng.uniform(5, 10), 250, rng)
    glands = _to_glands(circles, 1.8, rng)
    lumen_rel = rng.uniform(0.38, 0.62, len(glands))
    nuclei = _Nuclei()
    ring = (lumen_rel + 1 - 1.5 / glands[:, 2]) / 2
    _ring_nuclei(nuclei, glands, ring, (2.3, 2.9), 0.95, 0.8, (0.9, 1.3), rng)
    outer = 1 - 1.2 / glands[:, 2]
    _ring_nuclei(nuclei, glands, outer, (1.4, 1.8), 2.2, 1.9, (0.6, 0.9), rng)
    return _Layout(tissue, nuclei, glands, lumen_rel)


def _insitu(h: int, w: int, rng: np.random.Generator) -> _Layout:
    """Round ducts packed with large crowded nuclei, a few punched-out lumens, a rim."""
    tissue = _stroma(h, w, rng.uniform(0.45, 0.62), rng)
    circles = _pack_circles(h, w, (22, 40), rng.uniform(5, 10), 200, rng)
    glands = _to_glands(circles, 1.3, rng)
    nuclei = _Nuclei()
    _fill_nuclei(nuclei, glands, (3.0, 4.3), 1.0, 0.9, rng)
    _ring_nuclei(nuclei, glands, 1 - 1.2 / glands[:, 2], (1.5, 1.9), 2.0, 2.0, (0.6, 0.9), rng)
    # Cribriform spaces: a few small lumens in some ducts; cells there are cleared at draw time.
    holes = [np.zeros((0, 5))]
    for x, y, r, _, _ in glands:
        if rng.random() < 0.45:
            k = rng.integers(1, 5)
            a, d = rng.uniform(0, 2 * np.pi, k), rng.uniform(0, 0.55 * r, k)
            xy = np.column_stack([x + d * np.cos(a), y + d * np.sin(a)])
            holes.append(np.column_stack([xy, rng.uniform(3, 6, k), np.ones(k), np.zeros(k)]))
    return _Layout(tissue, nuclei, glands, np.zeros(len(glands)), np.concatenate(holes))


def _invasive(h: int, w: int, rng: np.random.Generator) -> _Layout:
    """No glands: pleomorphic nuclei in irregular cords and sheets through desmoplastic stroma."""
    tissue = _stroma(h, w, rng.uniform(0.5, 0.68), rng)
    density = _value_noise(h, w, rng.uniform(25, 45), rng) + 0.5 * _value_noise(h, w, 12, rng)
    p = 1 / (1 + np.exp(-2.2 * (density + rng.uniform(0.0, 0.6))))
    n = int(h * w / 40)
    x, y = rng.uniform(0, w, n), rng.uniform(0, h, n)
    keep = rng.random(n) < p[y.astype(int), x.astype(int)]
    x, y = x[keep], y[keep]
    m = x.size
    size = rng.uniform(2.4, 4.6, m)
    aspect = np.sqrt(rng.uniform(1.0, 2.6, m))
    nuclei = _Nuclei()
    nuclei.add(
        x, y, size * aspect, size / aspect, rng.uniform(0, np.pi, m), rng.uniform(0.7, 1.4, m)
    )
    return _Layout(tissue, nuclei, cells=True)


#: The layout of each class, in ``CLASSES`` order.
LAYOUTS = (_normal, _benign, _insitu, _invasive)

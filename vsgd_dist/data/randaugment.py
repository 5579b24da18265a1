"""RandAugment and random erasing of uint8 (H, W, 3) train images, in the decoding threads.

Why here (numba, after the crop in the decoder) rather than on the device: both work on one
image at a time, so each draw can be keyed like the crop by (seed, epoch, draw index) and an
image is augmented the same way on any rank, at any world size, thread count or batch
position, and again after a resume; the decoding threads run them in parallel with JPEG
decoding, and images still leave the host as uint8 (a quarter of fp32's bytes).

RandAugment is timm's `rand-m9-mstd0.5-inc1`, DeiT's default: `n` ops drawn uniformly, with
replacement, from the 15 of OPS, each applied with probability 0.5 at a magnitude drawn from
N(m, mstd), clipped to [0, 10]; signed ops get a random sign; geometric ops fill uncovered
pixels with FILL. The ops are PIL's (which timm calls), rewritten here with PIL's rounding:
tests/test_augment.py compares every op with PIL at two magnitudes and both signs (identical
pixels when written). One difference from DeiT: geometric ops interpolate bilinearly, where
DeiT's hparams ask PIL for bicubic.

Random erasing is timm's RandomErasing(mode="pixel", count 1): with probability p, a box of
2% to 1/3 of the image, aspect ratio log-uniform in [0.3, 1/0.3] (10 tries to fit), is
filled with per-pixel, per-channel standard normals of the normalized image. timm erases the
normalized fp32 tensor; here the noise is written as the uint8 value that normalizes to it
(mean + std * z, rounded, clipped to [0, 255]), so it is quantized to 1/std (~1/57) and
clipped near -2.1 and +2.2..2.6.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from .draws import approx_normals, normal, subkey, uniform
from .normalize import IMAGENET_MEAN, IMAGENET_STD

OPS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
       "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
"""timm's _RAND_INCREASING_TRANSFORMS, in its order; magnitude 10 means: rotate 30 degrees,
posterize to 0 bits, solarize above 0, solarize_add +110 below 128, color/contrast/
brightness/sharpness factor 1 +- 0.9, shear 0.3, translate 45% of the side."""
NUM_OPS = len(OPS)
FILL = np.array([124, 116, 104], np.uint8)
"""ImageNet's mean in 0-255, timm's fill for pixels a geometric op uncovers (DeiT's img_mean)."""
MAX_LEVEL = 10.0
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ERASE_TRIES = 10
NEAR_INTEGER = 1e-9
"""Erasing's values within this of an integer are recomputed with libm (draws.normal): far
above approx_normals' error (<= 1e-13 in z, x std < 60) and rare (2e-9 of the values)."""
_RANDAUGMENT, _ERASE = 1, 2  # subkey tags
_MEAN, _STD = IMAGENET_MEAN.astype(np.float64), IMAGENET_STD.astype(np.float64)


@numba.njit(nogil=True, cache=True)
def _clip8(value):
    """PIL's rounding of blends and bilinear samples: truncate, then clip to [0, 255]
    (min/max rather than branches, so loops over it vectorize)."""
    return np.uint8(int(min(max(value, 0.0), 255.0)))


@numba.njit(nogil=True, cache=True)
def _apply_lut(image, lut):
    """image[..., c] = lut[image[..., c], c]."""
    flat = image.reshape(-1)
    for p in range(flat.size // 3):  # pixels; a range with a step compiles to a slower loop
        flat[3 * p] = lut[flat[3 * p], 0]
        flat[3 * p + 1] = lut[flat[3 * p + 1], 1]
        flat[3 * p + 2] = lut[flat[3 * p + 2], 2]


@numba.njit(nogil=True, cache=True)
def _histograms(image):
    counts = np.zeros((256, 3), np.int64)
    flat = image.reshape(-1)
    for p in range(flat.size // 3):
        counts[flat[3 * p], 0] += 1
        counts[flat[3 * p + 1], 1] += 1
        counts[flat[3 * p + 2], 2] += 1
    return counts


@numba.njit(nogil=True, cache=True)
def auto_contrast(image):
    """PIL's ImageOps.autocontrast: stretch each channel's [min, max] to [0, 255]."""
    counts, lut = _histograms(image), np.empty((256, 3), np.uint8)
    for c in range(3):
        lo, hi = 0, 255
        while lo < 255 and counts[lo, c] == 0:
            lo += 1
        while hi > 0 and counts[hi, c] == 0:
            hi -= 1
        for v in range(256):
            if hi <= lo:
                lut[v, c] = v
            else:
                scale = 255.0 / (hi - lo)
                lut[v, c] = min(255, max(0, int(v * scale - lo * scale)))
    _apply_lut(image, lut)


@numba.njit(nogil=True, cache=True)
def equalize(image):
    """PIL's ImageOps.equalize: per channel, values spread by their cumulative histogram."""
    counts, lut = _histograms(image), np.empty((256, 3), np.uint8)
    for c in range(3):
        last, total, used = 0, 0, 0
        for v in range(256):
            if counts[v, c]:
                last, total, used = counts[v, c], total + counts[v, c], used + 1
        step = (total - last) // 255
        n = step // 2
        for v in range(256):
            lut[v, c] = v if used <= 1 or step == 0 else min(255, n // step)
            n += counts[v, c]
    _apply_lut(image, lut)


@numba.njit(nogil=True, cache=True)
def _value_lut(op, level):
    """The 256-entry table of a per-value op (the same for every channel): posterize (op 4,
    keep 4 - int(level * 4) bits), solarize (5, invert values >= 256 - int(level * 256)),
    solarize_add (6, + int(level * 110) below 128, clipped), or a blend with a constant
    degenerate value (op 100 + d: degenerate d, factor `level`)."""
    lut = np.empty((256, 3), np.uint8)
    for v in range(256):
        if op == 4:
            out = v & ((0xFF << (8 - (4 - int(level * 4)))) & 0xFF)
        elif op == 5:
            out = 255 - v if v >= 256 - int(level * 256) else v
        elif op == 6:
            out = min(255, v + int(level * 110)) if v < 128 else v
        else:
            out = _blend(op - 100, level, v)
        for c in range(3):
            lut[v, c] = out
    return lut


@numba.njit(nogil=True, cache=True)
def _blend(degenerate, factor, value):
    """PIL's blend of two uint8 values, degenerate + factor * (value - degenerate), computed
    in float32 as PIL computes it, truncated and clipped."""
    return _clip8(np.float32(degenerate) + np.float32(factor) * np.float32(value - degenerate))


@numba.njit(nogil=True, cache=True)
def _gray(r, g, b):
    """PIL's RGB -> L, (19595 R + 38470 G + 7471 B + 0x8000) >> 16, in float32: every partial
    sum is an integer below 2^24, so exact, and the shift is a floor of a power-of-two scaling."""
    return np.floor((np.float32(19595) * r + np.float32(38470) * g + np.float32(7471) * b + np.float32(0x8000))
                    * np.float32(2.0 ** -16))


@numba.njit(nogil=True, cache=True)
def _blend32(degenerate, factor, value):
    """_blend of float32 integers, clipped in float32 (the same value: both are exact)."""
    mixed = degenerate + factor * (value - degenerate)
    return np.uint8(np.int32(min(max(mixed, np.float32(0.0)), np.float32(255.0))))


@numba.njit(nogil=True, cache=True)
def enhance(image, scratch, kind, factor):
    """PIL's ImageEnhance, degenerate + factor * (image - degenerate), where the degenerate
    image is, by kind: 0 (Color) the grayscale image, 1 (Contrast) its mean gray, 2
    (Brightness) black, 3 (Sharpness) the image smoothed by PIL's SMOOTH 3x3 kernel (border
    pixels unchanged).

    Color and Sharpness first write the degenerate values (Color: each pixel's gray, once per
    channel, into scratch; Sharpness: per row, sums over three rows), then blend them in a
    loop over contiguous values, which LLVM vectorizes (row slices indexed by the loop
    counter keep numba's negative-index handling out of the loop)."""
    height, width = image.shape[0], image.shape[1]
    flat = image.reshape(-1)
    factor32 = np.float32(factor)
    if kind == 0:
        gray = scratch[:flat.size]
        for p in range(flat.size // 3):
            value = np.uint8(_gray(np.float32(flat[3 * p]), np.float32(flat[3 * p + 1]), np.float32(flat[3 * p + 2])))
            gray[3 * p], gray[3 * p + 1], gray[3 * p + 2] = value, value, value
        for i in range(flat.size):
            flat[i] = _blend32(np.float32(gray[i]), factor32, np.float32(flat[i]))
    elif kind <= 2:
        mean = 0
        if kind == 1:
            total = 0
            for p in range(flat.size // 3):
                total += int(_gray(np.float32(flat[3 * p]), np.float32(flat[3 * p + 1]), np.float32(flat[3 * p + 2])))
            mean = int(total / (height * width) + 0.5)
        _apply_lut(image, _value_lut(100 + mean, factor))
    else:
        row = 3 * width
        source = scratch[:flat.size]
        source[:] = flat
        columns = np.empty(row, np.float32)  # per row: each value's sum over rows y-1..y+1
        for y in range(1, height - 1):
            above, middle = source[(y - 1) * row:y * row], source[y * row:(y + 1) * row]
            below, out = source[(y + 1) * row:(y + 2) * row], flat[y * row + 3:(y + 1) * row - 3]
            for i in range(row):
                columns[i] = np.float32(above[i]) + np.float32(middle[i]) + np.float32(below[i])
            left, centre, right = columns[:row - 6], columns[3:row - 3], columns[6:]
            inner = middle[3:row - 3]
            for i in range(row - 6):
                value = np.float32(inner[i])
                total = left[i] + centre[i] + right[i] + np.float32(4.0) * value
                # int(total / 13 + 0.5) == (2 total + 13) // 26: an odd numerator is never a
                # multiple of 26, so float32's rounded quotient floors to the same integer
                smooth = np.floor((np.float32(2.0) * total + np.float32(13.0)) * np.float32(1 / 26))
                out[i] = _blend32(smooth, factor32, value)


@numba.njit(nogil=True, cache=True)
def warp_affine(image, scratch, a, b, c, d, e, f):
    """out(x, y) = image(a x + b y + c, d x + e y + f), PIL's AFFINE transform on pixel
    centers, bilinear and truncated as PIL's; points outside the image get FILL. Per row,
    the sample points first (a loop LLVM vectorizes), then the samples."""
    height, width = image.shape[0], image.shape[1]
    flat = image.reshape(-1)
    source = scratch[:flat.size]
    source[:] = flat
    row = 3 * width
    top_left, right, down = np.empty(width, np.int64), np.empty(width, np.int64), np.empty(width, np.int64)
    fxs, fys, inside = np.empty(width), np.empty(width), np.empty(width, np.bool_)
    for y in range(height):
        by, ey = b * (y + 0.5), e * (y + 0.5)
        for x in range(width):
            u = a * (x + 0.5) + by + c
            v = d * (x + 0.5) + ey + f
            inside[x] = 0.0 <= u < width and 0.0 <= v < height
            u, v = u - 0.5, v - 0.5
            x0, y0 = math.floor(u), math.floor(v)
            fxs[x], fys[x] = u - x0, v - y0
            xa, ya = min(max(int(x0), 0), width - 1), min(max(int(y0), 0), height - 1)
            top_left[x] = ya * row + 3 * xa
            right[x] = 3 * (min(max(int(x0) + 1, 0), width - 1) - xa)
            down[x] = row * (min(max(int(y0) + 1, 0), height - 1) - ya)
        out = flat[y * row:(y + 1) * row]
        for x in range(width):
            if not inside[x]:
                out[3 * x], out[3 * x + 1], out[3 * x + 2] = FILL[0], FILL[1], FILL[2]
                continue
            fx, fy = fxs[x], fys[x]
            for ch in range(3):  # PIL's a + (b - a) * d, exact where a == b
                at = top_left[x] + ch
                top = source[at] + (float(source[at + right[x]]) - source[at]) * fx
                bottom = source[at + down[x]] + (float(source[at + down[x] + right[x]]) - source[at + down[x]]) * fx
                out[3 * x + ch] = _clip8(top + (bottom - top) * fy)


@numba.njit(nogil=True, cache=True)
def _lerp(first, second, weights, out):
    """out[i] = _clip8(first[i] + (second[i] - first[i]) * weights[i]): PIL's bilinear sample
    where one of its two interpolations has weight 0 (that one is exact: a + (b - a) * 0 == a)."""
    for i in range(out.size):
        start = float(first[i])
        out[i] = _clip8(start + (float(second[i]) - start) * weights[i])


@numba.njit(nogil=True, cache=True)
def _fill(out):
    for p in range(out.size // 3):
        out[3 * p], out[3 * p + 1], out[3 * p + 2] = FILL[0], FILL[1], FILL[2]


@numba.njit(nogil=True, cache=True)
def _sample_points(slope, row_term, offset, size, floors, weights):
    """One coordinate of a row's sample points as warp_affine computes it, t = slope (i + 0.5)
    + row_term + offset (summed in that order), for i < floors.size: floors[i] = floor(t -
    0.5), weights[3 i .. 3 i + 2] = (t - 0.5) - floors[i]. Returns the range [first, last) of
    i with 0 <= t < size (one range: t is monotone in i)."""
    count = floors.size
    for i in range(count):
        t = slope * (i + 0.5) + row_term + offset - 0.5
        floors[i] = int(math.floor(t))
        weights[3 * i] = t - math.floor(t)
        weights[3 * i + 1] = weights[3 * i]
        weights[3 * i + 2] = weights[3 * i]
    first, last = 0, count
    while first < count and not 0.0 <= slope * (first + 0.5) + row_term + offset < size:
        first += 1
    while last > first and not 0.0 <= slope * (last - 0.5) + row_term + offset < size:
        last -= 1
    return first, last


@numba.njit(nogil=True, cache=True)
def shift_rows(image, scratch, b, c):
    """warp_affine(image, scratch, 1, b, c, 0, 1, 0) (shear_x, translate_x), where every
    sample lies on its own row: v = y + 0.5 exactly, so fy = 0, and PIL's bilinear sample is
    the row's linear one (top + (bottom - top) * 0 == top). Along a row the samples' columns
    move with x, so pixels whose sample sits at the same offset form runs of contiguous
    values, blended in vectorized loops; the row is copied with its edge pixels repeated
    once on each side, PIL's clamping at the border."""
    height, width = image.shape[0], image.shape[1]
    flat = image.reshape(-1)
    row = 3 * width
    padded = scratch[:row + 6]
    floors, weights = np.empty(width, np.int64), np.empty(row)
    for y in range(height):
        out = flat[y * row:(y + 1) * row]
        padded[3:row + 3] = out
        padded[:3], padded[row + 3:] = out[:3], out[row - 3:]
        first, last = _sample_points(1.0, b * (y + 0.5), c, width, floors, weights)
        _fill(out[:3 * first])
        _fill(out[3 * last:])
        while first < last:  # x0 = floors[x] in [-1, width - 1]: padded pixel x0 + 1
            shift, end = floors[first] - first, first + 1
            while end < last and floors[end] - end == shift:
                end += 1
            at = 3 * (first + shift + 1)
            _lerp(padded[at:at + 3 * (end - first)], padded[at + 3:at + 3 + 3 * (end - first)],
                  weights[3 * first:3 * end], out[3 * first:3 * end])
            first = end


@numba.njit(nogil=True, cache=True)
def shift_columns(image, scratch, d, f):
    """warp_affine(image, scratch, 1, 0, 0, d, 1, f) (shear_y, translate_y), where every
    sample lies on its own column: u = x + 0.5 exactly, so fx = 0, and PIL's bilinear sample
    is the column's linear one between two rows. Pixels of a row whose samples fall between
    the same two rows form runs of contiguous values, blended in vectorized loops."""
    height, width = image.shape[0], image.shape[1]
    flat = image.reshape(-1)
    source = scratch[:flat.size]
    source[:] = flat
    row = 3 * width
    floors, weights = np.empty(width, np.int64), np.empty(row)
    for y in range(height):
        out = flat[y * row:(y + 1) * row]
        first, last = _sample_points(d, 1.0 * (y + 0.5), f, height, floors, weights)
        _fill(out[:3 * first])
        _fill(out[3 * last:])
        while first < last:
            y0, end = floors[first], first + 1
            while end < last and floors[end] == y0:
                end += 1
            above, below = row * max(y0, 0), row * min(y0 + 1, height - 1)
            _lerp(source[above + 3 * first:above + 3 * end], source[below + 3 * first:below + 3 * end],
                  weights[3 * first:3 * end], out[3 * first:3 * end])
            first = end


@numba.njit(nogil=True, cache=True)
def apply_op(image, scratch, op, level, sign):
    """Op number `op` of OPS at magnitude `level` in [0, 1] (of MAX_LEVEL), signed ops
    turned by `sign` (+1 or -1)."""
    height, width = image.shape[0], image.shape[1]
    if op == 0:
        auto_contrast(image)
    elif op == 1:
        equalize(image)
    elif op == 2:
        for y in range(height):
            for x in range(width):
                for c in range(3):
                    image[y, x, c] = 255 - image[y, x, c]
    elif op == 3:  # PIL's rotate about the center
        angle = -math.radians(sign * level * 30.0)
        cos, sin = math.cos(angle), math.sin(angle)
        cx, cy = width / 2.0, height / 2.0
        warp_affine(image, scratch, cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    elif op <= 6:
        _apply_lut(image, _value_lut(op, level))
    elif op <= 10:
        enhance(image, scratch, op - 7, 1.0 + sign * level * 0.9)
    elif op == 11:
        shift_rows(image, scratch, sign * level * 0.3, 0.0)
    elif op == 12:
        shift_columns(image, scratch, sign * level * 0.3, 0.0)
    elif op == 13:
        shift_rows(image, scratch, 0.0, sign * level * 0.45 * width)
    else:
        shift_columns(image, scratch, 0.0, sign * level * 0.45 * height)


@numba.njit(nogil=True, cache=True)
def rand_augment(image, scratch, key, n, m, mstd):
    """RandAugment of one image in place; `key`: the image's key (draws.image_key), `scratch`:
    a uint8 buffer of at least the image's size."""
    stream = subkey(key, _RANDAUGMENT)
    for k in range(n):
        draw = 6 * k
        op = min(int(uniform(stream, draw) * NUM_OPS), NUM_OPS - 1)
        if uniform(stream, draw + 1) >= 0.5:
            continue
        level = m + mstd * normal(stream, draw + 2) if mstd > 0 else m
        level = min(MAX_LEVEL, max(0.0, level)) / MAX_LEVEL
        apply_op(image, scratch, op, level, 1.0 if uniform(stream, draw + 4) < 0.5 else -1.0)


@numba.njit(nogil=True, cache=True)
def random_erase(image, key, probability):
    """Random erasing of one image in place, with the image's key (draws.image_key)."""
    stream = subkey(key, _ERASE)
    if uniform(stream, 0) >= probability:
        return
    height, width = image.shape[0], image.shape[1]
    for attempt in range(ERASE_TRIES):
        draw = 1 + 4 * attempt
        area = height * width * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * uniform(stream, draw))
        aspect = math.exp(ERASE_LOG_ASPECT[0] + (ERASE_LOG_ASPECT[1] - ERASE_LOG_ASPECT[0]) * uniform(stream, draw + 1))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < h < height and 0 < w < width:
            top = int(uniform(stream, draw + 2) * (height - h + 1))
            left = int(uniform(stream, draw + 3) * (width - w + 1))
            _erase_box(image, subkey(stream, attempt + 1), top, left, h, w)
            return


@numba.njit(nogil=True, cache=True)
def _erase_box(image, noise, top, left, h, w):
    """Value c of pixel (y, x) in the box becomes _clip8(mean[c] + std[c] * z + 0.5), z the
    standard normal draw 2 ((y * width + x) * 3 + c) of the stream `noise`. z comes from
    draws.approx_normals, a row at a time; where mean + std * z + 0.5 lies within
    NEAR_INTEGER of an integer (where truncation or the clip could tell its last bits apart),
    it is recomputed with draws.normal, so the pixels are normal()'s."""
    width = image.shape[1]
    flat = image.reshape(-1)
    z, mean, std = np.empty(3 * w), np.empty(3 * w), np.empty(3 * w)
    for p in range(w):  # mean[c] and std[c] per value of a row, so the loop below is contiguous
        for c in range(3):
            mean[3 * p + c], std[3 * p + c] = _MEAN[c], _STD[c]
    for y in range(top, top + h):
        first = (y * width + left) * 3
        out = flat[first:first + 3 * w]
        approx_normals(noise, first, z)
        near = False
        for i in range(3 * w):
            value = mean[i] + std[i] * z[i] + 0.5
            fraction = value - math.floor(value)
            near |= fraction < NEAR_INTEGER or fraction > 1.0 - NEAR_INTEGER
            out[i] = _clip8(value)
        if near:
            for i in range(3 * w):
                value = mean[i] + std[i] * z[i] + 0.5
                fraction = value - math.floor(value)
                if fraction < NEAR_INTEGER or fraction > 1.0 - NEAR_INTEGER:
                    out[i] = _clip8(mean[i] + std[i] * normal(noise, 2 * (first + i)) + 0.5)

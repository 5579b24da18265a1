"""Seeded random-resized-crop + horizontal-flip decoder for ffcv.

ffcv 1.0.2's RandomResizedCropRGBImageDecoder and RandomHorizontalFlip draw from numba's
per-thread generator, which nothing seeds: two runs with one seed differ, and a resumed run
does not continue the one it replaces. Here every draw for an image is a hash (splitmix64) of
(data seed, epoch, sample index, draw number), so it does not depend on the decoding thread,
the batch the image lands in, or the world size.

ffcv compiles the pipeline once, and numba freezes closed-over values (numpy arrays
included) into the machine code. So the epoch, which changes at run time, lives in a one-element
array the decoder owns, and the compiled code closes over its address and loads from it once
per batch; `iterate_from` sets it before each epoch's iterator starts.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from numba.core import types
from numba.extending import intrinsic

RATIO = (3 / 4, 4 / 3)
"""Aspect-ratio range of the crops (torchvision's and ffcv's default)."""
TRIES = 10

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


@intrinsic
def _load_int64(typingctx, address):
    """The int64 stored at `address` now (a closed-over array would be a frozen copy)."""
    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], context.get_value_type(types.int64).as_pointer()))
    return types.int64(types.uint64), codegen


@numba.njit(nogil=True)
def _mix(z):
    """splitmix64's finalizer: a bijection of uint64 whose outputs look independent."""
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True)
def image_key(seed, epoch, index):
    """The key all draws of one image in one epoch derive from."""
    return _mix(_mix(_mix(np.uint64(seed) + _GOLDEN) ^ np.uint64(epoch)) ^ np.uint64(index))


@numba.njit(nogil=True)
def uniform(key, draw):
    """Draw number `draw` of an image's stream, uniform in [0, 1) (53 random bits)."""
    return float(_mix(key + np.uint64(draw + 1) * _GOLDEN) >> np.uint64(11)) * 2.0 ** -53


@numba.njit(nogil=True)
def crop_box(key, height, width, scale_min):
    """(top, left, h, w) as torchvision's RandomResizedCrop picks it: area fraction uniform in
    [scale_min, 1], aspect ratio log-uniform in RATIO, TRIES attempts, else the largest centered
    box within RATIO. Draw 0 is left to the flip."""
    area = height * width
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for attempt in range(TRIES):
        draw = 4 * attempt + 1
        target = area * (scale_min + (1.0 - scale_min) * uniform(key, draw))
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniform(key, draw + 1))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(key, draw + 2) * (height - h + 1))
            left = int(uniform(key, draw + 3) * (width - w + 1))
            return top, left, h, w
    if width < height * RATIO[0]:
        h, w = int(round(width / RATIO[0])), width
    elif width > height * RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit(nogil=True)
def mirror(image):
    """Flip an (H, W, C) image left-right in place."""
    width = image.shape[1]
    for x in range(width // 2):
        for y in range(image.shape[0]):
            for c in range(image.shape[2]):
                image[y, x, c], image[y, width - 1 - x, c] = image[y, width - 1 - x, c], image[y, x, c]


class SeededCropFlipDecoder(SimpleRGBImageDecoder):
    """RandomResizedCrop + RandomHorizontalFlip(0.5) whose draws depend only on (seed, epoch,
    sample index). Set `epoch` before iterating an epoch; `output_size` may change between
    epochs (ffcv sizes its buffers per epoch)."""

    def __init__(self, output_size: tuple[int, int], seed: int, scale_min: float = 0.08,
                 flip: bool = True):
        super().__init__()
        self.output_size, self.seed, self.scale_min, self.flip = output_size, seed, scale_min, flip
        self._epoch = np.zeros(1, np.int64)  # lives as long as the decoder, which ffcv keeps

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch[0] = value

    def declare_state_and_memory(self, previous_state):
        pixels = self.metadata["height"].astype(np.int64) * self.metadata["width"]
        shape, uint8 = (*self.output_size, 3), np.dtype("u1")
        # second buffer: one decoded source image per batch slot (JPEGs are decoded, then cropped)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=uint8),
                (AllocationQuery(shape, uint8), AllocationQuery((3 * int(pixels.max()),), uint8)))

    def generate_code(self):
        read, loop = self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        jpg = IMAGE_MODES["jpg"]
        seed, scale_min, flip = np.uint64(self.seed), float(self.scale_min), bool(self.flip)
        epoch_address = np.uint64(self._epoch.ctypes.data)

        def decode(batch_indices, storage, metadata, storage_state):
            epoch = _load_int64(epoch_address)
            destination, scratch = storage
            for k in loop(len(batch_indices)):
                index = batch_indices[k]
                field = metadata[index]
                data = read(field["data_ptr"], storage_state)
                height, width = int(field["height"]), int(field["width"])
                if field["mode"] == jpg:
                    pixels = scratch[k][:3 * height * width].reshape(height, width, 3)
                    imdecode_c(data, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
                else:
                    pixels = data.reshape(height, width, 3)
                key = image_key(seed, epoch, index)
                top, left, h, w = crop_box(key, height, width, scale_min)
                resize_crop_c(pixels, top, top + h, left, left + w, destination[k])
                if flip and uniform(key, 0) < 0.5:
                    mirror(destination[k])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode

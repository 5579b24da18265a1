"""Decoders for ffcv: seeded random-resized-crop + horizontal flip (train), optionally followed
by RandAugment and random erasing (randaugment.py), and center crop (val), all checking that
every JPEG decodes.

ffcv 1.0.2's RandomResizedCropRGBImageDecoder and RandomHorizontalFlip draw from numba's
per-thread generator, which nothing seeds: two runs with one seed differ, and a resumed run
does not continue the one it replaces. Here every draw for an image is a hash (splitmix64,
draws.py) of (data seed, epoch, draw index, draw number), so it does not depend on the
decoding thread, the batch the image lands in, or the world size. The draw index is the
sample index, or sample index + copy * number of samples for the copies of repeated
augmentation (repeated.py): the decoders read sample `draw index % number of samples`.

ffcv compiles the pipeline once, and numba freezes closed-over values (numpy arrays
included) into the machine code. So the epoch, which changes at run time, lives in a one-element
array the decoder owns, and the compiled code closes over its address and loads from it once
per batch; `iterate_from` sets it before each epoch's iterator starts.

ffcv's own decoders ignore libjpeg-turbo's return code, so a corrupt JPEG payload trains as
whatever was left in the buffer. An exception cannot leave the decoding threads either (the
loader then waits forever), so a JPEG that fails to decode writes its sample index into a
second one-element array, and `checked_batches` raises DataError when it reads one there.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from numba.core import types
from numba.extending import intrinsic

from .draws import image_key, uniform
from .errors import DataError
from .randaugment import rand_augment, random_erase

RATIO = (3 / 4, 4 / 3)
"""Aspect-ratio range of the crops (torchvision's and ffcv's default)."""
TRIES = 10


@intrinsic
def _load_int64(typingctx, address):
    """The int64 stored at `address` now (a closed-over array would be a frozen copy)."""
    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], context.get_value_type(types.int64).as_pointer()))
    return types.int64(types.uint64), codegen


@intrinsic
def _store_int64(typingctx, address, value):
    """Store `value` at `address` (where Python reads it back after the batch)."""
    def codegen(context, builder, signature, args):
        builder.store(args[1], builder.inttoptr(args[0], context.get_value_type(types.int64).as_pointer()))
        return context.get_dummy_value()
    return types.void(types.uint64, types.int64), codegen


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


class CropResizeDecoder(SimpleRGBImageDecoder):
    """Decode each image (JPEG or raw pixels) and hand it to the subclass's `place_function`,
    which crops, resizes and augments it into its batch slot. `output_size` may change between
    epochs (ffcv sizes its buffers per epoch)."""

    def __init__(self, output_size: tuple[int, int]):
        super().__init__()
        self.output_size = output_size
        # both live as long as the decoder, which ffcv keeps; the compiled code holds their addresses
        self._epoch = np.zeros(1, np.int64)
        self._corrupt = np.full(1, -1, np.int64)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch[0] = value

    def place_function(self, resize_crop_c):
        """A numba function (epoch, draw index, source, destination, scratch) writing the
        (H, W, 3) uint8 `source` image, cropped and resized with `resize_crop_c(source, top,
        bottom, left, right, destination)`, into `destination`; `scratch` is a uint8 buffer of
        at least the destination's size that it may use."""
        raise NotImplementedError

    def check_decoded(self, path: str) -> None:
        """Raise DataError if a JPEG of `path` failed to decode so far."""
        index = int(self._corrupt[0])
        if index >= 0:
            raise DataError(f"{path}: sample {index} holds a corrupt JPEG (libjpeg-turbo cannot decode it); "
                            f"write the dataset again from its source images (`python -m launch data write`)")

    def declare_state_and_memory(self, previous_state):
        pixels = self.metadata["height"].astype(np.int64) * self.metadata["width"]
        shape, uint8 = (*self.output_size, 3), np.dtype("u1")
        # second buffer, per batch slot: the decoded source image (JPEGs are decoded, then
        # cropped), then free for the place function's scratch
        scratch = 3 * max(int(pixels.max()), self.output_size[0] * self.output_size[1])
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=uint8),
                (AllocationQuery(shape, uint8), AllocationQuery((scratch,), uint8)))

    def generate_code(self):
        read, loop = self.memory_read, Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        jpg, place = IMAGE_MODES["jpg"], self.place_function(Compiler.compile(resize_crop))
        epoch_address = np.uint64(self._epoch.ctypes.data)
        corrupt_address = np.uint64(self._corrupt.ctypes.data)

        def decode(batch_indices, storage, metadata, storage_state):
            epoch = _load_int64(epoch_address)
            destination, scratch = storage
            for k in loop(len(batch_indices)):
                index = np.int64(batch_indices[k])  # the draw index; the sample is index % samples
                sample = index % len(metadata)
                field = metadata[sample]
                data = read(field["data_ptr"], storage_state)
                height, width = int(field["height"]), int(field["width"])
                if field["mode"] == jpg:
                    pixels = scratch[k][:3 * height * width].reshape(height, width, 3)
                    if imdecode_c(data, pixels, height, width, height, width, 0, 0, 1, 1, False, False) != 0:
                        _store_int64(corrupt_address, sample)
                else:
                    pixels = data.reshape(height, width, 3)
                place(epoch, index, pixels, destination[k], scratch[k])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededCropFlipDecoder(CropResizeDecoder):
    """RandomResizedCrop + RandomHorizontalFlip(0.5), then RandAugment (`randaugment`: ops
    per image, magnitude, magnitude std; 0 ops: off) and random erasing (`erase_prob`), whose
    draws depend only on (seed, epoch, draw index). Set `epoch` before iterating an epoch."""

    def __init__(self, output_size: tuple[int, int], seed: int, scale_min: float = 0.08,
                 flip: bool = True, randaugment: tuple[int, float, float] = (0, 0.0, 0.0),
                 erase_prob: float = 0.0):
        super().__init__(output_size)
        self.seed, self.scale_min, self.flip = seed, scale_min, flip
        self.randaugment, self.erase_prob = randaugment, erase_prob

    def place_function(self, resize_crop_c):
        seed, scale_min, flip, erase_prob = np.uint64(self.seed), float(self.scale_min), bool(self.flip), \
            float(self.erase_prob)
        ops, magnitude, magnitude_std = int(self.randaugment[0]), float(self.randaugment[1]), float(self.randaugment[2])

        @numba.njit(nogil=True)
        def place(epoch, index, source, destination, scratch):
            key = image_key(seed, epoch, index)
            top, left, h, w = crop_box(key, source.shape[0], source.shape[1], scale_min)
            resize_crop_c(source, top, top + h, left, left + w, destination)
            if flip and uniform(key, 0) < 0.5:
                mirror(destination)
            if ops:
                rand_augment(destination, scratch, key, ops, magnitude, magnitude_std)
            if erase_prob:
                random_erase(destination, key, erase_prob)
        return place


class CenterCropDecoder(CropResizeDecoder):
    """ffcv's CenterCropRGBImageDecoder: the centered square of `ratio` x the shorter side,
    resized to `output_size`."""

    def __init__(self, output_size: tuple[int, int], ratio: float):
        super().__init__(output_size)
        self.ratio = ratio

    def place_function(self, resize_crop_c):
        ratio = float(self.ratio)

        @numba.njit(nogil=True)
        def place(epoch, index, source, destination, scratch):
            height, width = source.shape[0], source.shape[1]
            side = int(ratio * min(height, width))
            top, left = (height - side) // 2, (width - side) // 2
            resize_crop_c(source, top, top + side, left, left + side, destination)
        return place


def checked_batches(loader, batches):
    """`batches` of `loader`, raising DataError as soon as its decoder reports a corrupt JPEG;
    stops the loader's decoding thread when left."""
    try:
        for batch in batches:
            loader.pipeline_specs["image"].decoder.check_decoded(loader.fname)
            yield batch
    finally:
        batches.close()


class CheckedLoader(Loader):
    """An ffcv Loader whose plain iteration (`for batch in loader`) goes through `checked_batches`."""

    def __iter__(self):
        return checked_batches(self, super().__iter__())

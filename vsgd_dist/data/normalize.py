"""Image normalization, on the device or in the decoding threads: uint8 in, the recipe's dtype out.

On CUDA the loaders copy uint8 images to the GPU (a quarter of fp32's bytes, and no
normalization work for the decoding threads) and `normalize_on_device` normalizes them
there. It looks up the same table as ffcv's NormalizeImage, which the CPU pipeline runs, so
both give the same values bit for bit (tests/test_gpu_lane.py checks every value of every
channel and dtype). Imports no ffcv until an op is built.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""data.dtype -> the images' torch dtype."""


def normalization_table(dtype: torch.dtype) -> torch.Tensor:
    """ffcv NormalizeImage's lookup table for ImageNet's mean and std, flat: entry
    value * 3 + channel is (value - mean[channel]) / std[channel], computed in float64 and
    rounded to `dtype` as the CPU pipeline rounds it (fp16 straight from float64; fp32, and
    bf16 through fp32, as NormalizeImage to fp32 followed by Convert(bfloat16) does)."""
    table = (np.arange(256)[:, None] - IMAGENET_MEAN[None, :]) / IMAGENET_STD[None, :]
    table = table.astype(np.float16 if dtype == torch.float16 else np.float32)
    return torch.from_numpy(table.reshape(-1)).to(dtype)


def normalize_images(images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> normalized images of `table`'s dtype, channels_last, on
    the images' device (where `table` must be): one lookup per value, the gather that
    NormalizeImage's GPU kernel does (table[value * 3 + channel])."""
    channel = torch.arange(3, dtype=torch.int32, device=images.device)
    index = images.permute(0, 2, 3, 1).to(torch.int32) * 3 + channel  # NHWC: a view of channels_last images
    return table[index].permute(0, 3, 1, 2)


def normalize_on_device(dtype: torch.dtype):
    """The last image op of a CUDA pipeline (after ToDevice and ToTorchImage): uint8 images
    on the device -> `normalize_images`. It is not jitted, so ffcv runs it in its loading
    thread on the batch's CUDA stream. Each output is a new tensor, marked as used by the
    stream of the thread that built the loader (the trainer's), so the caching allocator
    never hands its memory to a later batch while a step still reads it."""
    from ffcv.pipeline.operation import Operation

    class NormalizeOnDevice(Operation):
        def __init__(self):
            super().__init__()
            self.table, self.consumer = None, None

        def declare_state_and_memory(self, previous_state):
            device = previous_state.device
            self.table = normalization_table(dtype).to(device)
            self.consumer = torch.cuda.current_stream(device) if device.type == "cuda" else None
            return replace(previous_state, dtype=dtype), None

        def generate_code(self):
            table, consumer = self.table, self.consumer

            def normalize(images, _):
                out = normalize_images(images, table)
                if consumer is not None:
                    out.record_stream(consumer)
                return out

            return normalize

    return NormalizeOnDevice()

"""Images reach the GPU as uint8 and are normalized there, to the same values as the CPU
pipeline, bit for bit (the same lookup table: tests/test_gpu_lane.py checks it on CPU)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vsgd_dist.data import DataConfig, build_train_loader, build_val_loader, train_epoch


def demo_config(dtype: str) -> DataConfig:
    return DataConfig(num_workers=2, dtype=dtype, start_res=32, end_res=32, res_step=8, val_res=32,
                      val_crop_ratio=1.0, crop_scale_min=0.35, flip=False)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_val_batches_on_cuda_equal_the_cpu_pipelines(dtype):
    cfg = demo_config(dtype)
    cuda = build_val_loader(cfg, torch.device("cuda"), batch_size=128)
    ops = [type(op).__name__ for op in cuda.pipeline_specs["image"].transforms]
    assert "NormalizeImage" not in ops and ops[-1] == "NormalizeOnDevice", ops  # uint8 crosses PCIe
    cpu = list(build_val_loader(cfg, torch.device("cpu"), batch_size=128))
    on_gpu = list(cuda)
    assert len(on_gpu) == len(cpu) > 1
    for (images, labels), (gpu_images, gpu_labels) in zip(cpu, on_gpu):
        assert gpu_images.is_cuda and gpu_images.dtype == images.dtype
        assert gpu_images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(gpu_images.cpu(), images) and torch.equal(gpu_labels.cpu(), labels)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("deit", [False, True])
def test_train_batches_on_cuda_equal_the_cpu_pipelines_and_survive_later_batches(deit):
    """Each normalized batch is a fresh tensor made on ffcv's stream: it must still hold its
    values after later batches were produced (the allocator must not reuse it early). With the
    DeiT augmentation of the loader on (RandAugment, erasing, repeated augmentation), too."""
    cfg = demo_config("bf16")
    if deit:
        cfg = dataclasses.replace(cfg, randaugment_n=2, erase_prob=0.25, repeated_aug=3)
    cpu = [b[0] for b in train_epoch(build_train_loader(cfg, torch.device("cpu"), batch_size=64, seed=3), cfg, 0)]
    kept = [b[0] for b in train_epoch(build_train_loader(cfg, torch.device("cuda"), batch_size=64, seed=3), cfg, 0)]
    torch.cuda.synchronize()
    assert len(kept) == len(cpu) > 2
    for images, gpu_images in zip(cpu, kept):
        assert torch.equal(gpu_images.cpu(), images)

"""FFCV data layer on real files: writer CLI, loaders, sharding, resume, seeded crops and
flips, demo data, errors.

Every image of the generated folder is one solid colour unique to it, so a decoded batch
tells which images it holds whatever the crop, flip or resize, and exactly-once reading can
be checked. The crop and flip tests use a second folder of noise images, where every crop
looks different. Each FFCV Loader compiles its pipeline with numba (seconds per process), so
the tests share a few loaders; everything that builds one or starts processes has a timeout.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.__main__ import main as launch_main
from vsgd_dist.data import (DataConfig, DataError, build_train_loader, build_val_loader,
                            ensure_demo_data, inspect_beton, iterate_from, resolution_at_epoch,
                            set_train_resolution, train_epoch)
from vsgd_dist.data.demo import digits_splits
from vsgd_dist.data.image_folder import list_images
from vsgd_dist.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from vsgd_dist.spawn import run_distributed

CLASS_FOLDERS = ["zebra", "ant", "mole", "cat"]  # label = index in sorted order
PER_CLASS = {"train": 12, "val": 5}  # 48 train images: 2 and 3 ranks get equal shards
EXTENSIONS = [".JPEG", ".jpg", ".png", ".jpeg", ".PNG"]
BATCH = 8


def colour_of(image_id: int) -> tuple[int, int, int]:
    return 40 + 24 * (image_id % 8), 40 + 24 * (image_id // 8 % 8), 40 + 24 * (image_id // 64)


def ids_of(images: torch.Tensor) -> list[int]:
    """Image ids of a normalized NCHW batch of solid-colour images."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (images.double() * std + mean).mean(dim=(2, 3))
    r, g, b = torch.round((rgb - 40) / 24).long().T
    return (r + 8 * g + 64 * b).tolist()


def make_image_folder(root: Path) -> dict[int, int]:
    """Solid-colour images of varying sizes and extensions; returns {image id: label}."""
    labels, image_id = {}, 0
    for split, count in PER_CLASS.items():
        for name in CLASS_FOLDERS:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                size = (24 + 8 * (image_id % 5), 24 + 8 * (image_id // 5 % 4))
                path = root / split / name / f"id{image_id:03d}{EXTENSIONS[image_id % 5]}"
                Image.new("RGB", size, colour_of(image_id)).save(path, quality=95)
                labels[image_id] = sorted(CLASS_FOLDERS).index(name)
                image_id += 1
    return labels


def write_cli(*args) -> int:
    return launch_main(["data", "write", "--num-workers", "2", *map(str, args)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(output folder, {image id: label}) of the folder written with the CLI as JPEG."""
    root = tmp_path_factory.mktemp("data")
    labels = make_image_folder(root / "src")
    assert write_cli("--src", root / "src", "--out", root / "out", "--write-mode", "jpg") == 0
    return root / "out", labels


def config(data_dir: Path, **overrides) -> DataConfig:
    settings = dict(data_dir=str(data_dir), num_workers=2, start_res=32, end_res=32,
                    val_res=32, val_crop_ratio=1.0, dtype="fp16")
    return DataConfig(**{**settings, **overrides})


def file_ids(data_dir: Path, split: str) -> list[int]:
    """Image id of each sample index in the .beton (the writer keeps list_images order)."""
    src = Path(json.loads((data_dir / "manifest.json").read_text())["source"])
    return [int(Path(path).stem[2:]) for path, _ in list_images(src / split, sorted(CLASS_FOLDERS))]


# --- writer -------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_cli_writes_betons_and_manifest(dataset):
    out, labels = dataset
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == sorted(CLASS_FOLDERS)
    assert manifest["counts"] == {"train": 48, "val": 20}
    assert manifest["settings"]["write_mode"] == "jpg" and manifest["ffcv_version"] == "1.0.2"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.beton", "val.beton"]
    info = inspect_beton(out / "train.beton")
    assert (info.num_samples, info.num_classes, info.max_side) == (48, 4, 56)


@pytest.mark.timeout(60)
def test_cli_refuses_to_overwrite_another_dataset(dataset, tmp_path, capsys):
    out, _ = dataset
    make_image_folder(tmp_path / "other")
    shutil.rmtree(tmp_path / "other" / "val" / "ant")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert write_cli("--src", tmp_path / "other", "--out", out) == 2
    assert "holds a different dataset" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    (tmp_path / "loose").mkdir()
    shutil.copy(out / "val.beton", tmp_path / "loose" / "val.beton")
    assert write_cli("--src", tmp_path / "other", "--out", tmp_path / "loose") == 2
    assert "without a manifest.json" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_cli_names_an_unreadable_image_and_writes_nothing(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "src" / split / "a").mkdir(parents=True)
        Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / "src" / split / "a" / "ok.jpg")
    (tmp_path / "src" / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert write_cli("--src", tmp_path / "src", "--out", tmp_path / "out") == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


# --- loaders ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_loader(dataset):
    out, _ = dataset
    cfg = config(out, start_res=32, end_res=64, ramp_start_epoch=2, ramp_end_epoch=4, res_step=16)
    return cfg, build_train_loader(cfg, torch.device("cpu"), batch_size=BATCH)


@pytest.mark.timeout(120)
def test_train_loader_reads_each_image_once_per_epoch_in_a_fixed_order(dataset, train_loader):
    out, labels = dataset
    cfg, loader = train_loader
    epochs = {}
    for epoch in (0, 1):
        ids = []
        for images, batch_labels in train_epoch(loader, cfg, epoch):
            assert images.shape == (BATCH, 3, 32, 32) and images.dtype == torch.float16
            assert images.is_contiguous(memory_format=torch.channels_last)
            batch_ids = ids_of(images)
            assert batch_labels.tolist() == [labels[i] for i in batch_ids]
            ids += batch_ids
        assert sorted(ids) == sorted(file_ids(out, "train"))
        epochs[epoch] = ids
    assert epochs[0] != epochs[1]

    # resume: batches 2.. of epoch 1 are the tail of epoch 1, and the loader moves on to 2
    resumed = [i for images, _ in iterate_from(loader, 1, start_batch=2) for i in ids_of(images)]
    assert resumed == epochs[1][2 * BATCH:]
    assert loader.next_epoch == 2
    # a restarted process (new Loader, same seed) has the same order for that epoch
    fresh = build_train_loader(cfg, torch.device("cpu"), batch_size=BATCH)
    ids_by_index = file_ids(out, "train")
    assert [ids_by_index[i] for i in fresh.traversal_order.sample_order(1)] == epochs[1]


@pytest.mark.timeout(120)
def test_progressive_resizing_follows_the_schedule(train_loader):
    cfg, loader = train_loader
    sizes = [next(iter(train_epoch(loader, cfg, epoch)))[0].shape[-1] for epoch in range(6)]
    assert sizes == [32, 32, 32, 48, 64, 64]
    assert sizes == [resolution_at_epoch(e, 32, 64, 2, 4, step=16) for e in range(6)]


def test_resolution_schedule_rounds_like_ffcv_imagenet():
    # ResNet-50 88-epoch recipe: 160 -> 192 over epochs 65..76
    assert [resolution_at_epoch(e, 160, 192, 65, 76) for e in (0, 65, 70, 71, 76, 88)] == \
        [160, 160, 160, 192, 192, 192]
    assert resolution_at_epoch(5, 128, 256, 0, 10) == 192


@pytest.mark.timeout(120)
def test_val_loader_reads_each_image_once_in_file_order(dataset):
    out, labels = dataset
    loader = build_val_loader(config(out, dtype="bf16"), "cpu", batch_size=BATCH)
    ids = []
    for images, batch_labels in loader:
        assert images.dtype == torch.bfloat16 and images.shape[1:] == (3, 32, 32)
        batch_ids = ids_of(images)
        assert batch_labels.tolist() == [labels[i] for i in batch_ids]
        ids += batch_ids
    assert ids == file_ids(out, "val")


@pytest.mark.timeout(120)
def test_val_decoder_returns_the_stored_pixels(tmp_path):
    x, y = np.meshgrid(np.arange(32), np.arange(32))
    gradients = [np.stack([x * 8, y * 8, (x + y) * 4], -1).astype(np.uint8),
                 np.stack([255 - y * 8, x * 4, y * 2], -1).astype(np.uint8)]
    for split in ("train", "val"):
        for name, pixels in zip(("a", "b"), gradients):
            (tmp_path / "src" / split / name).mkdir(parents=True)
            Image.fromarray(pixels).save(tmp_path / "src" / split / name / "g.png")
    assert write_cli("--src", tmp_path / "src", "--out", tmp_path / "out", "--write-mode", "raw") == 0
    loader = build_val_loader(config(tmp_path / "out", dtype="fp32"), "cpu", batch_size=2)
    images, labels = next(iter(loader))
    pixels = images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert labels.tolist() == [0, 1]
    for decoded, source in zip(pixels, gradients):
        # atol 0.01 of a 0-255 pixel: normalizing and un-normalizing in fp32 rounds (~1e-5 relative)
        np.testing.assert_allclose(decoded.permute(1, 2, 0).numpy(), source, atol=0.01)


# --- seeded crops and flips --------------------------------------------------------------

NOISE_BATCH = 4


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    """16 train and 4 val images of random pixels in assorted sizes, written as JPEG."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for name in ("a", "b"):
            (root / "src" / split / name).mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(24, 72, size=2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "src" / split / name / f"{i}.png")
    assert write_cli("--src", root / "src", "--out", root / "out", "--write-mode", "jpg") == 0
    return root / "out"


def noise_loader(data_dir: Path, seed: int = 0, **overrides):
    cfg = config(data_dir, dtype="fp32", **overrides)
    return cfg, build_train_loader(cfg, "cpu", batch_size=NOISE_BATCH, seed=seed)


def epoch_batches(loader, cfg, epoch: int, start_batch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # ffcv reuses its output buffers a few batches later: keep copies
    return [(x.clone(), y.clone()) for x, y in train_epoch(loader, cfg, epoch, start_batch)]


def by_sample(loader, epoch: int, batches) -> dict[int, torch.Tensor]:
    """{sample index in the .beton: its decoded image} for one epoch's batches."""
    order = loader.traversal_order.sample_order(epoch)
    images = torch.cat([x for x, _ in batches])
    return {int(i): image for i, image in zip(order, images)}


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for (x, y), (x_ref, y_ref) in zip(actual, expected):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


@pytest.fixture(scope="module")
def noise_reference(noise_dir):
    """Seed 0, 2 threads: the loader and its epochs 0 and 1, uninterrupted."""
    cfg, loader = noise_loader(noise_dir)
    return cfg, loader, {epoch: epoch_batches(loader, cfg, epoch) for epoch in (0, 1)}


@pytest.fixture(scope="module")
def noise_fresh(noise_dir):
    """A second loader with the reference's settings, as a restarted process builds it."""
    return noise_loader(noise_dir)


@pytest.mark.timeout(120)
def test_the_same_seed_gives_bitwise_the_same_batches(noise_reference, noise_fresh):
    _, _, reference = noise_reference
    cfg, fresh = noise_fresh
    for epoch in (1, 0):
        assert_same_batches(epoch_batches(fresh, cfg, epoch), reference[epoch])


@pytest.mark.timeout(120)
def test_another_seed_or_epoch_gives_other_crops(noise_dir, noise_reference):
    _, loader, reference = noise_reference
    epoch0, epoch1 = by_sample(loader, 0, reference[0]), by_sample(loader, 1, reference[1])
    assert len(epoch0) == 16 and all(not torch.equal(epoch0[i], epoch1[i]) for i in epoch0)
    cfg, other = noise_loader(noise_dir, seed=1, num_workers=1)
    other0 = by_sample(other, 0, epoch_batches(other, cfg, 0))
    assert all(not torch.equal(epoch0[i], other0[i]) for i in epoch0)


@pytest.mark.timeout(120)
def test_resuming_mid_epoch_continues_bitwise(noise_reference, noise_fresh):
    _, loader, reference = noise_reference
    cfg, fresh = noise_fresh
    assert_same_batches(epoch_batches(fresh, cfg, 1, start_batch=2), reference[1][2:])
    assert_same_batches(epoch_batches(loader, cfg, 1, start_batch=1), reference[1][1:])
    assert_same_batches(epoch_batches(fresh, cfg, 0, start_batch=3), reference[0][3:])


@pytest.mark.timeout(120)
def test_crops_do_not_depend_on_the_thread_count_and_flip_only_mirrors(noise_dir, noise_reference):
    _, _, reference = noise_reference
    cfg, one_thread = noise_loader(noise_dir, num_workers=1)
    assert_same_batches(epoch_batches(one_thread, cfg, 0), reference[0])
    cfg, unflipped = noise_loader(noise_dir, num_workers=1, flip=False)
    pairs = [(x, x_ref) for (xs, _), (xs_ref, _) in zip(epoch_batches(unflipped, cfg, 0), reference[0])
             for x, x_ref in zip(xs, xs_ref)]
    mirrored = sum(torch.equal(x.flip(-1), x_ref) for x, x_ref in pairs)
    assert sum(torch.equal(x, x_ref) for x, x_ref in pairs) + mirrored == 16 and 4 <= mirrored <= 12


def test_crop_boxes_follow_random_resized_crop():
    from vsgd_dist.data.augment import crop_box, image_key

    boxes = np.array([crop_box(np.uint64(image_key(0, 0, i)), 300, 400, 0.08) for i in range(5000)])
    top, left, h, w = boxes.T
    assert top.min() >= 0 and left.min() >= 0 and (top + h).max() <= 300 and (left + w).max() <= 400
    area = h * w / (300 * 400)
    # torchvision's sampler gives a mean area fraction of ~0.43 on a 4:3 image (large boxes that
    # do not fit are redrawn), aspect ratios within [3/4, 4/3] up to rounding
    assert area.min() >= 0.079 and area.max() <= 1 and 0.41 < area.mean() < 0.45
    assert np.all(np.abs(np.log(w / h)) < np.log(4 / 3) + 0.02)
    bigger = np.array([crop_box(np.uint64(image_key(0, 0, i)), 300, 400, 0.35) for i in range(5000)])
    assert (bigger[:, 2] * bigger[:, 3]).min() >= 0.349 * 300 * 400
    # no box of the ratio range fits a 10 x 200 strip: the fallback is the centered 3:4 box
    assert crop_box(np.uint64(image_key(0, 0, 1)), 200, 10, 0.08) == (93, 0, 13, 10)


# --- demo data ----------------------------------------------------------------------------

def _demo_on_rank(rank, world_size, cache_dir):
    files = ensure_demo_data(cache_dir)
    return str(files.train), str(files.val), files.manifest.counts


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """Digits written by two ranks that start together on an empty cache folder."""
    cache = tmp_path_factory.mktemp("cache") / "digits"
    return cache, run_distributed(_demo_on_rank, 2, str(cache), timeout=150)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_demo_data_is_written_once_under_concurrent_ranks(demo_dir):
    cache, results = demo_dir
    assert results[0] == results[1]
    assert results[0][2] == {"train": 1500, "val": 297}
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "manifest.json", "train.beton", "val.beton"]
    assert inspect_beton(cache / "train.beton").num_classes == 10


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_demo_data_holds_the_real_digits(demo_dir):
    cache, _ = demo_dir
    expected = digits_splits()
    assert np.bincount(expected["val"].labels).min() >= 29  # stratified: ~30 per digit
    loader = build_val_loader(config(cache, dtype="fp32"), "cpu", batch_size=64)
    images, labels = next(iter(loader))
    pixels = images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert labels.tolist() == expected["val"].labels[:64].tolist()
    # atol 0.01 of a 0-255 pixel: the fp32 normalize / un-normalize round trip, as above
    np.testing.assert_allclose(pixels.permute(0, 2, 3, 1).numpy(), expected["val"].images[:64], atol=0.01)


# --- distributed sharding -----------------------------------------------------------------

def _shards_on_rank(rank, world_size, data_dir, decode_train):
    """Ids this rank reads in train epoch 0 and in val, and the error for mismatched seeds.

    Decoding the train epoch costs a numba compile per rank (slow on 2 shared cores), so the
    3-rank run reads the train shard from the same ffcv order the Loader iterates instead.
    """
    cfg = config(Path(data_dir))
    try:
        build_train_loader(config(Path(data_dir)), "cpu", batch_size=BATCH, seed=rank, distributed=True)
        seed_error = ""
    except DataError as e:
        seed_error = str(e)
    train = build_train_loader(cfg, "cpu", batch_size=BATCH, distributed=True)
    if decode_train:
        train_ids = [i for images, _ in train_epoch(train, cfg, 0) for i in ids_of(images)]
    else:
        ids_by_index = file_ids(Path(data_dir), "train")
        train_ids = [ids_by_index[i] for i in train.traversal_order.sample_order(0)[:len(train) * BATCH]]
    val_ids = [i for images, _ in build_val_loader(cfg, "cpu", batch_size=BATCH, distributed=True) for i in ids_of(images)]
    return train_ids, val_ids, seed_error


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_shards_that_cover_the_data(dataset, world_size):
    out, _ = dataset
    results = run_distributed(_shards_on_rank, world_size, str(out), world_size == 2, timeout=200)
    for split, column in (("train", 0), ("val", 1)):
        shards = [r[column] for r in results]
        assert sorted(sum(shards, [])) == sorted(file_ids(out, split)), split
    assert all(len(r[0]) == 48 // world_size for r in results)
    assert all("data seed differs across ranks" in r[2] for r in results)


# --- errors instead of hangs --------------------------------------------------------------

@pytest.fixture
def broken_copy(dataset, tmp_path):
    """A copy of the dataset folder whose train.beton each test damages its own way."""
    out, _ = dataset
    for name in ("manifest.json", "val.beton", "train.beton"):
        shutil.copy(out / name, tmp_path / name)
    return tmp_path


@pytest.mark.timeout(30)
def test_missing_folder_and_missing_file_are_errors(broken_copy, tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        build_train_loader(config(tmp_path / "nowhere"), "cpu", batch_size=BATCH)
    (broken_copy / "train.beton").unlink()
    with pytest.raises(DataError, match="no such dataset file.*launch data write"):
        build_train_loader(config(broken_copy), "cpu", batch_size=BATCH)
    (broken_copy / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a .beton file"):
        inspect_beton(broken_copy / "notes.txt")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("damage", ["random bytes", "cut in half", "last bytes cut", "empty"])
def test_corrupt_or_truncated_file_is_an_error(broken_copy, damage):
    path = broken_copy / "train.beton"
    data = path.read_bytes()
    damaged = {"random bytes": np.random.default_rng(0).bytes(len(data)), "cut in half": data[:len(data) // 2],
               "last bytes cut": data[:-5], "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.raises(DataError, match="corrupt or truncated"):
        build_train_loader(config(broken_copy), "cpu", batch_size=BATCH)


@pytest.mark.timeout(60)
def test_wrong_field_type_is_an_error(broken_copy):
    from ffcv.fields import FloatField, RGBImageField
    from ffcv.writer import DatasetWriter

    images = [(np.full((8, 8, 3), 100, np.uint8), 0.5)] * 4
    DatasetWriter(str(broken_copy / "train.beton"), {"image": RGBImageField(), "label": FloatField()},
                  num_workers=1).from_indexed_dataset(images)
    with pytest.raises(DataError, match="needs field 'label' of type IntField"):
        build_train_loader(config(broken_copy), "cpu", batch_size=BATCH)


@pytest.mark.timeout(30)
def test_unworkable_settings_are_errors(dataset, train_loader):
    out, _ = dataset
    with pytest.raises(DataError, match=r"batch_size 49 is outside \[1, this rank's shard"):
        build_train_loader(config(out), "cpu", batch_size=49)
    with pytest.raises(DataError, match="torch.distributed is not initialized"):
        build_train_loader(config(out), "cpu", batch_size=BATCH, distributed=True)
    with pytest.raises(DataError, match="single process only"):
        build_train_loader(config(out, os_cache=False), "cpu", batch_size=BATCH, distributed=True)
    with pytest.raises(DataError, match="val_res 4 is outside"):
        config(out, val_res=4)
    with pytest.raises(DataError, match="dtype 'fp8'"):
        config(out, dtype="fp8")
    with pytest.raises(DataError, match=r"crop_scale_min 0 must be in \(0, 1\]; flip 'no' must"):
        config(out, crop_scale_min=0, flip="no")
    with pytest.raises(DataError, match="train resolution 0"):
        set_train_resolution(train_loader[1], 0)
    with pytest.raises(DataError, match="start_batch 7 is outside"):
        iterate_from(train_loader[1], 0, start_batch=7)


@pytest.mark.dist
def test_ffcv_imported_through_vsgd_dist_data_has_its_image_modes_without_numba_compiling():
    """vsgd_dist/compat/ffcv.py: same mapping, numba's typed Dict untouched afterwards."""
    code = ("import vsgd_dist.data, ffcv.loader, numba.typed, numba.typed.typeddict as t\n"
            "from ffcv.fields.rgb_image import IMAGE_MODES\n"
            "assert IMAGE_MODES == {'jpg': 0, 'raw': 1} and numba.typed.Dict is t.Dict\n"
            "assert not t._setitem.signatures  # numba compiled no dict operation\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr

"""DeiT-style augmentation: RandAugment and random erasing (decoder), repeated augmentation
(the order), Mixup/CutMix (device batches), stochastic depth (the ViTs). Every draw is keyed,
so it repeats with the seed, changes with the epoch (or step), does not depend on the world
size where an image's own augmentation is concerned, and a resumed run continues bitwise."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import toy_model  # noqa: F401 - registers vit_toy here; ranks import it through VSGD_DIST_PLUGINS
from launch.__main__ import main as launch
from test_data import noise_dir  # noqa: F401 - the fixture: 16 train and 4 val JPEGs
from vsgd_dist.data import DataConfig, build_train_loader, train_epoch
from vsgd_dist.data.draws import approx_normals, image_key, normal
from vsgd_dist.data.mixup import BatchMixer, mix_batch, mix_draw
from vsgd_dist.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from vsgd_dist.data.randaugment import FILL, OPS, _erase_box, apply_op, rand_augment, random_erase
from vsgd_dist.data.repeated import repeated_order
from vsgd_dist.models import build_model
from vsgd_dist.models.drop_path import drop_path_draws
from vsgd_dist.spawn import run_distributed
from vsgd_dist.train.checkpoint import latest_checkpoint, read_full

TESTS = Path(__file__).resolve().parent


# --- RandAugment and random erasing, one image ---------------------------------------------

def textured(height=40, width=48, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(40, 200, (height, width, 3))
    return np.clip(noise + np.linspace(-40, 40, width)[None, :, None], 0, 255).astype(np.uint8)


def pil_op(image: Image.Image, op: str, level: float, sign: float) -> Image.Image:
    """timm's op (auto_augment.py, rand-increasing) at magnitude `level` in [0, 1], through PIL,
    geometry bilinear."""
    w, h = image.size
    affine = {"shear_x": (1, sign * level * 0.3, 0, 0, 1, 0), "shear_y": (1, 0, 0, sign * level * 0.3, 1, 0),
              "translate_x": (1, 0, sign * level * 0.45 * w, 0, 1, 0),
              "translate_y": (1, 0, 0, 0, 1, sign * level * 0.45 * h)}
    enhance = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
               "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}
    if op in affine:
        return image.transform(image.size, Image.AFFINE, affine[op], resample=Image.BILINEAR, fillcolor=tuple(FILL))
    if op in enhance:
        return enhance[op](image).enhance(1 + sign * level * 0.9)
    return {"auto_contrast": lambda: ImageOps.autocontrast(image), "equalize": lambda: ImageOps.equalize(image),
            "invert": lambda: ImageOps.invert(image),
            "rotate": lambda: image.rotate(sign * level * 30, resample=Image.BILINEAR, fillcolor=tuple(FILL)),
            "posterize": lambda: ImageOps.posterize(image, 4 - int(level * 4)),
            "solarize": lambda: ImageOps.solarize(image, 256 - int(level * 256)),
            "solarize_add": lambda: Image.fromarray(np.where(np.asarray(image) < 128, np.minimum(
                255, np.asarray(image).astype(int) + int(level * 110)), np.asarray(image)).astype(np.uint8)),
            }[op]()


@pytest.mark.parametrize("op", OPS)
def test_each_randaugment_op_gives_pils_pixels(op):
    """Both signs, two magnitudes; measured identical, and allowed to differ by 1 of 255 at
    0.1% of the values (a float rounded the other way on another CPU or Pillow)."""
    source = textured()
    scratch = np.empty(source.size, np.uint8)
    for level in (0.3, 0.9):
        for sign in (1.0, -1.0):
            mine = source.copy()
            apply_op(mine, scratch, OPS.index(op), level, sign)
            theirs = np.asarray(pil_op(Image.fromarray(source), op, level, sign)).astype(int)
            differ = np.abs(mine.astype(int) - theirs)
            assert differ.max() <= 1 and (differ > 0).mean() <= 0.001, (op, level, sign, differ.max())


def test_randaugment_is_keyed_by_the_image_key():
    source, scratch = textured(), np.empty(textured().size, np.uint8)

    def augmented(key, ops=2):
        image = source.copy()
        rand_augment(image, scratch, np.uint64(key), ops, 9.0, 0.5)
        return image

    keys = [image_key(0, 0, i) for i in range(40)]
    assert all(np.array_equal(augmented(k), augmented(k)) for k in keys)
    changed = [not np.array_equal(augmented(k), source) for k in keys]
    # each of 2 ops is applied with p 0.5: ~3/4 of the images change (a few ops can leave one as
    # is); auto_contrast, equalize and invert take no magnitude, so some keys give one result
    assert 0.5 < np.mean(changed) < 0.95
    assert len({augmented(k).tobytes() for k in keys}) >= 20
    assert np.array_equal(augmented(keys[0], ops=0), source)


def test_random_erasing_draws_timms_boxes_and_normal_noise():
    """A box of 2% to 1/3 of the image with p 0.25, its pixels the uint8 values of standard
    normals of the normalized image (clipped to what uint8 can hold)."""
    height, width = 48, 64
    erased, areas, noise = 0, [], []
    for i in range(2000):
        key = np.uint64(image_key(3, 1, i))
        black, white = np.zeros((height, width, 3), np.uint8), np.full((height, width, 3), 255, np.uint8)
        random_erase(black, key, 0.25)
        random_erase(white, key, 0.25)
        box = ((black != 0) | (white != 255)).any(2)
        if not box.any():
            continue
        assert np.array_equal(black[box], white[box])  # the noise is a function of the key
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one rectangle
        erased += 1
        areas.append(box.mean())
        noise.append((black[box] - IMAGENET_MEAN) / IMAGENET_STD)
    assert abs(erased / 2000 - 0.25) < 0.03
    assert 0.02 - 0.01 <= min(areas) and max(areas) <= 1 / 3 + 0.02  # rounding of the box's sides
    z = np.concatenate(noise)
    assert abs(z.mean()) < 0.02 and 0.9 < z.std() < 1.0  # clipped near -2.1 and +2.2..2.6


def test_erasing_noise_is_libms_normal_draw_for_every_value():
    """The SIMD normals (vector_math's log and cos) give the pixels the libm formula gives:
    every value of large boxes, bitwise; the approximation itself within 1e-13."""
    draws = np.empty(1 << 18)
    approx_normals(np.uint64(image_key(5, 0, 0)), 7, draws)
    exact = np.array([normal(np.uint64(image_key(5, 0, 0)), 2 * (7 + i)) for i in range(draws.size)])
    assert np.abs(draws - exact).max() < 1e-13
    height, width = 40, 56
    for seed in range(4):
        noise = np.uint64(image_key(seed, 2, 9))
        image = np.zeros((height, width, 3), np.uint8)
        _erase_box(image, noise, 3, 5, 30, 50)
        z = np.array([[[normal(noise, 2 * ((y * width + x) * 3 + c)) for c in range(3)] for x in range(5, 55)]
                      for y in range(3, 33)])
        expected = np.clip(np.trunc(IMAGENET_MEAN + IMAGENET_STD * z + 0.5), 0, 255)
        assert np.array_equal(image[3:33, 5:55], expected)
        assert not image[:3].any() and not image[33:].any() and not image[:, :5].any() and not image[:, 55:].any()


# --- Mixup and CutMix ----------------------------------------------------------------------

def batch(n=8, classes=5, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 12, 16, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, classes, (n,), generator=g)


def test_mix_draws_repeat_per_seed_epoch_and_step_only():
    draw = dict(height=12, width=16, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    assert mix_draw(0, 2, 5, **draw) == mix_draw(0, 2, 5, **draw)
    others = {mix_draw(0, 2, 6, **draw), mix_draw(0, 3, 5, **draw), mix_draw(1, 2, 5, **draw)}
    assert mix_draw(0, 2, 5, **draw) not in others and len(others) == 3
    draws = [mix_draw(0, 0, s, **draw) for s in range(400)]
    cutmix = [d for d in draws if d.box is not None]
    assert abs(len(cutmix) / 400 - 0.5) < 0.08
    weights = [d.weight for d in draws if d.box is None]
    assert abs(np.mean(weights) - 0.5) < 0.05 and np.std(weights) > 0.3  # Beta(0.8, 0.8): std 0.33
    only_mixup = [mix_draw(0, 0, s, 12, 16, 0.8, 0.0, 0.5) for s in range(50)]
    only_cutmix = [mix_draw(0, 0, s, 12, 16, 0.0, 1.0, 0.5) for s in range(50)]
    assert all(d.box is None for d in only_mixup) and all(d.box is not None for d in only_cutmix)


def test_mixup_and_cutmix_targets_sum_to_one_and_match_the_images():
    images, labels = batch()
    for step in range(40):
        draw = mix_draw(0, 0, step, 12, 16, 0.8, 1.0, 0.5)
        mixed, targets = mix_batch(images, labels, 5, draw)
        assert mixed.dtype == images.dtype and mixed.is_contiguous(memory_format=torch.channels_last)
        assert targets.dtype == torch.float32 and targets.shape == (8, 5)
        torch.testing.assert_close(targets.sum(1), torch.ones(8), rtol=0, atol=1e-6)
        one_hot = torch.nn.functional.one_hot(labels, 5).float()
        torch.testing.assert_close(targets, draw.weight * one_hot + (1 - draw.weight) * one_hot.flip(0))
        if draw.box is None:
            expected = draw.weight * images.float() + (1 - draw.weight) * images.flip(0).float()
            torch.testing.assert_close(mixed.float(), expected, rtol=2 ** -10, atol=2 ** -14)  # one fp16 rounding
        else:
            top, bottom, left, right = draw.box
            inside = torch.zeros(12, 16, dtype=torch.bool)
            inside[top:bottom, left:right] = True
            assert torch.equal(mixed[..., inside], images.flip(0)[..., inside])
            assert torch.equal(mixed[..., ~inside], images[..., ~inside])
            assert draw.weight == pytest.approx(1 - inside.float().mean().item())
    assert torch.equal(images, batch()[0])  # the loader's batch is left as it was


def test_every_rank_and_micro_batch_of_a_step_mixes_with_the_same_draw():
    """The draw is a function of (seed, epoch, step): two halves of a batch (two ranks, or two
    micro-batches) get the same weight or box, whatever images they hold."""
    mixer = BatchMixer(5, seed=0, mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.5)
    images, labels = batch()
    first, _ = mixer(images[:4], labels[:4], 1, 7)
    second, _ = mixer(images[4:], labels[4:], 1, 7)
    weight = mix_draw(0, 1, 7, 12, 16, 0.8, 0.0, 0.5).weight
    for half, mixed in ((images[:4], first), (images[4:], second)):
        expected = weight * half.float() + (1 - weight) * half.flip(0).float()
        torch.testing.assert_close(mixed.float(), expected, rtol=2 ** -10, atol=2 ** -14)


# --- repeated augmentation -------------------------------------------------------------------

def test_repeated_order_deals_deits_repeated_list_and_keeps_the_epoch_length():
    """Copies c of sample i are draw index i + c * N; the ranks' orders, interleaved, are one
    list (the permutation's samples each repeated 3 times in place) at every world size; with
    at least 3 ranks an image's copies go to 3 different ranks; each rank gets len // world."""
    num_samples, indices = 50, np.arange(0, 50, 2)  # e.g. minival holds out the odd samples
    for world in (1, 2, 3, 4):
        ranks = [repeated_order(indices, num_samples, 3, 7, 1, world, r) for r in range(world)]
        assert all(len(r) == len(indices) // world for r in ranks)
        dealt = np.stack(ranks, 1).reshape(-1)
        reference = repeated_order(indices, num_samples, 3, 7, 1, 1, 0)
        assert np.array_equal(dealt, reference[:len(dealt)])
        samples, copies = reference % num_samples, reference // num_samples
        assert np.array_equal(samples, np.repeat(samples[::3], 3)[:len(samples)])
        assert np.array_equal(copies, np.tile(np.arange(3), len(copies))[:len(copies)])
        assert set(samples) <= set(indices)
        if world >= 3:
            ranks_of = {}
            for rank, order in enumerate(ranks):
                for draw in order:
                    ranks_of.setdefault(draw % num_samples, []).append(rank)
            assert all(len(set(held)) == len(held) for held in ranks_of.values())
    again = repeated_order(indices, num_samples, 3, 7, 1, 2, 0)
    assert np.array_equal(again, repeated_order(indices, num_samples, 3, 7, 1, 2, 0))
    assert not np.array_equal(again, repeated_order(indices, num_samples, 3, 7, 2, 2, 0))
    assert not np.array_equal(again, repeated_order(indices, num_samples, 3, 8, 1, 2, 0))


# --- the loader with everything on -----------------------------------------------------------

BATCH = 4


def deit_config(data_dir, **overrides) -> DataConfig:
    settings = dict(data_dir=str(data_dir), num_workers=2, start_res=32, end_res=32, val_res=32,
                    val_crop_ratio=1.0, dtype="fp32", randaugment_n=2, randaugment_m=9.0, randaugment_mstd=0.5,
                    erase_prob=0.25, repeated_aug=3)
    return DataConfig(**{**settings, **overrides})


def by_draw_index(loader, cfg, epoch: int, start_batch: int = 0) -> dict[int, torch.Tensor]:
    """{draw index: decoded image} of `epoch` from batch `start_batch` on."""
    images = torch.cat([x.clone() for x, _ in train_epoch(loader, cfg, epoch, start_batch)])
    order = loader.traversal_order.sample_order(epoch)[start_batch * BATCH:]
    return {int(i): image for i, image in zip(order, images)}


@pytest.fixture(scope="module")
def deit_reference(noise_dir):
    cfg = deit_config(noise_dir)
    loader = build_train_loader(cfg, "cpu", batch_size=BATCH, seed=0)
    return cfg, loader, {epoch: by_draw_index(loader, cfg, epoch) for epoch in (0, 1)}


def same_images(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(240)
def test_augmented_batches_repeat_bitwise_resume_and_differ_by_epoch_and_copy(noise_dir, deit_reference):
    cfg, loader, reference = deit_reference
    assert len(reference[0]) == 16 and all(torch.isfinite(x).all() for x in reference[0].values())
    fresh = build_train_loader(deit_config(noise_dir, num_workers=1), "cpu", batch_size=BATCH, seed=0)
    for epoch in (1, 0):
        assert same_images(by_draw_index(fresh, cfg, epoch), reference[epoch])
    tail = by_draw_index(fresh, cfg, 1, start_batch=2)
    assert same_images(tail, {k: v for k, v in reference[1].items() if k in tail}) and len(tail) == 8
    shared = reference[0].keys() & reference[1].keys()
    assert all(not torch.equal(reference[0][k], reference[1][k]) for k in shared)
    copies = [(k, k + 16) for k in reference[0] if k + 16 in reference[0]]  # copies 0 and 1 of a sample
    assert copies and all(not torch.equal(reference[0][a], reference[0][b]) for a, b in copies)
    other_seed = build_train_loader(cfg, "cpu", batch_size=BATCH, seed=1)
    assert not same_images(by_draw_index(other_seed, cfg, 0), reference[0])


def _decode_on_rank(rank, world, data_dir):
    """This rank's {draw index: image} of epoch 0, as numpy (a tensor sent back from a rank that
    exits goes through shared memory that dies with it)."""
    cfg = deit_config(Path(data_dir))
    loader = build_train_loader(cfg, "cpu", batch_size=BATCH, seed=0, distributed=True)
    return {k: v.numpy() for k, v in by_draw_index(loader, cfg, 0).items()}


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_each_copy_is_augmented_alike_at_any_world_size(noise_dir, deit_reference):
    """2 ranks decode the draw indices one process decodes in epoch 0 (the same first 16
    entries of the repeated list, dealt out), and each gets the same pixels."""
    _, _, reference = deit_reference
    shards = run_distributed(_decode_on_rank, 2, str(noise_dir), timeout=200)
    assert not shards[0].keys() & shards[1].keys()
    assert same_images({k: torch.from_numpy(v) for shard in shards for k, v in shard.items()}, reference[0])


# --- stochastic depth ------------------------------------------------------------------------

def test_drop_path_keeps_the_weights_and_draws_keyed_masks_rising_over_the_blocks():
    torch.manual_seed(0)
    plain = build_model("vit_toy", 10, 32)
    torch.manual_seed(0)
    model = build_model("vit_toy", 10, 32, drop_path=0.5, seed=3)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    images = torch.randn(64, 3, 32, 32)
    model.eval()
    plain.eval()
    assert torch.equal(model(images), plain(images))  # evaluation drops nothing
    model.train()
    draws = drop_path_draws(model)
    with pytest.raises(RuntimeError, match="draw"):
        model(images)
    draws.draw(64, epoch=1, step=2, slot=0, device=torch.device("cpu"))
    scales, out = draws.scales.clone(), model(images)
    draws.draw(64, epoch=1, step=2, slot=0, device=torch.device("cpu"))
    assert torch.equal(draws.scales, scales) and torch.equal(model(images), out)
    for other in (dict(epoch=1, step=3, slot=0), dict(epoch=1, step=2, slot=1), dict(epoch=2, step=2, slot=0)):
        draws.draw(64, device=torch.device("cpu"), **other)
        assert not torch.equal(draws.scales, scales), other
    # 2 blocks: rates 0 (first block's 2 branches) and 0.5 (second's); kept branches x 1 / (1 - rate)
    assert torch.equal(scales[:2], torch.ones(2, 64))
    assert set(scales[2:].unique().tolist()) == {0.0, 2.0} and abs((scales[2:] > 0).float().mean() - 0.5) < 0.12
    assert drop_path_draws(plain) is None


# --- recipe checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["data.randaugment_m=11"], "randaugment_m 11.0 must be a magnitude in [0, 10] (DeiT: 9)"),
    (["data.randaugment_n=-1"], "randaugment_n -1 must be >= 0 ops per image (0: off; DeiT: 2)"),
    (["data.erase_prob=1.5"], "erase_prob 1.5 must be a probability in [0, 1] (DeiT: 0.25)"),
    (["data.repeated_aug=0"], "repeated_aug 0 must be >= 1 (1: off; DeiT: 3)"),
    (["data.repeated_aug=3", "data.os_cache=false"], "repeated_aug 3 needs os_cache=true"),
    (["data.mixup_alpha=-1"], "mixup_alpha -1.0 must be >= 0 (0: off)"),
    (["data.mix_switch_prob=2"], "mix_switch_prob 2.0 must be a probability in [0, 1]"),
    (["model.drop_path=1"], "model.drop_path=1.0 must be in [0, 1) (0: off; DeiT-S/B: 0.1)"),
    (["model.drop_path=0.1"], "model resnet_tiny has no stochastic depth (the ViTs have); set model.drop_path=0"),
])
def test_augmentation_values_that_cannot_work_fail_in_the_launcher(overrides, message, tmp_path, capsys):
    code = launch(["run", "recipes/demo.yaml", "--nproc", "2", f"out={tmp_path / 'r'}", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


# --- a resume through the trainer --------------------------------------------------------------

DEIT_OVERRIDES = ["model=vit_toy", "model.drop_path=0.1", "data.randaugment_n=2", "data.erase_prob=0.25",
                  "data.repeated_aug=3", "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0"]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def checkpoint_tensors(run_dir: Path) -> dict:
    full = read_full(latest_checkpoint(run_dir / "checkpoints"))

    def flat(tree, prefix):
        if isinstance(tree, dict):
            return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}/{key}").items()}
        if isinstance(tree, (list, tuple)):
            return {k: v for i, value in enumerate(tree) for k, v in flat(value, f"{prefix}/{i}").items()}
        return {prefix: tree} if torch.is_tensor(tree) else {}

    return flat({k: v for k, v in full.items() if k != "meta"}, "")


@pytest.fixture
def plugin_env(monkeypatch):
    """Rank processes import tests/toy_model.py (vit_toy) too."""
    monkeypatch.setenv("VSGD_DIST_PLUGINS", "toy_model")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_resume_with_every_augmentation_on_is_bitwise(tmp_path, plugin_env):
    """2 ranks, RandAugment, erasing, repeated augmentation, Mixup/CutMix and drop path on:
    6 steps in one go (checkpoint at 3), then the same run resumed from its step-3
    checkpoint: the same losses at steps 4-6 and bitwise the same final weights and state."""
    whole = tmp_path / "whole"
    command = ["run", "recipes/demo.yaml", "--nproc", "2", "max_steps=6", "train.ckpt_every=3",
               "train.keep_checkpoints=3", "train.log_every=1", "train.progress=false", *DEIT_OVERRIDES]
    assert launch(command + [f"out={whole}"]) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed, ignore=shutil.ignore_patterns("step_00000006"))
    assert launch(command + [f"out={resumed}"]) == 0
    losses = train_losses(whole)
    assert [s for s, _ in losses] == list(range(1, 7)) and all(math.isfinite(v) for _, v in losses)
    assert train_losses(resumed) == losses
    mine, theirs = checkpoint_tensors(resumed), checkpoint_tensors(whole)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

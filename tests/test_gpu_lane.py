"""The CUDA/NCCL path, checked where a CPU can check it: the device a rank picks,
the weight EMA in fp32 on every engine, FSDP2 with channels_last and with a bf16
MixedPrecisionPolicy, the CUDA kernel options, the CPU thread budget, ViT resolutions, and
the uint8-on-device image normalization. tests/gpu/ runs the rest on a GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.__main__ import main as launch
from vsgd_dist import distributed
from vsgd_dist.config import ConfigError, RunConfig, load_recipe
from vsgd_dist.distributed import DeviceError, backend_for, pick_device
from vsgd_dist.spawn import run_distributed
from vsgd_dist.train.ema import WeightEMA

DEMO = "recipes/demo.yaml"


# ------------------------------------------------------------------------- pick_device
@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine shows `n` GPUs to the process; record set_device calls."""
    chosen = []

    def show(n: int, local_rank: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        return chosen
    return show


def test_pick_device_without_a_gpu_is_the_cpu_over_gloo(gpus):
    gpus(0, 3)
    assert pick_device() == torch.device("cpu") and backend_for(torch.device("cpu")) == "gloo"


@pytest.mark.parametrize("local_rank", [0, 5])
def test_one_gpu_per_task_binding_uses_the_only_visible_gpu_whatever_the_local_rank(gpus, local_rank):
    """srun --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES per task: every task sees one GPU,
    cuda:0, while LOCAL_RANK still counts the tasks of the node."""
    chosen = gpus(1, local_rank)
    assert pick_device() == torch.device("cuda", 0) and chosen == [torch.device("cuda", 0)]


def test_a_node_wide_view_gives_each_local_rank_its_own_gpu(gpus):
    chosen = gpus(8, 5)
    assert pick_device() == torch.device("cuda", 5) and chosen == [torch.device("cuda", 5)]
    assert backend_for(torch.device("cuda", 5)) == "cuda:nccl,cpu:gloo"


def test_more_ranks_than_gpus_is_an_error_naming_the_fix_not_a_fall_back_to_gloo(gpus):
    chosen = gpus(2, 2)
    with pytest.raises(DeviceError, match=r"local rank 2 has no GPU: 2 are visible.*at most 2 ranks per node"):
        pick_device()
    assert chosen == []


# ------------------------------------------------------------------------- weight EMA
def test_ema_of_bf16_weights_moves_where_a_bf16_average_would_round_every_update_away():
    """Weights one bf16 ulp (2^-7) above 1.0 after starting at 1.0: at decay 0.999 an update
    moves the average by 2^-7 / 1000, far below bf16's half ulp at 1.0 (2^-9), so a bf16
    average never moves; the fp32 average follows 1 + 2^-7 (1 - 0.999^k) to fp32 rounding."""
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema = WeightEMA(model, decay=0.999)
    assert all(a.dtype == torch.float32 for a in ema.state())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0 + 2 ** -7)
    bf16_average = torch.ones(3, dtype=torch.bfloat16)
    for _ in range(100):
        ema.update()
        bf16_average.lerp_(torch.full_like(bf16_average, 1.0 + 2 ** -7), 1 - 0.999)
    assert torch.equal(bf16_average, torch.ones(3, dtype=torch.bfloat16)), "the bf16 average did not stall"
    expected = 1 + 2 ** -7 * (1 - 0.999 ** 100)
    for average in ema.state():
        torch.testing.assert_close(average, torch.full_like(average, expected), rtol=1e-6, atol=0)

    # swapped in, the model holds the averages (rounded to its bf16); its own weights after
    before = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_in():
        assert all(torch.equal(p, a.to(torch.bfloat16)) for p, a in zip(model.parameters(), ema.state()))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))

    # checkpoint round trip, and a clear error for another sharding
    other = WeightEMA(model, decay=0.999)
    other.load([a.clone() for a in ema.state()])
    assert all(torch.equal(a, b) for a, b in zip(other.state(), ema.state()))
    with pytest.raises(ValueError, match="another sharding"):
        other.load([a[:1] for a in ema.state()])


def scalar_tags(run_dir) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["ddp", "zero", "fsdp2", "deepspeed"])
def test_ema_with_channels_last_runs_on_every_engine_and_reports_val_ema(engine, tmp_path):
    """The ImageNet default channels_last with an fp32 EMA: fully_shard used to refuse the
    NHWC conv weights ("FSDP does not support non-contiguous parameters"), and the EMA is
    kept on each rank's own part of the weights (FSDP2: DTensor local shards; here with the
    bf16 policy, whose shards stay fp32). DeepSpeed takes contiguous weights only (below),
    and still gets channels_last images."""
    out = tmp_path / engine
    layout = "model.channels_last=" + ("false" if engine == "deepspeed" else "true")
    precision = "train.precision=" + ("bf16" if engine == "fsdp2" else "fp32")
    assert launch(["run", DEMO, "--nproc", "2", f"out={out}", f"engine={engine}", layout, precision,
                   "train.ema_decay=0.9", "max_steps=4", "train.progress=false", "train.log_every=2"]) == 0
    tags = scalar_tags(out)
    for metric in ("top1", "nll"):
        assert len(tags[f"val/{metric}"]) == 1 and len(tags[f"val_ema/{metric}"]) == 1, sorted(tags)
    assert 0 <= tags["val_ema/top1"][0] <= 1 and np.isfinite(tags["val_ema/nll"][0])
    # 4 steps at decay 0.9 leave the average 0.9^4 = 66% of the initial weights: another model
    assert tags["val_ema/nll"][0] != tags["val/nll"][0]


def test_deepspeed_with_channels_last_weights_is_refused_in_the_launcher(tmp_path, capsys):
    """deepspeed.initialize broadcasts each parameter viewed as bytes, which NHWC conv
    weights cannot be ("self.stride(-1) must be 1 to view Float as Byte" in every rank)."""
    assert launch(["run", DEMO, "--nproc", "2", f"out={tmp_path / 'x'}", "engine=deepspeed",
                   "model.channels_last=true"]) == 2
    err = capsys.readouterr().err
    assert "engine.name=deepspeed needs model.channels_last=false" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="needs model.channels_last=false"):
        load_recipe("recipes/imagenet/resnet50_vsgd.yaml", ["engine=deepspeed"], world_size=8)
    load_recipe("recipes/imagenet/resnet50_vsgd.yaml", ["engine=deepspeed", "model.channels_last=false"], world_size=8)


# ------------------------------------------------------------------------- FSDP2 bf16
def fsdp2_steps(rank: int, world: int, precision: str) -> dict:
    """5 steps of the tiny ResNet (channels_last, like the ImageNet recipes) through the
    FSDP2 engine with bf16 autocast, on a fixed batch; what the forward and the step saw."""
    import dataclasses

    from vsgd_dist.train.engine_setup import engine_for
    from vsgd_dist.models import build_model

    cfg = RunConfig()
    cfg.engine.name, cfg.optim.name, cfg.optim.lr = "fsdp2", "vsgd", 0.01
    cfg.train = dataclasses.replace(cfg.train, precision=precision)
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 10).to(memory_format=torch.channels_last)
    engine = engine_for(model, cfg, cfg.optim.lr)
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = (module.weight.dtype, args[0].dtype)
        return hook

    conv = engine.model.stages[0].conv1
    conv.register_forward_pre_hook(record("conv"))
    engine.model.stages[0].bn1.register_forward_pre_hook(record("bn"))
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 32, 32, generator=gen).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (16,), generator=gen)
    mine = slice(rank * 8, rank * 8 + 8)
    losses = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(engine.wrapped(images[mine]), labels[mine])
        engine.backward(loss)
        grad_dtypes = {p.grad.dtype for p in engine.model.parameters()}
        engine.step()
        losses.append(torch.tensor([loss.item()]))
    total = torch.cat(losses)
    torch.distributed.all_reduce(total)
    state = [v for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    return {"seen": seen, "losses": (total / world).tolist(), "grad_dtypes": grad_dtypes,
            "param_dtypes": {p.dtype for p in engine.model.parameters()},
            "sharded": all(hasattr(p, "to_local") for p in engine.model.parameters()),
            "state_dtypes": {v.dtype for v in state}}


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_fsdp2_bf16_policy_gathers_bf16_weights_keeps_fp32_shards_and_trains_like_fp32():
    """Expectations of MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32):
    - in the forward, conv weights are bf16 (all-gathered in bf16) and so are their inputs;
      BatchNorm keeps fp32 weights (its own fp32 unit: its running stats are fp32);
    - gradients land fp32 in the fp32 DTensor shards, and the optimizer state is fp32;
    - the loss falls on a fixed batch, exactly as with the fp32 policy under the same bf16
      autocast: autocast rounds the conv/linear weights to the same bf16 values the bf16
      all-gather moves, BatchNorm is fp32 in both, and both gradients are bf16 values made
      fp32 (autocast's cast backward, or the policy's reduce_dtype) before the fp32 sum.
      So the bf16 policy halves the all-gather bytes and changes no number on CPU (on GPU,
      kernel choices may differ: tests/gpu compares there with a tolerance)."""
    bf16 = run_distributed(fsdp2_steps, 2, "bf16", timeout=500)
    fp32 = run_distributed(fsdp2_steps, 2, "fp32", timeout=500)
    for result in bf16:
        assert result["seen"]["conv"] == (torch.bfloat16, torch.bfloat16)
        assert result["seen"]["bn"][0] == torch.float32
        assert result["sharded"] and result["param_dtypes"] == {torch.float32}
        assert result["grad_dtypes"] == {torch.float32} and result["state_dtypes"] == {torch.float32}
    assert fp32[0]["seen"]["conv"][0] == torch.float32
    losses, reference = bf16[0]["losses"], fp32[0]["losses"]
    assert losses[-1] < 0.5 * losses[0]
    assert losses == reference


# ------------------------------------------------------------------------- kernel options
@pytest.fixture
def restore_kernel_options():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.fp32_precision,
     torch.backends.cudnn.conv.fp32_precision) = saved[:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def test_fast_kernels_is_on_by_default_and_one_recipe_key_turns_it_off(restore_kernel_options):
    assert RunConfig().train.fast_kernels is True
    assert load_recipe(DEMO, ["fast_kernels=false"]).train.fast_kernels is False
    distributed.set_kernel_options(True)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" == torch.backends.cudnn.conv.fp32_precision
    distributed.set_kernel_options(False)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.backends.cuda.matmul.fp32_precision == "ieee" == torch.backends.cudnn.conv.fp32_precision
    assert torch.are_deterministic_algorithms_enabled()


def test_cpu_runs_leave_cuda_options_and_torch_threads_alone(restore_kernel_options, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    threads = torch.get_num_threads()
    torch.backends.cudnn.benchmark = False
    assert distributed.configure_device(torch.device("cpu"), True, num_workers=8) == 3
    assert not torch.backends.cudnn.benchmark and torch.get_num_threads() == threads


# ------------------------------------------------------------------------- thread budget
def test_cpus_per_rank_come_from_the_profile_under_slurm_else_the_affinity_shared_by_local_ranks(monkeypatch):
    for name in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("WORLD_SIZE", "4")  # launch run: every rank on this node
    assert distributed.cpus_per_rank() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun
    assert distributed.cpus_per_rank() == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")  # --cpus-per-task from the profile
    assert distributed.cpus_per_rank() == 12


def test_thread_budget_splits_a_ranks_cores_between_the_loader_and_torch(monkeypatch):
    """The example GPU profile gives each task 12 CPUs and the ImageNet recipes ask for 12
    decoding threads: on CUDA the loader gets them all and torch 1 (its CPU work is small);
    fewer decoding threads leave torch the rest; never more threads than cores."""
    import yaml

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    profile = yaml.safe_load(open("slurm/clusters/example-a100.yaml"))
    workers = load_recipe("recipes/imagenet/resnet50_vsgd.yaml", world_size=8).data.num_workers
    cuda = torch.device("cuda", 0)
    assert distributed.thread_budget(cuda, workers, cores=profile["cpus_per_task"]) == (12, 1)
    assert distributed.thread_budget(cuda, 8, cores=12) == (8, 4)
    assert distributed.thread_budget(cuda, 16, cores=12) == (12, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert distributed.thread_budget(cuda, 8, cores=12) == (8, 2)
    assert distributed.thread_budget(torch.device("cpu"), 8, cores=2) == (2, torch.get_num_threads())


# ------------------------------------------------------------------------- ViT resolutions
@pytest.mark.parametrize("model", ["vit_s16", "vit_b16"])
@pytest.mark.parametrize("key", ["data.start_res=160", "data.val_res=256"])
def test_vit_recipes_refuse_resolutions_other_than_their_position_embeddings(model, key):
    """torchvision's VisionTransformer asserts on any other input size at the first step;
    the recipe check refuses it in the launcher instead, naming the keys."""
    recipe = f"recipes/imagenet/{model}_vsgd.yaml"
    assert load_recipe(recipe, world_size=8).data.end_res == 224
    with pytest.raises(ConfigError, match=rf"model {model} takes 224 px images only.*set both to data.end_res"):
        load_recipe(recipe, [key], world_size=8)


def test_resnets_keep_progressive_resizing():
    cfg = load_recipe("recipes/imagenet/resnet50_vsgd.yaml", world_size=8)
    assert (cfg.data.start_res, cfg.data.end_res, cfg.data.val_res) == (160, 192, 256)


# ------------------------------------------------------------------------- uint8 images
def all_byte_values_image() -> np.ndarray:
    """One 16x16 image whose every channel holds each byte value once (in its own order)."""
    rng = np.random.default_rng(0)
    return np.stack([rng.permutation(256) for _ in range(3)], -1).astype(np.uint8).reshape(1, 16, 16, 3)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_device_normalization_equals_ffcvs_cpu_normalization_exactly(dtype):
    """Tolerance 0, for every byte value of every channel: normalize_images looks up the
    table ffcv's NormalizeImage computes (float64, then rounded once to fp16/fp32; bf16
    through fp32 like the CPU pipeline's Convert). Computing (x - mean) / std in fp32
    instead would differ by up to 2.4e-7 on about half of the fp32 values."""
    from ffcv.transforms import NormalizeImage

    from vsgd_dist.data.normalize import IMAGENET_MEAN, IMAGENET_STD, TORCH_DTYPES, normalization_table, \
        normalize_images

    image = all_byte_values_image()
    op = NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float16 if dtype == "fp16" else np.float32)
    out = np.zeros(image.shape, dtype=op.dtype)
    op.generate_code_cpu()(image, out, np.arange(1))  # the CPU pipeline's code, run as Python
    expected = torch.from_numpy(out)
    expected = (expected.view(torch.float16) if dtype == "fp16" else expected).permute(0, 3, 1, 2)
    expected = expected.to(TORCH_DTYPES[dtype])  # bf16: the CPU pipeline's Convert(bfloat16)
    got = normalize_images(torch.from_numpy(image).permute(0, 3, 1, 2), normalization_table(TORCH_DTYPES[dtype]))
    assert got.dtype == expected.dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_the_cuda_pipeline_run_on_cpu_gives_the_cpu_pipelines_batches(dtype, monkeypatch):
    """The CUDA pipeline (uint8 ToTensor, ToDevice, ToTorchImage, normalize_on_device) run
    through ffcv on the CPU gives the same batches, bit for bit, as the CPU pipeline
    (NormalizeImage in the decoding threads)."""
    from vsgd_dist.data import DataConfig, build_val_loader, loaders

    cfg = DataConfig(num_workers=1, dtype=dtype, start_res=32, end_res=32, res_step=8, val_res=32,
                     val_crop_ratio=1.0)
    cpu = list(build_val_loader(cfg, "cpu", batch_size=100))
    monkeypatch.setattr(loaders, "normalizes_on_device", lambda device: True)
    on_device = list(build_val_loader(cfg, "cpu", batch_size=100))
    assert len(cpu) == len(on_device) > 1
    for (images, labels), (dev_images, dev_labels) in zip(cpu, on_device):
        assert dev_images.dtype == images.dtype and dev_images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(dev_images, images) and torch.equal(dev_labels, labels)

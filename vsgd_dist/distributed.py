"""The process group and the device of a rank, and collectives on host values.

Every way a rank starts (local processes from `launch run`, `--from-env` under srun, submitit
on SLURM) joins its group through `init_process_group_from_env`, so there is one backend
rule: on CUDA the group is "cuda:nccl,cpu:gloo" (NCCL for device tensors, gloo for the few
host values such as a stop flag or a byte count), on CPU plain gloo. Host values are reduced
through `reduce_host_values`, which never hands NCCL a CPU tensor. `node_mesh` lays the ranks
out as nodes x ranks per node, for engines that shard within each node.
"""
from __future__ import annotations

import os
import re
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DEFAULT_TIMEOUT_S = 600.0
"""Process-group timeout: how long a collective waits for a missing rank before failing."""


class DeviceError(RuntimeError):
    """This rank cannot get the GPU its local rank asks for."""


class NodeLayoutError(RuntimeError):
    """The ranks cannot be split into nodes of equal size (engine.shard_within=node)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device() -> torch.device:
    """cuda:LOCAL_RANK among the visible GPUs, or the only visible GPU when the scheduler
    binds one GPU per task (SLURM --gpus-per-task=1); the CPU when there is no GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if visible == 1:
        index = 0
    elif local_rank < visible:
        index = local_rank
    else:
        raise DeviceError(f"local rank {local_rank} has no GPU: {visible} are visible to this task; "
                          f"start at most {visible} ranks per node or make each task see its own GPU")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def set_kernel_options(fast: bool) -> None:
    """CUDA kernel choices for training (train.fast_kernels). fast: cudnn.benchmark (each
    convolution shape autotuned on its first call) and TF32 for fp32 matmuls and
    convolutions. Not fast: no autotuning, IEEE fp32, and deterministic algorithms, so a run
    repeats and resumes bit for bit on the same GPU and software. Sets process-wide flags;
    call it once, before the first CUDA kernel, and only on CUDA runs."""
    torch.backends.cudnn.benchmark = fast
    torch.backends.cudnn.deterministic = not fast
    precision = "tf32" if fast else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9; never mix with the old flags
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast
    if not fast:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
        torch.use_deterministic_algorithms(True, warn_only=True)


def cpus_per_rank() -> int:
    """Cores this rank may use: SLURM's cpus per task (the cluster profile's `cpus_per_task`,
    which the job requests as --cpus-per-task), else this process's CPU affinity shared by
    the ranks of this node (LOCAL_WORLD_SIZE, SLURM's tasks per node, or, for `launch run`
    and lone processes, which run on one node, the world size)."""
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    local = (os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")
             or (os.environ.get("WORLD_SIZE", "1") if "SLURM_JOB_ID" not in os.environ else "1"))
    return max(1, len(os.sched_getaffinity(0)) // max(1, int(local.split("(")[0])))


def thread_budget(device: torch.device, num_workers: int, cores: int | None = None) -> tuple[int, int]:
    """(data loader threads, torch intra-op threads) for this rank out of its `cores`
    (`cpus_per_rank()`): the loader gets data.num_workers, at most all of them (decoding is
    a pure function of the sample, so the thread count never changes the data). On CUDA
    torch gets the cores the loader leaves (at least 1, at most OMP_NUM_THREADS when set),
    so decoding and torch's CPU threads do not fight; on the CPU, where the ranks compute on
    their cores, torch keeps OMP_NUM_THREADS (default 1, `init_process_group_from_env`)."""
    cores = cores or cpus_per_rank()
    workers = max(1, min(num_workers, cores))
    if device.type != "cuda":
        return workers, torch.get_num_threads()
    threads = max(1, cores - workers)
    if os.environ.get("OMP_NUM_THREADS"):
        threads = min(threads, int(os.environ["OMP_NUM_THREADS"]))
    return workers, threads


def configure_device(device: torch.device, fast_kernels: bool, num_workers: int) -> int:
    """This rank's setup-time settings: CUDA kernel options (`set_kernel_options`) and the
    CPU thread budget (`thread_budget`; torch's share is applied here). Returns the data
    loader's thread count."""
    if device.type == "cuda":
        set_kernel_options(fast_kernels)
    workers, threads = thread_budget(device, num_workers)
    torch.set_num_threads(threads)
    return workers


def backend_for(device: torch.device) -> str:
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def init_process_group_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the group RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT describe (a lone process
    without them gets a world of one). Returns whether this call created the group."""
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))
    dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s))
    return True


def close_process_group() -> None:
    """Leave the group; the barrier first, or 3+ rank gloo runs sometimes abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def reduce_host_values(values: list[float], op: str = "sum") -> list[float]:
    """All-reduce a few host numbers (flags, counts, byte sizes) over the default group and
    return them as Python floats. They travel as a CPU float64 tensor: gloo takes it, and a
    "cuda:nccl,cpu:gloo" group routes it to its gloo side, never to NCCL."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.tolist()


def rank_and_world() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_host_values(value: float) -> list[float]:
    """One host number from every rank, in rank order (the CPU side of the group, as above)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(value)]
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor([float(value)], dtype=torch.float64))
    return [t.item() for t in gathered]


def all_reduce(tensor: torch.Tensor, op: str = "sum", process_group=None) -> torch.Tensor:
    """Sum (or max) a tensor over the ranks in place and return it. It must live on the
    run's device (NCCL reduces CUDA tensors only); reading it back is the caller's sync."""
    if dist.is_initialized() and dist.get_world_size(process_group) > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=process_group)
    return tensor


def gather_host_objects(obj, process_group=None) -> list:
    """A small picklable object from every rank, in rank order. torch sends it through the
    group's CPU side when it has one (gloo, or "cuda:nccl,cpu:gloo")."""
    if not dist.is_initialized() or dist.get_world_size(process_group) == 1:
        return [obj]
    gathered: list = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(gathered, obj, group=process_group)
    return gathered


def ranks_per_node(world_size: int) -> int:
    """Ranks on each node of this run: LOCAL_WORLD_SIZE (set by `launch run`, submitit and
    torchrun), else SLURM's tasks per node (srun, e.g. the sbatch template: "2(x4)"), else
    all of them (one node). NodeLayoutError when nodes run different numbers of ranks or
    the count does not divide the world size."""
    if os.environ.get("LOCAL_WORLD_SIZE"):
        counts = {int(os.environ["LOCAL_WORLD_SIZE"])}
        source = f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']}"
    elif os.environ.get("SLURM_TASKS_PER_NODE"):
        source = f"SLURM_TASKS_PER_NODE={os.environ['SLURM_TASKS_PER_NODE']}"
        counts = {int(m[1]) for m in re.finditer(r"(\d+)(\(x\d+\))?", os.environ["SLURM_TASKS_PER_NODE"])}
    else:
        return world_size
    if len(counts) > 1:
        raise NodeLayoutError(f"engine.shard_within=node needs the same number of ranks on every node, but {source}; "
                              "start as many tasks on each node or use engine.shard_within=world")
    (count,) = counts
    if count < 1 or world_size % count:
        raise NodeLayoutError(f"{source} does not divide the world size {world_size} into nodes of equal size; "
                              "start as many tasks on each node or use engine.shard_within=world")
    return count


def node_mesh(device_type: str) -> DeviceMesh | None:
    """The ranks as a 2-D (replicate, shard) DeviceMesh of nodes x ranks per node
    (`ranks_per_node`): a "shard" group per node and a "replicate" group per local rank,
    across nodes. None on one node, where sharding within the node is sharding over the
    world. Call it once per engine (it creates the process groups). Every rank checks that
    the ranks are numbered node by node (LOCAL_RANK = RANK mod ranks per node, one hostname
    per node) and raises NodeLayoutError otherwise."""
    world = dist.get_world_size()
    per_node = ranks_per_node(world)
    if per_node == world:
        return None
    where = gather_host_objects((socket.gethostname(), os.environ.get("LOCAL_RANK")))
    for rank, (host, local_rank) in enumerate(where):
        first_host = where[rank - rank % per_node][0]
        if local_rank != str(rank % per_node) or host != first_host:
            raise NodeLayoutError(f"rank {rank} runs on {host} as local rank {local_rank}, but {per_node} ranks per "
                                  f"node numbered node by node put it on {first_host} as local rank "
                                  f"{rank % per_node}; engine.shard_within=node needs block rank placement "
                                  "(SLURM's default --distribution=block) or engine.shard_within=world")
    return init_device_mesh(device_type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2's sharded parameters and state), or the tensor
    itself. An attribute test, not isinstance: the optimizers call it per tensor per step."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor

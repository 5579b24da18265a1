"""Private torch names the project relies on.

- `torch.distributed.tensor._utils.compute_local_shape_and_global_offset` is the one place
  torch computes where a DTensor's local shard starts in the global tensor; IVON keys its noise
  by global element index and needs that start for FSDP2's dim-0 shards.
- `torch._subclasses.fake_tensor.FakeTensorMode` and `torch.distributed._tools.mem_tracker`
  measure the memory of a forward/backward without allocating it (the memory plan's
  activation peak at a GPU's real batch, on a CPU).
- torch.distributed.checkpoint (DCP) readers and planners that never unpickle untrusted data:
  `FileSystemReader.read_metadata` reads `.metadata` with plain `pickle.load`, and
  `DefaultLoadPlanner.load_bytes` non-tensor values with `torch.load(weights_only=False)`.
  `SafeReader` unpickles the metadata with `MetadataUnpickler` (DCP's metadata dataclasses and
  the torch types they hold, nothing else) and checks each file (`verify`) before it is read;
  `SafeLoadPlanner` loads values with weights_only=True. `OSErrorWriter` raises the OSError
  behind a failed write (torch.save's zip writer reports a full disk as RuntimeError "enforce
  fail", and DCP sends each rank's failure to every rank pickled, without its context). Both
  planners also resolve the objects
  of DCP's checkpointable protocol (`vsgd_dist.train.dcp_state.OwnedChunks`), which
  `find_state_dict_object` looks up only as tensors in 2.13.

Written for torch 2.13.0. Each can go when torch makes it public (DTensor has no public
accessor for the offset in 2.13; the memory tracker lives under `_tools`; the DCP classes when
DCP's reader and planner load with weights_only and resolve non-tensor checkpointables); tests/test_compat.py
fails when the pin changes, and the tests of their users (DTensor shards against plain tensors
in tests/test_ivon.py, the activation estimate against a measured CPU peak in
tests/test_memory_plan.py) fail if torch's answers change.
"""
from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

WRITTEN_FOR = {"torch": "2.13.0"}


def dtensor_global_offset(param: torch.Tensor) -> tuple[int, ...]:
    """Where this rank's local shard of DTensor `param` starts, per dimension of the global tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(offset)


def fake_activation_peak(model: torch.nn.Module, forward_backward: Callable[[torch.nn.Module], None]) -> int:
    """Bytes of activations and temporaries alive at the peak of `forward_backward(model)`, run on
    fake tensors: `model` (built on the meta device) and every tensor made inside become fake CPU
    tensors, so nothing is allocated whatever the batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            forward_backward(model)
        peak = tracker.get_tracker_snapshot("peak")
    by_kind = next(iter(peak.values()))
    return int(by_kind[_MemRefType.ACT] + by_kind[_MemRefType.TEMP])


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
"""What a DCP `.metadata` file pickles (torch 2.13), besides torch dtypes."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and refuses every other class or function (pickle.UnpicklingError)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _checkpointable_shard(state_dict: dict, index: MetadataIndex, fallback: Callable) -> Any:
    obj = state_dict[index.fqn]
    if hasattr(obj, "__get_tensor_shard__") and not torch.is_tensor(obj):
        return obj.__get_tensor_shard__(index)
    return fallback(index)


class SafeReader(FileSystemReader):
    """A FileSystemReader that calls `verify(file name)` before reading a file of the
    checkpoint and unpickles `.metadata` with `MetadataUnpickler`."""

    def __init__(self, path: str | Path, verify: Callable[[str], None]):
        super().__init__(path)
        self.verify = verify

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        self.verify(path.name)
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        """File by file, each verified first; a file that fails to load raises UnreadableFile."""
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in sorted(by_file.items()):
            self.verify(name)
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except Exception as e:  # noqa: BLE001 - whatever the file trips on, it is named
                raise UnreadableFile(Path(self.path) / name, e) from e
        return super().read_data(dataclasses.replace(plan, items=[]), planner)


class UnreadableFile(Exception):
    """A checkpoint file whose data failed to load (`cause`: why)."""

    def __init__(self, file: Path, cause: Exception):
        super().__init__(file, cause)  # as args: DCP sends a rank's failure to the others pickled
        self.file, self.cause = file, cause

    def __str__(self) -> str:
        return f"{self.file}: {type(self.cause).__name__}: {self.cause}"


class OSErrorWriter(FileSystemWriter):
    """A FileSystemWriter whose failed write raises the OSError behind it (disk full, file
    size limit, quota), so that every rank can name it."""

    def write_data(self, plan, planner):
        try:
            return super().write_data(plan, planner)
        except RuntimeError as e:
            cause = e.__context__ or e.__cause__
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror) from None
            raise


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner on a flat state dict: non-tensor values load with weights_only=True;
    checkpointable objects are kept (2.13's planner drops them) and resolved through their
    protocol."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        # DefaultLoadPlanner's `_init_state_dict` replaces values of unknown types by None
        kept = {k: v for k, v in state_dict.items() if hasattr(v, "__get_tensor_shard__") and not torch.is_tensor(v)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        self.state_dict.update(kept)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return _checkpointable_shard(self.state_dict, index, super().lookup_tensor)


class CheckpointableSavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner on a flat state dict that resolves checkpointable objects through
    their protocol."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Any:
        return _checkpointable_shard(self.state_dict, index, super().lookup_object)

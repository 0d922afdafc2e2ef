"""Safetensors checkpoints written and read one tensor at a time, sharded above a size, as on the hub.

:class:`ShardedWriter` takes tensors as they come and writes them to ``model.safetensors`` (one shard) or
``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json`` (several), the names and index
format transformers and the hub use. It holds at most one shard's tensors, so saving a model costs the
model plus one shard, never a second copy of the model.

:func:`iter_checkpoint_tensors` reads a checkpoint back one tensor at a time. It parses the safetensors header
and reads each tensor into its own buffer with ``readinto`` instead of memory-mapping the file: a mapped
file's pages count towards the process's resident memory for as long as the map is open, so reading a
whole checkpoint through one ``safe_open`` map would make the reader as large as the file.

torch is imported inside the functions so importing ``paligemma`` stays light.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_BYTES = 2 * 2**30
"""Shard size above which a checkpoint is split (the hub's PaliGemma checkpoints use shards of about 5 GB;
transformers' ``save_pretrained`` default is 5 GB too; 2 GiB keeps one shard small next to the model)."""

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PARTIAL_SUFFIX = ".safetensors.partial"
_READ_CHUNK = 256 * 2**20

# safetensors dtype names <-> torch dtype attribute names.
_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in _DTYPES:
        raise ValueError(f"unsupported safetensors dtype {name!r}")
    dtype = getattr(torch, _DTYPES[name])
    assert isinstance(dtype, torch.dtype)
    return dtype


def _safetensors_dtype(dtype: torch.dtype) -> str:
    wanted = str(dtype).removeprefix("torch.")
    for name, attr in _DTYPES.items():
        if attr == wanted:
            return name
    raise ValueError(f"cannot write {dtype} to safetensors")


def _raw_bytes(tensor: torch.Tensor) -> Any:
    """The tensor's bytes as a buffer, without copying a contiguous CPU tensor."""
    import torch

    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy()


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """One safetensors file: 8-byte header length, JSON header padded to 8 bytes, then the data in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _safetensors_dtype(tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for _, tensor in tensors:
            fh.write(_raw_bytes(tensor))


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (tensor entries and ``__metadata__``)."""
    return _read_header(path)[1]


def _read_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """``(offset of the data, header)``."""
    with Path(path).open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors header")
    return 8 + length, header


class ShardedWriter:
    """Writes tensors to safetensors shards as they come; holds at most one shard in memory.

    Shards are written under temporary names and renamed by :meth:`close`, which first removes any earlier
    ``model*.safetensors`` and index in ``out_dir`` (so re-saving sharded over single, or back, leaves no
    stale files). Used as a context manager it closes on success and deletes its partial shards on an
    exception, leaving what ``out_dir`` held before untouched.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, not {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: list[tuple[str, torch.Tensor]] = []
        self._buffered = 0
        self._partials: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_size = 0
        self.total_parameters = 0
        self._closed = False
        self._files: list[Path] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; writes the buffered shard first if this one would overflow it.

        A tensor larger than ``max_shard_bytes`` gets a shard of its own. The writer keeps a reference to
        the tensor until its shard is written, so don't modify it in place before then."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        self._names.add(name)
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered + size > self.max_shard_bytes:
            self._flush()
        self._buffer.append((name, tensor))
        self._buffered += size
        self.total_size += size
        self.total_parameters += tensor.numel()

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._partials) + 1:05d}{_PARTIAL_SUFFIX}"
        self._partials.append((path, [name for name, _ in self._buffer]))
        _write_safetensors(path, self._buffer)
        self._buffer = []
        self._buffered = 0

    def close(self) -> list[Path]:
        """Write the last shard, put the files in place and return them (shards, then the index if any)."""
        if self._closed:
            return list(self._files)
        if self._buffer or not self._partials:
            self._flush()
        self._closed = True
        remove_weights(self.out_dir)
        count = len(self._partials)
        if count == 1:
            target = self.out_dir / SINGLE_FILE
            self._partials[0][0].replace(target)
            self._files = [target]
            return list(self._files)
        weight_map: dict[str, str] = {}
        for i, (partial, names) in enumerate(self._partials, start=1):
            target = self.out_dir / f"model-{i:05d}-of-{count:05d}.safetensors"
            partial.replace(target)
            self._files.append(target)
            weight_map |= dict.fromkeys(names, target.name)
        index = {
            "metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
            "weight_map": weight_map,
        }
        index_path = self.out_dir / INDEX_FILE
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        self._files.append(index_path)
        return list(self._files)

    def abort(self) -> None:
        """Drop the buffer and delete the shards written so far."""
        self._closed = True
        self._buffer = []
        for partial, _ in self._partials:
            partial.unlink(missing_ok=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def remove_weights(directory: str | Path) -> None:
    """Delete ``model*.safetensors`` and ``model.safetensors.index.json`` in ``directory``."""
    directory = Path(directory)
    for path in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        path.unlink(missing_ok=True)


def has_weights(directory: str | Path) -> bool:
    """``directory`` holds ``model.safetensors`` or ``model.safetensors.index.json``."""
    directory = Path(directory)
    return (directory / SINGLE_FILE).is_file() or (directory / INDEX_FILE).is_file()


def checkpoint_files(directory: str | Path) -> list[Path]:
    """``model.safetensors``, or the shards ``model.safetensors.index.json`` names, in order.

    The index wins when both are there (as in transformers)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


def checkpoint_names(directory: str | Path) -> list[str]:
    """Every tensor name in the checkpoint, read from the headers only."""
    return [name for path in checkpoint_files(directory) for name in read_header(path) if name != "__metadata__"]


def iter_checkpoint_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of the checkpoint, read one at a time, in file order."""
    for path in checkpoint_files(directory):
        yield from iter_file_tensors(path)


def iter_file_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of one safetensors file, each read into its own CPU tensor."""
    import torch

    start, header = _read_header(path)
    entries = sorted(
        ((name, entry) for name, entry in header.items() if name != "__metadata__"),
        key=lambda item: int(item[1]["data_offsets"][0]),
    )
    with Path(path).open("rb") as fh:
        for name, entry in entries:
            begin, end = (int(x) for x in entry["data_offsets"])
            tensor = torch.empty(tuple(entry["shape"]), dtype=_torch_dtype(entry["dtype"]))
            if end > begin:
                if tensor.numel() * tensor.element_size() != end - begin:
                    raise ValueError(f"{path}: {name} has {end - begin} bytes for shape {entry['shape']}")
                fh.seek(start + begin)
                view = memoryview(cast(Any, tensor.reshape(-1).view(torch.uint8).numpy()))
                done = 0
                while done < len(view):  # in chunks: one read() stops at 2 GiB on Linux
                    got = fh.readinto(view[done : done + _READ_CHUNK])
                    if not got:
                        raise ValueError(f"{path}: {name} is truncated")
                    done += got
            yield name, tensor
            del tensor  # the caller may drop it before the next one is read

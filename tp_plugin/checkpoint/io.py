"""Files on disk: safetensors headers (checked for truncation), a streaming safetensors writer, atomic dirs.

The writer exists because `safetensors.torch.save_file` needs every tensor of a file in memory at once, and a
consolidated checkpoint file is often the whole model: written here tensor by tensor, a rank never holds more
than one full tensor. It writes the documented format (8-byte little-endian header length, JSON header with
dtype / shape / data_offsets per tensor, then the raw bytes in offset order); files are read back with
`safetensors.safe_open` in the tests, and by plain `transformers`.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES  # the library's own name -> dtype table

from ..sharding import TPSplitError

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class CheckpointError(TPSplitError):
    """A checkpoint does not match the model, is damaged, or cannot be written."""


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensor table of a safetensors file, after checking that the file holds every byte it promises."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes, too short for its "
                                  f"header). Copy or save the checkpoint again.")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header ({exc}). Copy or save it again.") from None
    header.pop("__metadata__", None)
    expected = 8 + n + max((t["data_offsets"][1] for t in header.values()), default=0)
    if size < expected:
        raise CheckpointError(f"{path}: truncated safetensors file: {size} bytes on disk, its header describes "
                              f"{expected} bytes ({len(header)} tensors). The file was cut short (an interrupted "
                              f"copy, download or save); copy or save the checkpoint again.")
    return header


def header_dtype(entry: dict) -> torch.dtype:
    return SAFETENSORS_DTYPES[entry["dtype"]]


class StreamingWriter:
    """One safetensors file written tensor by tensor, in the order given up front (shapes known in advance)."""

    def __init__(self, path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header, offset = {}, 0
        for name, dtype, shape in tensors:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = metadata or {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data must start 8-byte aligned
        self._pending = [(name, dtype, tuple(shape)) for name, dtype, shape in tensors]
        self.path = path
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self._pending.pop(0)
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != want:
            raise CheckpointError(f"{self.path}: writing {got}, but the header promised {want} next")
        # .cpu(): the gathered tensors are on the model's device (CUDA after GPU training); a no-op on CPU
        self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        if self._pending:
            raise CheckpointError(f"{self.path}: closed with {len(self._pending)} tensors not written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def make_temp_dir(target: Path) -> Path:
    """A fresh directory next to `target` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def commit_dir(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` in place of `target`; the old checkpoint stays whole until the swap."""
    umask = os.umask(0)
    os.umask(umask)
    for file in tmp.iterdir():  # data reaches the disk before the rename makes it visible
        if file.is_file() and not file.is_symlink():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
            file.chmod(0o666 & ~umask)
    fsync_dir(tmp)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary directory
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp)  # `tmp` now holds the previous checkpoint
    else:  # no atomic exchange: the previous checkpoint is briefly under the `.old-` name, never damaged
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
        os.rename(tmp, target)
        shutil.rmtree(old)
    fsync_dir(target.parent)

"""Where a checkpoint's tensors come from, read one rank's slice at a time.

A source answers `shape(name)`, `dtype(name)` and `read(name, spec)`: the rows `spec` describes (its ranges of
the full tensor along `spec.dim`, concatenated, plus `spec.pad` zero rows), or the whole tensor for `spec=None`.
Only those rows are read from disk (`safe_open(...).get_slice`), so a rank's memory is its shards plus one slice.

* `SafetensorsSource`: an ordinary HF checkpoint, one file or several with `model.safetensors.index.json`.
* `ShardedSource`: a per-rank checkpoint written by `save_sharded` at any TP degree; a read stitches the
  requested rows together from the ranks that saved them (resharding is just reading other rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..sharding import ShardSpec
from .io import CheckpointError, header_dtype, read_header

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SHARDED_INDEX = "tp_shards.json"
SHARDED_FORMAT = "tp_plugin.sharded/1"


def rank_file(rank: int, tp_size: int) -> str:
    return f"tp-rank-{rank:05d}-of-{tp_size:05d}.safetensors"


def _rows(handle, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) along `dim`, read without touching the rest of the tensor."""
    index = (slice(None),) * dim + (slice(start, stop),)
    return handle.get_slice(name)[index]


def _pad(pieces: list[torch.Tensor], spec: ShardSpec, like: torch.Tensor) -> torch.Tensor:
    if spec.pad:
        shape = list(like.shape)
        shape[spec.dim] = spec.pad
        pieces.append(like.new_zeros(shape))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=spec.dim)


def _open(path: Path):
    """`pread` reads just the requested bytes into memory the tensor owns: a rank's resident memory is then its
    shards (not also the file pages it touched, as with mmap), and no tensor stays a lazy view of the file.
    safetensors < 0.7 has no `backend` and memory-maps."""
    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:
        return safe_open(str(path), framework="pt", device="cpu")


class _Files:
    """Lazily opened `safe_open` handles, one per file (every header checked for truncation up front)."""

    def __init__(self, paths: list[Path]):
        self.headers = {path: read_header(path) for path in paths}
        self._handles: dict[Path, object] = {}

    def handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _open(path)
        return self._handles[path]

    def close(self) -> None:
        self._handles.clear()


class SafetensorsSource:
    """An ordinary Hugging Face safetensors checkpoint directory."""

    kind = "safetensors"

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / SAFE_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            paths = sorted({directory / f for f in weight_map.values()})
            missing = [p.name for p in paths if not p.is_file()]
            if missing:
                raise CheckpointError(f"{index} names {missing}, which are not in {directory}: the checkpoint "
                                      f"is incomplete; copy the missing files or save it again")
        else:
            paths = [directory / SAFE_WEIGHTS]
        self._files = _Files(paths)
        self.file_of = {name: path for path, header in self._files.headers.items() for name in header}
        if index.is_file():
            listed = [n for n, f in weight_map.items() if self.file_of.get(n) != directory / f]
            if listed:
                raise CheckpointError(f"{index} lists {listed[:3]} in files that do not hold them: the index and "
                                      f"the files disagree; save the checkpoint again")

    def names(self) -> list[str]:
        return list(self.file_of)

    def _entry(self, name: str) -> dict:
        return self._files.headers[self.file_of[name]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return header_dtype(self._entry(name))

    def where(self, name: str) -> str:
        return str(self.file_of.get(name, self.directory))

    def read(self, name: str, spec: ShardSpec | None) -> torch.Tensor:
        handle = self._files.handle(self.file_of[name])
        if spec is None:
            return handle.get_tensor(name)
        pieces = [_rows(handle, name, spec.dim, a, b) for a, b in spec.ranges]
        return _pad(pieces, spec, pieces[0])

    def close(self) -> None:
        self._files.close()


def _spec_from_json(obj) -> ShardSpec | None:
    if obj is None:
        return None
    return ShardSpec(obj["dim"], obj["full_size"], tuple(tuple(r) for r in obj["ranges"]), obj.get("pad", 0))


def spec_to_json(spec: ShardSpec | None):
    if spec is None:
        return None
    return {"dim": spec.dim, "full_size": spec.full_size, "ranges": [list(r) for r in spec.ranges], "pad": spec.pad}


class ShardedSource:
    """A per-rank checkpoint: `tp_shards.json` (TP degree, every tensor's full shape and per-rank specs) and
    one safetensors file per TP rank holding that rank's shards as they were in memory."""

    kind = "sharded"

    def __init__(self, directory: Path):
        self.directory = directory
        meta = json.loads((directory / SHARDED_INDEX).read_text())
        if meta.get("format") != SHARDED_FORMAT:
            raise CheckpointError(f"{directory / SHARDED_INDEX}: format {meta.get('format')!r}, this version of "
                                  f"tp_plugin reads {SHARDED_FORMAT!r}")
        self.tp_size = meta["tp_size"]
        self.paths = [directory / rank_file(r, self.tp_size) for r in range(self.tp_size)]
        missing = [p.name for p in self.paths if not p.is_file()]
        if missing:
            raise CheckpointError(f"{directory}: per-rank checkpoint saved at tp={self.tp_size} lacks {missing}; "
                                  f"copy the missing files or save it again")
        self._files = _Files(self.paths)
        self.tensors = meta["tensors"]
        for name, info in self.tensors.items():  # the json and the files must agree before anything is read
            for rank, path in enumerate(self.paths):
                if name not in self._files.headers[path]:
                    raise CheckpointError(f"{path}: tensor {name} listed in {SHARDED_INDEX} is missing; "
                                          f"the checkpoint is damaged, save it again")
        # Per tensor: the (start, stop, rank, offset in that rank's shard) pieces of the full tensor, by start.
        self._pieces = {name: self._layout([_spec_from_json(s) for s in info["specs"]])
                        for name, info in self.tensors.items()}

    @staticmethod
    def _layout(specs: list[ShardSpec | None]) -> list[tuple[int, int, int, int]] | None:
        if specs[0] is None:
            return None  # replicated: every rank saved the whole tensor; rank 0's copy is read
        pieces = []
        for rank, spec in enumerate(specs):
            offset = 0
            for a, b in spec.ranges:
                pieces.append((a, b, rank, offset))
                offset += b - a
        return sorted(pieces)

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return header_dtype(self._files.headers[self.paths[0]][name])

    def where(self, name: str) -> str:
        return f"{self.directory} (per-rank checkpoint, tp={self.tp_size})"

    def read(self, name: str, spec: ShardSpec | None) -> torch.Tensor:
        pieces_of = self._pieces[name]
        if spec is None:
            dim = 0 if pieces_of is None else _spec_from_json(self.tensors[name]["specs"][0]).dim
            spec = ShardSpec(dim, self.shape(name)[dim], ((0, self.shape(name)[dim]),))
        if pieces_of is None:  # saved whole: slice rank 0's copy directly
            handle = self._files.handle(self.paths[0])
            pieces = [_rows(handle, name, spec.dim, a, b) for a, b in spec.ranges]
            return _pad(pieces, spec, pieces[0])
        saved_dim = _spec_from_json(self.tensors[name]["specs"][0]).dim
        if saved_dim != spec.dim:
            raise CheckpointError(f"{self.where(name)}: {name} was saved split along dim {saved_dim}, the model "
                                  f"splits it along dim {spec.dim}; load with the policy it was saved with")
        out = []
        for a, b in spec.ranges:
            pos = a
            while pos < b:  # take each row from the first saved shard that holds it
                hit = next(((s, e, r, o) for s, e, r, o in pieces_of if s <= pos < e), None)
                if hit is None:
                    raise CheckpointError(f"{self.where(name)}: no rank saved rows {pos}.. of {name}; damaged")
                s, e, rank, offset = hit
                stop = min(b, e)
                out.append(_rows(self._files.handle(self.paths[rank]), name, spec.dim,
                                 offset + pos - s, offset + stop - s))
                pos = stop
        return _pad(out, spec, out[0])

    def close(self) -> None:
        self._files.close()

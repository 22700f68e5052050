"""An on-disk cache of tensors in safetensors files, keyed by a hash of what produced them.

Spectra and calibration statistics are expensive and depend only on the weights (and the data), so a
second run with another budget reads them back instead of recomputing. Files are written atomically and
read with safetensors only; a file that fails to read is treated as missing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT_VERSION = "1"


def digest(tensors: Iterable[torch.Tensor], *labels: str) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes, and of ``labels``: a cache key."""
    hasher = hashlib.sha256(FORMAT_VERSION.encode())
    for label in labels:
        hasher.update(b"\0" + label.encode())
    for tensor in tensors:
        data = tensor.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"\0{data.dtype}{tuple(tensor.shape)}".encode())
        hasher.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return hasher.hexdigest()


class DiskCache:
    """Named groups of tensors under ``directory/<kind>/<key>.safetensors``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def _path(self, kind: str, key: str) -> Path:
        return self.directory / kind / f"{key}.safetensors"

    def load(self, kind: str, key: str, names: Iterable[str] | None = None) -> dict[str, torch.Tensor] | None:
        """The stored tensors (only ``names`` when given), or None when absent or unreadable."""
        path = self._path(kind, key)
        try:
            if names is None:
                tensors = load_file(path)
            else:
                with safe_open(path, framework="pt") as handle:
                    tensors = {name: handle.get_tensor(name) for name in names}
        except (FileNotFoundError, SafetensorError, OSError, KeyError):
            return None
        return tensors

    def names(self, kind: str, key: str) -> list[str] | None:
        """The names of the stored tensors, or None when the entry is absent or unreadable."""
        try:
            with safe_open(self._path(kind, key), framework="pt") as handle:
                return list(handle.keys())
        except (FileNotFoundError, SafetensorError, OSError):
            return None

    def reader(self, kind: str, key: str) -> Callable[[str], torch.Tensor]:
        """A function that reads one stored tensor by name each time it is called (nothing is kept)."""
        path = self._path(kind, key)

        def read(name: str) -> torch.Tensor:
            with safe_open(path, framework="pt") as handle:
                return handle.get_tensor(name)
        return read

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` atomically (readers never see half a file)."""
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
        try:
            save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, temporary)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

"""Several processes compressing one model together (``torchrun``): split the work, share the results.

Every process runs the same command on the same model. Layers' bases are computed by one process each and
broadcast; calibration batches and probe batches are split into contiguous shares and the results gathered
in batch order, so every process — and the plan — sees exactly what a single process would. Validation
checks run in every process (they are the task's own code) and rank 0's result is used by all. Gloo on
CPU, NCCL when CUDA is available (tensors are exchanged through the GPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

Item = TypeVar("Item")


def init_from_environment() -> None:
    """Join the process group ``torchrun`` describes in the environment (no-op for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("RANKCUT_BACKEND") != "gloo" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


@dataclass(frozen=True)
class Group:
    """This process's rank among ``world`` processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Group:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[Item]) -> list[Item]:
        """This process's contiguous share of ``items`` (the first shares get one more when uneven)."""
        size, extra = divmod(len(items), self.world)
        start = self.rank * size + min(self.rank, extra)
        return list(items[start:start + size + (1 if self.rank < extra else 0)])

    def owner(self, index: int) -> int:
        """The process that computes item ``index`` of a list all processes share (round-robin)."""
        return index % self.world

    def all_agree(self, flag: bool) -> bool:
        """True only when ``flag`` is true in every process (e.g. every process found the cache entry)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], device=self._device())
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def broadcast_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Rank 0's metrics in every process, so that decisions taken on them are the same everywhere."""
        if self.world == 1:
            return metrics
        tensors = {name: torch.tensor(value, dtype=torch.float64) for name, value in metrics.items()}
        return {name: float(value) for name, value in self.broadcast_tensors(tensors, 0).items()}

    def _device(self) -> torch.device:
        nccl = dist.get_backend() == "nccl"  # NCCL moves CUDA tensors only
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's ``rows`` (same trailing shape), concatenated in rank order."""
        if self.world == 1:
            return rows
        device = self._device()
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world)]
        dist.all_gather(counts, torch.tensor([rows.shape[0]], device=device))
        longest = int(max(count.item() for count in counts))
        padded = torch.zeros(longest, *rows.shape[1:], dtype=rows.dtype, device=device)
        padded[: rows.shape[0]] = rows.to(device)
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded)
        return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts, strict=True)]).to(rows.device)

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None, source: int) -> dict[str, torch.Tensor]:
        """``source``'s named tensors, in every process (others pass None)."""
        if self.world == 1:
            return tensors
        header = [None if tensors is None else [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]]
        dist.broadcast_object_list(header, src=source)  # names, dtypes and shapes only; tensors go as tensors
        device = self._device()
        result = {}
        for name, dtype, shape in header[0]:
            tensor = (tensors[name].contiguous().to(device) if self.rank == source
                      else torch.empty(shape, dtype=dtype, device=device))
            dist.broadcast(tensor, src=source)
            result[name] = tensor.cpu()
        return result

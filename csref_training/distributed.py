"""torchrun / single-process setup and the few collective operations the trainers need.

Launched by torchrun (WORLD_SIZE > 1) every process joins one process group, NCCL on GPUs and
gloo on CPUs; otherwise the run is a single process and every helper here is a no-op.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the torchrun process group if launched by torchrun; else a single process."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def per_rank_batch_size(total: int, world_size: int) -> int:
    if total % world_size:
        raise ValueError(f"batch_size {total} is not divisible by the {world_size} processes; "
                         f"use a multiple of {world_size}")
    return total // world_size


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def mean_over_ranks(value: float, device: torch.device) -> float:
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return sum_over_ranks([value], device)[0] / world_size


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_initialized():
        # gloo's teardown can wait forever on a peer that has already exited: leave together.
        dist.barrier()
        dist.destroy_process_group()

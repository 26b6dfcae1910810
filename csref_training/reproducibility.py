"""Seeds, RNG state and data order: what makes a resumed run identical to an uninterrupted one.

- `derive_seed` turns integers (seed, epoch, rank, step, ...) into a seed, the same in every
  process and Python version;
- `rng_state` / `set_rng_state` save and restore the global RNGs as tensors and plain
  containers (loadable with weights_only=True);
- `ResumableSampler` + `SeededItems`: DistributedSampler's order, able to start mid-epoch,
  with each item's randomness derived from (seed, epoch, rank, position), so a resumed run sees
  exactly the batches an uninterrupted one would.
"""

import hashlib
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain containers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


class ResumableSampler(Sampler):
    """DistributedSampler's order for one epoch, starting at `start`, yielding (index, item_seed).

    item_seed depends only on (seed, epoch, rank, position in the epoch), so random choices
    a dataset makes per item (speaker, sentence) do not depend on which worker loads the
    item or on whether the run was resumed.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.inner)
        for position in range(self.start, len(indices)):
            yield indices[position], derive_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return len(self.inner) - self.start


class SeededItems(Dataset):
    """Wraps a dataset so that item (index, seed) is loaded with random/numpy/torch seeded."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        seed_all(seed)
        return self.dataset[index]


def eval_subset(dataset: Dataset, rank: int, world_size: int) -> Subset:
    """This rank's share of an evaluation set (every world_size-th item, without the padding
    DistributedSampler adds), each item loaded with a fixed seed so its choices are stable."""
    keys = [(i, derive_seed(0, i)) for i in range(rank, len(dataset), world_size)]
    return Subset(SeededItems(dataset), keys)

"""Datasets and loaders over a `Cache`: the classifier's and the CycleGAN's."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from ..pixels import to_tensor
from .cache import Cache
from .images import default_workers


class ClassifierDataset(torch.utils.data.Dataset):
    """(image, label) from a Cache: image float32 (3, S, S) = (pixel/255 - mean) / std per channel,
    label float32 (1.0 = malignant); `items` are image names or cache rows."""

    def __init__(self, cache: Cache, items: Iterable, mean: Sequence[float], std: Sequence[float]):
        self.cache = cache
        self.rows = cache.rows(items)
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if mean_t.shape != (3,) or std_t.shape != (3,) or (std_t <= 0).any():
            raise ValueError(f"mean and std need 3 values each with std > 0, got mean={mean}, std={std}")
        self.scale = (1 / (255 * std_t)).view(3, 1, 1)
        self.shift = (-mean_t / std_t).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[i]
        x = torch.from_numpy(np.array(self.cache.images[row])).permute(2, 0, 1)
        x = x.float().mul_(self.scale).add_(self.shift)
        return x, torch.tensor(float(self.cache.targets[row]))

    @property
    def targets(self) -> np.ndarray:
        return self.cache.targets[self.rows]


class UnpairedDataset(torch.utils.data.Dataset):
    """Unpaired images for CycleGAN: item i is ``{"A": a, "B": b, "a_row": int, "b_row": int}``,
    a and b float32 (3, S, S) in [-1, 1]. A is read in order, B through a permutation seeded by
    (seed, epoch), each B image equally often; ``set_epoch(e)`` pairs them anew."""

    def __init__(self, cache: Cache, rows_a: Iterable, rows_b: Iterable, seed: int = 0):
        self.cache = cache
        self.rows_a, self.rows_b = cache.rows(rows_a), cache.rows(rows_b)
        if len(self.rows_a) == 0 or len(self.rows_b) == 0:
            raise ValueError(f"both domains need images, got |A|={len(self.rows_a)}, |B|={len(self.rows_b)}")
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._perm_b = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows_b))

    def __len__(self) -> int:
        return max(len(self.rows_a), len(self.rows_b))

    def _image(self, row: int) -> torch.Tensor:
        return to_tensor(np.array(self.cache.images[row]), -1, 1)

    def __getitem__(self, i: int) -> dict:
        a = int(self.rows_a[i % len(self.rows_a)])
        b = int(self.rows_b[self._perm_b[i % len(self.rows_b)]])
        return {"A": self._image(a), "B": self._image(b), "a_row": a, "b_row": b}


def default_loader_workers() -> int:
    """DataLoader workers: 0 on 4 cores or fewer, where reading the memmap in the main process is
    faster than feeding workers (bench/bench_data.py); else min(8, cores - 1)."""
    n = default_workers()
    return 0 if n <= 4 else min(8, n - 1)


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                workers: int | None = None, drop_last: bool = False,
                sampler: torch.utils.data.Sampler | None = None,
                pin_memory: bool | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader with a seeded shuffle (without a `sampler` only), `default_loader_workers()` and
    pinned memory when CUDA is available. Workers are not persistent, so `set_epoch` reaches them."""
    workers = default_loader_workers() if workers is None else workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=workers, drop_last=drop_last, generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, persistent_workers=False)

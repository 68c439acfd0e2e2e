"""torchrun / DistributedDataParallel for the trainers. With one process every helper here is the
identity: a single-process run is exactly the program it was before distribution existed.

The trainers' conventions: every rank initialises the models alike; streams that must differ
between ranks (augmentation, noisy labels, image pools, dropout) are seeded with `rank_seed`, which
leaves rank 0's the single-process one; the batch size is per process; each epoch's order is one
permutation seeded by (seed, epoch), of which each rank takes its `shard` (as DistributedSampler
does), so resuming stays exact; only rank 0 logs at INFO level and writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger("melano.dist")

# Collectives wait this long for a late rank: the first run of a stage builds the image cache on
# one process per node while the others wait at a barrier (minutes on the full ISIC set).
TIMEOUT = datetime.timedelta(minutes=60)


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if _active() else 1


def rank() -> int:
    return tdist.get_rank() if _active() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str | None = None) -> torch.device:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL and the GPU of LOCAL_RANK on CUDA,
    else gloo); return this process's device. Ranks other than 0 then log only warnings."""
    dev = pick_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dev
    local = int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        if dev.index is not None and dev.index != local:
            raise ValueError(f"--device {device}: under torchrun each process uses the GPU of its LOCAL_RANK "
                             f"(cuda:{local} here); pass --device cuda or leave --device out")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local}, but this node has {torch.cuda.device_count()} visible GPU(s): "
                             f"start at most that many processes per node (--nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not _active():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT,
                                 device_id=dev if dev.type == "cuda" else None)
    if rank() > 0:
        logging.getLogger("melano").setLevel(logging.WARNING)
    log.info("process group: %d processes (%s), this is rank 0 on %s", world_size(), tdist.get_backend(), dev)
    return dev


def destroy() -> None:
    if _active():
        tdist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


@contextlib.contextmanager
def local_main_first():
    """Run the block on each node's first process, then on its others: for work they can reuse,
    such as building the image cache or drawing the split file."""
    first = not _active() or int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` with several processes (it broadcasts rank 0's weights
    and averages gradients), else `model` itself. Keep the unwrapped model for checkpoints."""
    if world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def rank_seed(seed: int) -> int:
    """This rank's own stream's seed: `seed` on rank 0 (as in one process), mixed with the rank on others."""
    r = rank()
    return seed if r == 0 else int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


def shard(order: Iterable[int], drop_last: bool = False) -> list[int]:
    """This rank's share of a global order, as DistributedSampler splits it: padded by repeating from
    the start (or cut, with `drop_last`) to a multiple of the world size; every world_size-th item."""
    order, n = list(order), world_size()
    if n == 1:
        return order
    if drop_last:
        order = order[:len(order) // n * n]
    else:
        pad = math.ceil(len(order) / n) * n - len(order)
        order += (order * math.ceil(pad / max(1, len(order))))[:pad]
    return order[rank()::n]


def all_gather_object(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; small objects only)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def _reduce(values: Sequence[float], op: str) -> list[float]:  # op: a tdist.ReduceOp name
    if world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=getattr(tdist.ReduceOp, op))
    return t.tolist()


def mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (e.g. per-step losses, for one log of the global batch)."""
    return {k: v / world_size() for k, v in zip(values, _reduce(values.values(), "SUM"))}


def max_int(value: int) -> int:
    """The largest `value` over the ranks: to agree on stopping after the same step."""
    return int(_reduce([value], "MAX")[0])


def gather_shards(index: Sequence[int], n: int, *arrays: np.ndarray) -> list[np.ndarray]:
    """Per-rank results (`arrays`, one row per item of the rank's padded share `index`) as arrays
    over items 0..n-1 in order, on every rank; a padded repeat is kept once."""
    if world_size() == 1:
        if list(index) != list(range(n)):
            raise ValueError("gather_shards in one process expects the items 0..n-1 in order")
        return list(arrays)
    parts = all_gather_object((np.asarray(index), *arrays))
    index_all = np.concatenate([p[0] for p in parts])
    items, first = np.unique(index_all, return_index=True)
    if len(items) != n or items[0] != 0 or items[-1] != n - 1:
        raise RuntimeError(f"the ranks scored {len(items)} distinct items of {n}: the shards do not cover the "
                           f"data set; every rank must use the same sampler over the same data")
    return [np.concatenate([p[i + 1] for p in parts])[first] for i in range(len(arrays))]


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank before evaluating: after the last
    training forward each rank has its own, and every rank must score with the model rank 0 saves."""
    if world_size() > 1:
        for b in model.buffers():
            tdist.broadcast(b, src=0)


def pick_device(device: str | None = None) -> torch.device:
    """The device named by --device (checked: CUDA must be there), or CUDA when available."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: melano runs on cpu or cuda")
    return dev


def epoch_order(n: int, seed: int, epoch: int, take: int | None = None) -> list[int]:
    """This rank's `shard` of the first `take` items of a permutation of n seeded by (seed, epoch)
    alone: a resumed run can skip exactly the batches it has done."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return shard(order[:take].tolist())

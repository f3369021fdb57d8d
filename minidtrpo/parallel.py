"""Data parallel under torchrun (DDP; docs/distributed.md), as nanoGPT's train.py does it.

Launched by torchrun, each process runs the same run loop (train.run_loop) on its share of every
global batch (`share`), DDP sums the weighted gradients (`data_parallel`, `weigh`), and rank 0 alone
evaluates, logs, checkpoints and plots (`is_main`). Without torchrun: one process, and every helper
here does nothing.
"""

import contextlib
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import BadInput, pick_device


def init_parallel(device_name: str):
    """-> (rank, world size, device). Under torchrun (RANK set) join the process group, gloo on
    CPU, nccl on CUDA with one GPU per process; otherwise (0, 1, the device asked): one process."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name, verbose=rank == 0)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def end_parallel(finished: bool):
    """Leave the process group, if joined, as a run ends (nanoGPT's destroy_process_group). A run
    that finished first waits for every process to finish (a barrier, the GIL released): gloo's
    worker threads free the tensors of the last collectives after these return, and a process
    that reaches interpreter shutdown before they do aborts ("terminate called without an active
    exception"). A run that failed or was interrupted does not wait: the others may never come."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def share(n: int, rank: int, world: int, option: str, group: int = 1) -> slice:
    """Rank r's rows of a global batch of n groups of `group` rows each: the r-th of `world` equal
    runs of whole groups (a group is never split). BadInput if n does not divide by world."""
    if n % world:
        whole = f" (its groups of {group} rows stay whole on one process)" if group > 1 else ""
        raise BadInput(f"--{option}={n} does not divide among the {world} processes{whole}")
    rows = n // world * group
    return slice(rank * rows, (rank + 1) * rows)


def _weighted_sum(weight, bucket):
    """DDP's reduction: Σ_r w_r·g_r over ranks, where g_r is rank r's gradient of its loss."""
    grad = bucket.buffer().mul_(weight.value)
    return dist.all_reduce(grad, async_op=True).get_future().then(lambda fut: fut.value()[0])


def data_parallel(model, world: int):
    """The module whose forward and backward compute the gradient: the model itself for one
    process; DDP(model) for several, which all-reduces the gradients in backward, weighted by
    `weigh` (each rank's loss is a mean over its own rows)."""
    if world == 1:
        return model
    ddp = DDP(model)
    ddp.config = model.config  # the estimators read model.config
    ddp.weight = SimpleNamespace(value=1 / world)  # DDP's default: the mean of equal shares
    ddp.register_comm_hook(ddp.weight, _weighted_sum)
    return ddp


def weigh(model, rows: int, total: int):
    """Weight of this rank's gradient in the sum: its rows / the global batch's rows, so that the
    sum of the ranks' row-mean gradients is the gradient of the global row mean."""
    if isinstance(model, DDP):
        model.weight.value = rows / total


def no_sync(model):
    """DDP's `model.no_sync`: a forward and backward inside it accumulate gradients without
    reducing them, so n backwards reduce once, in the last. One process: a context doing nothing."""
    return model.no_sync if isinstance(model, DDP) else contextlib.nullcontext


def all_ranks(x: float, op=None) -> float:
    """x summed (or op: dist.ReduceOp.MAX, ...) over the ranks; x itself for one process."""
    if not dist.is_initialized():
        return x
    t = torch.tensor(float(x), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op or dist.ReduceOp.SUM)
    return t.item()


def is_main() -> bool:
    """Rank 0, or the only process: the one that evaluates, logs, checkpoints and plots."""
    return not dist.is_initialized() or dist.get_rank() == 0

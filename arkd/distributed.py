"""arkd's distributed helpers, in one room: every one is a no-op in a single process.

Tensor collectives (sums, means, broadcasts, gradient averaging) for the policy, the features and the trainer's
statistics, and object collectives (gathering Python objects in rank order, undoing ``items[rank::world]`` sharding,
broadcasting rank 0's value) for validation, checkpoints and the run directory. How Slurm tasks become a process
group is :mod:`arkd.distributed_env`.

The policy's tensors live on the CPU. Collectives run on the device the process group's backend needs (the current
CUDA device for NCCL, the CPU otherwise) and results come back on the caller's device, so the same code runs under
gloo on CPUs and under NCCL on GPUs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is available, initialised and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (a new tensor on ``tensor``'s device; the input is left untouched)."""
    if not is_distributed():
        return tensor.clone()
    buf = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (a new tensor)."""
    return all_reduce_sum(tensor) / world_size()


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` as held by process ``src``, on every process (a new tensor on ``tensor``'s device)."""
    if not is_distributed():
        return tensor.clone()
    buf = tensor.detach().to(_comm_device(), copy=True).contiguous()
    dist.broadcast(buf, src=src)
    return buf.to(tensor.device)


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite ``module``'s parameters and buffers with those of process ``src`` (in place)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.copy_(broadcast(tensor, src))


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace every parameter's gradient by its mean over processes (one flat all-reduce; missing grads count 0)."""
    if not is_distributed():
        return
    params = list(parameters)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = all_reduce_mean(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every process, in rank order (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def unshard(shards: list[list[Any]], n: int) -> list[Any]:
    """Undo ``items[rank::world]`` sharding: interleave the per-rank lists back into the original order."""
    out: list[Any] = [None] * n
    world = len(shards)
    for rank_, shard in enumerate(shards):
        for j, item in enumerate(shard):
            out[rank_ + j * world] = item
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Process ``src``'s ``obj`` on every process (e.g. rank 0's run directory: ranks may resolve ``${now:...}`` a
    second apart)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def disagreement(record: dict[str, Any], *, limit: int = 4) -> str | None:
    """Compare what every process was asked (``record``: e.g. its resolved config and its model's fingerprint, plain
    values and nested dicts) with process 0's; every process gets the same answer: None when all agree, else
    ``process R has KEY: A (process 0: B); ...`` for the first process that differs (a collective)."""
    records = gather_objects(record)
    first = _leaves(records[0])
    for index, other in enumerate(records[1:], start=1):
        mine = _leaves(other)
        keys = [k for k in sorted(set(first) | set(mine)) if first.get(k, "<absent>") != mine.get(k, "<absent>")]
        if keys:
            listed = "; ".join(
                f"{k}: {mine.get(k, '<absent>')!r} (process 0: {first.get(k, '<absent>')!r})" for k in keys[:limit]
            )
            more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
            return f"process {index} has {listed}{more}"
    return None

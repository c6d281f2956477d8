"""torch.distributed variables for a job started by Slurm (or submitit's local executor) rather than a launcher.

``arkd-train -m hydra/launcher=slurm ...`` submits each run of a sweep as one Slurm job whose tasks (one per GPU) are
started by ``srun`` through submitit: every task is a plain Python process, with no ``accelerate launch`` or
``torchrun`` to set ``RANK`` and friends. :func:`distributed_env` derives them from Slurm's variables and
:func:`export_distributed_env` puts them in ``os.environ`` before the ``Accelerator`` is built, so the tasks of a job
form one accelerate process group.

What accelerate (1.15, ``accelerate/state.py``, ``PartialState.__init__`` and ``_prepare_backend``) needs: a
``LOCAL_RANK`` other than -1 selects the distributed GPU backend (nccl), after which
``torch.distributed.init_process_group`` runs with the default ``env://`` rendezvous, which reads ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; the device is ``cuda:LOCAL_RANK % device_count``. With
``trainer.cpu=true`` a ``WORLD_SIZE`` above 1 selects the gloo backend, and accelerate reads ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (``utils.environment.get_cpu_distributed_information``), and requires
``MASTER_ADDR`` across machines. These six variables are what is exported.

Nothing is exported outside Slurm, for a single task, or when a launcher already set ``RANK``, ``WORLD_SIZE`` or
``LOCAL_RANK`` (``accelerate launch``, ``torchrun``, ``srun accelerate launch ...``). In a hand-written sbatch script
of several tasks, start arkd-train with ``srun`` (one process per task): run directly in the script, its single
process would be told the job's task count and could wait for peers that never start.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

__all__ = ["distributed_env", "expand_nodelist", "export_distributed_env", "master_port", "tasks_per_node"]

# Set by torch launchers; any of them means the process group is already described.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# MASTER_PORT = _PORT_BASE + job id mod _PORT_SPAN: 20000-29999, above the registered service ports people tend to
# use and below Linux's ephemeral range (32768-60999), so it does not collide with outgoing connections. Every task of
# a job computes the same port; two jobs sharing a node (the elements of a submitit job array have their own
# SLURM_JOB_ID) get different ones unless their ids differ by a multiple of _PORT_SPAN.
_PORT_BASE = 20000
_PORT_SPAN = 10000


def _split_top_level(text: str) -> list[str]:
    """Split on the commas outside brackets: ``a[1-2],b`` -> ``["a[1-2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"Slurm node list {text!r} has nested brackets; expected e.g. 'gpu[01-03,07]'.")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"Slurm node list {text!r} has a ']' without '['; expected e.g. 'gpu[01-03,07]'.")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"Slurm node list {text!r} has a '[' without ']'; expected e.g. 'gpu[01-03,07]'.")
    parts.append(text[start:])
    return parts


def _expand_range(spec: str, nodelist: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]``; a range keeps the zero padding of its lower bound."""
    values = []
    for part in spec.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"Slurm node list {nodelist!r} has a bad range {part!r}; expected N or N-M with digits.")
        if not dash:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"Slurm node list {nodelist!r} has a decreasing range {part!r}; expected N-M with N <= M.")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return values


def _expand_host(pattern: str, nodelist: str) -> list[str]:
    """One comma-free item, each ``[...]`` group expanded in turn: ``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2."""
    open_at = pattern.find("[")
    if open_at < 0:
        return [pattern]
    close_at = pattern.index("]", open_at)
    prefix, spec, rest = pattern[:open_at], pattern[open_at + 1 : close_at], pattern[close_at + 1 :]
    tails = _expand_host(rest, nodelist)
    return [prefix + value + tail for value in _expand_range(spec, nodelist) for tail in tails]


def expand_nodelist(nodelist: str) -> list[str]:
    """The host names of a Slurm node list, in order, without calling ``scontrol``.

    Handles plain lists (``node1,node2``), bracket ranges with zero padding (``gpu[01-03,07]``), several groups
    (``gpu[1-2],cpu07``) and several brackets in one name (``rack[1-2]-n[01-02]``). Raises ``ValueError`` on a
    malformed list.
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("Slurm node list is empty; expected host names such as 'gpu[01-03,07]' or 'node1,node2'.")
    hosts: list[str] = []
    for item in _split_top_level(text):
        item = item.strip()
        if not item:
            raise ValueError(f"Slurm node list {nodelist!r} has an empty entry; expected comma-separated host names.")
        hosts.extend(_expand_host(item, nodelist))
    return hosts


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's ``SLURM_TASKS_PER_NODE`` form, one count per node: ``4(x2),2`` -> ``[4, 4, 2]``."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"Slurm tasks per node {spec!r} is malformed; expected e.g. '8' or '4(x2),2'.")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def master_port(job_id: str) -> int:
    """A port every task of a job derives alike from its id: 20000-29999 (see ``_PORT_BASE``)."""
    digits = "".join(char for char in str(job_id) if char.isdigit())
    if not digits:
        raise ValueError(f"job id {job_id!r} holds no digits; expected a Slurm job id such as '123456'.")
    return _PORT_BASE + int(digits) % _PORT_SPAN


def _int(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    if not value.strip().isdigit():
        raise ValueError(f"{key}={value!r} is not a non-negative integer, as Slurm sets it.")
    return int(value)


def _slurm(environ: Mapping[str, str]) -> dict[str, str] | None:
    # SLURM_PROCID is set for each task started by srun (submitit starts its tasks so); SLURM_STEP_NUM_TASKS is the
    # step's task count (all of the job's under submitit, whose srun takes no -n), SLURM_NTASKS the job's.
    if "SLURM_PROCID" not in environ or "SLURM_JOB_ID" not in environ:
        return None
    world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    if world_key not in environ:
        return None
    world = _int(environ, world_key)
    if world <= 1:
        return None
    rank = _int(environ, "SLURM_PROCID")
    local_rank = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    per_node_key = next((k for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if k in environ), None)
    if per_node_key is not None:
        counts = tasks_per_node(environ[per_node_key])
        node = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
        local_world = counts[node] if node < len(counts) else counts[-1]
    else:
        local_world = world
    nodelist_key = next(
        (k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(k, "").strip()),
        None,
    )
    if nodelist_key is not None:
        master_addr = expand_nodelist(environ[nodelist_key])[0]
    elif local_world == world:
        master_addr = "127.0.0.1"
    else:
        raise ValueError(
            "SLURM_JOB_NODELIST is not set in a job of several nodes; expected the node list to choose MASTER_ADDR "
            "(or set MASTER_ADDR yourself)."
        )
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port(environ["SLURM_JOB_ID"])),
    }


def _submitit_local(environ: Mapping[str, str]) -> dict[str, str] | None:
    # submitit's local executor (hydra/launcher=slurm_local): the tasks of one job on this machine.
    keys = ("SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS")
    if not all(key in environ for key in keys):
        return None
    world = _int(environ, "SUBMITIT_LOCAL_NTASKS")
    if world <= 1:
        return None
    rank = _int(environ, "SUBMITIT_LOCAL_GLOBALID")
    local_rank = _int(environ, "SUBMITIT_LOCAL_LOCALID") if "SUBMITIT_LOCAL_LOCALID" in environ else rank
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port(environ["SUBMITIT_LOCAL_JOB_ID"])),
    }


def distributed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables to set for this process, or ``{}`` when there is nothing to do.

    Pure: reads ``environ`` only. Empty when ``RANK``, ``WORLD_SIZE`` or ``LOCAL_RANK`` is already set (a launcher
    described the process group), outside Slurm and submitit's local executor, and for a job of a single task.
    Otherwise ``RANK`` = ``SLURM_PROCID``, ``LOCAL_RANK`` = ``SLURM_LOCALID``, ``WORLD_SIZE`` = the step's (else the
    job's) number of tasks, ``LOCAL_WORLD_SIZE`` = this node's number of tasks, ``MASTER_ADDR`` = the first host of
    the node list, ``MASTER_PORT`` = :func:`master_port` of ``SLURM_JOB_ID``; an existing ``MASTER_ADDR`` or
    ``MASTER_PORT`` is kept (left out of the result). Raises ``ValueError`` on malformed Slurm variables.
    """
    if any(key in environ for key in _LAUNCHER_VARIABLES):
        return {}
    found = _submitit_local(environ) or _slurm(environ)
    if not found:
        return {}
    return {key: value for key, value in found.items() if not (key.startswith("MASTER_") and environ.get(key))}


def export_distributed_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :func:`distributed_env`'s variables in ``environ`` (default ``os.environ``) and return them.

    ``arkd-train`` calls it at the start of each job, before the ``Accelerator`` is built.
    """
    target = os.environ if environ is None else environ
    values = distributed_env(target)
    target.update(values)
    return values

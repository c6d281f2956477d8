"""The compiled path's machinery: when a call compiles (:func:`compile_enabled`, ``ARKD_COMPILE_LOSS``), the compiled
kernels with a dynamic row count (:class:`_Kernel`), and the process's compile state (:class:`_CompileState`: the
kernels compiled so far and whether a compilation failed) held in one object, :data:`_STATE`."""

from __future__ import annotations

import contextlib
import os
import time
import types
import warnings

import torch

COMPILE_ENV = "ARKD_COMPILE_LOSS"
"""Environment switch of the compiled kernel: ``0`` (or ``false``/``off``/``no``) never compiles, ``1`` (``true``/
``on``/``yes``) compiles whatever the size; unset or ``auto`` compiles when the work reaches
``COMPILE_MIN_ELEMENTS``."""
COMPILE_MIN_ELEMENTS = 2**22
"""``compiled=None`` (auto) compiles when tokens x V reaches this (4M entries, e.g. 84 tokens at V = 50257): below
it the one-time compilation (seconds) costs more than it can save, and the eager path is fast enough."""


class _CompileFailed(Exception):
    """Raised inside a forward when a kernel could not be compiled; the caller reruns the eager path."""


class _CompileState:
    """What this process compiled: ``kernels`` by key (each compiles once), and ``failures``, the reason of every
    failed compilation (once there is one, everything runs eagerly from then on)."""

    def __init__(self) -> None:
        self.kernels: dict[tuple, _Kernel] = {}
        self.failures: list[str] = []

    def kernel(self, key: tuple, make, *flags) -> _Kernel:
        """The kernel of ``key``, made by ``make(*flags)`` (and compiled at its first call) when it is new."""
        kernel = self.kernels.get(key)
        if kernel is None:
            kernel = self.kernels[key] = _Kernel(make(*flags), self)
        return kernel


_STATE = _CompileState()
"""The process's one compile state (a test may swap it for a fresh one)."""


def compile_enabled(compiled: bool | None, elements: int, device: torch.device) -> bool:
    """Whether a call uses the compiled kernel.

    ``compiled`` True/False forces it (True still runs eagerly once a compilation failed in this process, or where
    compilation is impossible: other devices, inside an outer ``torch.compile``); None follows ``ARKD_COMPILE_LOSS``
    and, in auto mode, compiles when ``elements`` (tokens x V) reaches ``COMPILE_MIN_ELEMENTS``.
    """
    if compiled is False or _STATE.failures or device.type not in ("cpu", "cuda"):
        return False
    if not hasattr(torch, "compile") or _is_compiling():
        return False
    if compiled is True:
        return True
    env = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False
    if env in ("1", "true", "on", "yes"):
        return True
    if env not in ("", "auto"):
        raise ValueError(f"{COMPILE_ENV} must be 0, 1 or auto, got {os.environ[COMPILE_ENV]!r}")
    return elements >= COMPILE_MIN_ELEMENTS


def _check_compiled(compiled) -> None:
    if compiled is not None and not isinstance(compiled, bool):
        raise ValueError(f"compiled must be True, False or None (auto), got {compiled!r}")


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def compiled_kernels() -> dict[tuple, float]:
    """The kernels this process compiled: ``{key: seconds its first call took}`` (each compiles once)."""
    return {key: k.compile_seconds for key, k in _STATE.kernels.items() if k.compiled_ok}


def _kernel(key: tuple, make, *flags) -> _Kernel:
    """The process's kernel of ``key`` (see :meth:`_CompileState.kernel`)."""
    return _STATE.kernel(key, make, *flags)


class _Kernel:
    """One compiled kernel whose row count (dimension 0 of every argument) is dynamic: one compilation serves every
    number of tokens. It has a private copy of the code object, so its compilation cache and recompile limit are its
    own. A failed compilation is recorded in ``state`` (then every call runs eagerly)."""

    def __init__(self, fn, state: _CompileState) -> None:
        private = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, None, fn.__closure__)
        self.compiled = torch.compile(private, fullgraph=True)
        self.compiled_ok = False
        self.compile_seconds = 0.0
        self.state = state

    def __call__(self, *args):
        # detached views: whether the caller's logits require grad must not make a second graph (guards)
        args = tuple(None if arg is None else arg.detach() for arg in args)
        for arg in args:  # rows (and the index) are dynamic: no recompilation for another token count
            if arg is not None:
                torch._dynamo.mark_dynamic(arg, 0)
        if self.compiled_ok:
            return self.compiled(*args)
        start = time.perf_counter()
        try:
            # AOTAutograd's graph CSE would merge the per-use exp nodes back into one (see _kernels._row_stats)
            with _functorch_config_patch(cse=False):
                out = self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
            lines = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
            self.state.failures.append(reason)
            warnings.warn(
                f"arkd.losses: torch.compile of the bidirectional KL kernel failed ({reason}); using the eager "
                f"chunked path from now on (set {COMPILE_ENV}=0 to skip the attempt)",
                RuntimeWarning,
                stacklevel=4,
            )
            raise _CompileFailed(reason) from error
        self.compile_seconds = time.perf_counter() - start
        self.compiled_ok = True
        return out


def _functorch_config_patch(**changes):
    try:
        import torch._functorch.config as functorch_config
    except ImportError:  # pragma: no cover - very old torch
        return contextlib.nullcontext()
    return functorch_config.patch(**{k: v for k, v in changes.items() if hasattr(functorch_config, k)})

"""Which rows a chunk reads, without copying the logits: counted rows chunk by chunk (:func:`_row_chunks`), row access
to ``[..., V]`` logits as ``[N, V]`` for the eager path (:class:`_Rows`), and one strided ``[R, V]`` view of their
storage for the compiled kernels (:class:`_RowLayout`)."""

from __future__ import annotations

import torch


def _row_chunks(mask: torch.Tensor | None, n: int, chunk_size: int):
    """Yield ``(rows, index)``: a slice (everything counted) or an index tensor of counted rows, chunk by chunk."""
    if mask is None:
        for start in range(0, n, chunk_size):
            yield slice(start, min(start + chunk_size, n)), None
        return
    counted = mask.nonzero().squeeze(-1)
    for start in range(0, counted.numel(), chunk_size):
        index = counted[start : start + chunk_size]
        yield index, index


def _unravel(index: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """Flat row indices → a tuple of per-dimension indices for ``shape`` (``torch.unravel_index`` for torch < 2.2)."""
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index = index // size
    return tuple(reversed(coords))


class _Rows:
    """Row access to ``[..., V]`` logits as if they were ``[N, V]``, without copying non-viewable layouts.

    ``logits[:, :-1]`` (the next-token shift) cannot be flattened to ``[N, V]`` without a full copy; rows are then
    gathered chunk by chunk through their multi-dimensional indices instead.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.token_shape = x.shape[:-1]
        try:
            self.flat = x.view(-1, x.shape[-1])
        except RuntimeError:
            self.flat = None

    def __getitem__(self, rows: slice | torch.Tensor) -> torch.Tensor:
        if self.flat is not None:
            return self.flat[rows]
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=self.x.device)
        return self.x[_unravel(rows, self.token_shape)]


class _RowLayout:
    """Rows of ``[..., V]`` logits as rows of one ``[R, V]`` strided view of their storage (no copy).

    ``logits[:, :-1]`` of a contiguous ``[B, T, V]`` is rows ``b * T + t`` (``t < T - 1``) of the ``[B * T, V]``
    matrix. ``rows`` maps the tokens (flattened) to rows of ``base``, or is None for the identity; rows that are no
    token are never read. :meth:`of` returns None when no such view exists (overlapping rows, or rows spread over
    more than twice the tokens): the eager path gathers rows instead.
    """

    def __init__(self, base: torch.Tensor, rows: torch.Tensor | None, row_strides: tuple[int, ...]) -> None:
        self.base, self.rows, self.row_strides = base, rows, row_strides

    @classmethod
    def of(cls, x: torch.Tensor) -> _RowLayout | None:
        v = x.shape[-1]
        if x.dim() < 2 or (x.stride(-1) != 1 and v > 1):
            return None
        try:
            flat = x.view(-1, v)
        except RuntimeError:
            flat = None
        if flat is not None and (flat.shape[0] <= 1 or flat.stride(0) >= v):
            return cls(flat, None, ())
        shape, strides = x.shape[:-1], x.stride()[:-1]
        used = [st for size, st in zip(shape, strides) if size > 1]
        unit = min(used)
        if unit < v or any(st % unit for st in used):
            return None
        row_strides = tuple(st // unit if size > 1 else 0 for size, st in zip(shape, strides))
        rows = torch.zeros((), dtype=torch.long, device=x.device)
        for dim, (size, step) in enumerate(zip(shape, row_strides)):
            view = [1] * len(shape)
            view[dim] = size
            rows = rows + torch.arange(size, device=x.device).mul_(step).view(view)
        rows = rows.reshape(-1)
        n = rows.numel()
        total = int(rows.max()) + 1
        if total > 2 * n or torch.unique(rows).numel() != n:
            return None
        return cls(x.as_strided((total, v), (unit, 1), x.storage_offset()), rows, row_strides)

    def same_rows(self, other: _RowLayout) -> bool:
        if self.rows is None or other.rows is None:
            return self.rows is None and other.rows is None
        return self.row_strides == other.row_strides and self.base.shape[0] == other.base.shape[0]

    def grad_view(self, grad_rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The ``[R, V]`` (contiguous) gradient rows as a tensor shaped like the logits."""
        if self.rows is None:
            return grad_rows.view(like.shape)
        v = like.shape[-1]
        return grad_rows.as_strided(like.shape, tuple(st * v for st in self.row_strides) + (1,))

"""Counting the ops that read device values back to the host (on a GPU each one waits for the
queue to drain), for tests that keep them out of hot paths."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReadCounter(TorchDispatchMode):
    """Records every host read dispatched while active (``reads``: the op of each).

    ``.tolist()`` dispatches nothing on CPU, so it goes uncounted here: code whose reads are
    counted must make them with ``bool``, ``int``, ``float`` or ``.item()``.
    """

    READS = {
        torch.ops.aten._local_scalar_dense.default,  # bool(t), int(t), float(t), t.item()
        torch.ops.aten.nonzero.default,
        torch.ops.aten.masked_select.default,
    }

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        bool_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if func in self.READS or bool_index:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))

"""Summing weight gradients over ranks in buckets, overlapped with the backward pass."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.distributed as dist


class GradReducer:
    """All-reduce (sum) of parameter gradients, one flat bucket at a time.

    Parameters are grouped into buckets of about ``bucket_bytes`` in reverse registration
    order (the order backward produces them); a bucket's all-reduce starts as soon as its last
    gradient is accumulated. :meth:`wait` finishes every bucket and writes the sums back.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        group: dist.ProcessGroup | None = None,
        bucket_bytes: int = 16 << 20,
    ) -> None:
        self.group = group
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p in reversed([p for p in params if p.requires_grad]):
            if size >= bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._pending = [len(b) for b in self.buckets]
        self._works: dict[int, tuple[dist.Work, torch.Tensor]] = {}
        for p in self._bucket_of_params():
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _bucket_of_params(self) -> list[torch.nn.Parameter]:
        return [p for b in self.buckets for p in b]

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        i = self._bucket_of[id(param)]
        self._pending[i] -= 1
        if self._pending[i] == 0:
            self._launch(i)

    def _launch(self, i: int) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[i]]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._works[i] = (dist.all_reduce(flat, group=self.group, async_op=True), flat)

    def wait(self) -> float:
        """Finish every bucket's all-reduce, store the sums in ``.grad``; return seconds blocked."""
        for i in range(len(self.buckets)):
            if i not in self._works:  # some parameter got no gradient this step
                self._launch(i)
        start = time.perf_counter()
        for i, (work, flat) in sorted(self._works.items()):
            work.wait()
            offset = 0
            for p in self.buckets[i]:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p)
                offset += n
        self._works.clear()
        self._pending = [len(b) for b in self.buckets]
        return time.perf_counter() - start

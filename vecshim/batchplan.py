"""How a batch of texts is cut into backend calls (padding-aware)."""
from __future__ import annotations

from typing import Sequence

__all__ = ["plan_groups"]


def plan_groups(tokens: Sequence[int], *, max_size: int | None, max_tokens: int | None,
                cost: tuple[float, float, float] | None) -> list[list[int]]:
    """Split items into backend calls: indices grouped so padding is not wasted.

    Items are sorted by token length and cut into contiguous groups that
    respect `max_size` and `max_tokens`. With a cost model
    `(a, b, c)` -> `a + b*n*L + c*n*L*L` per call (n texts padded to L
    tokens), the cut minimises the summed cost (a small dynamic program);
    without one, groups are simply as large as the limits allow.
    """
    order = sorted(range(len(tokens)), key=lambda i: tokens[i])
    n = len(order)
    lens = [tokens[i] for i in order]
    cap = max_size or n or 1

    def fits(i: int, j: int) -> bool:  # items order[i:j] in one call
        if j - i > cap:
            return False
        return max_tokens is None or sum(lens[i:j]) <= max_tokens or j - i == 1

    if cost is None:
        groups, start = [], 0
        while start < n:
            end = start + 1
            while end < n and fits(start, end + 1):
                end += 1
            groups.append(order[start:end])
            start = end
        return groups
    a, b, c = cost
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        L = lens[j - 1]
        for i in range(j - 1, -1, -1):
            if not fits(i, j):
                break
            k = j - i
            total = best[i] + a + b * k * L + c * k * L * L
            if total < best[j]:
                best[j], cut[j] = total, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]

"""`RoutingPlan`: where every (token, slot) assignment goes in the expert-sorted buffer, and back.

Token t's j-th choice is assignment (t, j), flat index a = t·K + j. Assignments are ordered by a stable
sort on the expert id of the slot-major sequence (all first choices in token order, then all second
choices, ...): expert e's rows are contiguous, rows [expert_offsets[e], expert_offsets[e+1]), and within
them first choices come before second choices. Under a capacity C an expert keeps its first C rows in that
order (Switch/GShard: priority by choice rank, then token order); the rest are dropped.

    row_token[r]         token whose features row r holds            (M,)
    row_assignment[r]    flat assignment a = t·K + j of row r          (M,)
    assignment_row[t, j] row holding assignment (t, j); −1 if dropped (T, K)

`assignment_row` and `row_assignment` are inverse permutations, so both the combine and its backward are
gathers in which every output row has exactly one owner: no atomics, deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RoutingPlan:
    n_tokens: int
    top_k: int
    n_experts: int
    capacity: int | None
    requested_per_expert: object  # (E,) int64, assignments each expert was asked to take (before capacity)
    expert_offsets: object      # (E+1,) int64 on the data's device, start of each expert's rows
    expert_offsets_host: np.ndarray  # the same on the host: the few integers the plan must sync
    row_token: object           # (M,) int64
    row_assignment: object      # (M,) int64
    assignment_row: object      # (T, K) int64, −1 where dropped
    n_requested: int = 0        # valid assignments before capacity (T·K, or fewer with a `valid` mask)

    @property
    def n_rows(self) -> int:
        """M: the assignments kept, i.e. rows of the dispatched buffer."""
        return int(self.expert_offsets_host[-1])

    @property
    def kept_per_expert(self) -> np.ndarray:
        """(E,) int64 on the host: rows each expert keeps (after capacity)."""
        return np.diff(self.expert_offsets_host)

    @property
    def dropped_fraction(self) -> float:
        return 0.0 if self.n_requested == 0 else 1.0 - self.n_rows / self.n_requested

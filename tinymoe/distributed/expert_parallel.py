"""Per-rank plan of expert parallelism: who receives which rows, and the local regrouping by expert.

P ranks share E experts, E divisible by P: rank r holds experts [r·E/P, (r+1)·E/P). Each rank's dispatched
buffer is sorted by expert (a routing plan), hence by destination rank, so it leaves in P contiguous blocks

    destination_counts[p] = Σ_{e held by p} kept_per_expert[e]

and arrives source-major: rank r receives, from every source s in rank order, s's rows for r's local experts
in expert order. The local experts need them expert-major (expert e's rows from every source together), a
stable permutation of the received rows built from the per-expert counts each source sent:

    counts_from_sources[s, e]   rows source s sent for local expert e            (P, E/P)
    order                       expert_major = received[order]                   (M,)
    inverse                     received = expert_major[inverse]                 (M,)
    expert_offsets              expert e's rows in expert_major: [o_e, o_{e+1})  (E/P + 1,)

Within one expert, rows stay in source order, then in each source's own order (stable): the result does not
depend on timing, so the layer stays deterministic. These are pure functions of host integer arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.backend import to_numpy
from .communicator import Communicator, exclusive_cumsum


def _require_divisible(n_experts, n_ranks, op: str) -> tuple[int, int]:
    for name, value in (("n_experts", n_experts), ("n_ranks", n_ranks)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{op}: {name}={value!r} must be an int >= 1")
    if n_experts % n_ranks:
        raise ValueError(f"{op}: n_experts={n_experts} is not divisible by n_ranks={n_ranks}; "
                         "expert parallelism gives every rank the same number of experts")
    return int(n_experts), int(n_ranks)


def local_experts(rank: int, n_experts: int, n_ranks: int) -> range:
    """The experts rank `rank` holds: [rank·E/P, (rank+1)·E/P)."""
    n_experts, n_ranks = _require_divisible(n_experts, n_ranks, "local_experts")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < n_ranks:
        raise ValueError(f"local_experts: rank={rank!r} must be in [0, {n_ranks})")
    per_rank = n_experts // n_ranks
    return range(int(rank) * per_rank, (int(rank) + 1) * per_rank)


def _kept(kept_per_expert, op: str) -> np.ndarray:
    kept = to_numpy(kept_per_expert) if hasattr(kept_per_expert, "dtype") else np.asarray(kept_per_expert)
    if kept.ndim != 1 or kept.dtype.kind not in "iu" or (kept < 0).any():
        raise ValueError(f"{op}: kept_per_expert must be a 1-D array of counts >= 0, got "
                         f"{kept.dtype.name} {tuple(kept.shape)}")
    return kept.astype(np.int64)


def counts_per_destination_expert(kept_per_expert, n_ranks: int) -> np.ndarray:
    """kept_per_expert (E,) as (P, E/P): row p holds the counts for rank p's experts, in expert order."""
    kept = _kept(kept_per_expert, "counts_per_destination_expert")
    _require_divisible(kept.shape[0], n_ranks, "counts_per_destination_expert")
    return kept.reshape(n_ranks, -1)


def destination_counts(kept_per_expert, n_ranks: int) -> np.ndarray:
    """Rows this rank sends to each rank: (P,) int64, destination_counts[p] = Σ_{e held by p} kept[e]."""
    return counts_per_destination_expert(kept_per_expert, n_ranks).sum(axis=1)


def expert_major_order(counts_from_sources) -> tuple[np.ndarray, np.ndarray]:
    """(order, expert_offsets) turning source-major received rows into expert-major ones (module docstring).

    counts_from_sources: int (P, E_local), entry [s, e] = rows received from source s for local expert e.
    The expert-major row j = Σ (blocks before block (s, e) in (e, s) order) + i is received row
    start[s, e] + i, where start is the exclusive cumsum of the counts in (s, e) order.
    """
    counts = np.asarray(counts_from_sources)
    if counts.ndim != 2 or counts.dtype.kind not in "iu" or (counts < 0).any():
        raise ValueError(f"expert_major_order: counts_from_sources must be a 2-D array (sources, local experts) "
                         f"of counts >= 0, got {counts.dtype.name} {tuple(counts.shape)}")
    counts = counts.astype(np.int64)
    source_major_start = exclusive_cumsum(counts.reshape(-1)).reshape(counts.shape)
    block_sizes = counts.T.reshape(-1)                   # blocks in expert-major order (e, s)
    block_starts = source_major_start.T.reshape(-1)      # where each block sits in the received buffer
    n_rows = int(block_sizes.sum())
    offset_in_block = np.arange(n_rows, dtype=np.int64) - np.repeat(exclusive_cumsum(block_sizes), block_sizes)
    order = np.repeat(block_starts, block_sizes) + offset_in_block
    expert_offsets = np.concatenate([[0], np.cumsum(counts.sum(axis=0))]).astype(np.int64)
    return order, expert_offsets


def inverse_permutation(order) -> np.ndarray:
    """inverse with inverse[order[j]] = j, so that x[order][inverse] == x."""
    order = np.asarray(order, dtype=np.int64)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.shape[0], dtype=np.int64)
    return inverse


@dataclass(frozen=True)
class ExpertExchangePlan:
    """Everything one rank needs for the two exchanges of an expert-parallel MoE layer (module docstring)."""

    send_counts: np.ndarray          # (P,) rows sent to each rank
    recv_counts: np.ndarray          # (P,) rows received from each rank
    counts_from_sources: np.ndarray  # (P, E/P) rows received per source and local expert
    order: np.ndarray                # (M,) expert_major = received[order]
    inverse: np.ndarray              # (M,) received = expert_major[inverse]
    expert_offsets: np.ndarray       # (E/P + 1,) local expert e's rows in expert_major

    @property
    def n_received(self) -> int:
        return int(self.recv_counts.sum())


def plan_expert_exchange(kept_per_expert, comm: Communicator) -> ExpertExchangePlan:
    """One small all-to-all of per-expert counts (E integers per rank) and the local permutations.

    kept_per_expert: (E,) rows of this rank's expert-sorted buffer per (global) expert. Collective: every
    rank of `comm` calls it with the same E.
    """
    per_destination_expert = counts_per_destination_expert(kept_per_expert, comm.size)
    counts_from_sources = comm.alltoall_counts(per_destination_expert)
    order, expert_offsets = expert_major_order(counts_from_sources)
    return ExpertExchangePlan(
        send_counts=per_destination_expert.sum(axis=1),
        recv_counts=counts_from_sources.sum(axis=1),
        counts_from_sources=counts_from_sources,
        order=order,
        inverse=inverse_permutation(order),
        expert_offsets=expert_offsets,
    )

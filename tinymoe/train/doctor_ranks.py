"""The expert-parallel check of `tinymoe doctor`: how evenly the ranks of an expert-parallel run shared the rows
of the all-to-all exchange.

An expert-parallel run (`tinymoe train --expert-parallel P`) writes, in each metrics.jsonl row, "expert_parallel":
{"ranks": P, "rows_received": [[r_0, ..., r_{P-1}] per MoE layer], "bytes_sent", "bytes_received",
"exchange_seconds"} summed over the evaluation window (tinymoe.train.distributed.step_statistics). Rank p runs
the experts it holds on the r_p rows it received, and every rank waits for the slowest at the return exchange,
so a layer's expert time is set by max_p r_p, against mean_p r_p for a perfect split:

    imbalance = max_p r_p / mean_p r_p        (1.0 balanced; P when one rank receives every row)
"""
from __future__ import annotations

from .doctor_rules import Finding

RANK_IMBALANCE = 1.25
"""max/mean rows received above this: the busiest rank works 25% longer than a balanced split and the others
wait for it at every MoE layer (GShard, Lepikhin et al. 2020, and DeepSpeed-MoE size expert-parallel groups on
the premise of an even split; 1.25 is also the capacity factor Switch Transformer trains with, the slack a
balanced router is given)."""


def rank_imbalance(rows: list) -> tuple | None:
    """(row, [(layer, max/mean, rows per rank)]) of the last row that carries "expert_parallel" rows_received, or
    None when no row does (a one-process run) or the counts are empty."""
    for row in reversed(rows):
        parallel = row.get("expert_parallel")
        if not isinstance(parallel, dict) or not isinstance(parallel.get("rows_received"), list):
            continue
        layers = []
        for index, ranks in enumerate(parallel["rows_received"]):
            if not isinstance(ranks, list) or len(ranks) < 2 or not all(isinstance(r, (int, float)) for r in ranks):
                continue
            total = sum(ranks)
            if total > 0:
                layers.append((index, max(ranks) * len(ranks) / total, list(ranks)))
        return (row, layers) if layers else None
    return None


def check_rank_balance(rows: list, command) -> Finding | None:
    """A finding when, in the last window of an expert-parallel run, some layer's max/mean rows received over
    the ranks exceeds RANK_IMBALANCE."""
    found = rank_imbalance(rows)
    if found is None:
        return None
    row, layers = found
    worst = [(index, ratio, ranks) for index, ratio, ranks in layers if ratio > RANK_IMBALANCE]
    if not worst:
        return None
    ranks_count = len(worst[0][2])
    evidence = {"step": row["step"], "ranks": ranks_count,
                "layers": [{"layer": index, "max_over_mean_rows_received": round(ratio, 3), "rows_received": ranks}
                           for index, ratio, ranks in worst]}
    text = (f"window ending at step {row['step']}, {ranks_count} ranks: "
            + "; ".join(f"layer {index}: max/mean rows received {ratio:.2f} (per rank {ranks})"
                        for index, ratio, ranks in worst))
    aux = command.value("aux_coef", 0.01)
    alternatives = [command.with_flags(router="sigmoid", bias_update_rate=0.001) + "   (DeepSeek-V3 loss-free balance)"]
    if ranks_count > 1:
        alternatives.append(command.with_flags(expert_parallel=1) + "   (one process: no exchange to balance)")
    return Finding("rank_imbalance", "expert-parallel imbalance: some ranks receive far more rows than others",
                   evidence, text, "every rank waits for the busiest one at each MoE layer's exchange: the step "
                   f"runs at the speed of a rank doing {max(r for _, r, _ in worst):.2f}x its share",
                   command.with_flags(aux_coef=round(max(3 * aux, 0.03), 4)), alternatives)

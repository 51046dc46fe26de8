"""The expert-parallel rank-balance rule of `tinymoe doctor`: max/mean rows received over the ranks, computed by
hand here from the per-rank counts an expert-parallel run writes."""
import sys
from pathlib import Path

import pytest

from tinymoe.train.doctor import diagnose
from tinymoe.train.doctor_ranks import RANK_IMBALANCE, check_rank_balance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_doctor import PLENTY, _healthy_rows, _run  # noqa: E402


def _with_ranks(rows, rows_received):
    last = dict(rows[-1], expert_parallel={"ranks": len(rows_received[0]), "rows_received": rows_received,
                                           "bytes_sent": [[0] * len(r) for r in rows_received]})
    return rows[:-1] + [last]


def test_an_imbalanced_rank_is_reported_with_its_ratio(tmp_path):
    received = [[100, 100], [300, 100]]  # layer 1: max 300 / mean 200 = 1.5
    report = diagnose(_run(tmp_path, _with_ranks(_healthy_rows(), received)), memory_bytes=PLENTY)
    (finding,) = [f for f in report.findings if f.kind == "rank_imbalance"]
    assert finding.evidence["layers"] == [{"layer": 1, "max_over_mean_rows_received": 1.5,
                                           "rows_received": [300, 100]}]
    assert finding.evidence["step"] == 300 and finding.evidence["ranks"] == 2
    assert "--aux-coef 0.03" in finding.next_command
    assert report.numbers["max_over_mean_rows_received"] == 1.5
    assert "layer 1: max/mean rows received 1.50" in report.to_text()


@pytest.mark.parametrize("received", [[[100, 100, 100, 100]], [[110, 90, 100, 100]]])
def test_balanced_ranks_give_no_finding_but_the_number(tmp_path, received):
    report = diagnose(_run(tmp_path, _with_ranks(_healthy_rows(), received)), memory_bytes=PLENTY)
    assert report.healthy
    assert report.numbers["max_over_mean_rows_received"] == pytest.approx(max(received[0]) * 4 / sum(received[0]),
                                                                          abs=1e-3)


def test_one_process_runs_have_no_rank_number(tmp_path):
    report = diagnose(_run(tmp_path, _healthy_rows()), memory_bytes=PLENTY)
    assert "max_over_mean_rows_received" not in report.numbers


def test_the_threshold_is_exclusive():
    class Command:
        def value(self, name, default=None):
            return default

        def with_flags(self, **changes):
            return str(changes)

    at = RANK_IMBALANCE * 100  # two ranks: (100 + 100·r) / 2 as mean -> pick counts giving exactly the threshold
    rows = [{"step": 1, "expert_parallel": {"rows_received": [[at, 200 - at]]}}]
    assert check_rank_balance(rows, Command()) is None
    rows = [{"step": 1, "expert_parallel": {"rows_received": [[at + 1, 199 - at]]}}]
    assert check_rank_balance(rows, Command()).kind == "rank_imbalance"

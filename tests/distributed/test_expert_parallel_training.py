"""The Trainer under expert + data parallelism: a run that goes 2 ranks → 4 ranks → 1 process through its
checkpoint (--resume under another P) ends with the same weights, metrics and validation losses as the
one-process run that stops and resumes at the same steps, and its checkpoint is the one-process format
(`load_trained_model`, what `tinymoe sample` uses, reads it).

Active once tinymoe/train/loop.py's Trainer takes `comm=` (the patch described in tinymoe/train/distributed.py's
ParallelTraining); skipped, with that reason, before."""
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_distributed_mpi import MPIEXEC, needs_mpi
from tinymoe.train.checkpoint import load_checkpoint, load_trained_model
from tinymoe.train.loop import Trainer

needs_patch = pytest.mark.skipif("comm" not in inspect.signature(Trainer.__init__).parameters,
                                 reason="Trainer has no comm= yet (the loop patch of ParallelTraining)")

RUN = """
import sys
from tinymoe.distributed import abort_on_error, world
from tinymoe.models import TransformerConfig
from tinymoe.train.data import CharData
from tinymoe.train.loop import TrainConfig, Trainer
out, steps, resume, single = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume", sys.argv[4] == "single"
grad_accum = int(sys.argv[5])
comm = world()
with abort_on_error(comm):
    text = "".join(f"{a} + {b} = {a + b}. the cat sat on the mat.\\n" for a in range(20) for b in range(7))
    data = CharData.from_text(text, 8)
    moe = {"d_ff": 8, "n_experts": 4, "top_k": 2, "router": "sigmoid", "bias_update_rate": 0.01}
    model = TransformerConfig(vocab_size=len(data.vocab), d_model=8, n_layers=2, n_heads=2, max_seq_len=8,
                              dtype="float64", moe=moe)
    train = TrainConfig(steps=steps, batch_size=4, seq_len=8, lr=0.01, warmup_steps=1, eval_every=2,
                        eval_batches=2, checkpoint_every=0, grad_accum=grad_accum)
    trainer = Trainer(model, train, data, out, stream=open(__import__("os").devnull, "w"),
                      comm=None if single else comm)
    if resume:
        trainer.resume()
    trainer.run()
"""


def run(out, steps, resume, n_ranks=None, grad_accum=1):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_", "MPI_"))}
    environment["TINYMOE_KERNELS"] = "numpy"
    command = [sys.executable, "-c", RUN, str(out), str(steps), "resume" if resume else "new",
               "mpi" if n_ranks else "single", str(grad_accum)]
    result = subprocess.run(([MPIEXEC, "-n", str(n_ranks)] if n_ranks else []) + command, capture_output=True,
                            text=True, timeout=120, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_mpi
@needs_patch
def test_a_run_resumed_under_other_rank_counts_equals_the_one_process_run(tmp_path):
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    single.mkdir(), parallel.mkdir()
    for steps, resume in ((2, False), (4, True), (6, True)):
        run(single, steps, resume)
    for steps, resume, n_ranks in ((2, False, 2), (4, True, 4), (6, True, None)):
        run(parallel, steps, resume, n_ranks)
    expected, actual = load_checkpoint(single / "checkpoint.npz"), load_checkpoint(parallel / "checkpoint.npz")
    assert expected.model_state.keys() == actual.model_state.keys()
    for name, value in expected.model_state.items():
        np.testing.assert_allclose(actual.model_state[name], value, rtol=1e-10, atol=1e-12, err_msg=name)
    rows = [[json.loads(line) for line in open(path / "metrics.jsonl")] for path in (single, parallel)]
    assert [row["step"] for row in rows[1]] == [2, 4, 6]
    for expected_row, row in zip(*rows):
        for key in ("train_loss", "val_loss", "aux_loss", "z_loss"):
            assert abs(row[key] - expected_row[key]) < 1e-12, (key, row, expected_row)
        assert row["tokens_per_expert"] == expected_row["tokens_per_expert"]
        assert row["experts_per_token_histogram"] == expected_row["experts_per_token_histogram"]
    assert rows[1][0]["expert_parallel"]["ranks"] == 2 and rows[1][1]["expert_parallel"]["ranks"] == 4
    assert len(rows[1][1]["expert_parallel"]["rows_received"][0]) == 4  # per layer, one entry per rank
    model, vocab = load_trained_model(parallel)
    assert model.moe_layers()[0].experts.w1.shape[0] == 4 and len(vocab) == model.config.vocab_size


@needs_mpi
@needs_patch
def test_grad_accum_under_expert_parallelism_equals_the_one_process_run(tmp_path):
    """--grad-accum 2 on 2 ranks: each step's 2 micro-batches are split over the ranks, so the run equals the
    one-process --grad-accum 2 run (weights, losses, every micro-batch counted in the routing statistics)."""
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    single.mkdir(), parallel.mkdir()
    run(single, 4, False, grad_accum=2)
    run(parallel, 4, False, n_ranks=2, grad_accum=2)
    expected, actual = load_checkpoint(single / "checkpoint.npz"), load_checkpoint(parallel / "checkpoint.npz")
    for name, value in expected.model_state.items():
        np.testing.assert_allclose(actual.model_state[name], value, rtol=1e-10, atol=1e-12, err_msg=name)
    rows = [[json.loads(line) for line in open(path / "metrics.jsonl")] for path in (single, parallel)]
    assert [row["step"] for row in rows[1]] == [2, 4]
    for expected_row, row in zip(*rows):
        for key in ("train_loss", "val_loss", "aux_loss", "z_loss"):
            assert abs(row[key] - expected_row[key]) < 1e-12, (key, row, expected_row)
        assert row["tokens_per_expert"] == expected_row["tokens_per_expert"]
        assert [sum(layer) for layer in row["tokens_per_expert"]] == [2 * 2 * 4 * 8 * 2] * 2  # 2 steps x 2 micro
        assert row["experts_per_token_histogram"] == expected_row["experts_per_token_histogram"]

"""`tinymoe train --grad-accum N`: N micro-batches of --batch-size per optimizer step give the same run as one
batch N times larger (float64; the balance loss off, since f_e of a micro-batch is not that of the batch)."""
import pytest

from cli_helpers import TINY, assert_ok, assert_one_line_error, read_metrics, tinymoe

EXACT = [*TINY, "--dtype", "float64", "--aux-coef", "0", "--eval-every", "1", "--steps", "3"]


def _losses(workdir, out, *flags):
    result = tinymoe("train", "--data", "data.txt", "--out", out, "--overwrite", *EXACT, *flags, cwd=workdir)
    assert_ok(result)
    return [(row["train_loss"], row["val_loss"], row["tokens_per_expert"]) for row in read_metrics(workdir / out)]


def test_two_micro_batches_of_8_equal_one_batch_of_16(workdir):
    accumulated = _losses(workdir, "accum2", "--batch-size", "8", "--grad-accum", "2")
    whole = _losses(workdir, "accum1", "--batch-size", "16", "--grad-accum", "1")
    halves = _losses(workdir, "half", "--batch-size", "8")
    assert len(accumulated) == len(whole) == 3
    for (train_a, val_a, counts_a), (train_w, val_w, counts_w) in zip(accumulated, whole):
        assert train_a == pytest.approx(train_w, rel=1e-11)
        assert val_a == pytest.approx(val_w, rel=1e-11)
        assert counts_a == counts_w  # every token of both micro-batches counted, as in the big batch
    assert halves[1][0] != pytest.approx(whole[1][0], rel=1e-6)  # the test can tell a batch of 8 from one of 16


def test_grad_accum_must_be_a_positive_integer(workdir):
    result = tinymoe("train", "--grad-accum", "0", cwd=workdir)
    assert_one_line_error(result, "argument --grad-accum")
    assert result.returncode == 2


def test_resume_with_another_grad_accum_is_refused(workdir):
    assert_ok(tinymoe("train", "--data", "data.txt", "--out", "accum_resume", *TINY, "--steps", "2",
                      "--grad-accum", "2", cwd=workdir))
    result = tinymoe("train", "--data", "data.txt", "--out", "accum_resume", *TINY, "--steps", "4", "--resume",
                     cwd=workdir)
    assert_one_line_error(result, "grad_accum: checkpoint 2 vs given 1")
    assert result.returncode == 1  # as for every setting that differs on resume (a CheckpointError)

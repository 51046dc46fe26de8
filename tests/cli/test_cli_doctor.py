"""`tinymoe doctor RUN_DIR`: the report of tinymoe.train.doctor as text or JSON, the memory to check against,
the rank-balance rule of expert-parallel runs, and one-line errors."""
import json
import shutil

import pytest

from cli_helpers import assert_ok, assert_one_line_error, tinymoe


def test_doctor_of_a_trained_run_prints_the_report(trained):
    out, _ = trained
    result = tinymoe("doctor", out, cwd=out.parent)
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert lines[0] == f"tinymoe doctor {out}"
    assert any(line.startswith("key numbers: last_step 4") for line in lines)


def test_doctor_json_and_a_small_memory(trained):
    out, _ = trained
    result = tinymoe("doctor", out, "--json", "--memory", "64KiB", cwd=out.parent)
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["numbers"]["memory_bytes"] == 64 * 1024
    (memory,) = [finding for finding in report["findings"] if finding["kind"] == "memory"]
    assert memory["evidence"]["memory"] == "--memory" and not report["healthy"]


def test_doctor_reports_an_imbalanced_expert_parallel_run(trained, tmp_path):
    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["expert_parallel"] = {"ranks": 2, "rows_received": [[90, 30]], "bytes_sent": [[0, 0]]}
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = tinymoe("doctor", run, "--memory", "64G", cwd=tmp_path)
    assert_ok(result)
    assert "expert-parallel imbalance" in result.stdout
    assert "layer 0: max/mean rows received 1.50 (per rank [90, 30])" in result.stdout  # 90 / ((90 + 30) / 2)


@pytest.mark.parametrize("text, expected", [("1000", 1000), ("16G", 16 * 10 ** 9), ("16GiB", 16 * 2 ** 30),
                                            ("1.5ki", 1536), ("512MB", 512 * 10 ** 6)])
def test_memory_sizes(text, expected):
    from tinymoe.cli.doctor_command import byte_count

    assert byte_count(text) == expected


DOCTOR_ERRORS = {
    "missing dir": (["nowhere"], "nowhere", 2),
    "dir without a run": (["empty"], "holds none of", 2),
    "bad memory": (["run", "--memory", "lots"], "argument --memory", 2),
    "zero memory": (["run", "--memory", "0"], "argument --memory", 2),
}


@pytest.mark.parametrize("args, fragment, code", DOCTOR_ERRORS.values(), ids=DOCTOR_ERRORS.keys())
def test_doctor_user_errors_are_one_line(trained, tmp_path, args, fragment, code):
    (tmp_path / "empty").mkdir()
    shutil.copytree(trained[0], tmp_path / "run")
    result = tinymoe("doctor", *args, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert result.returncode == code


def test_a_damaged_checkpoint_is_a_note_not_a_crash(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "run")
    (tmp_path / "run" / "checkpoint.npz").write_bytes(b"not a zip")
    result = tinymoe("doctor", "run", cwd=tmp_path)
    assert_ok(result)
    assert "note: cannot read the model config" in result.stdout

"""diagnose(run_dir) on synthetic run directories: each diagnosis with its evidence numbers, a healthy run with
none, a torn last metrics line skipped with a note."""
import json

import pytest

from tinymoe.models import TransformerConfig
from tinymoe.train.checkpoint import save_checkpoint
from tinymoe.train.doctor import diagnose, machine_memory_bytes, read_checkpoint_meta
from tinymoe.train.estimate import estimate

PLENTY = 64 * 2 ** 30
BALANCED = [[1000, 1010, 990, 1000], [1005, 995, 1000, 1000]]


def _model_config(**moe):
    return TransformerConfig(vocab_size=41, moe=dict(dict(d_ff=128, n_experts=4), **moe))


def _run(tmp_path, rows, config=None, train=None, torn=None):
    config = config or _model_config()
    train = dict({"steps": 600, "batch_size": 16, "seq_len": 64, "device": "cpu"}, **(train or {}))
    with open(tmp_path / "metrics.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        if torn:
            handle.write(torn)
    save_checkpoint(tmp_path / "checkpoint.npz", {}, None, {"model_config": config.to_dict(), "train_config": train,
                                                           "step": rows[-1]["step"] if rows else 0})
    (tmp_path / "summary.json").write_text(json.dumps({"val_loss": rows[-1]["val_loss"] if rows else 0.0,
                                                       "improvement_over_unigram": 0.5}))
    return tmp_path


def _row(step, train, val, loads=None, dropped=(0.0, 0.0)):
    return {"step": step, "train_loss": train, "val_loss": val, "tokens_per_expert": loads or BALANCED,
            "dropped_fraction": list(dropped), "aux_loss": 1.0}


def _healthy_rows():
    return [_row(50 * i, 3.0 - 0.2 * i, 3.1 - 0.2 * i) for i in range(1, 7)]


def test_a_healthy_run_gets_no_diagnosis_and_its_key_numbers(tmp_path):
    report = diagnose(_run(tmp_path, _healthy_rows()), memory_bytes=PLENTY)
    assert report.healthy and report.findings == []
    assert "no problems found" in report.to_text()
    assert report.numbers["best_val_loss"] == pytest.approx(1.9) and report.numbers["last_step"] == 300
    assert report.numbers["max_over_mean_load"] == pytest.approx(1010 / 1000)
    assert report.numbers["total_parameters"] == 236_928  # what `tinymoe train` prints for this model
    assert json.loads(json.dumps(report.to_dict()))["healthy"] is True


def test_overfitting_with_the_step_range_and_rise(tmp_path):
    rows = [_row(100, 2.0, 2.10), _row(200, 1.8, 2.00), _row(300, 1.6, 2.03), _row(400, 1.4, 2.08)]
    report = diagnose(_run(tmp_path, rows), memory_bytes=PLENTY)
    (finding,) = report.findings
    assert finding.kind == "overfitting"
    assert finding.evidence["best_step"] == 200 and finding.evidence["last_step"] == 400
    assert finding.evidence["val_rise"] == pytest.approx(2.08 / 2.00 - 1, abs=1e-4)
    assert finding.evidence["evals_since_best"] == 2
    assert "--dropout 0.1" in finding.next_command and finding.next_command.startswith("tinymoe train")
    assert any("--steps 200" in alternative for alternative in finding.alternatives)


@pytest.mark.parametrize("rows", [
    [_row(100, 2.0, 2.10), _row(200, 1.8, 2.00), _row(300, 1.6, 2.03)],                     # one eval after the min
    [_row(100, 2.0, 2.10), _row(200, 1.8, 2.00), _row(300, 1.6, 2.01), _row(400, 1.4, 2.03)],  # +1.5% only
    [_row(100, 2.0, 2.10), _row(200, 1.8, 2.00), _row(300, 1.9, 2.05), _row(400, 1.85, 2.08)],  # train not falling
])
def test_no_overfitting_below_the_thresholds(tmp_path, rows):
    assert diagnose(_run(tmp_path, rows), memory_bytes=PLENTY).findings == []


def test_routing_collapse_names_the_layer_ratio_and_starved_expert(tmp_path):
    collapsed = [[3600, 300, 30, 70], [1005, 995, 1000, 1000]]  # mean 1000: max/mean 3.6; expert 2 has 0.75%
    rows = _healthy_rows()[:-1] + [_row(300, 1.8, 1.9, loads=collapsed)]
    report = diagnose(_run(tmp_path, rows), memory_bytes=PLENTY)
    (finding,) = report.findings
    assert finding.kind == "routing_collapse" and finding.evidence["steps"] == [250, 300]
    (layer,) = finding.evidence["layers"]
    assert layer["layer"] == 0 and layer["max_over_mean"] == pytest.approx(3.6)
    assert layer["starved_experts"] == [2] and layer["min_share"] == pytest.approx(30 / 4000)
    assert "--aux-coef 0.03" in finding.next_command and "--jitter 0.01" in finding.next_command
    assert any("--router sigmoid --bias-update-rate 0.001" in a for a in finding.alternatives)
    assert any("router entropy is not recorded" in note for note in report.notes)


def test_a_starved_expert_alone_is_a_collapse_and_entropy_is_evidence(tmp_path):
    loads = [[1300, 1300, 1380, 20], BALANCED[1]]  # max/mean 1.38, but expert 3 has 0.5%
    rows = [dict(_row(100, 2.0, 2.1), router_entropy=[1.38, 1.38]),
            dict(_row(200, 1.8, 1.9, loads=loads), router_entropy=[0.9, 1.3])]
    (finding,) = diagnose(_run(tmp_path, rows), memory_bytes=PLENTY).findings
    assert finding.evidence["layers"][0]["starved_experts"] == [3]
    assert finding.evidence["router_entropy"]["first"] == pytest.approx(1.38)
    assert finding.evidence["router_entropy"]["last"] == pytest.approx(1.1)
    assert finding.evidence["router_entropy"]["falling"] is False  # fell 0.28 < 0.25·ln 4 = 0.35


def test_dropped_tokens_suggest_a_capacity_that_holds_them(tmp_path):
    rows = _healthy_rows()[:-1] + [_row(300, 1.8, 1.9, dropped=(0.02, 0.12))]
    report = diagnose(_run(tmp_path, rows, config=_model_config(capacity_factor=1.0)), memory_bytes=PLENTY)
    (finding,) = report.findings
    assert finding.kind == "dropped_tokens" and finding.evidence["worst"] == pytest.approx(0.12)
    assert finding.evidence["steps"] == [250, 300] and finding.evidence["capacity_factor"] == 1.0
    assert "--capacity-factor 1.25" in finding.next_command  # ceil(4 · 1/(1 − 0.12)) / 4
    assert "--capacity-factor" not in finding.alternatives[0]  # dropless


def test_memory_against_an_injected_machine_suggests_what_fits(tmp_path):
    config = _model_config()
    needed = estimate(config, 16, 64).training_bytes
    memory = int(estimate(config, 5, 64).training_bytes / 0.8) + 1  # batch 5 fits in 80%, batch 6 does not
    report = diagnose(_run(tmp_path, _healthy_rows(), config=config), memory_bytes=memory)
    (finding,) = report.findings
    assert finding.kind == "memory" and finding.evidence["training_bytes"] == needed
    assert finding.evidence["fitting_batch_size"] == 5
    assert finding.next_command.endswith("--batch-size 5")
    assert finding.evidence["memory_bytes"] == memory


def test_a_torn_last_line_is_skipped_with_a_note(tmp_path):
    rows = _healthy_rows()
    report = diagnose(_run(tmp_path, rows, torn='{"step": 350, "train_loss": 1.'), memory_bytes=PLENTY)
    assert report.healthy and report.numbers["last_step"] == 300
    assert any("torn last line" in note for note in report.notes)


def test_checkpoint_meta_is_read_without_weights(tmp_path):
    path = _run(tmp_path, _healthy_rows()) / "checkpoint.npz"
    assert read_checkpoint_meta(path)["train_config"]["batch_size"] == 16


def test_flat_model_config_of_earlier_releases(tmp_path):
    rows = _healthy_rows()[:-1] + [_row(300, 1.8, 1.9, dropped=(0.0, 0.2))]
    run = _run(tmp_path, rows)
    flat = {"vocab_size": 41, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, "d_ff": 128,
            "n_experts": 4, "top_k": 2, "router": "softmax", "capacity_factor": 1.0}
    save_checkpoint(run / "checkpoint.npz", {}, None, {"model_config": flat, "train_config": {"batch_size": 16}})
    (finding,) = diagnose(run, memory_bytes=PLENTY).findings
    assert finding.kind == "dropped_tokens" and finding.evidence["capacity_factor"] == 1.0


def test_bad_run_dirs_are_named(tmp_path):
    with pytest.raises(ValueError, match="run_dir="):
        diagnose(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds none of"):
        diagnose(tmp_path)
    with pytest.raises(ValueError, match="memory_bytes"):
        diagnose(_run(tmp_path, _healthy_rows()), memory_bytes=0)


def test_machine_memory_reads_memtotal(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree: 10 kB\nMemTotal:       2048 kB\n")
    assert machine_memory_bytes(meminfo) == 2048 * 1024
    assert machine_memory_bytes(tmp_path / "none") is None

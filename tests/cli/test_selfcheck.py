"""The cases behind `tinymoe gradcheck` build the same thing every time they are built (run_all may run many
times in one process): the MoE cases must not consume their options."""
import numpy as np
import pytest

from tinymoe.selfcheck import CASES

MOE_CASES = [name for name in CASES if name.startswith("MoE")]


@pytest.mark.parametrize("name", MOE_CASES)
def test_building_a_case_twice_gives_the_same_function_and_inputs(name):
    outputs = []
    for _ in range(2):
        fn, inputs = CASES[name](np.random.default_rng(0), "cpu")[:2]
        outputs.append([np.asarray(value.numpy()) for value in fn(*inputs)])
    for first, second in zip(*outputs):
        np.testing.assert_array_equal(first, second)



def _on_a_boundary(generator, device):
    """x² at x = (0.3, 1.0, -2.0) with the decision "x > 0.3": x[0] + eps flips it, nothing else does."""
    from tinymoe.engine.backend import to_numpy
    from tinymoe.engine.tensor import tensor

    x = tensor(np.array([0.3, 1.0, -2.0]), requires_grad=True, dtype="float64", device=device)
    return (lambda x: x * x), [x], (lambda x: (to_numpy(x.data) > 0.3).tobytes())


def test_run_all_counts_the_perturbations_a_decision_flip_excluded(monkeypatch):
    import tinymoe.selfcheck as selfcheck

    monkeypatch.setattr(selfcheck, "CASES", {"boundary": _on_a_boundary, "MoE softmax top-2": CASES["MoE softmax top-2"]})
    boundary, moe = selfcheck.run_all()
    assert boundary.passed and boundary.detail == "1 perturbations excluded (routing flipped)"
    assert len(boundary.report.excluded) == 1 and boundary.report.excluded[0].input == 0
    assert moe.passed and moe.detail == f"{len(moe.report.excluded)} perturbations excluded (routing flipped)"


@pytest.mark.parametrize("name", MOE_CASES)
def test_every_moe_case_passes_with_its_routing_as_discrete_state(monkeypatch, name):
    import tinymoe.selfcheck as selfcheck

    assert len(CASES[name](np.random.default_rng(0), "cpu")) == 3  # (fn, inputs, discrete)
    monkeypatch.setattr(selfcheck, "CASES", {name: CASES[name]})
    (result,) = selfcheck.run_all()
    assert result.passed, result.detail
    assert result.detail.endswith("perturbations excluded (routing flipped)")

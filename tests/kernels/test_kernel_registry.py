"""The kernel registry: choosing an implementation (TINYMOE_KERNELS, `use`), its errors, a missing Numba, and
the public dispatch ops (values, gradients, gradcheck) under every implementation."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinymoe as tm
from tinymoe import kernels
from tinymoe.engine.backend import BackendUnavailableError, cuda_available, module_for_device, numba_available
from tinymoe.functional import combine_rows, gather_rows, routing_plan

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, **environment) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **environment}
    env.pop("TINYMOE_KERNELS", None) if "TINYMOE_KERNELS" not in environment else None
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


# ----- choosing an implementation --------------------------------------------------------------------------
@pytest.mark.parametrize("value, current", [("numpy", "numpy"), (" NUMBA ", "numba"), ("auto", "auto"), ("", "auto")])
def test_environment_variable_sets_the_choice(value, current):
    result = run_python("import tinymoe.kernels as k; print(k.current(), k.chosen('cpu'))", TINYMOE_KERNELS=value)
    assert result.returncode == 0, result.stderr
    fastest = "numba" if numba_available() else "numpy"
    assert result.stdout.split() == [current, fastest if current == "auto" else current]


def test_environment_variable_with_an_unknown_name_fails_at_first_use_not_at_import():
    code = ("import numpy as np, tinymoe as tm\n"
            "from tinymoe import kernels\n"
            "print('problem:', kernels.environment_problem())\n"
            "with kernels.use('numpy'):\n"
            "    print('forced:', kernels.current())\n"
            "try:\n"
            "    tm.functional.gather_rows(tm.tensor(np.ones((3, 2))), np.array([0]))\n"
            "except ValueError as error:\n"
            "    print('ValueError:', error)\n")
    result = run_python(code, TINYMOE_KERNELS="fastest")
    assert result.returncode == 0, result.stderr
    problem, forced, error = result.stdout.splitlines()
    assert problem.startswith("problem: TINYMOE_KERNELS='fastest'") and "numba" in problem and "auto" in problem
    assert forced == "forced: numpy"  # an explicit choice does not need the environment
    assert error.startswith("ValueError: TINYMOE_KERNELS='fastest'") and "expected one of" in error


def test_environment_problem_is_none_when_the_variable_is_fine():
    result = run_python("import tinymoe.kernels as k; print(k.environment_problem())", TINYMOE_KERNELS="numpy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"


def test_environment_cupy_on_cpu_data_names_both_devices():
    code = ("import numpy as np, tinymoe as tm\n"
            "from tinymoe.functional import gather_rows\n"
            "try:\n"
            "    gather_rows(tm.tensor(np.ones((3, 2))), np.array([0, 2]))\n"
            "except ValueError as error:\n"
            "    print('ValueError:', error)\n")
    result = run_python(code, TINYMOE_KERNELS="cupy")
    assert result.returncode == 0, result.stderr
    assert "ValueError:" in result.stdout and "'cuda'" in result.stdout and "'cpu'" in result.stdout


def test_use_as_context_manager_restores_the_previous_choice():
    before = kernels.current()
    with kernels.use("numpy") as choice:
        assert isinstance(choice, kernels.use)
        assert kernels.current() == "numpy" and kernels.chosen("cpu") == "numpy"
        with kernels.use("auto"):
            assert kernels.current() == "auto"
        assert kernels.current() == "numpy"
    assert kernels.current() == before


def test_use_as_context_manager_restores_after_an_error():
    before = kernels.current()
    with pytest.raises(RuntimeError):
        with kernels.use("numpy"):
            raise RuntimeError("inside")
    assert kernels.current() == before


def test_use_as_a_plain_call_lasts():
    before = kernels.current()
    try:
        kernels.use("numpy")
        assert kernels.current() == "numpy"
        x = np.ones((2, 3))
        assert kernels.kernel("gather_rows", x).__module__ == "tinymoe.kernels.reference"
    finally:
        kernels.use(before)
    assert kernels.current() == before


def test_unknown_names_are_errors():
    before = kernels.current()
    with pytest.raises(ValueError, match="'turbo' is unknown"):
        kernels.use("turbo")
    assert kernels.current() == before
    with pytest.raises(ValueError, match="unknown dispatch primitive"):
        kernels.kernel("gather_columns", np.ones(2))


def test_cupy_on_cpu_data_is_a_clear_error():
    x = np.ones((3, 2))
    with pytest.raises(ValueError, match="runs on 'cuda' arrays, but the data is on 'cpu'"):
        kernels.implementation(x, "cupy")
    if cuda_available():
        with kernels.use("cupy"), pytest.raises(ValueError, match="data is on 'cpu'"):
            gather_rows(tm.tensor(x), np.array([0]))
    else:
        with pytest.raises(BackendUnavailableError, match="pip install"):
            kernels.use("cupy")
        assert "cupy" not in kernels.available("cpu") and kernels.available("cuda") == ["numpy"]


@pytest.mark.skipif(not numba_available(), reason="needs numba")
def test_numba_runs_by_default_on_the_cpu():
    assert kernels.available("cpu") == ["numpy", "numba"]
    with kernels.use("auto"):
        assert kernels.kernel("combine_rows", np.ones((2, 2))).__module__ == "tinymoe.kernels.numba_cpu"


def test_missing_numba_falls_back_and_forcing_it_says_what_to_install():
    code = ("import sys\n"
            "sys.modules['numba'] = None  # `import numba` now raises ImportError\n"
            "import numpy as np, tinymoe as tm\n"
            "from tinymoe import kernels\n"
            "from tinymoe.functional import gather_rows\n"
            "print(kernels.available('cpu'), kernels.chosen('cpu'))\n"
            "print(gather_rows(tm.tensor(np.arange(6.0).reshape(3, 2)), np.array([2, 0])).numpy().ravel().tolist())\n"
            "try:\n"
            "    kernels.use('numba')\n"
            "except tm.BackendUnavailableError as error:\n"
            "    print('BackendUnavailableError:', error)\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "['numpy'] numpy"
    assert lines[1] == "[4.0, 5.0, 0.0, 1.0]"
    assert lines[2].startswith("BackendUnavailableError:") and "pip install" in lines[2]


def test_missing_numba_forced_by_the_environment_fails_at_the_first_call():
    code = ("import sys\n"
            "sys.modules['numba'] = None\n"
            "import numpy as np, tinymoe as tm\n"
            "from tinymoe.functional import gather_rows\n"
            "try:\n"
            "    gather_rows(tm.tensor(np.ones((3, 2))), np.array([0]))\n"
            "except tm.BackendUnavailableError as error:\n"
            "    print('BackendUnavailableError:', error)\n")
    result = run_python(code, TINYMOE_KERNELS="numba")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("BackendUnavailableError:") and "pip install" in result.stdout


# ----- the public dispatch ops under every implementation -------------------------------------------------
def dispatch_problem(device, n_tokens=13, d_model=5, n_experts=4, top_k=2, capacity=None, seed=0):
    rng = np.random.default_rng(seed)
    xp = module_for_device(device)
    expert_ids = xp.asarray(np.argsort(rng.random((n_tokens, n_experts)), axis=1)[:, :top_k])
    with kernels.use("numpy"):
        plan = routing_plan(expert_ids, n_experts, capacity)
    x = rng.standard_normal((n_tokens, d_model))
    weights = rng.random((n_tokens, top_k))
    return plan, expert_ids, x, weights


def leaf(array, device):
    return tm.tensor(np.asarray(array), requires_grad=True, dtype="float64", device=device)


def forward_and_backward(device, plan, x, weights, use_inverse):
    """Outputs and gradients of gather → combine, the dispatch of one MoE layer with identity experts."""
    x_t, w_t = leaf(x, device), leaf(weights, device)
    rows = gather_rows(x_t, plan.row_token, token_rows=plan.assignment_row if use_inverse else None)
    y = rows * rows  # a nonlinearity between the two, so dy depends on the rows
    out = combine_rows(y, plan.assignment_row, w_t, row_assignment=plan.row_assignment if use_inverse else None)
    cotangent = out.xp.asarray(np.random.default_rng(1).standard_normal(out.shape))
    out.backward(cotangent)
    return [tm.engine.backend.to_numpy(a) for a in (rows.data, out.data, x_t.grad, w_t.grad)]


@pytest.mark.parametrize("capacity", [None, 3])
@pytest.mark.parametrize("use_inverse", [False, True], ids=["scatter", "inverse"])
def test_dispatch_gives_the_same_results_under_every_implementation(device, capacity, use_inverse):
    plan, expert_ids, x, weights = dispatch_problem(device, capacity=capacity)
    with kernels.use("numpy"):
        expected = forward_and_backward(device, plan, x, weights, use_inverse)
    for name in kernels.available(device):
        with kernels.use(name):
            got_plan = routing_plan(expert_ids, 4, capacity)
            np.testing.assert_array_equal(tm.engine.backend.to_numpy(got_plan.assignment_row),
                                          tm.engine.backend.to_numpy(plan.assignment_row))
            got = forward_and_backward(device, plan, x, weights, use_inverse)
        for what, a, b in zip(("rows", "out", "dx", "dw"), got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=f"{name}: {what}")


@pytest.mark.parametrize("capacity", [None, 2])
@pytest.mark.parametrize("use_inverse", [False, True], ids=["scatter", "inverse"])
def test_gradcheck_gather_and_combine_under_every_implementation(device, capacity, use_inverse):
    plan, _, x, weights = dispatch_problem(device, n_tokens=7, d_model=3, capacity=capacity, seed=2)
    y = np.random.default_rng(3).standard_normal((plan.n_rows, 3))
    for name in kernels.available(device):
        with kernels.use(name):
            x_t, y_t, w_t = leaf(x, device), leaf(y, device), leaf(weights, device)
            token_rows = plan.assignment_row if use_inverse else None
            row_assignment = plan.row_assignment if use_inverse else None
            assert tm.gradcheck(lambda x_: gather_rows(x_, plan.row_token, token_rows=token_rows), [x_t])
            assert tm.gradcheck(lambda y_, w_: combine_rows(y_, plan.assignment_row, w_, row_assignment=row_assignment),
                                [y_t, w_t])
            assert tm.gradcheck(lambda y_: combine_rows(y_, plan.assignment_row, None, row_assignment=row_assignment),
                                [y_t])

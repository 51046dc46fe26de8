"""swiglu_backward in place (out=(a, b), h_out=grad_h: what the experts' backward does on the last use of its
saved [a | b]): the same values as into separate outputs, against the float64 formula; any other overlap of an
output with an input is refused, naming both."""
import numpy as np
import pytest

from tinymoe import kernels
from tinymoe.kernels import reference

needs_numba = pytest.mark.skipif(not kernels.is_available("numba", "cpu"), reason="needs numba")


SPECIAL_GATES = [0.0, -0.0, 87.0, -87.0, 88.0, -88.0, 100.0, -100.0, 1e-30, -1e-30, 3e38, -3e38]


def _problem(n_rows, width, dtype, seed=0):
    rng = np.random.default_rng(seed)
    gate_up = (4 * rng.standard_normal((n_rows, 2 * width))).astype(dtype)  # gates far into both tails
    specials = np.resize(np.array(SPECIAL_GATES, dtype), width)
    gate_up[0, :width] = specials  # the first row's gates: zeros of both signs, σ's clamp, huge values
    return gate_up, rng.standard_normal((n_rows, width)).astype(dtype)


def _bits(array):
    return array.view(np.uint32 if array.dtype == np.float32 else np.uint64)


def _formula(gate_up, grad_h):
    """(da, db, h) by the formula, in float64."""
    width = grad_h.shape[1]
    a, b, g = (np.asarray(v, np.float64) for v in (gate_up[:, :width], gate_up[:, width:], grad_h))
    sigma = 1 / (1 + np.exp(-a))
    return g * b * sigma * (1 + a * (1 - sigma)), g * a * sigma, a * sigma * b


def _in_place(implementation, gate_up, grad_h):
    width = grad_h.shape[1]
    gate_up, grad_h = gate_up.copy(), grad_h.copy()
    gate, up = gate_up[:, :width], gate_up[:, width:]
    returned = implementation.swiglu_backward(gate, up, grad_h, out=(gate, up), h_out=grad_h)
    for got, target in zip(returned, (gate, up, grad_h)):
        assert np.shares_memory(got, target)
    return gate_up[:, :width], gate_up[:, width:], grad_h


@needs_numba
@pytest.mark.parametrize("dtype, tolerance", [("float32", 2e-6), ("float64", 1e-13)])
@pytest.mark.parametrize("n_rows, width", [(1, 1), (7, 5), (40, 33), (600, 1024)])  # the last: over the pool
def test_numba_in_place_gives_the_bits_of_separate_outputs_and_the_formula(dtype, tolerance, n_rows, width):
    from tinymoe.kernels import numba_cpu
    gate_up, grad_h = _problem(n_rows, width, dtype, seed=n_rows + width)
    separate = numba_cpu.swiglu_backward(gate_up[:, :width], gate_up[:, width:], grad_h)
    in_place = _in_place(numba_cpu, gate_up, grad_h)
    with np.errstate(over="ignore", invalid="ignore"):
        oracle = _formula(gate_up, grad_h)
    finite = np.isfinite(gate_up[:, :width]) & (np.abs(gate_up[:, :width]) < 1e30)
    for got, want, expected in zip(in_place, separate, oracle):
        np.testing.assert_array_equal(_bits(np.ascontiguousarray(got)), _bits(np.ascontiguousarray(want)))
        np.testing.assert_allclose(got[finite], expected[finite], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reference_in_place_matches_the_formula(dtype):
    gate_up, grad_h = _problem(9, 6, dtype)
    for got, oracle in zip(_in_place(reference, gate_up, grad_h), _formula(gate_up, grad_h)):
        np.testing.assert_allclose(got, oracle, rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-6)


@needs_numba
def test_numba_refuses_outputs_that_overlap_inputs_other_than_all_in_place():
    from tinymoe.kernels import numba_cpu
    gate_up, grad_h = _problem(4, 3, "float32")
    before = gate_up.copy(), grad_h.copy()
    a, b = gate_up[:, :3], gate_up[:, 3:]
    fresh = np.empty((4, 3), np.float32), np.empty((4, 3), np.float32)
    shifted = np.lib.stride_tricks.as_strided(gate_up[:, 1:], shape=(4, 3), strides=gate_up.strides)
    cases = [
        (dict(out=(a, b)), "out da shares memory with a; outputs must be apart from the inputs"),  # h not
        (dict(out=fresh, h_out=grad_h), "h_out shares memory with grad_h; outputs must be apart"),  # da/db not
        (dict(out=(b, a), h_out=grad_h), "out da shares memory with b; outputs must be apart"),  # swapped
        (dict(out=(shifted, fresh[1]), h_out=fresh[0]), "out da shares memory with a; outputs"),  # a column over
        (dict(out=fresh, h_out=fresh[0]), "out da and h_out share memory; outputs must be apart from each other"),
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            numba_cpu.swiglu_backward(a, b, grad_h, **arguments)
    overlapping_grad = gate_up[:, 1:4]  # grad_h over a and b: in place would overwrite what it has yet to read
    with pytest.raises(ValueError, match="a and grad_h share memory; inputs computed in place must be apart"):
        numba_cpu.swiglu_backward(a, b, overlapping_grad, out=(a, b), h_out=overlapping_grad)
    np.testing.assert_array_equal(gate_up, before[0])  # refused before anything was written
    np.testing.assert_array_equal(grad_h, before[1])

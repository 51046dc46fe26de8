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
        fn, inputs = CASES[name](np.random.default_rng(0), "cpu")
        outputs.append([np.asarray(value.numpy()) for value in fn(*inputs)])
    for first, second in zip(*outputs):
        np.testing.assert_array_equal(first, second)


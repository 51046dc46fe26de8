"""Non-finite values are caught where they appear, naming the layer: an MoE whose experts overflow or whose
weights hold NaN, a dense SwiGLU block, the router's bias, weights entering through load_state_dict or
assignment; and `set_finite_checks(False)` / `with finite_checks(False)` turn the per-forward checks off."""
import threading
import warnings

import numpy as np
import pytest

import tinymoe as tm
from helpers import host
from moe_helpers import fast_kernels, inputs, layer, set_parameter
from tinymoe.engine.checks import all_finite, check_finite
from tinymoe.nn import SwiGLU

# The kernels warn about the NaN and inf these tests plant; the layer's FloatingPointError is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BAD_VALUES = [pytest.param(np.nan, id="nan"), pytest.param(np.inf, id="inf"), pytest.param(-np.inf, id="-inf")]


def float32_layer(device="cpu", **options):
    return layer(dtype="float32", device=device, name="layers.1.moe", **options)


# ----- the reduction itself ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_all_finite_sees_one_bad_entry_anywhere(bad, dtype):
    for position in [0, 17, 4095]:
        values = np.ones(4096, dtype=dtype)
        values[position] = bad
        assert not all_finite(values)
    assert all_finite(np.ones(4096, dtype=dtype))


def test_all_finite_does_not_flag_finite_values_whose_sum_overflows():
    huge = np.full(8, np.finfo(np.float32).max, dtype=np.float32)  # the sum is inf, every entry finite
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no RuntimeWarning leaks from the overflowing sum
        assert all_finite(huge)


# ----- MoE and SwiGLU outputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["softmax", "noisy", "sigmoid", "expert_choice"])
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_non_finite_expert_weights_raise_naming_the_layer(router, bad, device):
    moe = float32_layer(device, router=router)
    weight = host(moe.experts.w2).copy()
    weight[:, 0, 0] = bad  # every expert: whichever is chosen, its output is not finite
    set_parameter(moe.experts.w2, weight)
    with fast_kernels(device), pytest.raises(FloatingPointError,
                                             match=r"MoE 'layers\.1\.moe': expert output is not finite"):
        moe(inputs((8, 6), dtype="float32", device=device))


def test_experts_overflowing_float32_raise_instead_of_returning_inf(device):
    """x ~ 1e30: the router logits stay finite (1e30 · |w| ≲ 1e31) but w1·x · w3·x ~ 1e60 overflows float32."""
    moe = float32_layer(device)
    set_parameter(moe.router.weight, np.zeros((4, 6)))  # keep the logits finite whatever the scale of x
    with fast_kernels(device), pytest.raises(FloatingPointError, match=r"'layers\.1\.moe': expert output"):
        moe(inputs((8, 6), dtype="float32", device=device, scale=1e30))


def test_non_finite_shared_expert_is_named_too(device):
    moe = float32_layer(device, n_shared_experts=1)
    weight = host(moe.shared.w1).copy()
    weight[0, 0] = np.nan
    set_parameter(moe.shared.w1, weight)
    with fast_kernels(device), pytest.raises(FloatingPointError, match=r"'layers\.1\.moe\.shared': output"):
        moe(inputs((8, 6), dtype="float32", device=device))


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_dense_swiglu_names_itself(bad, device):
    block = SwiGLU(6, 5, dtype="float32", device=device, generator=0, name="blocks.0.ffn")
    weight = host(block.w2).copy()
    weight[1, 2] = bad
    set_parameter(block.w2, weight)
    with pytest.raises(FloatingPointError, match=r"SwiGLU 'blocks\.0\.ffn': output is not finite"):
        block(inputs((4, 6), dtype="float32", device=device))


def test_non_finite_input_is_caught_at_the_router_logits(device):
    x = host(inputs((8, 6), dtype="float32")).copy()
    x[3, 2] = np.nan
    with pytest.raises(FloatingPointError, match=r"MoE 'layers\.1\.moe': router logits are not finite"):
        float32_layer(device)(tm.tensor(x, device=device))


# ----- the switch --------------------------------------------------------------------------------------------
def nan_layer():
    moe = float32_layer()
    set_parameter(moe.experts.w2, np.full(moe.experts.w2.shape, np.nan))
    return moe


def test_finite_checks_can_be_turned_off_in_a_block_and_come_back():
    moe, x = nan_layer(), inputs((8, 6), dtype="float32")
    assert tm.finite_checks_enabled()
    with tm.finite_checks(False), np.errstate(invalid="ignore"):
        assert not tm.finite_checks_enabled()
        assert np.isnan(host(moe(x))).all()  # propagates silently, as asked
    assert tm.finite_checks_enabled()
    with pytest.raises(FloatingPointError):
        moe(x)


def test_set_finite_checks_changes_the_current_context_only():
    seen = []
    try:
        tm.set_finite_checks(False)
        assert not tm.finite_checks_enabled()
        thread = threading.Thread(target=lambda: seen.append(tm.finite_checks_enabled()))
        thread.start()
        thread.join()
    finally:
        tm.set_finite_checks(True)
    assert seen == [True]  # another thread keeps its own (default) setting
    assert tm.finite_checks_enabled()


@pytest.mark.parametrize("value", ["no", 0, 1, None, "False"])
def test_the_switch_takes_bools_only(value):
    with pytest.raises(TypeError, match=rf"set_finite_checks: enabled={value!r} must be a bool"):
        tm.set_finite_checks(value)
    with pytest.raises(TypeError, match=rf"finite_checks: enabled={value!r} must be a bool"):
        with tm.finite_checks(value):
            pass


def test_check_finite_builds_its_message_only_on_failure():
    check_finite(np.ones(3), lambda: pytest.fail("message built for finite data"))
    with pytest.raises(FloatingPointError, match="^where$"):
        check_finite(np.array([1.0, np.nan]), lambda: "where")


def test_finite_outputs_are_unchanged_by_the_checks(device):
    moe, x = float32_layer(device, n_shared_experts=1), inputs((16, 6), dtype="float32", device=device)
    with fast_kernels(device):
        checked = host(moe(x))
        with tm.finite_checks(False):
            unchecked = host(moe(x))
    np.testing.assert_array_equal(checked, unchecked)


# ----- weights entering the model ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("key", ["experts.w1", "router.weight", "experts.w2"])
def test_load_state_dict_refuses_non_finite_weights_naming_the_key(key, bad):
    moe = float32_layer()
    state = moe.state_dict()
    before = {name: value.copy() for name, value in state.items()}
    state[key] = state[key].copy()
    state[key].reshape(-1)[3] = bad
    with pytest.raises(FloatingPointError, match=rf"load_state_dict: '{key}' holds 1 NaN or inf value"):
        moe.load_state_dict(state)
    for name, value in moe.state_dict().items():  # nothing changed
        np.testing.assert_array_equal(value, before[name])


def test_load_state_dict_refuses_a_nan_router_bias():
    moe = float32_layer(router="sigmoid")
    state = moe.state_dict()
    state["router.bias"] = np.array([0.0, np.nan, 0.0, 0.0], dtype=np.float32)
    with pytest.raises(FloatingPointError, match=r"'router\.bias' holds 1 NaN"):
        moe.load_state_dict(state)


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_assigning_a_non_finite_parameter_names_the_attribute(bad):
    moe = float32_layer()
    values = np.ones(moe.experts.w1.shape, dtype=np.float32)
    values[0, 0, 0] = bad
    with pytest.raises(FloatingPointError, match=r"Experts: w1 holds 1 NaN or inf value"):
        moe.experts.w1 = tm.nn.Parameter(values)


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_a_non_finite_router_bias_never_routes_silently(bad, device):
    moe = float32_layer(device, router="sigmoid")
    bias = np.zeros(4, dtype=np.float32)
    bias[2] = bad
    if np.isnan(bad):  # assignment refuses NaN (±inf may sit in buffers, such as masks)
        with pytest.raises(FloatingPointError, match=r"Router: bias holds 1 NaN"):
            moe.router.bias = moe.router.weight.xp.asarray(bias)
    moe.router._buffers["bias"] = moe.router.weight.xp.asarray(bias)  # as an in-place write would leave it
    with fast_kernels(device), pytest.raises(FloatingPointError, match=r"'layers\.1\.moe': the sigmoid router's bias"):
        moe(inputs((8, 6), dtype="float32", device=device))

"""load_mixtral's input checks: a state dict that is not a mapping, arrays of strings or objects, NaN or
infinite weights, and Qwen2-MoE's shared-expert gate (not a router) - each a clear error naming the argument
or key, raised before the layer changes; and a loaded layer never holds a read-only memory-mapped array."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.io import load_mixtral, save_safetensors
from tinymoe.io.mixtral import mixtral_arrays

D_MODEL, D_FF, N_EXPERTS = 4, 6, 3
PREFIX = "model.layers.0.mlp."


def layer():
    return tm.nn.MoE(D_MODEL, D_FF, N_EXPERTS, top_k=2, dtype="float64", seed=1)


def weights(prefix="", seed=0):
    generator = np.random.default_rng(seed)
    state = {prefix + "gate.weight": generator.standard_normal((N_EXPERTS, D_MODEL))}
    for expert in range(N_EXPERTS):
        state[f"{prefix}experts.{expert}.w1.weight"] = generator.standard_normal((D_FF, D_MODEL))
        state[f"{prefix}experts.{expert}.w3.weight"] = generator.standard_normal((D_FF, D_MODEL))
        state[f"{prefix}experts.{expert}.w2.weight"] = generator.standard_normal((D_MODEL, D_FF))
    return state


def snapshot(moe):
    return [parameter.numpy().copy() for parameter in moe.parameters()]


@pytest.mark.parametrize("state_dict", [None, [("gate.weight", np.zeros((3, 4)))], "model.safetensors", 3],
                         ids=["None", "list", "str", "int"])
def test_a_state_dict_that_is_not_a_mapping_is_a_type_error_naming_it(state_dict):
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_mixtral(layer(), state_dict)


def test_keys_that_are_not_strings_and_a_prefix_that_is_not_one():
    with pytest.raises(TypeError, match="keys must be strings"):
        load_mixtral(layer(), {0: np.zeros(3)})
    with pytest.raises(TypeError, match="prefix=7"):
        load_mixtral(layer(), weights(), prefix=7)


BAD_ARRAYS = {
    "strings": (lambda shape: np.full(shape, "0.5"), TypeError, r"holds <U3 values"),
    "objects": (lambda shape: np.empty(shape, dtype=object), TypeError, r"holds object values"),
    "nan": (lambda shape: np.where(np.arange(np.prod(shape)).reshape(shape) == 2, np.nan, 1.0), FloatingPointError,
            r"holds 1 NaN or infinite value"),
    "inf": (lambda shape: np.full(shape, -np.inf), FloatingPointError, r"holds \d+ NaN or infinite"),
}


@pytest.mark.parametrize("key", ["gate.weight", "experts.1.w3.weight", "experts.2.w2.weight"])
@pytest.mark.parametrize("kind", BAD_ARRAYS)
def test_bad_values_raise_naming_the_key_and_change_nothing(key, kind):
    make, error, words = BAD_ARRAYS[kind]
    state = weights(PREFIX)
    state[PREFIX + key] = make(state[PREFIX + key].shape)
    moe = layer()
    before = snapshot(moe)
    with pytest.raises(error, match=rf"{PREFIX + key} {words}"):
        load_mixtral(moe, state)
    for old, parameter in zip(before, moe.parameters()):
        np.testing.assert_array_equal(parameter.numpy(), old)


def test_the_shared_expert_gate_of_qwen2_moe_is_not_a_router():
    state = weights(PREFIX)
    state["model.layers.0.mlp.shared_expert_gate.weight"] = np.zeros((1, D_MODEL))
    state["model.layers.0.mlp.shared_expert.gate_proj.weight"] = np.zeros((D_FF, D_MODEL))
    own = {key: value for key, value in state.items() if "shared_expert" not in key}
    # the prefix found is the block's only; the shared-expert keys are then named as unexpected in that block
    with pytest.raises(KeyError, match=r"unexpected keys \['model.layers.0.mlp.shared_expert_gate.weight'"):
        load_mixtral(layer(), state)
    arrays = mixtral_arrays(layer(), {**own, "model.layers.0.shared_expert_gate.weight": np.zeros((1, D_MODEL))})
    np.testing.assert_array_equal(arrays["router.weight"], own[PREFIX + "gate.weight"])


def test_two_true_routers_still_ask_for_a_prefix():
    state = {**weights("model.layers.0.mlp."), **weights("model.layers.1.mlp.")}
    with pytest.raises(ValueError, match=r"several layers .*'model.layers.0.mlp.', 'model.layers.1.mlp.'"):
        load_mixtral(layer(), state)
    load_mixtral(layer(), state, prefix="model.layers.1.mlp.")


def test_weights_loaded_from_a_memory_mapped_file_are_private_writable_copies(tmp_path):
    path = tmp_path / "layer.safetensors"
    save_safetensors(weights(PREFIX), path)
    loaded = tm.io.load_safetensors(path)
    assert not loaded[PREFIX + "gate.weight"].flags.writeable
    moe = layer()
    load_mixtral(moe, loaded)
    router = moe.router.weight.numpy()
    assert router.flags.writeable and not np.shares_memory(router, loaded[PREFIX + "gate.weight"])
    np.testing.assert_array_equal(router, weights(PREFIX)[PREFIX + "gate.weight"])

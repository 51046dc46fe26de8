"""tinymoe.nn.Experts keeps w1 and w3 as the two halves of one (E, 2ff, d) array (SwiGLU, NumPy, an expert's
[w1[e]; w3[e]] of 1 MiB or more), so the expert products read it as a view; the layout survives optimizer steps
and is re-made after to(), load_state_dict() and the checkpoint loaders; results are bit for bit those of
separate arrays."""
import numpy as np
import pytest

import moe_reference as ref
import tinymoe as tm
from tinymoe.functional.experts import joint_gate_up
from tinymoe.nn import MoE

D_MODEL, D_FF, N_EXPERTS, TOP_K = 32, 4096, 3, 2  # [w1[e]; w3[e]]: 1 MiB in float32, 2 in float64


def _moe(dtype="float64", **options):
    return MoE(D_MODEL, D_FF, N_EXPERTS, top_k=TOP_K, dtype=dtype, seed=3, **options)


def _joint(moe):
    return joint_gate_up(moe.experts.w1.data, moe.experts.w3.data)


def _step(moe, seed=5):
    x = tm.tensor(np.random.default_rng(seed).standard_normal((40, D_MODEL)), requires_grad=True,
                  dtype=moe.experts.w1.dtype.name)
    moe.zero_grad()
    out = moe(x)
    (out * out).sum().backward()
    return [out.numpy(), x.grad] + [p.grad.copy() for p in (moe.experts.w1, moe.experts.w3, moe.experts.w2)]


def test_a_new_swiglu_layer_keeps_w1_and_w3_as_halves_of_one_array():
    moe = _moe()
    joint = _joint(moe)
    assert joint is not None and joint.shape == (N_EXPERTS, 2 * D_FF, D_MODEL)
    np.testing.assert_array_equal(joint[:, :D_FF], moe.experts.w1.data)
    np.testing.assert_array_equal(joint[:, D_FF:], moe.experts.w3.data)
    assert _joint(_moe(expert_bias=True, activation="swiglu")) is None  # the gated-bias layers keep their own
    assert _joint(MoE(D_MODEL, 8, N_EXPERTS, top_k=TOP_K)) is None  # 2 KiB per expert: copies cost nothing


def test_the_view_gives_the_bits_of_separate_arrays_and_the_reference():
    joined, separate = _moe(), _moe()
    separate.experts.w1.data = separate.experts.w1.data.copy()  # no longer halves of one array: copies per block
    assert _joint(joined) is not None and _joint(separate) is None
    for got, want in zip(_step(joined), _step(separate)):
        np.testing.assert_array_equal(got, want)
    params = {name: p.numpy() for name, p in joined.named_parameters()}
    x = np.random.default_rng(5).standard_normal((40, D_MODEL))
    np.testing.assert_allclose(_step(joined)[0], ref.token_choice(params, x, TOP_K)["y"], rtol=1e-12, atol=1e-12)


def test_the_layout_survives_optimizer_steps_and_is_remade_after_to_and_load_state_dict():
    moe = _moe()
    optimizer = tm.optim.AdamW(moe.parameters(), lr=1e-2)
    before = moe.experts.w3.numpy().copy()
    _step(moe)
    optimizer.step()
    assert _joint(moe) is not None and not np.array_equal(moe.experts.w3.numpy(), before)  # updated in place
    state = moe.state_dict()
    other = _moe()
    other.experts.w1.data = other.experts.w1.data.copy()
    other.load_state_dict(state)
    assert _joint(other) is not None
    for name, parameter in other.named_parameters():
        np.testing.assert_array_equal(parameter.numpy(), state[name])
    other.to(dtype="float32")
    assert _joint(other) is not None and other.experts.w1.dtype == np.float32
    np.testing.assert_array_equal(other.experts.w3.numpy(), state["experts.w3"].astype(np.float32))


def test_from_dense_gives_the_layout_and_to_keeps_it():
    """from_dense broadcasts the dense weights (arrays that are not in C order): the joined array is C order."""
    dense = tm.nn.SwiGLU(D_MODEL, D_FF, dtype="float64", generator=1)
    moe = MoE.from_dense(dense, N_EXPERTS, TOP_K)
    assert _joint(moe) is not None
    for e in range(N_EXPERTS):
        np.testing.assert_array_equal(moe.experts.w1.numpy()[e], dense.w1.numpy())
        np.testing.assert_array_equal(moe.experts.w3.numpy()[e], dense.w3.numpy())
    moe.to(dtype="float32")
    assert _joint(moe) is not None


def test_load_mixtral_leaves_the_layout_in_place():
    rng = np.random.default_rng(0)
    moe = _moe()
    w1, w3 = rng.standard_normal((N_EXPERTS, D_FF, D_MODEL)), rng.standard_normal((N_EXPERTS, D_FF, D_MODEL))
    tm.io.load_mixtral(moe, {"gate.weight": rng.standard_normal((N_EXPERTS, D_MODEL)),
                             "experts.gate_up_proj": np.concatenate([w1, w3], axis=1),
                             "experts.down_proj": rng.standard_normal((N_EXPERTS, D_MODEL, D_FF))})
    assert _joint(moe) is not None
    np.testing.assert_array_equal(moe.experts.w1.numpy(), w1)
    np.testing.assert_array_equal(moe.experts.w3.numpy(), w3)


@pytest.mark.parametrize("arrangement", ["separate", "swapped halves", "a strided base", "a Fortran-order base",
                                         "same array"])
def test_joint_gate_up_finds_only_the_exact_layout(arrangement):
    joint = np.arange(2 * 6 * 5, dtype=np.float64).reshape(2, 6, 5).copy()  # an array of its own (base None)
    wider = np.arange(2 * 6 * 10, dtype=np.float64).reshape(2, 6, 10)
    fortran = np.asfortranarray(joint)
    w1, w3 = {
        "separate": (joint[:, :3].copy(), joint[:, 3:].copy()),
        "swapped halves": (joint[:, 3:], joint[:, :3]),
        "a strided base": (wider[:, :3, ::2], wider[:, 3:, ::2]),  # every other column of a wider array
        "a Fortran-order base": (fortran[:, :3], fortran[:, 3:]),  # the right shape, not in C order
        "same array": (joint[:, :3], joint[:, :3]),
    }[arrangement]
    assert joint_gate_up(w1, w3) is None
    assert joint_gate_up(joint[:, :3], joint[:, 3:]) is joint

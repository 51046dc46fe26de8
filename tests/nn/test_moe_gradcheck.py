"""gradcheck (float64, central differences) of the whole MoE layer — input and every parameter — for every router,
with and without capacity dropping, with shared experts, SwiGLU and the non-GLU activations; of aux_loss, z_loss
and the noisy-gating losses; and proof that gradcheck has teeth here (a backward off by 1% is caught)."""
from dataclasses import dataclass, field

import numpy as np
import pytest

import tinymoe as tm
from moe_helpers import fast_kernels, inputs, layer
from tinymoe.engine.backend import to_device
from tinymoe.functional import dispatch
from tinymoe.functional import experts as experts_module
from tinymoe.nn import gating, router_losses

N_TOKENS, D_MODEL, D_FF, N_EXPERTS = 8, 6, 5, 4
NOISE_SEED = 1234


@dataclass
class Case:
    id: str
    options: dict = field(default_factory=dict)
    training: bool = False
    drops: bool = False  # the case must actually drop assignments (so the capacity path is what gets checked)


LAYER_CASES = [
    Case("softmax-swiglu-shared-dropless", dict(router="softmax", n_shared_experts=1)),
    Case("softmax-swiglu-shared-capacity", dict(router="softmax", n_shared_experts=1, capacity_factor=0.75),
         drops=True),
    Case("softmax-gelu-switch-raw-p", dict(router="softmax", activation="gelu", normalize_top_k=False)),
    Case("softmax-relu-k1-capacity", dict(router="softmax", activation="relu", top_k=1, capacity_factor=0.5),
         drops=True),
    Case("softmax-silu-k=E-dense", dict(router="softmax", activation="silu", top_k=N_EXPERTS)),
    Case("noisy-eval-swiglu-shared", dict(router="noisy", n_shared_experts=1)),
    Case("noisy-train-swiglu-capacity", dict(router="noisy", capacity_factor=0.75), training=True, drops=True),
    Case("noisy-train-gelu-raw-p", dict(router="noisy", activation="gelu", normalize_top_k=False), training=True),
    Case("sigmoid-swiglu-shared", dict(router="sigmoid", n_shared_experts=2)),
    Case("sigmoid-relu-capacity-raw-s", dict(router="sigmoid", activation="relu", capacity_factor=0.75,
                                             normalize_top_k=False), drops=True),
    Case("expert_choice-swiglu-shared", dict(router="expert_choice", capacity_factor=1.0, n_shared_experts=1),
         drops=True),
    Case("expert_choice-gelu-cf2", dict(router="expert_choice", activation="gelu", capacity_factor=2.0)),
    Case("softmax-jitter-train", dict(router="softmax", jitter=0.2, n_shared_experts=1), training=True),
]


def build(device, case, seed=0):
    moe = layer(D_MODEL, D_FF, N_EXPERTS, device=device, seed=seed, **{"top_k": 2, **case.options})
    if case.options.get("router") == "sigmoid":  # a selection bias that changes some choices
        rng = np.random.default_rng(seed + 7)
        moe.router.bias = to_device(rng.normal(0.0, 0.3, N_EXPERTS), device)
    return moe.train(case.training)


def forward(moe, x):
    """One forward with the layer's noise (jitter, noisy gating) restarted from a fixed seed: repeatable."""
    moe.reseed(NOISE_SEED)
    return moe(x)


def expected_parameter_names(case):
    names = {"router.weight", "experts.w1", "experts.w2"}
    names |= {"experts.w3"} if case.options.get("activation", "swiglu") == "swiglu" else {"experts.b1", "experts.b2"}
    if case.options.get("router") == "noisy":
        names.add("router.noise_weight")
    if case.options.get("n_shared_experts"):
        names |= {"shared.w1", "shared.w2", "shared.w3"}
    return names


@pytest.mark.parametrize("case", LAYER_CASES, ids=[case.id for case in LAYER_CASES])
def test_layer_gradcheck_input_and_every_parameter(device, case):
    moe = build(device, case)
    assert {name for name, _ in moe.named_parameters()} == expected_parameter_names(case)
    x = inputs((N_TOKENS, D_MODEL), device=device)
    with fast_kernels(device):
        forward(moe, x)
        if case.drops:
            assert moe.stats.dropped_fraction > 0, "the case should exercise capacity dropping"
        assert tm.gradcheck(lambda *_: forward(moe, x), [x, *moe.parameters()])


def test_layer_gradcheck_with_the_default_kernels(device):
    """The same check through the default (fastest available) kernels, not only the NumPy reference; along
    random directions only, since Numba's parallel launches make each forward slow on tiny arrays."""
    case = LAYER_CASES[1]
    moe = build(device, case)
    x = inputs((N_TOKENS, D_MODEL), device=device)
    assert tm.gradcheck(lambda *_: forward(moe, x), [x, *moe.parameters()], exact_max_elements=0, n_directions=3)


def test_layer_gradcheck_with_batch_dimensions(device):
    moe = build(device, Case("batched", dict(router="softmax", capacity_factor=1.0)))
    x = inputs((2, 3, D_MODEL), device=device)
    with fast_kernels(device):
        assert forward(moe, x).shape == (2, 3, D_MODEL)
        assert tm.gradcheck(lambda *_: forward(moe, x), [x, *moe.parameters()])


LOSS_CASES = [
    Case("softmax", dict(router="softmax")),
    Case("softmax-capacity", dict(router="softmax", capacity_factor=0.5, top_k=1), drops=True),
    Case("noisy-eval", dict(router="noisy")),
    Case("noisy-train", dict(router="noisy"), training=True),
    Case("sigmoid", dict(router="sigmoid")),
    Case("expert_choice", dict(router="expert_choice", capacity_factor=1.0)),
]


def router_parameters(moe):
    return [parameter for name, parameter in moe.named_parameters() if name.startswith("router.")]


@pytest.mark.parametrize("case", LOSS_CASES, ids=[case.id for case in LOSS_CASES])
def test_aux_and_z_loss_gradcheck(device, case):
    moe = build(device, case)
    x = inputs((N_TOKENS, D_MODEL), device=device)

    def losses(*_):
        forward(moe, x)
        return moe.aux_loss, moe.z_loss

    with fast_kernels(device):
        aux, z = losses()
        assert aux.shape == () and z.shape == () and aux.requires_grad and z.requires_grad
        assert tm.gradcheck(losses, [x, *router_parameters(moe)])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_noisy_gating_losses_gradcheck(device, training, top_k):
    moe = build(device, Case("noisy", dict(router="noisy", top_k=top_k), training=training))
    x = inputs((N_TOKENS, D_MODEL), device=device)

    def losses(*_):
        forward(moe, x)
        return moe.importance_loss, moe.load_loss

    with fast_kernels(device):
        importance, load = losses()
        assert float(importance.item()) > 0 and float(load.item()) > 0
        assert tm.gradcheck(losses, [x, *router_parameters(moe)])


# ----- gradcheck has teeth: every hand-written backward on the MoE path, off by 1%, is caught ---------------
def _off_by_one_percent(backward):
    def scaled(ctx, *grads):
        result = backward(ctx, *grads)
        if isinstance(result, tuple):
            return tuple(None if grad is None else grad * 1.01 for grad in result)
        return None if result is None else result * 1.01

    return staticmethod(scaled)


TEETH = [
    (gating.SoftmaxTopK, dict(router="softmax"), "y"),
    (gating.SigmoidTopK, dict(router="sigmoid"), "y"),
    (gating.ExpertChoice, dict(router="expert_choice", capacity_factor=1.0), "y"),
    (gating.NoisyLogits, dict(router="noisy"), "y"),
    (experts_module.SwiGLUExperts, dict(router="softmax", capacity_factor=0.75), "y"),
    (experts_module.MLPExperts, dict(router="softmax", activation="gelu"), "y"),
    (dispatch.GatherRows, dict(router="softmax"), "y"),
    (dispatch.CombineRows, dict(router="softmax"), "y"),
    (router_losses.LoadBalanceLoss, dict(router="softmax"), "aux_loss"),
    (router_losses.ZLoss, dict(router="softmax"), "z_loss"),
    (router_losses.ImportanceLoss, dict(router="noisy"), "importance_loss"),
    (router_losses.NoisyLoadLoss, dict(router="noisy"), "load_loss"),
]


@pytest.mark.parametrize("function, options, output", TEETH, ids=[row[0].__name__ for row in TEETH])
def test_gradcheck_catches_a_backward_off_by_one_percent(monkeypatch, function, options, output):
    moe = build("cpu", Case(function.__name__, options, training=options["router"] == "noisy"))
    x = inputs((N_TOKENS, D_MODEL))

    def value(*_):
        y = forward(moe, x)
        return y if output == "y" else getattr(moe, output)

    monkeypatch.setattr(function, "backward", _off_by_one_percent(function.backward))
    with fast_kernels("cpu"), pytest.raises(tm.GradcheckError, match="gradcheck failed"):
        tm.gradcheck(value, [x, *moe.parameters()])

"""The float64 gradient checks behind `tinymoe gradcheck`: every op and layer, on one device.

Each case builds (fn, inputs) from a seeded generator, the MoE cases (fn, inputs, discrete) with discrete the
layer's routing decisions (tinymoe.testing.moe_decisions): a perturbation that flips a token's experts or a
capacity drop measures a jump, not a derivative, so it is excluded and counted, not compared. `run_all(device)`
runs `gradcheck` on each and returns one result row per case (with the GradcheckReport). Useful to check an
install (e.g. a GPU's CuPy build) end to end.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np

from . import functional as F
from .engine.gradcheck import GradcheckError, GradcheckReport, gradcheck
from .engine.tensor import tensor
from .nn import Dropout, Embedding, LayerNorm, Linear, MoE, MoEConfig, RMSNorm, SwiGLU
from .testing import moe_decisions


@dataclass
class CaseResult:
    name: str
    passed: bool
    seconds: float
    detail: str = ""
    report: GradcheckReport | None = None  # None for a failure found before any comparison


def _inputs(generator, device, *shapes, positive=False):
    arrays = [generator.standard_normal(shape) for shape in shapes]
    if positive:
        arrays = [np.abs(array) + 0.5 for array in arrays]
    return [tensor(array, requires_grad=True, dtype="float64", device=device) for array in arrays]


def _moe_case(router, **options):
    config = MoEConfig(d_model=6, d_ff=5, n_experts=4, router=router, dtype="float64", **{"top_k": 2, **options})

    def build(generator, device):  # builds the same layer on every call (run_all may run many times)
        layer = MoE(config, device=device, generator=0)
        for parameter in layer.parameters():
            parameter.data = parameter.xp.asarray(generator.standard_normal(parameter.shape) * 0.5)
        (x,) = _inputs(generator, device, (2, 4, 6))
        if hasattr(layer.router, "defer_updates"):  # no per-forward bias / L1-coefficient step: fn must be a function
            layer.router.defer_updates = True

        def fn(x, *parameters):
            layer.reseed(1)
            out = [layer(x), layer.aux_loss, layer.z_loss]
            extra = [getattr(layer, name, None) for name in ("importance_loss", "load_loss", "entropy_loss", "l1_loss")]
            return tuple(out + [loss for loss in extra if loss is not None])
        return fn, [x, *layer.parameters()], moe_decisions(layer, reseed=1)
    return build


def _available(**options) -> bool:
    """Whether this build's MoEConfig has every option (fields still being added are left out of CASES)."""
    names = {field.name for field in fields(MoEConfig)}
    return set(options) <= names


def _module_case(make, shape):
    def build(generator, device):
        module = make(device).to(dtype="float64")
        for parameter in module.parameters():
            parameter.data = parameter.xp.asarray(generator.standard_normal(parameter.shape))
        (x,) = _inputs(generator, device, shape)
        return (lambda x, *parameters: module(x)), [x, *module.parameters()]
    return build


def _op(fn, *shapes, positive=False):
    def build(generator, device):
        return fn, _inputs(generator, device, *shapes, positive=positive)
    return build


def _embedding(generator, device):
    module = Embedding(7, 3, dtype="float64", device=device, generator=0)
    indices = np.array([[0, 3, 3], [6, 1, 0]])
    return (lambda weight: module(module.weight.xp.asarray(indices))), [module.weight]


def _cross_entropy(generator, device):
    (logits,) = _inputs(generator, device, (5, 4))
    targets = logits.xp.asarray(np.array([0, 3, -100, 1, 2]))
    return (lambda logits: F.cross_entropy(logits, targets)), [logits]


CASES = {
    "add/mul/div/pow (broadcast)": _op(lambda a, b: (a * b + a / (b * b + 1)) ** 2 - b, (3, 4), (4,)),
    "matmul (batched)": _op(lambda a, b: a @ b, (2, 3, 4), (4, 5)),
    "getitem/sum/mean/max": _op(lambda a: a[[0, 0, 2], 1:].sum(axis=0) * a.mean() + a.max(axis=1).sum(), (3, 4)),
    "linear": _op(lambda x, w, b: F.linear(x, w, b), (3, 4), (5, 4), (5,)),
    "relu/gelu/silu/sigmoid/tanh": _op(lambda x: F.relu(x) + F.gelu(x) + F.gelu(x, approximate="tanh")
                                       + F.silu(x) + F.sigmoid(x) + F.tanh(x), (4, 5)),
    "softplus/exp/log": _op(lambda x: F.softplus(x) + F.exp(x) + F.log(x), (4, 5), positive=True),
    "softmax/log_softmax/logsumexp": _op(lambda x: F.softmax(x, axis=1) * F.log_softmax(x, axis=0)
                                         + F.logsumexp(x, axis=1, keepdims=True), (3, 5)),
    "cross_entropy": _cross_entropy,
    "mse_loss": _op(lambda a, b: F.mse_loss(a, b), (4, 3), (4, 3)),
    "rms_norm": _op(lambda x, w: F.rms_norm(x, w), (3, 6), (6,)),
    "layer_norm": _op(lambda x, w, b: F.layer_norm(x, w, b), (3, 6), (6,), (6,)),
    "embedding": _embedding,
    "concatenate/stack/where": _op(lambda a, b: F.concatenate([a, b], axis=0).sum(axis=0)
                                   * F.stack([a, b], axis=1).mean(axis=(0, 1))
                                   + F.where(a > 0, a, b).sum(axis=0), (2, 3), (2, 3)),
    "topk": _op(lambda x: F.topk(x, 2)[0], (4, 6)),
    "attention (causal)": _op(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
                              (2, 5, 4), (2, 5, 4), (2, 5, 3)),
    "Linear": _module_case(lambda device: Linear(4, 3, device=device, generator=0), (5, 4)),
    "RMSNorm": _module_case(lambda device: RMSNorm(6, device=device), (3, 6)),
    "LayerNorm": _module_case(lambda device: LayerNorm(6, device=device), (3, 6)),
    "Dropout (eval)": _module_case(lambda device: Dropout(0.5).eval(), (3, 6)),
    "SwiGLU": _module_case(lambda device: SwiGLU(6, 5, device=device, generator=0), (2, 3, 6)),
    "MoE softmax top-2": _moe_case("softmax"),
    "MoE softmax top-1, capacity 1.0": _moe_case("softmax", top_k=1, capacity_factor=1.0),
    "MoE noisy top-2 (training)": _moe_case("noisy"),
    "MoE sigmoid, shared expert": _moe_case("sigmoid", n_shared_experts=1),
    "MoE expert choice": _moe_case("expert_choice"),
    "MoE GELU experts, capacity 0.5": _moe_case("softmax", activation="gelu", capacity_factor=0.5),
}
# Options of later releases, each where this MoEConfig has it: (name, router, options).
_NEWER_MOE_CASES = [
    ("MoE top-p 0.6 (up to 3 experts)", "top_p", dict(top_p=0.6, top_k=3)),
    ("MoE relu router (ReMoE)", "relu", dict(target_sparsity=0.5, l1_coefficient=0.01)),
    ("MoE null experts (AdaMoE)", "softmax", dict(n_null_experts=2, top_k=3)),
    ("MoE sigmoid, group-limited", "sigmoid", dict(n_groups=2, topk_groups=1, routed_scaling_factor=2.5)),
    ("MoE gated shared expert", "softmax", dict(n_shared_experts=1, shared_d_ff=3, shared_expert_gate=True)),
    ("MoE clamped SwiGLU, biases", "softmax", dict(activation="swiglu_clamped", swiglu_limit=0.8,
                                                   expert_bias=True, router_bias=True)),
]
CASES.update({name: _moe_case(router, **options) for name, router, options in _NEWER_MOE_CASES
              if _available(**options)})


def run_all(device: str = "cpu", seed: int = 0) -> list:
    """One CaseResult per case. detail: "N perturbations excluded (routing flipped)" for an MoE case that
    passed with exclusions; on a failure, the report's one-line summary (the worst mismatch)."""
    results = []
    for name, build in CASES.items():
        generator = np.random.default_rng(seed)
        started = time.perf_counter()
        fn, inputs, discrete = (*build(generator, device), None)[:3]
        try:
            report = gradcheck(fn, inputs, return_report=True, discrete=discrete)
        except GradcheckError as error:
            detail = error.report.summary() if error.report is not None else str(error).splitlines()[-1].strip()
            results.append(CaseResult(name, False, time.perf_counter() - started, detail, error.report))
            continue
        detail = f"{len(report.excluded)} perturbations excluded (routing flipped)" if discrete is not None else ""
        results.append(CaseResult(name, True, time.perf_counter() - started, detail, report))
    return results

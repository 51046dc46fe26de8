"""`tinymoe.testing`: gradient assertions for your own pytest suites, and an MoE layer's routing decisions
as the `discrete` state of a gradient check.

    import tinymoe as tm
    from tinymoe.testing import assert_gradients, moe_decisions

    def test_my_op():
        x = tm.tensor(np.random.randn(3, 4), dtype="float64", requires_grad=True)
        assert_gradients(lambda t: MyOp.apply(t), [x])          # AssertionError with the report on a mismatch

    def test_my_moe():
        moe = tm.nn.MoE(6, 5, 4, top_k=2, capacity_factor=0.75, dtype="float64")
        x = tm.tensor(np.random.randn(8, 6), dtype="float64", requires_grad=True)
        report = assert_gradients(lambda x, *p: (moe(x), moe.aux_loss), [x, *moe.parameters()],
                                  discrete=moe_decisions(moe))
        print(report.excluded)      # perturbations that flipped a routing decision: listed, not compared

Why `discrete`: a central difference taken across a routing flip (a token's top-k set changes, a capacity
drop moves, an expert-choice selection changes) measures the jump of the output, not its derivative, so a
plain check fails there however right the backward is. See `tinymoe.engine.gradcheck` for the rules.
"""
from __future__ import annotations

import copy
import math

import numpy as np

from .engine.autograd import no_grad
from .engine.backend import to_numpy
from .engine.gradcheck import GradcheckReport, gradcheck
from .engine.tensor import Tensor
from .functional.dispatch import routing_plan

__all__ = ["assert_gradients", "moe_decisions"]


def assert_gradients(fn, inputs, *, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-4, discrete=None,
                     directions=None, seed: int = 0, roundoff: float = 4.0) -> GradcheckReport:
    """Assert that fn's hand-written gradients match central differences; return the GradcheckReport.

    fn(*inputs) returns a float64 Tensor or a tuple of them (each output is checked with its own random
    cotangent). Every Tensor input with requires_grad must be float64: a float32 one is refused (TypeError
    naming it) rather than upcast, because an upcast would check a different computation than the one under
    test (and parameters fn reads from a closure could not be upcast at all).
    directions: None = element by element for inputs of <= 64 elements, 4 random directions above;
    an int n = n random directions for every input; "elements" = every element of every input.
    discrete: state_fn(*inputs) of the decisions (e.g. `moe_decisions(moe)`); perturbations that flip it are
    excluded and listed in `report.excluded`. Raises GradcheckError (an AssertionError, which pytest shows
    with the full report: input, multi-index, analytic vs numeric, errors, tolerance, exclusions).
    """
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    for position, value in enumerate(inputs):
        if isinstance(value, Tensor) and value.requires_grad and value.dtype != np.float64:
            raise TypeError(
                f"assert_gradients: input {position} (shape {tuple(value.shape)}) is {value.dtype.name}; finite "
                "differences need float64 (in float32 the round-off of fn, ~1e-7·|out|/eps, swamps the derivative). "
                "Build it with dtype='float64' (layers: dtype='float64' or module.to(dtype='float64')), "
                "or pass x.astype('float64')")
    if directions is None:
        n_directions, exact_max_elements = 4, 64
    elif directions == "elements":
        n_directions, exact_max_elements = 0, math.inf
    elif isinstance(directions, int) and not isinstance(directions, bool) and directions >= 1:
        n_directions, exact_max_elements = directions, 0
    else:
        raise ValueError(f"assert_gradients: directions={directions!r}; expected None, a positive int "
                         "(random directions per input) or 'elements'")
    return gradcheck(fn, inputs, eps, atol, rtol, True, n_directions=n_directions,
                     exact_max_elements=exact_max_elements, seed=seed, discrete=discrete, roundoff=roundoff,
                     return_report=True)


def moe_decisions(moe, x=0, *, reseed=None):
    """A state_fn for `gradcheck(..., discrete=...)`: the routing decisions of MoE layer `moe` on its input.

    x: the position of the layer's input in gradcheck's `inputs` (default 0), or the input Tensor itself
    when fn reads it from a closure. reseed: the seed fn passes to `moe.reseed` before its forward; needed
    when the layer routes with noise (training mode with router="noisy" or jitter > 0), so the decisions
    recomputed here see the same noise as fn's forward.

    state(*inputs) -> (expert_ids (T, K) int64, kept (T, K) bool) as NumPy arrays, T = tokens of x:
    each token's chosen experts (expert choice: K = E, ids 0..E-1) and which assignments survive capacity
    (and, for expert choice, which (token, expert) pairs were selected at all).

    The decisions of the layer's last forward are read from `moe.last_decisions` (the (expert_ids, kept) pair
    every MoE forward sets; gradcheck calls state right after fn, so they are fn's). They are recomputed
    instead when reseed is given (the decisions under that seed), before the first forward, and for a layer
    without last_decisions: recomputed with the layer's own router and routing plan
    under no_grad, at the current inputs (capacity_per="sequence": capacity counted per sequence of the input
    (..., L, d)); the router's noise generator and its non-gradient state (sigmoid load and bias, the ReLU
    router's l1_coefficient, last_sparsity, pending_load, pending_gates) are left as they were, so the
    state_fn does not change what fn computes.
    """
    if not (hasattr(moe, "router") and hasattr(moe, "n_experts") and hasattr(moe, "d_model")):
        raise TypeError(f"moe_decisions: moe must be a tinymoe.nn.MoE layer, got {type(moe).__name__}")
    router = moe.router
    noisy = router.kind == "noisy" or router.jitter > 0
    if getattr(moe, "last_decisions", None) is None and moe.training and noisy and reseed is None:
        raise ValueError(
            f"moe_decisions: {moe.name} routes with noise in training mode (router={router.kind!r}, "
            f"jitter={router.jitter}); pass reseed=<the seed fn gives moe.reseed before its forward>, "
            "or call moe.eval()")

    def state(*inputs):
        recorded = getattr(moe, "last_decisions", None)
        if recorded is not None and reseed is None:
            expert_ids, kept = recorded
            return np.asarray(to_numpy(expert_ids)).astype(np.int64), np.asarray(to_numpy(kept)).astype(bool)
        tokens = x if isinstance(x, Tensor) else _input_at(inputs, x)
        return _routing_decisions(moe, tokens, reseed)

    return state


def _input_at(inputs, position):
    if not isinstance(position, int) or not -len(inputs) <= position < len(inputs):
        raise ValueError(f"moe_decisions: x={position!r} is not a position in the {len(inputs)} inputs")
    tokens = inputs[position]
    if not isinstance(tokens, Tensor):
        raise TypeError(f"moe_decisions: inputs[{position}] must be the layer's input Tensor, "
                        f"got {type(tokens).__name__}")
    return tokens


# Router state a forward may change (training mode) and the state function must leave as it was: the sigmoid
# router's load and bias (updated per forward, or summed when deferred), the ReLU router's L1 coefficient λ (a
# buffer, stepped by each training forward unless deferred), its last sparsity and pending gate counts.
_ROUTER_STATE = ("last_load", "pending_load", "pending_gates", "last_sparsity", "last_choice_counts")


def _routing_decisions(moe, tokens, reseed):
    router = moe.router
    saved_generator = router.generator
    saved_state = {name: getattr(router, name) for name in _ROUTER_STATE if hasattr(router, name)}
    saved_buffers = {name: router._buffers[name] for name in ("bias", "l1_coefficient") if name in router._buffers}
    if reseed is None:
        router.generator = copy.deepcopy(saved_generator)
    else:
        moe.reseed(reseed)
    sequence_length = tokens.shape[-2] if tokens.ndim >= 2 else None
    try:
        with no_grad():
            routing = router(tokens.reshape(-1, moe.d_model), layer_name=moe.name, sequence_length=sequence_length)
            kept = _kept_assignments(moe, routing, sequence_length)
    finally:
        router.generator = saved_generator
        for name, value in saved_state.items():
            setattr(router, name, value)
        for name, value in saved_buffers.items():
            setattr(router, name, value)
    expert_ids = np.asarray(to_numpy(routing.expert_ids)).astype(np.int64)
    return expert_ids, kept


def _kept_assignments(moe, routing, sequence_length):
    """(T, K) bool host array of the assignments that survive capacity, counted as the layer counts it: over the
    whole batch, or (capacity_per="sequence") within each run of sequence_length tokens with C from L (the
    batch rule applied to each sequence, so each sequence gets its own routing plan)."""
    if getattr(moe, "capacity_per", "batch") != "sequence":
        plan = routing_plan(routing.expert_ids, moe.n_experts, routing.capacity, routing.valid)
        return np.asarray(to_numpy(plan.assignment_row)) >= 0
    if sequence_length is None:
        raise ValueError(f"moe_decisions: {moe.name} has capacity_per='sequence' and needs an input of shape "
                         "(..., L, d_model)")
    capacity = moe.router.capacity(sequence_length)
    kept = []
    for start in range(0, routing.expert_ids.shape[0], sequence_length):
        ids = routing.expert_ids[start:start + sequence_length]
        plan = routing_plan(ids, moe.n_experts, capacity, None)
        kept.append(np.asarray(to_numpy(plan.assignment_row)) >= 0)
    return np.concatenate(kept, axis=0)

"""`gradcheck`: hand-written gradients against central finite differences, in float64.

Each output o of fn is checked on its own. For a random cotangent v_o, L_o(x) = <v_o, out_o(x)>, and the
hand-written backward of out_o alone gives dL_o/dx. Each input is checked along directions u:

    numeric  = (L_o(x + eps·u) − L_o(x − eps·u)) / (2·eps)          analytic = <dL_o/dx, u>
    pass when |numeric − analytic| <= atol_effective(o) + rtol·|numeric|

Inputs with at most `exact_max_elements` elements are checked element by element (u = every unit vector);
larger ones along `n_directions` random Gaussian directions (the forward-mode check of HIPS autograd),
which stays cheap at any size. Inputs are perturbed in place, so `fn` may also read them from a closure
(e.g. a module's parameters passed in `inputs`).

Tolerance relative to the output's round-off. fn computes L̃_o = L_o + δ with |δ| <= γ·Σ_i |v_i·out_i|,
γ ≈ m·u for m roundings along the way (u = eps64 / 2 the unit round-off, eps64 = 2.2e-16). The two
evaluations round independently, so the numeric derivative is off by up to (|δ+| + |δ−|) / (2·eps):

    atol_effective(o) = atol + c · eps64 · Σ_i |v_i · out_o,i| / eps          (c = `roundoff`, default 4)

c = 4 allows m = 8 roundings of the output's own magnitude. For a scalar output this is atol + c·eps64·
|v|·|out|/eps: a z-loss of 1.3e6 with eps = 1e-6 has a numeric derivative blurred by ~3e-4, and a fixed
atol of 1e-5 would flag a correct gradient. Checking outputs separately keeps one huge output from
blurring the others' checks. `roundoff=0` gives the fixed atol.

Discrete decisions. A finite difference across a routing flip (a top-k set, a capacity drop, a ReLU kink)
measures a jump, not a derivative. With `discrete=state_fn`, state_fn(*inputs) (called right after each
fn(*inputs), at the same point, so it may read what that forward recorded) returns the decision state: an
array, a scalar, or a tuple/list/dict of them. A perturbation whose x + eps·u or x − eps·u changes the state
from the one at x is excluded from the comparison and listed in the report (`report.excluded`); an input
whose every perturbation flipped fails (nothing of it was checked).
"""
from __future__ import annotations

import numpy as np

from .autograd import no_grad
from .backend import to_numpy
from .gradcheck_report import Exclusion, GradcheckError, GradcheckReport, Mismatch
from .tensor import Tensor

__all__ = ["GradcheckError", "GradcheckReport", "gradcheck"]

EPS64 = float(np.finfo(np.float64).eps)


def gradcheck(
    fn,
    inputs,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    raise_exception: bool = True,
    *,
    n_directions: int = 4,
    exact_max_elements: int = 64,
    seed: int = 0,
    discrete=None,
    roundoff: float = 4.0,
    return_report: bool = False,
):
    """Compare the gradients of `fn(*inputs)` with central differences for every input with requires_grad.

    fn: callable of `inputs` returning a float64 Tensor (or a tuple of them; each is checked on its own).
    inputs: Tensors (and any other arguments, passed through). discrete: optional state_fn(*inputs) giving
    the decision state (see the module docstring); perturbations that flip it are excluded and reported.
    roundoff: c in atol_effective = atol + c·eps64·Σ|v·out|/eps. Returns True (the GradcheckReport with
    `return_report=True`); on a mismatch raises GradcheckError whose `.report` lists the worst comparisons,
    or returns False (the report) when `raise_exception=False`. fn must be deterministic: seed any noise.
    """
    report = _run(fn, inputs, eps, atol, rtol, n_directions, exact_max_elements, seed, discrete, roundoff)
    if not report.passed and raise_exception:
        raise GradcheckError(report.format(), report)
    if return_report:
        return report
    return report.passed


def _run(fn, inputs, eps, atol, rtol, n_directions, exact_max_elements, seed, discrete, roundoff):
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    checked = [i for i, value in enumerate(inputs) if isinstance(value, Tensor) and value.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True, so there is nothing to check")
    for position in checked:
        if inputs[position].dtype != np.float64:
            raise TypeError(
                f"gradcheck: input {position} is {inputs[position].dtype.name}; finite differences need float64 "
                "inputs (build it with dtype='float64' or cast it with .astype('float64'))"
            )
    if not eps > 0:
        raise ValueError(f"gradcheck: eps={eps!r} must be positive")
    if not roundoff >= 0:
        raise ValueError(f"gradcheck: roundoff={roundoff!r} must be >= 0 (0 means a fixed atol)")
    if discrete is not None and not callable(discrete):
        raise TypeError(f"gradcheck: discrete must be a callable state_fn(*inputs) or None, "
                        f"got {type(discrete).__name__}")
    rng = np.random.default_rng(seed)
    report = GradcheckReport(eps=eps, atol=atol, rtol=rtol, roundoff=roundoff,
                             input_shapes={p: tuple(inputs[p].shape) for p in checked})
    saved_grads = [inputs[position].grad for position in checked]
    saved_retain = [inputs[position]._retains_grad for position in checked]

    try:
        for position in checked:
            inputs[position]._retains_grad = True  # non-leaf inputs get .grad too
        outputs = _outputs_of(fn(*inputs))
        base_state = _state_of(discrete, inputs)
        cotangents = [out.xp.asarray(rng.standard_normal(out.shape)) for out in outputs]
        analytic = [_gradients_of(out, cotangent, inputs, checked) for out, cotangent in zip(outputs, cotangents)]
        base_values = _contractions(outputs, cotangents)
        for o, (out, cotangent) in enumerate(zip(outputs, cotangents)):
            scale = float(abs(out.data * cotangent).sum())
            report.tolerances[o] = atol + roundoff * EPS64 * scale / eps

        def value_at_current_inputs():
            with no_grad():
                values = _contractions(_outputs_of(fn(*inputs)), cotangents)
                return values, _state_of(discrete, inputs)

        repeat_values, repeat_state = value_at_current_inputs()
        for o, (first, second) in enumerate(zip(base_values, repeat_values)):
            if abs(second - first) > report.tolerances[o] + rtol * abs(first):
                raise GradcheckError(
                    f"gradcheck: fn is not deterministic (two calls gave {first!r} and {second!r} for output {o}); "
                    "fix the seed of any noise, dropout or jitter inside fn"
                )
        if discrete is not None and not _same_state(base_state, repeat_state):
            raise GradcheckError("gradcheck: the discrete state is not deterministic (two calls of fn and "
                                 "state_fn at the same inputs gave different states)")

        for position in checked:
            _check_input(report, inputs[position], position, [grads[position] for grads in analytic],
                         value_at_current_inputs, base_state, discrete is not None,
                         n_directions, exact_max_elements, rng)
    finally:
        for position, grad, retain in zip(checked, saved_grads, saved_retain):
            inputs[position].grad, inputs[position]._retains_grad = grad, retain

    for position in checked:
        tried, flipped = report.perturbations[position], len(report.excluded_of(position))
        if tried and flipped == tried:
            report.problems.append(
                f"input {position} of shape {report.input_shapes[position]}: all {tried} perturbations flipped the "
                "discrete state, so nothing of it was checked (x sits on a decision boundary at this eps; "
                "move it away or use a smaller eps)")
    return report


def _outputs_of(result):
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    for out in outputs:
        if not isinstance(out, Tensor):
            raise TypeError(f"gradcheck: fn must return Tensors, got {type(out).__name__}")
        if out.dtype != np.float64:
            raise TypeError(f"gradcheck: fn returned a {out.dtype.name} tensor; compute in float64")
    return tuple(outputs)


def _gradients_of(out, cotangent, inputs, checked) -> dict:
    """{input position: host float64 gradient of <cotangent, out>, or None where backward gave none}."""
    for position in checked:
        inputs[position].grad = None
    if out.requires_grad:
        out.backward(cotangent, retain_graph=True)
    grads = {}
    for position in checked:
        grad = inputs[position].grad
        grads[position] = None if grad is None else np.array(to_numpy(grad), dtype=np.float64)
        inputs[position].grad = None
    return grads


def _contractions(outputs, cotangents) -> list:
    return [float((out.data * cotangent).sum()) for out, cotangent in zip(outputs, cotangents)]


def _state_of(state_fn, inputs):
    """The decision state as host values (nested tuples/dicts of NumPy arrays), or None without state_fn."""
    return None if state_fn is None else _to_host(state_fn(*inputs))


def _to_host(state):
    if isinstance(state, Tensor):
        return np.array(to_numpy(state.data))
    if isinstance(state, dict):
        return {key: _to_host(value) for key, value in state.items()}
    if isinstance(state, (tuple, list)):
        return tuple(_to_host(value) for value in state)
    if state is None:
        return None
    return np.array(to_numpy(state)) if hasattr(state, "shape") else np.asarray(state)


def _same_state(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_same_state(a[key], b[key]) for key in a))
    if isinstance(a, tuple) or isinstance(b, tuple):
        return (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
                and all(_same_state(x, y) for x, y in zip(a, b)))
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def _check_input(report, tensor, position, grads, value_at, base_state, has_state, n_directions,
                 exact_max_elements, rng):
    """Compare every output's gradient for this input along each direction; fill `report`."""
    xp, eps, original = tensor.xp, report.eps, tensor.data
    if tensor.size <= exact_max_elements:
        directions = (("element", np.unravel_index(flat, tensor.shape)) for flat in range(tensor.size))
    else:
        directions = (("direction", number) for number in range(n_directions))
    report.perturbations[position] = report.checked[position] = 0
    for kind, label in directions:
        if kind == "element":
            direction = np.zeros(tensor.shape)
            direction[label] = 1.0
            label = tuple(int(i) for i in label)
        else:
            direction = rng.standard_normal(tensor.shape)
        step = xp.asarray(direction * eps)
        try:
            tensor.data = original + step
            values_plus, state_plus = value_at()
            tensor.data = original - step
            values_minus, state_minus = value_at()
        finally:
            tensor.data = original
        report.perturbations[position] += 1
        if has_state:
            sides = ("+" if not _same_state(state_plus, base_state) else "") + \
                    ("-" if not _same_state(state_minus, base_state) else "")
            if sides:
                report.excluded.append(Exclusion(position, kind, label, sides))
                continue
        for o, grad in enumerate(grads):
            numeric = (values_plus[o] - values_minus[o]) / (2 * eps)
            analytic = 0.0 if grad is None else float((grad * direction).sum())
            tolerance = report.tolerances[o] + report.rtol * abs(numeric)
            report.checked[position] += 1
            if abs(numeric - analytic) > tolerance:
                report.mismatches.append(Mismatch(position, o, kind, label, analytic, numeric, tolerance,
                                                  missing_gradient=grad is None))

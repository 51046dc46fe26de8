"""SGD, Adam and AdamW against their update rules written out in NumPy here (and torch.optim as a second
oracle when torch is installed): several steps, with gradients that depend on the current parameters so the
order of the state updates matters; parameter groups; state_dict round trips; hyperparameter checks.

    SGD:   d = g + wd·p;  b = d (first step) or μ·b + (1 − τ)·d;  d = d + μ·b (Nesterov) or b;  p -= lr·d
    Adam:  g += wd·p (L2);  m = β1·m + (1 − β1)·g;  v = β2·v + (1 − β2)·g²;  p -= lr·m̂ / (sqrt(v̂) + eps)
    AdamW: p *= 1 − lr·wd (decoupled), then the Adam step without L2
"""
import math

import numpy as np
import pytest

from tinymoe.nn.module import Parameter
from tinymoe.optim import SGD, Adam, AdamW

N_STEPS = 6


def gradient_at(parameter_values, step, salt=0):
    """A gradient that depends on the parameter (a quadratic's pull plus a step-dependent drift)."""
    drift = np.random.default_rng(1000 * salt + step).standard_normal(parameter_values.shape)
    return 0.7 * parameter_values + drift


def sgd_reference(p, steps, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, salt=0):
    p = p.copy()
    buffer = None
    for step in range(steps):
        d = gradient_at(p, step, salt) + weight_decay * p
        if momentum:
            buffer = d.copy() if buffer is None else momentum * buffer + (1 - dampening) * d
            d = d + momentum * buffer if nesterov else buffer
        p = p - lr * d
    return p


def adam_reference(p, steps, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False, salt=0):
    p = p.copy()
    beta1, beta2 = betas
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t in range(1, steps + 1):
        g = gradient_at(p, t - 1, salt)
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def run_tinymoe(make_optimizer, p, steps, salt=0):
    parameter = Parameter(p.copy())
    optimizer = make_optimizer([parameter])
    for step in range(steps):
        optimizer.zero_grad()
        parameter.grad = gradient_at(parameter.data, step, salt)
        optimizer.step()
    return parameter.data


def start_values(shape=(3, 4), seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


SGD_CASES = {
    "plain": dict(lr=0.1),
    "weight decay": dict(lr=0.1, weight_decay=0.3),
    "momentum": dict(lr=0.05, momentum=0.9),
    "momentum + dampening": dict(lr=0.05, momentum=0.8, dampening=0.3),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "nesterov + weight decay": dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.1),
}
ADAM_CASES = {
    "Adam": (Adam, dict(lr=0.05), False),
    "Adam betas/eps": (Adam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3), False),
    "Adam L2": (Adam, dict(lr=0.05, weight_decay=0.2), False),
    "AdamW": (AdamW, dict(lr=0.05, weight_decay=0.2), True),
    "AdamW betas": (AdamW, dict(lr=0.03, betas=(0.5, 0.9), weight_decay=0.5), True),
}


@pytest.mark.parametrize("options", SGD_CASES.values(), ids=SGD_CASES.keys())
def test_sgd_matches_its_update_rule(options):
    p = start_values()
    actual = run_tinymoe(lambda params: SGD(params, **options), p, N_STEPS)
    np.testing.assert_allclose(actual, sgd_reference(p, N_STEPS, **options), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ADAM_CASES.values(), ids=ADAM_CASES.keys())
def test_adam_and_adamw_match_their_update_rules(case):
    cls, options, decoupled = case
    p = start_values()
    actual = run_tinymoe(lambda params: cls(params, **options), p, N_STEPS)
    expected = adam_reference(p, N_STEPS, decoupled=decoupled, **options)
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


def test_adamw_decay_is_decoupled_from_adam_l2():
    """With the same weight_decay, Adam (L2 through the moments) and AdamW (shrink p) must differ."""
    p = start_values()
    adam = run_tinymoe(lambda params: Adam(params, lr=0.05, weight_decay=0.5), p, N_STEPS)
    adamw = run_tinymoe(lambda params: AdamW(params, lr=0.05, weight_decay=0.5), p, N_STEPS)
    assert np.abs(adam - adamw).max() > 1e-4


def test_adamw_with_zero_gradient_only_shrinks_the_parameter():
    p = start_values()
    parameter = Parameter(p.copy())
    optimizer = AdamW([parameter], lr=0.1, weight_decay=0.5)
    parameter.grad = np.zeros_like(p)
    optimizer.step()
    np.testing.assert_allclose(parameter.data, p * (1 - 0.1 * 0.5), rtol=1e-12)


def test_first_adam_step_moves_every_coordinate_by_about_lr():
    """Bias correction: the first update is lr · g/|g| (up to eps), whatever the gradient's scale."""
    parameter = Parameter(np.zeros(4))
    optimizer = Adam([parameter], lr=0.01)
    parameter.grad = np.array([1e-3, -2.0, 50.0, -1e4])
    optimizer.step()
    np.testing.assert_allclose(parameter.data, -0.01 * np.sign(parameter.grad), rtol=1e-4)


# ----- torch.optim as a second, independent oracle ---------------------------------------------------------
TORCH_CASES = {
    **{f"SGD {name}": ("SGD", options) for name, options in SGD_CASES.items()},
    "Adam": ("Adam", dict(lr=0.05)),
    "Adam L2 betas eps": ("Adam", dict(lr=0.02, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.2)),
    "AdamW": ("AdamW", dict(lr=0.05, weight_decay=0.2)),
    "AdamW default decay": ("AdamW", dict(lr=0.05)),
}


@pytest.mark.parametrize("case", TORCH_CASES.values(), ids=TORCH_CASES.keys())
def test_matches_torch_optim_in_float64(case):
    torch = pytest.importorskip("torch")
    name, options = case
    ours_cls = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[name]
    p = start_values()
    ours = Parameter(p.copy())
    theirs = torch.tensor(p.copy(), dtype=torch.float64, requires_grad=True)
    ours_optimizer = ours_cls([ours], **options)
    theirs_optimizer = getattr(torch.optim, name)([theirs], **options)
    for step in range(N_STEPS):
        ours.grad = gradient_at(ours.data, step)
        theirs.grad = torch.from_numpy(gradient_at(theirs.detach().numpy(), step))
        ours_optimizer.step()
        theirs_optimizer.step()
    np.testing.assert_allclose(ours.data, theirs.detach().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_counts_steps_per_parameter_like_torch(name):
    """A parameter without a gradient at step 1 is skipped; its first real update must still be of size lr."""
    torch = pytest.importorskip("torch")
    ours_cls = {"Adam": Adam, "AdamW": AdamW}[name]
    a0, b0 = np.array([1.0, -2.0]), np.array([0.5, 0.3])
    a, b = Parameter(a0.copy()), Parameter(b0.copy())
    ta = torch.tensor(a0.copy(), requires_grad=True)
    tb = torch.tensor(b0.copy(), requires_grad=True)
    ours = ours_cls([a, b], lr=0.1, weight_decay=0.0)
    theirs = getattr(torch.optim, name)([ta, tb], lr=0.1, weight_decay=0.0)
    for grad_a, grad_b in [(np.array([0.1, 0.2]), None), (np.array([0.3, -0.1]), np.array([1.0, 2.0]))]:
        a.grad, b.grad = grad_a.copy(), None if grad_b is None else grad_b.copy()
        ta.grad, tb.grad = torch.from_numpy(grad_a.copy()), None if grad_b is None else torch.from_numpy(grad_b.copy())
        ours.step()
        theirs.step()
    np.testing.assert_allclose(a.data, ta.detach().numpy(), rtol=1e-12)
    # the first update of b has magnitude lr in every coordinate: b0 - 0.1
    np.testing.assert_allclose(b.data, tb.detach().numpy(), rtol=1e-12)


# ----- parameter groups, skipped parameters, dtypes -------------------------------------------------------
def test_param_groups_use_their_own_lr_and_weight_decay():
    p, q = start_values(seed=1), start_values((5,), seed=2)
    first, second = Parameter(p.copy()), Parameter(q.copy())
    optimizer = AdamW([{"params": [first]}, {"params": [second], "lr": 0.01, "weight_decay": 0.0}],
                      lr=0.05, weight_decay=0.3)
    for step in range(N_STEPS):
        optimizer.zero_grad()
        first.grad = gradient_at(first.data, step, salt=1)
        second.grad = gradient_at(second.data, step, salt=2)
        optimizer.step()
    np.testing.assert_allclose(first.data, adam_reference(p, N_STEPS, lr=0.05, weight_decay=0.3, decoupled=True,
                                                          salt=1), rtol=1e-12)
    np.testing.assert_allclose(second.data, adam_reference(q, N_STEPS, lr=0.01, weight_decay=0.0, decoupled=True,
                                                           salt=2), rtol=1e-12)


def test_sgd_param_groups_override_momentum():
    p, q = start_values(seed=3), start_values(seed=4)
    first, second = Parameter(p.copy()), Parameter(q.copy())
    optimizer = SGD([{"params": [first], "momentum": 0.9}, {"params": [second], "lr": 0.2}], lr=0.05)
    for step in range(N_STEPS):
        first.grad = gradient_at(first.data, step, salt=3)
        second.grad = gradient_at(second.data, step, salt=4)
        optimizer.step()
    np.testing.assert_allclose(first.data, sgd_reference(p, N_STEPS, lr=0.05, momentum=0.9, salt=3), rtol=1e-12)
    np.testing.assert_allclose(second.data, sgd_reference(q, N_STEPS, lr=0.2, salt=4), rtol=1e-12)


def test_lr_property_sets_every_group():
    first, second = Parameter(np.zeros(2)), Parameter(np.zeros(2))
    optimizer = SGD([{"params": [first]}, {"params": [second], "lr": 0.5}], lr=0.1)
    optimizer.lr = 0.25
    assert [group["lr"] for group in optimizer.param_groups] == [0.25, 0.25]
    first.grad = second.grad = np.ones(2)
    optimizer.step()
    np.testing.assert_allclose(first.data, -0.25 * np.ones(2))
    np.testing.assert_allclose(second.data, -0.25 * np.ones(2))


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9), lambda ps: AdamW(ps, lr=0.1)],
                         ids=["SGD", "AdamW"])
def test_parameters_without_gradient_are_left_alone(make):
    used, unused = Parameter(np.ones(3)), Parameter(np.full(3, 2.0))
    optimizer = make([used, unused])
    used.grad = np.ones(3)
    optimizer.step()
    np.testing.assert_array_equal(unused.data, np.full(3, 2.0))  # no weight decay either
    assert not np.array_equal(used.data, np.ones(3))
    optimizer.zero_grad()
    assert used.grad is None and unused.grad is None


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
                                  lambda ps: Adam(ps, lr=0.1, weight_decay=0.1), lambda ps: AdamW(ps, lr=0.1)],
                         ids=["SGD", "Adam", "AdamW"])
def test_float32_parameters_stay_float32(make):
    parameter = Parameter(np.ones((2, 3), dtype=np.float32))
    optimizer = make([parameter])
    for _ in range(3):
        parameter.grad = np.full((2, 3), 0.5, dtype=np.float32)
        optimizer.step()
    assert parameter.data.dtype == np.float32
    assert parameter.data.shape == (2, 3)
    assert np.all(parameter.data < 1)


def test_optimizer_keeps_the_parameter_object():
    """The update happens in place on the Parameter (a model holding it sees the change)."""
    parameter = Parameter(np.ones(3))
    optimizer = SGD([parameter], lr=0.5)
    parameter.grad = np.ones(3)
    optimizer.step()
    assert optimizer.parameters()[0] is parameter
    np.testing.assert_allclose(parameter.data, 0.5 * np.ones(3))


# ----- state_dict ------------------------------------------------------------------------------------------
STATEFUL = {
    "SGD nesterov": lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "Adam": lambda ps: Adam(ps, lr=0.05, weight_decay=0.1),
    "AdamW groups": lambda ps: AdamW([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.01, "weight_decay": 0.0}],
                                     lr=0.05),
}


def _two_parameters():
    return [Parameter(start_values(seed=5)), Parameter(start_values((4,), seed=6))]


def _steps(optimizer, parameters, first, count):
    for step in range(first, first + count):
        for salt, parameter in enumerate(parameters):
            parameter.grad = gradient_at(parameter.data, step, salt)
        optimizer.step()


@pytest.mark.parametrize("make", STATEFUL.values(), ids=STATEFUL.keys())
def test_state_dict_into_a_fresh_optimizer_continues_identically(make):
    parameters = _two_parameters()
    optimizer = make(parameters)
    _steps(optimizer, parameters, 0, 3)
    saved_values = [parameter.data.copy() for parameter in parameters]
    state = optimizer.state_dict()

    _steps(optimizer, parameters, 3, 3)  # the uninterrupted run
    expected = [parameter.data.copy() for parameter in parameters]

    restored = [Parameter(values.copy()) for values in saved_values]
    fresh = make(restored)
    fresh.load_state_dict(state)
    assert fresh.step_count == 3
    _steps(fresh, restored, 3, 3)
    for got, want in zip(restored, expected):
        np.testing.assert_array_equal(got.data, want)


@pytest.mark.parametrize("make", STATEFUL.values(), ids=STATEFUL.keys())
def test_state_dict_is_a_snapshot(make):
    """Later steps must not change a state_dict taken earlier (it holds copies, not the live buffers)."""
    parameters = _two_parameters()
    optimizer = make(parameters)
    _steps(optimizer, parameters, 0, 2)
    state = optimizer.state_dict()
    frozen = {position: {name: np.array(value) for name, value in entry.items()}
              for position, entry in state["state"].items()}
    assert frozen, "the optimizer has state after two steps"
    _steps(optimizer, parameters, 2, 2)
    for position, entry in frozen.items():
        for name, value in entry.items():
            np.testing.assert_array_equal(state["state"][position][name], value)
    assert state["step_count"] == 2


def test_state_dict_holds_hyperparameters_and_numpy_state():
    parameters = _two_parameters()
    optimizer = AdamW([{"params": parameters[:1]}, {"params": parameters[1:], "weight_decay": 0.0}], lr=0.02,
                      betas=(0.8, 0.9), weight_decay=0.3)
    _steps(optimizer, parameters, 0, 1)
    state = optimizer.state_dict()
    assert [group["lr"] for group in state["groups"]] == [0.02, 0.02]
    assert [group["weight_decay"] for group in state["groups"]] == [0.3, 0.0]
    assert tuple(state["groups"][0]["betas"]) == (0.8, 0.9)
    assert all("params" not in group for group in state["groups"])
    for entry in state["state"].values():
        for value in entry.values():
            assert isinstance(value, np.ndarray)


def test_load_state_dict_restores_hyperparameters():
    parameters = _two_parameters()
    source = SGD(parameters, lr=0.3, momentum=0.5)
    target = SGD(_two_parameters(), lr=0.01, momentum=0.5)
    target.load_state_dict(source.state_dict())
    assert target.lr == 0.3


def test_load_state_dict_rejects_mismatches():
    parameters = _two_parameters()
    optimizer = Adam(parameters, lr=0.01)
    _steps(optimizer, parameters, 0, 1)
    state = optimizer.state_dict()
    with pytest.raises(ValueError, match="shape"):
        Adam([Parameter(np.zeros((2, 2))), Parameter(np.zeros(4))], lr=0.01).load_state_dict(state)
    with pytest.raises(ValueError, match="group"):
        Adam([{"params": [Parameter(start_values(seed=5))]}, {"params": [Parameter(np.zeros(4))]}],
             lr=0.01).load_state_dict(state)


# ----- hyperparameter checks -------------------------------------------------------------------------------
BAD_VALUES = [  # in range for the type, out of range for the hyperparameter: ValueError naming it
    (lambda ps: SGD(ps, lr=-0.1), "lr"),
    (lambda ps: SGD(ps, lr=0.1, momentum=-0.5), "momentum"),
    (lambda ps: SGD(ps, lr=0.1, momentum=1.0), "momentum"),
    (lambda ps: SGD(ps, lr=0.1, momentum=1.5), "momentum"),
    (lambda ps: SGD(ps, lr=0.1, weight_decay=-1e-3), "weight_decay"),
    (lambda ps: SGD(ps, lr=0.1, momentum=0.5, dampening=-0.1), "dampening"),
    (lambda ps: SGD(ps, lr=0.1, momentum=0.5, dampening=1.5), "dampening"),
    (lambda ps: SGD(ps, lr=0.1, nesterov=True), "nesterov"),
    (lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (lambda ps: Adam(ps, lr=-1.0), "lr"),
    (lambda ps: Adam(ps, lr=1e-3, betas=(1.0, 0.999)), "beta1"),
    (lambda ps: Adam(ps, lr=1e-3, betas=(-0.1, 0.999)), "beta1"),
    (lambda ps: Adam(ps, lr=1e-3, betas=(0.9, -0.1)), "beta2"),
    (lambda ps: Adam(ps, lr=1e-3, betas=(0.9,)), "betas"),
    (lambda ps: Adam(ps, lr=1e-3, betas=0.9), "betas"),
    (lambda ps: Adam(ps, lr=1e-3, eps=0.0), "eps"),
    (lambda ps: Adam(ps, lr=1e-3, eps=-1e-8), "eps"),
    (lambda ps: Adam(ps, lr=1e-3, weight_decay=-0.1), "weight_decay"),
    (lambda ps: AdamW(ps, lr=1e-3, weight_decay=-0.1), "weight_decay"),
    (lambda ps: AdamW(ps, lr=1e-3, betas=(0.9, 1.0)), "beta2"),
]


@pytest.mark.parametrize("make, name", BAD_VALUES, ids=[f"{i}-{name}" for i, (_, name) in enumerate(BAD_VALUES)])
def test_out_of_range_hyperparameters_raise_value_errors_that_name_them(make, name):
    with pytest.raises(ValueError, match=name):
        make([Parameter(np.zeros(2))])


# not a finite real number: TypeError naming the hyperparameter (bool is not a number, even though True == 1)
NOT_NUMBERS = [True, False, "0.1", None, math.nan, math.inf, -math.inf, [0.1]]
HYPERPARAMETERS = [
    (lambda ps, v: SGD(ps, lr=v), "lr"),
    (lambda ps, v: SGD(ps, lr=0.1, momentum=v), "momentum"),
    (lambda ps, v: SGD(ps, lr=0.1, weight_decay=v), "weight_decay"),
    (lambda ps, v: SGD(ps, lr=0.1, dampening=v), "dampening"),
    (lambda ps, v: Adam(ps, lr=v), "lr"),
    (lambda ps, v: Adam(ps, eps=v), "eps"),
    (lambda ps, v: Adam(ps, betas=(v, 0.999)), "beta1"),
    (lambda ps, v: Adam(ps, betas=(0.9, v)), "beta2"),
    (lambda ps, v: AdamW(ps, weight_decay=v), "weight_decay"),
    (lambda ps, v: AdamW([{"params": ps, "lr": v}]), "lr"),
]


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
@pytest.mark.parametrize("make, name", HYPERPARAMETERS, ids=[f"{i}-{n}" for i, (_, n) in enumerate(HYPERPARAMETERS)])
def test_hyperparameters_that_are_not_finite_numbers_raise_type_errors_that_name_them(make, name, value):
    with pytest.raises(TypeError, match=rf"{name}=.*finite real number"):
        make([Parameter(np.zeros(2))], value)


def test_nesterov_must_be_a_bool():
    with pytest.raises(TypeError, match="nesterov"):
        SGD([Parameter(np.zeros(2))], lr=0.1, momentum=0.9, nesterov="yes")


def test_a_zero_learning_rate_is_allowed_and_leaves_parameters_unchanged():
    parameter = Parameter(np.array([1.0, -2.0]))
    for optimizer in (SGD([parameter], lr=0.0, momentum=0.9), Adam([parameter], lr=0.0)):
        parameter.grad = np.array([0.5, 0.25])
        optimizer.step()
        np.testing.assert_array_equal(parameter.data, [1.0, -2.0])


@pytest.mark.parametrize("value, error", [(-0.1, ValueError), (True, TypeError), (math.nan, TypeError)])
def test_the_lr_setter_checks_its_value_and_changes_nothing_when_bad(value, error):
    optimizer = SGD([Parameter(np.zeros(2))], lr=0.1)
    with pytest.raises(error, match="lr"):
        optimizer.lr = value
    assert optimizer.lr == 0.1


@pytest.mark.parametrize("damage, message", [
    (lambda s: s["groups"][0].update(lr=-1.0), "lr"),
    (lambda s: s["groups"][0].update(betas=[0.9, 2.0]), "beta2"),
    (lambda s: s["groups"][0].update(eps=True), "eps"),
    (lambda s: s["groups"][0].update(momentun=0.9), "momentun"),
    (lambda s: s.update(groups="not a list"), "groups"),
    (lambda s: s.update(step_count=-3), "step_count"),
    (lambda s: s.update(step_count=1.5), "step_count"),
    (lambda s: s.pop("state"), "state"),
], ids=["lr", "beta2", "eps-bool", "unknown", "groups", "step_count-negative", "step_count-float", "no-state"])
def test_load_state_dict_refuses_damaged_hyperparameters_and_changes_nothing(damage, message):
    parameters = _two_parameters()
    source = Adam(parameters, lr=0.01)
    _steps(source, parameters, 0, 1)
    state = source.state_dict()
    damage(state)
    target = Adam(_two_parameters(), lr=0.02)
    with pytest.raises((ValueError, TypeError), match=message):
        target.load_state_dict(state)
    assert target.lr == 0.02 and target.step_count == 0 and not target.state


def test_bad_parameter_lists():
    parameter = Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="more than one group"):
        SGD([{"params": [parameter]}, {"params": [parameter]}], lr=0.1)
    with pytest.raises(ValueError, match="momentun"):
        SGD([{"params": [parameter], "momentun": 0.9}], lr=0.1)
    with pytest.raises(TypeError):
        SGD([np.zeros(2)], lr=0.1)


@pytest.mark.parametrize("group, name", [({"lr": -1.0}, "lr"), ({"momentum": 5.0}, "momentum"),
                                         ({"weight_decay": -0.5}, "weight_decay")])
def test_bad_hyperparameters_in_a_group_raise_errors_that_name_them(group, name):
    with pytest.raises(ValueError, match=name):
        SGD([{"params": [Parameter(np.zeros(2))], **group}], lr=0.1, momentum=0.5)


@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_adam_step_leaves_the_gradient_alone(cls):
    """The update works in a scratch buffer of its own: parameter.grad must come out as it went in."""
    parameter = Parameter(start_values())
    optimizer = cls([parameter], lr=0.05, weight_decay=0.1)
    for step in range(3):
        parameter.grad = gradient_at(parameter.data, step)
        kept = parameter.grad.copy()
        optimizer.step()
        np.testing.assert_array_equal(parameter.grad, kept)

"""`Optimizer`: parameter groups, zero_grad, and a state_dict that a checkpoint can hold."""
from __future__ import annotations

import numpy as np

from ..engine.backend import to_device, to_numpy
from ..engine.checks import require_number
from ..nn.module import Parameter


class Optimizer:
    """Base class. `params`: Parameters, or dicts {"params": [...], <hyperparameter overrides>} (groups)."""

    def __init__(self, params, defaults: dict):
        params = list(params)
        if not params:
            raise ValueError("the optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.defaults = dict(defaults)
        self.param_groups = []
        seen = set()
        for group in groups:
            unknown = set(group) - set(defaults) - {"params"}
            if unknown:
                raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)}; expected {sorted(defaults)}")
            members = list(group["params"])
            for parameter in members:
                if not isinstance(parameter, Parameter):
                    raise TypeError(f"optimizers update Parameters, got {type(parameter).__name__}")
                if id(parameter) in seen:
                    raise ValueError("a parameter appears in more than one group")
                seen.add(id(parameter))
            merged = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}, "params": members}
            self.check_group(merged)
            self.param_groups.append(merged)
        self.state = {}      # id(parameter) -> {name: array}
        self.step_count = 0

    def parameters(self):
        return [parameter for group in self.param_groups for parameter in group["params"]]

    def zero_grad(self) -> None:
        for parameter in self.parameters():
            parameter.grad = None

    def step(self) -> None:
        self.step_count += 1
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self._update(parameter, parameter.grad, self.state.setdefault(id(parameter), {}), group)

    def check_group(self, group: dict) -> None:
        """Raise an error naming any hyperparameter of `group` (defaults merged with overrides) that is not a
        finite number (TypeError) or out of its range (ValueError)."""
        raise NotImplementedError

    def _update(self, parameter, grad, state, group) -> None:
        raise NotImplementedError

    # ----- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"step_count", "groups": hyperparameters, "state": {position: {name: numpy array}}}.

        State arrays have their parameter's shape; 0-d entries are per-parameter counters (Adam's step)."""
        positions = {id(parameter): position for position, parameter in enumerate(self.parameters())}
        return {
            "step_count": self.step_count,
            "groups": [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups],
            "state": {positions[key]: {name: np.array(to_numpy(value)) for name, value in entry.items()}
                      for key, entry in self.state.items() if key in positions},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        parameters = self.parameters()
        if not isinstance(state_dict, dict) or not {"groups", "state", "step_count"} <= set(state_dict):
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected a dict with groups, state and "
                             f"step_count, got {type(state_dict).__name__}")
        groups = state_dict["groups"]
        if not isinstance(groups, (list, tuple)) or not all(isinstance(group, dict) for group in groups):
            raise ValueError(f"optimizer state groups must be a list of dicts, got {groups!r:.80}")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(groups)} parameter group(s), this optimizer {len(self.param_groups)}")
        new_state = {}
        for position, entry in state_dict["state"].items():
            position = int(position)
            if position >= len(parameters):
                raise ValueError(f"optimizer state names parameter {position}, but there are {len(parameters)}")
            parameter = parameters[position]
            restored = {}
            for name, value in entry.items():
                if np.ndim(value) == 0:
                    restored[name] = np.asarray(value).item()
                elif np.shape(value) == parameter.shape:
                    restored[name] = to_device(np.array(value, dtype=parameter.dtype), parameter.device)
                else:
                    raise ValueError(f"optimizer state {name!r} of parameter {position} has shape {np.shape(value)}, "
                                     f"the parameter {parameter.shape}")
            new_state[id(parameter)] = restored
        step_count = state_dict["step_count"]
        if isinstance(step_count, bool) or not isinstance(step_count, (int, np.integer)) or step_count < 0:
            raise ValueError(f"optimizer state step_count={step_count!r} must be an int >= 0")
        merged_groups = []
        for group, saved in zip(self.param_groups, groups):
            unknown = set(saved) - set(self.defaults)
            if unknown:
                raise ValueError(f"optimizer state group has unknown hyperparameter(s) {sorted(unknown)}")
            merged = {**group, **saved}
            self.check_group(merged)  # every group is checked before any is changed
            merged_groups.append(merged)
        for group, merged in zip(self.param_groups, merged_groups):
            group.update(merged)
        self.state, self.step_count = new_state, int(step_count)

    @property
    def lr(self) -> float:
        """The first group's learning rate (the only one, unless groups were given)."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        """One learning rate for every group (a schedule that keeps groups' ratios sets group["lr"] instead)."""
        value = check_hyperparameter(value, "lr", f"{type(self).__name__}.lr", low=0.0)
        for group in self.param_groups:
            group["lr"] = value


def check_hyperparameter(value, name: str, op: str, low=None, high=None, low_open=False, high_open=False) -> float:
    """`value` as a float: a finite real number (not a bool) in the interval from `low` to `high`, each end
    closed unless `low_open` / `high_open`. TypeError for a non-number, a bool or a non-finite value (as
    engine.checks.require_number), ValueError naming `name`, its value and the interval otherwise."""
    value = require_number(value, name, op, finite=True)  # TypeError for bool, str, None, nan, inf
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        interval = f"{'(' if low_open else '['}{'-inf' if low is None else low}, " \
                   f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{op}: {name}={value!r} must be in {interval}")
    return value


def check_hyperparameters(lr, weight_decay=0.0, op: str = "optimizer") -> None:
    """lr finite >= 0 (0 freezes a group; a schedule's floor may be 0), weight_decay finite >= 0."""
    check_hyperparameter(lr, "lr", op, low=0.0)
    check_hyperparameter(weight_decay, "weight_decay", op, low=0.0)

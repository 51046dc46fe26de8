"""Process settings the `tinymoe` application chooses for itself (the library never changes the environment)."""
from __future__ import annotations

import os

_SET_BY_TINYMOE = False


def prefer_passive_openmp() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user set OMP_WAIT_POLICY. Numba's parallel kernels run on OpenMP
    workers that by default spin for a while after each kernel; on a 2-core machine the spinning workers take
    the cores OpenBLAS needs for the next matmul (measured: the step gets slower). Must run before numba
    loads, since the OpenMP runtime reads the variable once, when it starts."""
    global _SET_BY_TINYMOE
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _SET_BY_TINYMOE = True


def omp_wait_policy() -> str:
    """The OMP_WAIT_POLICY of this process and who chose it, for `tinymoe info`."""
    value = os.environ.get("OMP_WAIT_POLICY")
    if value is None:
        return "unset (OpenMP default)"
    if _SET_BY_TINYMOE:
        return f"{value} (set by the tinymoe command; set OMP_WAIT_POLICY yourself to override)"
    return f"{value} (from the environment)"

"""Expert- and data-parallel MoE over MPI: pytest launches `mpiexec -n P python tests/distributed/ep_cases.py`
(P = 2 and 4, oversubscribed) and checks every rank passed. Skipped where mpi4py or mpiexec is missing.

The ranks use the NumPy reference kernels (TINYMOE_KERNELS=numpy): what is under test is the exchange and
the gradient bookkeeping, and P processes compiling Numba kernels at once on a small machine take longer
than the checks themselves (the kernels are compared with each other in tests/kernels)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_distributed_mpi import MPIEXEC, needs_mpi

CASES = Path(__file__).with_name("ep_cases.py")
TIMEOUT_S = 120  # about 3 s for P = 4 on an idle 2-core machine; generous for a shared one


@needs_mpi
@pytest.mark.parametrize("n_ranks", [2, 4])
def test_expert_parallel_layer_and_training_equal_one_process(n_ranks):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_", "MPI_"))}
    environment["TINYMOE_KERNELS"] = "numpy"
    result = subprocess.run([MPIEXEC, "-n", str(n_ranks), sys.executable, str(CASES)], capture_output=True,
                            text=True, timeout=TIMEOUT_S, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ep_cases: 10 cases passed on {n_ranks} ranks" in result.stdout

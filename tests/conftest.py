"""Suite-wide set-up. Fixture plugins of the areas are listed in `pytest_plugins`."""

import os
import shutil

# Triton's interpreter must be chosen before any @triton.jit function is defined, so this
# runs before any test module imports bloomrun.kernels. On a machine with a CUDA device the
# kernels are compiled for real instead.
if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

pytest_plugins: list[str] = ["tests.cluster.fixture"]

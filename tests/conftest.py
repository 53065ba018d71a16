import os

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's CPU interpreter (set before d2sm_ext imports
# Triton). On a GPU machine the real kernels run and the CUDA variants of the tests are used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

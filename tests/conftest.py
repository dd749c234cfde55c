import os

import torch

# Triton kernels run on CPU tensors only in interpreter mode, and the flag is read
# when a kernel is decorated: set it before anything imports our Triton modules. With a
# GPU the kernels are compiled and run on CUDA tensors instead (tools/gpu_check.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from hypothesis import settings

    # CI must be repeatable: property tests draw the same examples on every run. Run with
    # HYPOTHESIS_PROFILE=explore to search new ones locally.
    settings.register_profile("ci", derandomize=True, deadline=None)
    settings.register_profile("explore", max_examples=2000, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass

import os

# Triton kernels run on CPU tensors only in interpreter mode, and the flag is read
# when a kernel is decorated: set it before anything imports our Triton modules.
os.environ.setdefault("TRITON_INTERPRET", "1")

"""The only module that reads os.environ. Every KVPLUG_* variable is listed here.

Environment variables are for debugging and backend overrides only, never for
behaviour the scheduler and the workers must agree on (that goes in KVPlugConfig).

| variable                  | meaning                                                       |
|---------------------------|---------------------------------------------------------------|
| KVPLUG_<OP>_BACKEND       | force one implementation of op <OP>: cuda, triton or torch     |
| TRITON_INTERPRET          | read, not set: 1 lets Triton kernels run on CPU tensors        |
"""
import os

BACKENDS = ("cuda", "triton", "torch")


def op_backend(op: str) -> str | None:
    """The backend forced for `op` by KVPLUG_<OP>_BACKEND, or None."""
    name = f"KVPLUG_{op.upper()}_BACKEND"
    value = os.environ.get(name)
    if value is None or value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"{name}={value!r}: allowed values are auto, {', '.join(BACKENDS)}")
    return value


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

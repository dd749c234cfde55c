"""kvplug's Triton kernels, installed as `kvplug._triton` (never as `triton_kernels`).

Triton ships a real package named `triton_kernels` that vLLM probes for with a trial import.
When this folder is reached as `triton_kernels` (Python started in the repository root puts
it on sys.path), refuse the import so the probe sees "absent" instead of our kernels.
"""
if __name__ == "triton_kernels":
    raise ImportError(
        "this triton_kernels/ folder is kvplug's Triton source (import it as kvplug._triton); "
        "it is not Triton's triton_kernels package"
    )

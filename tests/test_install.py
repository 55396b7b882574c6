"""The install: no folder of the checkout shadows an installed package, and import names are real folders."""
import importlib.util
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from vcr1_testing import REPO


def _run(code: str, cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_repo_root_first_on_path_shadows_nothing():
    """From the repository root (`python -c` puts it first on sys.path): transformers' Qwen2.5-VL modelling
    (which imports the PyPI package `kernels`), vcr1 and vcr1_kernels import, and `kernels` is the
    installed package, not the checkout's kernels/ folder."""
    assert metadata.version("kernels"), "the PyPI package `kernels` is not installed (the lock file pins it)"
    found = _run(
        "import json, sys\n"
        "import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl\n"
        "import vcr1.packing, vcr1_kernels, kernels\n"
        "print(json.dumps({'path0': sys.path[0], 'kernels': kernels.__file__, 'vcr1_kernels': vcr1_kernels.__file__,"
        " 'vcr1': vcr1.__file__}))", cwd=REPO)
    assert found["path0"] == ""  # the repository root really was first
    installed = Path(metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    assert Path(found["kernels"]).resolve() == installed
    # The editable install points at the real folders: no remapped or doubled import names.
    assert Path(found["vcr1_kernels"]).resolve() == REPO / "kernels" / "vcr1_kernels" / "__init__.py"
    assert Path(found["vcr1"]).resolve() == REPO / "vcr1" / "__init__.py"


def test_only_vcr1_is_a_package_at_the_root():
    """A top-level folder with __init__.py would win over an installed package of the same name; only vcr1
    may be one. kernels/ is a plain folder around the vcr1_kernels package."""
    packages = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").exists())
    assert packages == ["vcr1"]
    assert not list((REPO / "kernels").glob("*.py")), "modules directly in kernels/ would be importable as kernels.*"
    assert (REPO / "kernels" / "vcr1_kernels" / "__init__.py").is_file()


def test_train_script_keeps_checkout_off_the_front_of_sys_path(tmp_path):
    """`torchrun vcr1/train.py` starts with vcr1/ first on sys.path; the script removes it before importing
    anything, so vcr1/'s modules cannot hide installed ones and the repo root is not put ahead."""
    script = REPO / "vcr1" / "train.py"
    found = _run(
        "import json, runpy, sys\n"
        f"sys.path.insert(0, {str(script.parent)!r})\n"
        f"g = runpy.run_path({str(script)!r}, run_name='vcr1_train_as_script')\n"
        "print(json.dumps({'path': sys.path, 'loss_from': g['token_logprobs'].__module__}))", cwd=tmp_path)
    resolved = [str(Path(p or tmp_path).resolve()) for p in found["path"]]
    assert str(script.parent) not in resolved
    assert str(REPO) not in resolved  # installed: reached through site-packages, not by a path entry
    assert found["loss_from"].startswith("vcr1_kernels.")


def _cuda_pins():
    spec = importlib.util.spec_from_file_location("cuda_pins", REPO / "scripts" / "cuda_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_pins_keep_torch_and_match_torchcodec_to_it():
    pins = _cuda_pins()
    for minor in pins.SUPPORTED:
        lines = pins.constraints(f"{minor}.1+cu128")
        assert lines[0] == f"torch=={minor}.1+cu128"  # the user's build, kept exactly
        torchcodec = next(line for line in lines if line.startswith("torchcodec=="))
        assert torchcodec == f"torchcodec==0.{minor.split('.')[1]}.*"  # torchcodec 0.N goes with torch 2.N


def test_unsupported_cuda_torch_stops_setup_with_the_supported_versions():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "cuda_pins.py"), "2.8.0+cu126"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    message = run.stderr.strip()
    assert "\n" not in message and "2.8.0+cu126" in message
    assert all(minor in message for minor in _cuda_pins().SUPPORTED)


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "scripts" / "requirements-cpu.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement = Requirement(line.split(";")[0])
            (spec,) = requirement.specifier  # exactly one `==` pin per package
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_cpu_lock_pins_every_dependency_within_the_declared_ranges():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = _lock()
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    for entry in declared:
        requirement = Requirement(entry)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{name} is not in the lock"
        assert requirement.specifier.contains(lock[name], prereleases=True), f"lock {name}=={lock[name]} vs {entry}"
    assert lock["torchcodec"].minor == lock["torch"].minor  # the same pairing rule as on CUDA machines
    assert "kernels" in lock  # transformers' dependency, which tests the shadowing above

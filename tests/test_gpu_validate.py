"""bench/gpu_validate.sh: its --smoke runs every phase at tiny shapes on the CPU and reports each with the
schema, so the one command meant for a GPU machine cannot rot between the rare runs there."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from vcr1_testing import REPO, torchcodec_missing

spec = importlib.util.spec_from_file_location("gpu_validate", REPO / "bench" / "gpu_validate.py")
gv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gv)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}  # the script runs this Python
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_validate.sh"), "--smoke", "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return run, out


def test_smoke_runs_every_phase_in_order_with_the_schema(smoke):
    run, out = smoke
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "gpu_validate_smoke.json").read_text())
    assert list(report["phases"]) == [name for name, *_ in gv.PHASES]
    assert (out / "gpu_validate_smoke.log").stat().st_size > 0
    for name, phase in report["phases"].items():
        assert set(gv.SCHEMA) <= set(phase), name
        needs_video = name in ("nvdec", "grpo_step")  # the only phases that may skip, and only for a reason
        reason = torchcodec_missing() or gv.ffmpeg_missing()
        if needs_video and reason:
            assert phase["status"] == "skipped" and phase["error"] == reason
            continue
        assert phase["status"] == "ok", (name, phase["error"])
        assert phase["device"]["type"] == "cpu" and phase["versions"]["torch"], name
        assert phase["wall_s"] <= phase["time_limit_s"], name
        for ratio, entry in phase["ratios"].items():
            assert set(entry) == {"value", "target", "met"}, (name, ratio)
            judged = entry["target"] is not None and isinstance(entry["value"], (int, float))
            assert isinstance(entry["met"], bool) if judged else entry["met"] is None, (name, ratio)
        for peer, entry in phase["peers"].items():  # a measured peer, or null with its reason
            assert "median_s" in entry or (entry["value"] is None and entry["reason"]), (name, peer)
        if name not in ("probe", "cuda_tests"):
            assert phase["median_s"] > 0 and phase["dtype"] and phase["shapes"], name


def test_smoke_measures_what_it_claims(smoke):
    """The smoke's numbers are real measurements: the kernel is accurate, the packed forward saves what
    the ideal one does, the ceilings are positive, the test run is counted."""
    run, out = smoke
    phases = json.loads((out / "gpu_validate_smoke.json").read_text())["phases"]
    assert phases["probe"]["results"]["attention"]["auto"] == "prefix"  # the CPU's pick (vcr1/packing.py)
    assert phases["ceilings"]["results"]["gemm_tflops"] > 0 and phases["ceilings"]["results"]["copy_bandwidth_Bps"] > 0
    accuracy = phases["head_accuracy"]
    assert accuracy["checks"]["finite"] and accuracy["checks"]["within_tolerance"], accuracy["ratios"]
    speed = phases["head_speed"]
    impls = {(row["n"], row["impl"]) for row in speed["results"]["rows"]}
    assert {(n, impl) for n in speed["shapes"]["n"] for impl in ("matmul", "triton", "eager", "torch")} <= impls
    group = phases["group_forward"]
    assert group["ratios"]["packed_prefix_over_ideal_saved"]["met"]
    assert group["ratios"]["padded_over_packed_saved"]["value"] > 1
    counts = phases["cuda_tests"]["results"]["counts"]
    assert counts["tests"] >= 1 and counts["skipped"] == counts["tests"]  # CUDA-only tests skip on the CPU
    assert phases["rollout"]["ratios"]["decode_step_over_bandwidth_bound"]["value"] > 0


def test_a_phase_past_its_limit_is_killed_and_reported(tmp_path):
    """A phase that overruns is killed with its process group and recorded as a timeout with the schema."""
    with open(tmp_path / "log", "w") as log:
        data = gv.run_phase("probe", 0.2, tmp_path, True, log)  # importing torch alone takes longer
    assert data["status"] == "timeout" and "limit" in data["error"]
    assert set(gv.SCHEMA) <= set(data) and data["time_limit_s"] == 0.2

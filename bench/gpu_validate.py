"""Every GPU path in one run: `bash bench/gpu_validate.sh` (docs/gpu_validation.md).

The phases run in order, each in its own Python process (its own process group) under its own time limit,
within one overall budget (8 minutes on one H100/H200). Each phase writes its JSON as it goes; the driver
merges it into one results file as soon as the phase ends, so a timeout or a crash keeps every earlier
phase and the rows the interrupted one had finished. One file rather than one per phase because the GPU
machine hands back at most 8 files. `--smoke` runs the same phases at tiny shapes on the CPU (Triton in
its interpreter), as the test suite does in CI, so the harness cannot rot.

Every phase records the same keys (SCHEMA): device, versions, dtype, shapes, median_s, peak_memory_bytes,
ratios (each with its target in docs/gpu_validation.md, when it has one), peers (a missing peer is null
with its reason), checks (pass/fail facts) and results (the detail). Measurement code comes from the
benchmarks (bench/test_bench_*.py) and tests/support wherever they have it.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = ("phase", "status", "smoke", "wall_s", "time_limit_s", "device", "versions", "dtype", "shapes",
          "median_s", "peak_memory_bytes", "ratios", "peers", "checks", "results")
STATUSES = ("ok", "skipped", "error", "timeout")
TOTAL_S = {"gpu": 470, "smoke": 600}  # the GPU run must end inside 8 minutes, wheel install included
# (name, GPU time limit s, smoke time limit s), in the order they run.
PHASES = (
    ("probe", 20, 60),
    ("ceilings", 20, 60),
    ("head_accuracy", 40, 90),
    ("head_speed", 80, 90),
    ("cuda_tests", 90, 90),
    ("rollout", 50, 90),
    ("group_forward", 65, 90),  # includes the first flex compile, timed apart
    ("nvdec", 25, 60),
    ("grpo_step", 90, 120),
)
# Test files whose CUDA paths run when a GPU is there (the rest of the suite is the same on both).
CUDA_TEST_FILES = ("tests/test_kernels.py", "tests/test_packing.py", "tests/test_rollout.py", "tests/test_video.py")
# The smoke runs one CUDA-only test (it skips on the CPU): enough to exercise the run and the report.
SMOKE_TEST_SELECTION = ("tests/test_rollout.py", "-k", "cuda_graphs_match_eager")
# bf16 operands: ‖out − ref‖ / ‖ref‖ lands between 1e-3 and 1e-2 against an fp32 reference.
BF16_REL_TOLERANCE = 1e-2


# ---------------------------------------------------------------------------------------------- the driver

def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def results_dir(args) -> Path:
    if args.out:
        return Path(args.out)
    if args.smoke:  # never the repository's bench/results: CI must not dirty the checkout
        return Path(tempfile.mkdtemp(prefix="vcr1_gpu_validate_"))
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"


def write_json(path: Path, data) -> None:
    """Atomically (write, then rename): a kill mid-write leaves the previous version, never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def run_phase(name: str, limit: float, work: Path, smoke: bool, log) -> dict:
    """Runs one phase in a new process group (so its children die with it at the limit) and returns its JSON,
    marked timeout/error when the process did not finish cleanly."""
    from vcr1.distributed import standalone_env

    # A phase is a process of its own: a caller's process-group variables (a test runner that built a
    # trainer in-process holds MASTER_PORT open) would make the phase's trainer join or collide with it.
    env = standalone_env(VCR1_BENCH_RESULTS=str(work / "bench_results"), PYTHONUNBUFFERED="1")
    if smoke:  # the CPU mode, even on a GPU machine; Triton in its interpreter
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--work", str(work),
           "--limit", str(limit)] + (["--smoke"] if smoke else [])
    log.write(f"\n===== {name} (limit {limit:.0f} s) =====\n")
    log.flush()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
        status = None if code == 0 else "error"
        reason = None if code == 0 else f"exit code {code} (see the log)"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status, reason = "timeout", f"killed at its {limit:.0f} s limit"
    path = work / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else blank(name, smoke)
    if status:
        data["status"] = status
        data["error"] = reason if data.get("error") is None else f"{reason}; {data['error']}"
    elif data["status"] not in STATUSES:
        data["status"], data["error"] = "error", "the phase ended without reporting"
    data["wall_s"], data["time_limit_s"] = time.monotonic() - start, limit
    return data


def drive(args) -> int:
    out = results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vcr1_gpu_validate_work_"))
    mode = "smoke" if args.smoke else "gpu"
    name = "gpu_validate_smoke" if args.smoke else f"gpu_validate_{slug(smi_gpu_name() or 'cpu')}"
    report = {"command": "bash bench/gpu_validate.sh" + (" --smoke" if args.smoke else ""), "mode": mode,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "phases": {}}
    deadline = time.monotonic() + TOTAL_S[mode]
    only = set(args.only.split(",")) if args.only else None
    with open(out / f"{name}.log", "w") as log:
        for phase, gpu_limit, smoke_limit in PHASES:
            if only and phase not in only:
                continue
            limit = min(smoke_limit if args.smoke else gpu_limit, deadline - time.monotonic())
            if limit < 5:
                data = blank(phase, args.smoke)
                data.update(status="skipped", error=f"the run's {TOTAL_S[mode]} s budget was spent")
            else:
                data = run_phase(phase, limit, work, args.smoke, log)
            report["phases"][phase] = data
            report["total_s"] = sum(p["wall_s"] or 0 for p in report["phases"].values())
            write_json(out / f"{name}.json", report)
            print(f"{phase:14s} {data['status']:8s} {data['wall_s'] or 0:6.1f} s  {summary(data)}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"results: {out / (name + '.json')}")
    return 0 if all(p["status"] in ("ok", "skipped") for p in report["phases"].values()) else 1


def summary(data: dict) -> str:
    """One line for the console: the error, or the ratios against their targets."""
    if data.get("error"):
        return data["error"].splitlines()[0][:100]
    parts = [f"{k} {v['value']:.3g}" + ("" if v["target"] is None else f" ({v['target']})")
             for k, v in data["ratios"].items() if isinstance(v["value"], (int, float))]
    return "; ".join(parts)[:160]


def smi_gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi: the driver process never starts CUDA, whose context would hold
    GPU memory through every phase."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    names = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return names.stdout.splitlines()[0].strip() if names.returncode == 0 and names.stdout.strip() else None


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------- a phase

def blank(phase: str, smoke: bool) -> dict:
    return {"phase": phase, "status": "running", "smoke": smoke, "wall_s": None, "time_limit_s": None,
            "device": None, "versions": None, "dtype": None, "shapes": None, "median_s": None,
            "peak_memory_bytes": None, "ratios": {}, "peers": {}, "checks": {}, "results": {}, "error": None}


class Report:
    """One phase's JSON, rewritten after every finished piece (so a timeout keeps the pieces)."""

    def __init__(self, phase: str, work: Path, smoke: bool):
        import torch

        self.path = work / f"{phase}.json"
        self.data = blank(phase, smoke)
        cuda = torch.cuda.is_available()
        self.data["device"] = {"type": "cuda" if cuda else "cpu", "name": gpu_name() or "cpu",
                               "count": torch.cuda.device_count(), "threads": torch.get_num_threads()}
        self.data["versions"] = versions()
        self.save()

    def __getitem__(self, key):
        return self.data[key]

    def __setitem__(self, key, value):
        self.data[key] = value

    def ratio(self, name: str, value, target: str | None = None):
        """A ratio and its docs/gpu_validation.md target (">= 3", "<= 1.5"), with whether it is met."""
        met = None
        if target is not None and isinstance(value, (int, float)):
            op, bound = target.split()
            met = value >= float(bound) if op == ">=" else value <= float(bound)
        self.data["ratios"][name] = {"value": value, "target": target, "met": met}

    def peer(self, name: str, measured: dict | None, reason: str | None = None):
        """A peer's measurement (with its median_s), or null and why it has none."""
        self.data["peers"][name] = measured if measured is not None else {"value": None, "reason": reason}

    def save(self):
        write_json(self.path, self.data)


def versions() -> dict:
    """Installed versions, read from package metadata (nothing imported)."""
    import platform
    from importlib import metadata

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("triton", "transformers", "deepspeed", "liger-kernel", "torchcodec", "flash-attn", "vcr1"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of fn(), synchronised before and after each call, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cuda_peak(fn) -> int | None:
    """Peak device bytes allocated during fn() beyond those allocated before it (None on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - before


def rel_error(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def ffmpeg_missing() -> str | None:
    return None if shutil.which("ffmpeg") else "no ffmpeg CLI on PATH (the synthetic videos are encoded with it)"


def earlier(work: Path, phase: str) -> dict | None:
    path = work / f"{phase}.json"
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------- phases

def phase_probe(r: Report, smoke: bool, work: Path, limit: float):
    """Versions, the GPU, the attention backend `auto` picks, FFmpeg, torchcodec and NVDEC."""
    import torch

    from vcr1 import packing
    from vcr1_testing import torchcodec_missing

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    r["dtype"] = str(dtype).removeprefix("torch.")
    gpu = {}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        gpu = {"capability": list(torch.cuda.get_device_capability()), "multiprocessors": props.multi_processor_count,
               "memory_bytes": props.total_memory, "l2_bytes": getattr(props, "L2_cache_size", None)}
        smi = shutil.which("nvidia-smi")
        if smi:
            gpu["driver"] = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
    backends = {b: packing.unavailable_reason(b, device, dtype) or "available" for b in packing.ATTENTION_BACKENDS}
    ffmpeg = shutil.which("ffmpeg")
    ldconfig = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout if shutil.which("ldconfig") \
        else ""
    codec_missing = torchcodec_missing()
    try:
        import deepspeed  # noqa: F401  (the trainer and the step phase need it)
        deepspeed_error = None
    except Exception as e:  # noqa: BLE001  (any failure to import is the finding)
        deepspeed_error = f"{type(e).__name__}: {e}"
    r["results"] = {
        "gpu": gpu,
        "attention": {"auto": packing.pick_backend("auto", device, dtype), "backends": backends},
        "ffmpeg_cli": subprocess.run([ffmpeg, "-version"], capture_output=True, text=True).stdout.split("\n")[0]
        if ffmpeg else None,
        "libavcodec_in_ldconfig": "libavcodec" in ldconfig,
        "libnvcuvid_in_ldconfig": "libnvcuvid" in ldconfig,  # NVDEC's driver library
        "torchcodec": codec_missing or "loads",
        "deepspeed": deepspeed_error or "imports",
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "carried_site": os.environ.get("VCR1_GPU_SITE"),
    }
    r["checks"] = {"cuda": cuda, "ffmpeg_cli": ffmpeg is not None, "torchcodec": codec_missing is None,
                   "deepspeed": deepspeed_error is None, "nvdec_possible": cuda and codec_missing is None
                   and "libnvcuvid" in ldconfig}


def phase_ceilings(r: Report, smoke: bool, work: Path, limit: float):
    """The two ceilings every later ratio is taken against: a bf16 GEMM at 8k³ and a device copy."""
    import torch
    from test_bench_rollout import copy_bandwidth

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    n, dtype, nbytes = (8192, torch.bfloat16, 1 << 30) if not smoke else (256, torch.float32, 1 << 24)
    r["dtype"], r["shapes"] = str(dtype).removeprefix("torch."), {"gemm": [n, n, n], "copy_bytes": nbytes}
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=dtype)  # random, never zeros (METHOD.md)
    b = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    seconds = median_time(lambda: a @ b, repeats=10 if cuda else 3, warmup=3 if cuda else 1)
    r["median_s"] = seconds
    r["peak_memory_bytes"] = cuda_peak(lambda: a @ b)
    bandwidth = copy_bandwidth(device, nbytes)
    r["results"] = {"gemm_tflops": 2 * n**3 / seconds / 1e12, "copy_bandwidth_Bps": bandwidth,
                    "copy_counts": "bytes read + bytes written"}


def _head_inputs(n, dim, vocab, dtype, device, seed=0):
    import torch

    gen = torch.Generator(device).manual_seed(seed)
    return (torch.randn(n, dim, generator=gen, device=device, dtype=dtype),
            (dim**-0.5 * torch.randn(vocab, dim, generator=gen, device=device)).to(dtype),
            torch.randint(vocab, (n,), generator=gen, device=device),
            torch.randn(n, generator=gen, device=device))


def phase_head_accuracy(r: Report, smoke: bool, work: Path, limit: float):
    """The fused head at the 7B head against the fp32 reference: log-probs and both gradients, and whether
    two backward passes give bitwise equal gradients."""
    import torch

    from vcr1_kernels import token_logprobs, token_logprobs_reference

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    n, dim, vocab = (2048, 3584, 152064) if not smoke else (64, 64, 1000)
    dtype = torch.bfloat16
    r["dtype"], r["shapes"] = "bfloat16", {"n": n, "h": dim, "v": vocab}
    hidden, weight, targets, grad = _head_inputs(n, dim, vocab, dtype, device)

    def fused():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = token_logprobs(h, w, targets, backend="triton")
        (logp * grad).sum().backward()
        return logp.detach(), h.grad, w.grad

    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref = token_logprobs_reference(h32, w32, targets)
    (ref * grad).sum().backward()
    first, second = fused(), fused()
    errors = {name: rel_error(ours, theirs) for name, ours, theirs in
              zip(("logprobs", "d_hidden", "d_weight"), first, (ref.detach(), h32.grad, w32.grad))}
    for name, value in errors.items():
        r.ratio(f"rel_error_{name}", value, f"<= {BF16_REL_TOLERANCE}")
    r["checks"] = {
        "finite": all(bool(torch.isfinite(t).all()) for t in first),
        "within_tolerance": all(e <= BF16_REL_TOLERANCE for e in errors.values()),
        "bitwise_deterministic_d_hidden": torch.equal(first[1], second[1]),
        "bitwise_deterministic_d_weight": torch.equal(first[2], second[2]),
        "bitwise_deterministic_logprobs": torch.equal(first[0], second[0]),
    }
    r["median_s"] = median_time(fused, repeats=3)
    r["peak_memory_bytes"] = cuda_peak(fused)
    r["results"] = {"reference": "token_logprobs_reference on fp32 copies of the same bf16 inputs",
                    "loss": "sum(logp * g), g ~ N(0, 1) per token", "what": "median_s: fused forward + backward"}


def _bench_impls(lm):
    """bench/test_bench_lm_head.py's implementations in its order, each with the reason its marks skip it here
    (None when it runs), so this phase times exactly what the benchmark would."""
    for param in lm.IMPLS:
        name = param.values[0] if hasattr(param, "values") else param
        marks = getattr(param, "marks", ())
        skips = [m.kwargs.get("reason", "skipped") for m in marks
                 if m.name == "skipif" and (m.args[0] if m.args else m.kwargs.get("condition"))]
        yield name, (skips[0] if skips else None)


def phase_head_speed(r: Report, smoke: bool, work: Path, limit: float):
    """The fused GRPO loss forward + backward at N = 4k and 16k against the fp32 reference, eager logits, Liger
    and a bare cuBLAS head (bench/test_bench_lm_head.py's implementations), as fractions of the GEMM ceiling
    measured by the ceilings phase and of one head GEMM."""
    import test_bench_lm_head as lm
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dim, vocab = (3584, 152064) if not smoke else (32, 515)
    sizes = (4096, 16384) if not smoke else (lm.SEQ_LEN, 2 * lm.SEQ_LEN)
    ours = next(iter(lm.OURS))  # the default fused path ("triton")
    ceiling = (earlier(work, "ceilings") or {}).get("results", {}).get("gemm_tflops")
    impls = list(_bench_impls(lm))
    # Ours first, then the peers, Inductor's compile last: a timeout then costs a peer row, never ours.
    impls.sort(key=lambda item: (item[0] not in lm.OURS, item[0] == "compiled"))
    r["dtype"] = str(lm.DTYPE).removeprefix("torch.")
    r["shapes"] = {"n": list(sizes), "h": dim, "v": vocab, "seq_len": lm.SEQ_LEN}
    table = []
    r["results"] = {"flops": "matmul 2NHV (one head GEMM); fwd_bwd 8NHV", "gemm_ceiling_tflops": ceiling,
                    "ours": ours, "rows": table}
    repeats = 3 if cuda else 1
    for n in sizes:
        x = lm._inputs(n, dim, vocab, device)
        rows = {"matmul": {"median_s": median_time(lambda x=x: x["hidden"] @ x["weight"].T, repeats),
                           "flops": 2 * n * dim * vocab, "peak_extra_bytes": None}}
        table.append({"n": n, "impl": "matmul", **rows["matmul"]})
        x["hidden"].requires_grad_(True)
        x["weight"].requires_grad_(True)
        for impl, skip in impls:
            if skip:
                r.peer(f"{impl}_{n}", None, skip)
                continue
            try:
                loss_fn = lm._loss_fn(impl, x)

                def step(x=x, loss_fn=loss_fn):
                    x["hidden"].grad = x["weight"].grad = None
                    loss_fn().backward()

                seconds = median_time(step, repeats)
                x["hidden"].grad = x["weight"].grad = None
                rows[impl] = {"median_s": seconds, "flops": 8 * n * dim * vocab,
                              "peak_extra_bytes": lm._peak_extra_bytes(step, x)}
            except Exception as e:  # noqa: BLE001  (a peer that fails is recorded, not fatal)
                if impl in lm.OURS:
                    raise
                r.peer(f"{impl}_{n}", None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            finally:
                x["hidden"].grad = x["weight"].grad = None
            rows[impl]["tflops"] = rows[impl]["flops"] / rows[impl]["median_s"] / 1e12
            table.append({"n": n, "impl": impl, **rows[impl]})
            if impl not in lm.OURS:
                r.peer(f"{impl}_{n}", rows[impl])
            r.save()
        if n == sizes[0]:
            r["median_s"], r["peak_memory_bytes"] = rows[ours]["median_s"], rows[ours]["peak_extra_bytes"]
        matmul_tflops = rows["matmul"]["flops"] / rows["matmul"]["median_s"] / 1e12
        r.ratio(f"fraction_of_gemm_ceiling_{n}", rows[ours]["tflops"] / ceiling if ceiling else None, ">= 0.6")
        r.ratio(f"fraction_of_head_matmul_{n}", rows[ours]["tflops"] / matmul_tflops, ">= 0.6")
        # docs/gpu_validation.md's targets: >= 3x Liger at <= its memory; >= 1.5x eager with >= 10x less extra memory.
        for peer, speed_target, memory_target in (("liger_grpo", ">= 3", ">= 1"), ("eager", ">= 1.5", ">= 10"),
                                                  ("torch", None, None), ("cublas", None, None),
                                                  ("compiled", None, None), ("liger_flce", None, None)):
            theirs = rows.get(peer)
            r.ratio(f"speedup_vs_{peer}_{n}", theirs["median_s"] / rows[ours]["median_s"] if theirs else None,
                    speed_target)
            memory = theirs["peak_extra_bytes"] / rows[ours]["peak_extra_bytes"] \
                if theirs and theirs["peak_extra_bytes"] and rows[ours]["peak_extra_bytes"] else None
            r.ratio(f"memory_{peer}_over_ours_{n}", memory, memory_target)
        r.save()


def phase_cuda_tests(r: Report, smoke: bool, work: Path, limit: float):
    """The test files whose CUDA paths run when a GPU is there; counts and failures from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    junit = work / "cuda_tests.xml"
    selection = list(SMOKE_TEST_SELECTION if smoke else CUDA_TEST_FILES)
    # -P: the repository root must not come first on sys.path (its kernels/ folder would pose as a package).
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *selection]
    r["shapes"], r["results"] = {"selection": selection}, {"command": " ".join(cmd[1:])}
    start = time.monotonic()
    try:
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(limit - 10, 5))
    except subprocess.TimeoutExpired as e:
        r["results"]["output_tail"] = (e.stdout or b"")[-3000:].decode(errors="replace") \
            if isinstance(e.stdout, bytes) else (e.stdout or "")[-3000:]
        raise TimeoutError(f"pytest ran past {limit - 10:.0f} s") from e
    r["median_s"] = time.monotonic() - start
    r["results"]["exit_code"] = run.returncode
    r["results"]["output_tail"] = run.stdout[-3000:] + run.stderr[-1000:]
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:200]}"
              for case in suite.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    skipped = sorted({(s.get("message") or "")[:200] for case in suite.iter("testcase") for s in case
                      if s.tag == "skipped"})
    r["results"].update(counts=counts, failed=failed, skip_reasons=skipped)
    r["checks"] = {"no_failures": counts["failures"] == 0 and counts["errors"] == 0,
                   "ran_some": counts["tests"] > counts["skipped"] or smoke}


class _Bench:
    """Stands in for pytest-benchmark's fixture, so the benchmarks' run functions work outside pytest."""

    stats = None

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, fn, args=(), kwargs=None, setup=None, rounds=1, iterations=1, warmup_rounds=0):
        result = None
        for _ in range(warmup_rounds + rounds):
            if setup:
                setup()
            for _ in range(iterations):
                result = fn(*args, **(kwargs or {}))
        return result


def phase_rollout(r: Report, smoke: bool, work: Path, limit: float):
    """Rollouts at the 7B shape (4 layers, 32 rows): tokens/s against HF generate, and one decode step against
    the bytes it must read over the copy bandwidth (bench/test_bench_rollout.py's run)."""
    import test_bench_rollout as rb
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = rb.CUDA_SHAPE if cuda and not smoke else rb.CPU_SHAPE
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = rb.run(shape, device, dtype, _Bench(), repeats=3 if cuda else 1)
    r["dtype"], r["shapes"] = str(dtype).removeprefix("torch."), result["shape"]
    r["median_s"] = result["fast"]["seconds"]
    r["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    r.peer("hf_generate", {"median_s": result["hf_generate"]["seconds"], **result["hf_generate"]})
    r.ratio("tokens_per_s_vs_hf_generate", result["speedup"], ">= 5")
    r.ratio("decode_step_over_bandwidth_bound", result["decode_step"]["ratio_to_bound"], "<= 1.5")
    r["results"] = result


def phase_group_forward(r: Report, smoke: bool, work: Path, limit: float):
    """The group forward + backward at 7B's layer shape (4 layers), G = 8, 3.6k video tokens, 256-token answers:
    packed (auto backend and prefix), the copying sdpa reference, the padded batch and the ideal; time, bytes
    saved for backward and peak memory (tests/support/vcr1_memory.py, bench/test_bench_memory.py)."""
    import torch
    from test_bench_memory import PeakMemory

    from vcr1 import packing
    from vcr1_memory import group_forwards, proportioned_model, saved_bytes, video_group

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if smoke:
        model_shape, grid, text, group, answer, dtype = dict(head_dim=16, kv_heads=2, layers=2), (2, 8, 8), 16, 8, \
            12, torch.float32
    else:  # hidden 7·4·128 = 3584, 28 heads / 4 KV heads, MLP 18944; 16·30·30/4 = 3600 video tokens
        model_shape, grid, text, group, answer, dtype = dict(head_dim=128, kv_heads=4, layers=4), (16, 30, 30), 128, \
            8, 256, torch.bfloat16
    with device:  # initialised where it runs: a billion parameters take a while on the host
        model = proportioned_model(**model_shape).to(dtype)
    video = grid[0] * grid[1] * grid[2] // 4
    prompt, answers = video_group(grid, video + text, group, answer)
    prompt = {k: v.to(device) for k, v in prompt.items()}
    answers = [a.to(device) for a in answers]
    auto = packing.pick_backend("auto", device, dtype)
    forwards = group_forwards(model, prompt, answers)
    forwards["packed_auto"] = lambda: packing.completion_hidden(model, [prompt], [answers])[0]
    text_config = model.config.text_config
    r["dtype"] = str(dtype).removeprefix("torch.")
    r["shapes"] = {"hidden": text_config.hidden_size, "intermediate": text_config.intermediate_size,
                   "layers": text_config.num_hidden_layers, "heads": text_config.num_attention_heads,
                   "kv_heads": text_config.num_key_value_heads, "video_grid_thw": grid, "video_tokens": video,
                   "prompt_tokens": video + text, "group": group, "answer_tokens": answer,
                   "vision": "2 tiny blocks (vcr1_memory.proportioned_model)"}
    r["results"] = {"auto_backend": auto, "paths": {}}

    def forward_backward(forward):
        hidden = forward()
        weights = torch.linspace(-1, 1, hidden.numel(), device=hidden.device).view_as(hidden)
        (hidden.float() * weights).sum().backward()
        model.zero_grad(set_to_none=True)

    # The first call of the auto path compiles its kernels (flex on CUDA): timed apart, so that neither its
    # saved-bytes count nor its median includes the compile.
    start = time.perf_counter()
    forward_backward(forwards["packed_auto"])
    sync()
    r["results"]["auto_first_call_s"] = time.perf_counter() - start
    for name in ("packed_auto", "packed", "ideal", "padded", "packed_sdpa"):
        step = functools.partial(forward_backward, forwards[name])
        row = {"saved_bytes": saved_bytes(model, forwards[name])[0]}
        model.zero_grad(set_to_none=True)
        if cuda:
            row["peak_bytes"] = cuda_peak(step)
        else:
            with PeakMemory() as peak:
                step()
            row["peak_bytes"] = peak.peak
        row["median_s"] = median_time(step, repeats=3 if cuda else 1)
        r["results"]["paths"][name] = row
        r.save()
        if cuda:
            torch.cuda.empty_cache()
    paths = r["results"]["paths"]
    r["median_s"], r["peak_memory_bytes"] = paths["packed_auto"]["median_s"], paths["packed_auto"]["peak_bytes"]
    r.peer("padded", paths["padded"])
    r.peer("ideal", paths["ideal"])
    r.ratio("padded_over_packed_time", paths["padded"]["median_s"] / paths["packed_auto"]["median_s"], ">= 4")
    r.ratio("padded_over_packed_saved", paths["padded"]["saved_bytes"] / paths["packed_auto"]["saved_bytes"], ">= 3")
    r.ratio("padded_over_packed_peak", paths["padded"]["peak_bytes"] / paths["packed_auto"]["peak_bytes"])
    r.ratio("packed_auto_over_ideal_saved", paths["packed_auto"]["saved_bytes"] / paths["ideal"]["saved_bytes"],
            "<= 1.25")
    r.ratio("packed_prefix_over_ideal_saved", paths["packed"]["saved_bytes"] / paths["ideal"]["saved_bytes"],
            "<= 1.25")  # the bound tests/test_packing.py pins


def phase_nvdec(r: Report, smoke: bool, work: Path, limit: float):
    """Decode + sample + preprocess of a 30 s 1080p H.264 clip, NVDEC against the CPU (bench/test_bench_video.py's
    pipeline); clips NVDEC could not open count as fallbacks."""
    import torch

    from vcr1_testing import torchcodec_missing

    if reason := torchcodec_missing() or ffmpeg_missing():
        r["status"], r["error"] = "skipped", reason
        return
    import test_bench_video as vb

    from vcr1.data import video as V

    cuda = torch.cuda.is_available()
    (w, h), seconds = ((1920, 1080), 30) if not smoke else ((128, 72), 2)
    path = work / f"clip_{w}x{h}_{seconds}s.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=s={w}x{h}:r={vb.FPS}:d={seconds}",
                    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(path)], check=True)
    r["dtype"], r["shapes"] = "uint8", {"width": w, "height": h, "seconds": seconds, "fps": vb.FPS, "codec": "h264"}
    frames = vb.pipeline(path, "cpu")  # also the warm-up
    cpu_s = median_time(lambda: vb.pipeline(path, "cpu"), repeats=2, warmup=0)
    r.peer("cpu", {"median_s": cpu_s})
    r["results"] = {"frames": frames, "cpu_s": cpu_s}
    if not cuda:
        r["median_s"] = cpu_s
        r.ratio("nvdec_over_cpu_speed", None, ">= 3")
        r["results"]["nvdec"] = "no CUDA device: the CPU path alone was timed"
        return
    before = V.decode_stats["cuda_fallback"]
    gpu_s = median_time(lambda: vb.pipeline(path, "cuda"), repeats=2, warmup=1)
    fallbacks = V.decode_stats["cuda_fallback"] - before
    r["median_s"], r["peak_memory_bytes"] = gpu_s, cuda_peak(lambda: vb.pipeline(path, "cuda"))
    r["results"].update(cuda_s=gpu_s, cuda_fallbacks=fallbacks)
    r["checks"] = {"nvdec_decoded": fallbacks == 0}
    r.ratio("nvdec_over_cpu_speed", cpu_s / gpu_s, ">= 3")


def phase_grpo_step(r: Report, smoke: bool, work: Path, limit: float):
    """A full GRPO step (rollouts, rewards, reference log-probs, update) at a 7B-shaped 4-layer model, fast path
    against the paper's algorithm (bench/test_bench_step.py's model and arguments)."""
    import importlib.util

    import torch

    from vcr1_testing import torchcodec_missing

    if reason := (torchcodec_missing() or ffmpeg_missing()
                  or (None if importlib.util.find_spec("deepspeed") else "deepspeed is not installed")):
        r["status"], r["error"] = "skipped", reason
        return
    import test_bench_step as sb

    from vcr1.config import parse_config
    from vcr1.train import Tally, Trainer

    cuda = torch.cuda.is_available()
    rounds = 2 if cuda else 1
    r["dtype"], r["shapes"] = ("bfloat16" if cuda else "float32"), {**sb.SHAPE, "rounds": rounds}
    r["results"] = {}
    root = work / "grpo_step"
    for path in ("fast", "reference"):  # ours first: a timeout costs the reference row
        try:
            trainer = Trainer(parse_config(sb.trainer_args(root, path)))
            trainer.phase.pop()  # the set-up's times are not the step's
            if cuda:
                trainer.grpo_step(Tally())  # warm-up: allocator, kernels, CUDA graphs
                trainer.phase.pop()
                torch.cuda.reset_peak_memory_stats()
            rows = []
            for _ in range(rounds):
                tally, start = Tally(), time.perf_counter()
                trainer.grpo_step(tally)
                seconds = time.perf_counter() - start
                rows.append({**tally.reduce(), "step_time": seconds, **trainer.phase.pop()})
            best = min(rows, key=lambda row: row["step_time"])
            result = {"median_s": statistics.median(row["step_time"] for row in rows),
                      "tokens_per_s": best["tokens"] / best["step_time"], "tokens": best["tokens"],
                      "completion_length": best["completion_length"],
                      "phases_s": {k.removeprefix("time/"): v for k, v in best.items() if k.startswith("time/")},
                      "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}
        except Exception as e:  # noqa: BLE001  (the reference may run out of memory: record it, keep ours)
            if path == "fast":
                raise
            r.peer("reference", None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            result = None
        trainer = None  # frees the model before the next path
        if cuda:
            torch.cuda.empty_cache()
        r["results"][path] = result
        if path == "fast":
            r["median_s"], r["peak_memory_bytes"] = result["median_s"], result["peak_memory_bytes"]
        elif result:
            r.peer("reference", result)
        r.save()
    fast, reference = r["results"]["fast"], r["results"]["reference"]
    r.ratio("tokens_per_s_vs_reference", fast["tokens_per_s"] / reference["tokens_per_s"] if reference else None,
            ">= 3")


def run_one(args) -> int:
    """Child process: one phase, its JSON saved on the way and at the end."""
    for extra in (REPO / "tests" / "support", REPO / "bench"):  # the benchmarks' and tests' shared helpers
        if str(extra) not in sys.path:
            sys.path.insert(0, str(extra))
    work = Path(args.work)
    r = Report(args.phase, work, args.smoke)
    try:
        globals()[f"phase_{args.phase}"](r, args.smoke, work, args.limit)
        if r["status"] == "running":
            r["status"] = "ok"
    except Exception as e:  # noqa: BLE001  (reported in the JSON; the driver goes on with the next phase)
        import traceback

        r["status"], r["error"] = "error", f"{type(e).__name__}: {e}"
        r["results"]["traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
    r.save()
    return 0 if r["status"] in ("ok", "skipped") else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    p.add_argument("--out", help="results folder (default: $OUT, else bench/results; --smoke: a temporary folder)")
    p.add_argument("--only", help="comma-separated phases to run (default: all, in order)")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # the driver's child processes
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only and (unknown := set(args.only.split(",")) - {name for name, *_ in PHASES}):
        p.error(f"unknown phases {sorted(unknown)}")
    return run_one(args) if args.phase else drive(args)


if __name__ == "__main__":
    sys.exit(main())

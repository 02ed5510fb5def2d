"""The test and GPU-check scripts, on this machine whatever it has: scripts/run_tests.sh's choice
of pytest runs (one without a GPU, two with one: the interpreter run and the GPU run), with a
stand-in interpreter that records what it is asked to run, and scripts/gpu_check.sh's refusal
where there is no NVIDIA GPU. Nothing here needs a GPU, and nothing here runs the suite."""
import os
import shutil
import subprocess
import sys

import pytest
from cli_runs import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")

# A stand-in for .venv/bin/python: `-c` is run_tests.sh asking whether torch sees a GPU or
# whether xdist imports (answered from FAKE_CUDA / FAKE_XDIST, 0 = yes); anything else is a
# pytest run, logged with the variables that decide how it runs, and exits FAKE_PYTEST.
FAKE_PYTHON = r"""#!/bin/sh
if [ "$1" = -c ]; then
    case $2 in
        *cuda*) exit "$FAKE_CUDA" ;;
        *xdist*) exit "$FAKE_XDIST" ;;
    esac
    exit 99
fi
echo "TRITON_INTERPRET=${TRITON_INTERPRET-unset} SGM_EXT_GPU_RUN=${SGM_EXT_GPU_RUN-unset} $*" \
    >> "$FAKE_LOG"
exit "${FAKE_PYTEST:-0}"
"""


def run_tests(tmp_path, *args, cuda, xdist=True, pytest_status=0, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "log"
    base = {k: v for k, v in os.environ.items()
            if k not in ("TRITON_INTERPRET", "SGM_EXT_GPU", "SGM_EXT_GPU_RUN")}
    base.update(PYTHON=str(fake), FAKE_LOG=str(log), FAKE_CUDA="0" if cuda else "1",
                FAKE_XDIST="0" if xdist else "1", FAKE_PYTEST=str(pytest_status), **env)
    res = subprocess.run(["bash", os.path.join(SCRIPTS, "run_tests.sh"), *args], env=base,
                         capture_output=True, text=True, timeout=HANG_S)
    runs = log.read_text().splitlines() if log.exists() else []
    return res, runs


def _workers():
    # as the script counts them (nproc: this process's CPUs, OMP_NUM_THREADS if set)
    return min(int(subprocess.check_output(["nproc"], text=True)), 8)


def test_without_a_gpu_one_run_of_everything(tmp_path):
    res, runs = run_tests(tmp_path, "-q", "--durations=15", cuda=False)
    assert res.returncode == 0, res.stderr
    # what test.sh ran before it: conftest.py's default interpreter setting, tests/ whole
    assert runs == ["TRITON_INTERPRET=unset SGM_EXT_GPU_RUN=unset -m pytest -q --durations=15"]


def test_with_a_gpu_the_interpreter_run_then_the_gpu_run(tmp_path):
    res, runs = run_tests(tmp_path, "-q", cuda=True)
    assert res.returncode == 0, res.stderr
    assert runs == [
        "TRITON_INTERPRET=1 SGM_EXT_GPU_RUN= -m pytest --ignore=tests/test_gpu.py -q",
        f"TRITON_INTERPRET=0 SGM_EXT_GPU_RUN=1 -m pytest tests/test_gpu.py -n {_workers()} -q",
    ]


def test_gpu_run_without_xdist_runs_on_one_worker(tmp_path):
    _, runs = run_tests(tmp_path, cuda=True, xdist=False)
    assert runs[1] == "TRITON_INTERPRET=0 SGM_EXT_GPU_RUN=1 -m pytest tests/test_gpu.py"


@pytest.mark.parametrize("forced, cuda, n_runs", [("1", False, 2), ("0", True, 1)])
def test_the_choice_can_be_forced(tmp_path, forced, cuda, n_runs):
    res, runs = run_tests(tmp_path, cuda=cuda, SGM_EXT_GPU=forced)
    assert res.returncode == 0, res.stderr
    assert len(runs) == n_runs, runs


def test_only_the_gpu_run(tmp_path):
    # what scripts/gpu_check.sh asks for; the GPU run's status is the script's
    res, runs = run_tests(tmp_path, "-q", cuda=False, xdist=False, pytest_status=3,
                          SGM_EXT_GPU="only")
    assert res.returncode == 3
    assert runs == ["TRITON_INTERPRET=0 SGM_EXT_GPU_RUN=1 -m pytest tests/test_gpu.py -q"]


def test_a_failing_first_run_still_makes_the_gpu_run_and_fails(tmp_path):
    res, runs = run_tests(tmp_path, cuda=True, pytest_status=1)
    assert res.returncode == 1
    assert len(runs) == 2, runs


def test_a_bad_choice_is_refused(tmp_path):
    res, runs = run_tests(tmp_path, cuda=True, SGM_EXT_GPU="yes")
    assert res.returncode == 2 and "SGM_EXT_GPU must be auto, 0, 1 or only" in res.stderr
    assert runs == []


def test_test_sh_runs_run_tests_sh():
    # test.sh is set-up, lint, then run_tests.sh with the same options (not a pytest of its own)
    text = open(os.path.join(SCRIPTS, "test.sh")).read()
    assert 'bash scripts/run_tests.sh "$@"' in text
    assert "-m pytest" not in text


def test_gpu_run_fails_where_the_gpu_tests_skip():
    # The GPU run where torch sees no GPU (none here, or hidden by CUDA_VISIBLE_DEVICES): its
    # tests skip, and SGM_EXT_GPU_RUN=1 must make that a failure. Without it they skip and the
    # run passes (as in CI).
    node = os.path.join("tests", "test_gpu.py") + "::test_gpu_backends_present"
    env = {k: v for k, v in os.environ.items() if k != "SGM_EXT_GPU_RUN"}
    env.update(TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", node, "-q", "-p", "no:cacheprovider"]
    plain = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=HANG_S)
    assert plain.returncode == 0 and "1 skipped" in plain.stdout, plain.stdout[-2000:]
    gpu_run = subprocess.run(cmd, env={**env, "SGM_EXT_GPU_RUN": "1"}, capture_output=True,
                             text=True, cwd=ROOT, timeout=HANG_S)
    assert gpu_run.returncode != 0, gpu_run.stdout[-2000:]
    assert "skipped in the GPU run" in gpu_run.stdout and "no CUDA GPU" in gpu_run.stdout


def _gpu_check(tmp_path, path):
    # The script alone in an empty checkout: were its check broken, the set-up it would go on
    # to (scripts/setup.sh) is not there, so nothing gets installed or run.
    (tmp_path / "repo" / "scripts").mkdir(parents=True)
    script = shutil.copy(os.path.join(SCRIPTS, "gpu_check.sh"), tmp_path / "repo" / "scripts")
    out = tmp_path / "out"
    env = {**os.environ, "PATH": path, "SGM_EXT_GPU_CHECK_OUT": str(out)}
    res = subprocess.run(["/bin/bash", str(script)], env=env, capture_output=True, text=True,
                         timeout=HANG_S)
    return res, out


@pytest.mark.parametrize("answer", [
    "exit 9",  # NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver
    "echo 'No devices were found'; exit 6",
    "echo",  # a driver that lists no GPU and says so with a blank line
])
def test_gpu_check_refuses_where_nvidia_smi_finds_no_gpu(tmp_path, answer):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\n{answer}\n")
    (fake / "nvidia-smi").chmod(0o755)
    res, out = _gpu_check(tmp_path, f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.strip() == ("gpu_check.sh: no NVIDIA GPU here (nvidia-smi missing, "
                                  "failing or listing none)"), res.stderr
    assert not out.exists() and not res.stdout  # refused before any stage


def test_gpu_check_refuses_without_nvidia_smi(tmp_path):
    # a PATH with only the tools the script needs before its check, nvidia-smi not among them
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("dirname", "head", "tr"):
        (tools / name).symlink_to(shutil.which(name))
    res, out = _gpu_check(tmp_path, str(tools))
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "no NVIDIA GPU here" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not out.exists()


def test_bench_gpu_refuses_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_gpu.py"), "--quick"],
                         env=env, capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "torch sees no CUDA GPU here" in res.stderr


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(SCRIPTS) if f.endswith(".sh")))
def test_scripts_parse(script):
    res = subprocess.run(["bash", "-n", os.path.join(SCRIPTS, script)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr

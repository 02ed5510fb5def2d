"""scripts/llamacpp.sh's arguments and where it says the built binaries are: with an empty
cache, a stand-in build (empty executables where the build puts them) and a PATH without cmake
or a compiler. Nothing here builds llama.cpp (15 minutes on 2 cores: not in CI); the last test
runs the real build's binaries where `scripts/llamacpp.sh build` has made them, and skips
otherwise, saying so."""
import os
import shutil
import sys

import pytest
from cli_runs import run_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "llamacpp.sh")
VERSION = "11434.0.0"
TARGETS = ("llama-perplexity", "llama-completion", "llama-bench", "llama-tokenize")


def script(*args, cache, path=None):
    env = dict(os.environ, SGM_EXT_CACHE=str(cache), PYTHON=sys.executable)
    if path is not None:
        env["PATH"] = str(path)
    return run_process([shutil.which("bash"), SCRIPT, *map(str, args)], env=env)


def fake_build(cache):
    bin_dir = cache / f"llama.cpp-{VERSION}" / "build" / "bin"
    bin_dir.mkdir(parents=True)
    for name in TARGETS:
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_usage_and_unknown_commands(tmp_path):
    rc, _, err = script(cache=tmp_path)
    assert rc == 2 and "scripts/llamacpp.sh build" in err
    rc, _, err = script("frobnicate", cache=tmp_path)
    assert rc == 2 and "unknown command 'frobnicate' (build, where, compare)" in err
    rc, _, err = script("where", "extra", cache=tmp_path)
    assert rc == 2 and "where takes no arguments (got: extra)" in err
    rc, out, _ = script("--help", cache=tmp_path)
    assert rc == 0 and "scripts/llamacpp.sh compare --gguf FILE --scales FILE" in out


def test_not_built_is_said_and_compare_refuses(tmp_path):
    rc, out, err = script("where", cache=tmp_path)
    where = tmp_path / f"llama.cpp-{VERSION}" / "build" / "bin"
    assert rc == 1 and out == ""
    assert f"llama.cpp {VERSION} is not built" in err and str(where) in err
    rc, _, err = script("compare", "--gguf", "x.gguf", cache=tmp_path)
    assert rc == 2 and "is not built" in err and "run: scripts/llamacpp.sh build" in err


def test_where_names_the_built_binaries(tmp_path):
    bin_dir = fake_build(tmp_path)
    rc, out, _ = script("where", cache=tmp_path)
    assert rc == 0 and out.strip() == str(bin_dir)
    rc, out, _ = script("build", cache=tmp_path)  # built: nothing to do
    assert rc == 0 and f"llama.cpp {VERSION} is built: {bin_dir}" in out
    (bin_dir / "llama-bench").unlink()  # one missing: not built
    assert script("where", cache=tmp_path)[0] == 1


def test_compare_checks_its_arguments(tmp_path):
    fake_build(tmp_path)
    rc, _, err = script("compare", "--gguf", tmp_path / "missing.gguf", cache=tmp_path)
    assert rc == 2 and "the following arguments are required: --scales" in err
    rc, _, err = script("compare", "--gguf", tmp_path / "missing.gguf", "--scales",
                        tmp_path / "s.safetensors", cache=tmp_path)
    assert rc == 2 and f"--gguf {tmp_path / 'missing.gguf'}: no such file" in err


def _path_with(tmp_path, *tools):
    """A PATH holding only `tools` (links to this machine's)."""
    d = tmp_path / "path"
    d.mkdir()
    for tool in ("dirname", "mkdir", *tools):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"this machine has no {tool}")
        os.symlink(found, d / tool)
    return d


def test_build_says_what_is_missing(tmp_path):
    rc, _, err = script("build", cache=tmp_path / "cache", path=_path_with(tmp_path))
    assert rc == 2 and "building llama.cpp needs cmake" in err
    assert not (tmp_path / "cache").exists()


def test_build_says_a_compiler_is_missing(tmp_path):
    env_cxx = os.environ.pop("CXX", None)
    try:
        rc, _, err = script("build", cache=tmp_path / "cache",
                            path=_path_with(tmp_path, "cmake"))
    finally:
        if env_cxx is not None:
            os.environ["CXX"] = env_cxx
    assert rc == 2 and "building llama.cpp needs a C++ compiler" in err


def test_the_real_build_runs_where_it_says():
    rc, out, err = script("where", cache=os.environ.get("SGM_EXT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sgm-ext"))
    if rc != 0:
        pytest.skip(f"llama.cpp is not built here (scripts/llamacpp.sh build): {err.strip()}")
    bin_dir = out.strip()
    for name in TARGETS:
        _, out, err = run_process([os.path.join(bin_dir, name), "--help"])
        assert "usage" in (out + err).lower(), (name, err[-500:])

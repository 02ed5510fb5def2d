"""The ordinary install: `pip install sgm-ext` builds in pip's isolated environment, which has
no torch, so the wheel is pure Python and ships the C++ / CUDA sources; the library is then
built by `sgm-ext build` (sgm_ext.build) into a cache that sgm_ext.compiled loads from.

Here: the wheel built with build isolation and installed without the library (imports
silently, the ops run on the torch backend, the backends say how to build it), the sdist,
the cache keys and their lookup order, the loader on a cached library (a copy of this
checkout's in-package build, so nothing is compiled), a cached library that does not load,
and, marked slow, one real CPU-only build into a temporary cache (about 20 s on 2 cores).

With CI=true a missing in-package library or package index fails these tests instead of
skipping them.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest
import torch
from cli_runs import HANG_S

from sgm_ext.ops import build, compiled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
IN_CI = os.environ.get("CI") == "true"
# What the build reads: the rest of the checkout (.git, .venv, build outputs) stays behind.
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                 "*.so", "*.pyd", "*.o", ".*cache*", ".benchmarks", "out",
                                 "sgm-ext-*")
SITE = os.pathsep.join(dict.fromkeys([sysconfig.get_paths()["purelib"],
                                      sysconfig.get_paths()["platlib"]]))


def _pip(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "PIP_NO_BUILD_ISOLATION"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=HANG_S)


def _package_copy(where, csrc=True):
    """sgm_ext as a wheel installs it, without any library: the package, sgm_ext.kernels and
    (with `csrc`) the sources as sgm_ext/csrc. Returns the directory to put on PYTHONPATH."""
    package = os.path.join(where, "sgm_ext")
    shutil.copytree(os.path.join(ROOT, "sgm_ext"), package,
                    ignore=shutil.ignore_patterns("_C*", "__pycache__", "csrc"))
    shutil.copytree(os.path.join(ROOT, "kernels"), os.path.join(package, "kernels"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    if csrc:
        shutil.copytree(CSRC, os.path.join(package, "csrc"), ignore=IGNORED)
    return str(where)


def _run_python(script, path, cache, *args, **env_extra):
    """`script` in a fresh interpreter that imports sgm_ext from `path` (-S: no site
    processing, so the editable install's finder, which would find this checkout and its
    library, is not installed), with `cache` as the build cache. Returns stdout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SGM_EXT_BACKEND", compiled.BUILD_ON_IMPORT_ENV, build.ARCHS_ENV)}
    env.update(TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([path, SITE]),
               SGM_EXT_CACHE=str(cache), **env_extra)
    res = subprocess.run([sys.executable, "-S", "-c", "import sys\n" + script, path, *args],
                         capture_output=True, text=True, env=env, cwd=path, timeout=HANG_S)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


# Shared by the scripts below: import sgm_ext recording warnings, then run the ops.
PRELUDE = r"""
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, sgm_ext
    from sgm_ext.ops import build
    from sgm_ext.ops import compiled
    from sgm_ext.ops.backends import selected
    info = sgm_ext.backends()
    sgm_ext.backends()
    gate, up, scale = torch.randn(3, 37), torch.randn(3, 37), torch.rand(37)
    out = sgm_ext.act_mul_scale(gate, up, scale, strength=0.5)
    packed = sgm_ext.act_mul_scale_packed(torch.cat([gate, up], -1), scale, act="gelu")
    single = sgm_ext.act_scale(gate, scale, act="relu")
assert sgm_ext.__file__.startswith(sys.argv[1]), sgm_ext.__file__
ours = [str(w.message) for w in caught if "sgm_ext" in str(w.message)]
s_eff = 1 - 0.5 * (1 - scale)
torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up * s_eff)
torch.testing.assert_close(packed, torch.nn.functional.gelu(gate) * up * scale)
torch.testing.assert_close(single, torch.relu(gate) * scale)
"""


def _require_in_package_library():
    if compiled.SOURCE != "in-package":
        (pytest.fail if IN_CI else pytest.skip)(
            f"this checkout's sgm_ext._C is not loaded: {compiled.describe()}")


# ------------------------------------------------------------------ the ordinary install

@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    """A copy of the checkout as pip sees it (builds write build/ and egg-info next to
    setup.py: not into the checkout, where an editable rebuild may be running)."""
    src = tmp_path_factory.mktemp("source") / "sgm-ext"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    return src


@pytest.fixture(scope="module")
def wheel(source_tree, tmp_path_factory):
    """The wheel `pip wheel --no-deps .` builds, with build isolation (setuptools and wheel
    from the package index, no torch)."""
    out = tmp_path_factory.mktemp("wheels")
    res = _pip("wheel", "--no-deps", "-w", str(out), ".", cwd=source_tree)
    if res.returncode != 0 and "No matching distribution" in res.stderr and not IN_CI:
        pytest.skip(f"no package index for the isolated build: {res.stderr[-500:]}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    found = sorted(out.glob("*.whl"))
    assert len(found) == 1, found
    return found[0]


def test_ordinary_wheel_is_pure_python_and_ships_the_sources(wheel):
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert "Root-Is-Purelib: true" in metadata, metadata
    shipped = {f"sgm_ext/csrc/{rel}" for rel in build.source_files(CSRC)}
    assert {"sgm_ext/csrc/ops.cpp", "sgm_ext/csrc/act_mul_scale.cu"} <= shipped
    assert shipped <= names, sorted(shipped - names)
    assert {"sgm_ext/__init__.py", "sgm_ext/ops/build.py", "sgm_ext/kernels/__init__.py",
            "sgm_ext/cli/__init__.py", "sgm_ext/serving/vllm_plugin.py",
            "sgm_ext/resources/benign.txt", "sgm_ext/resources/calibration.txt"} <= names
    binaries = [n for n in names if n.endswith((".so", ".pyd", ".o", ".dll", ".dylib"))]
    assert not binaries, binaries
    assert not [n for n in names if n.startswith(("kernels/", "csrc/"))]  # nothing top-level


def test_sdist_ships_the_sources(source_tree, tmp_path):
    # What `pip install sgm-ext` builds from when there is no wheel: MANIFEST.in adds csrc/.
    env = dict(os.environ, SGM_EXT_NO_BUILD="1")
    res = subprocess.run([sys.executable, "-c", "import sys\nfrom setuptools import build_meta"
                          "\nprint(build_meta.build_sdist(sys.argv[1]))", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=source_tree, timeout=HANG_S)
    assert res.returncode == 0, res.stderr[-3000:]
    with tarfile.open(tmp_path / res.stdout.strip().splitlines()[-1]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {f"csrc/{rel}" for rel in build.source_files(CSRC)} <= names
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "sgm_ext/ops/build.py",
            "kernels/__init__.py", "sgm_ext/resources/benign.txt",
            "sgm_ext/resources/calibration.txt"} <= names
    assert not [n for n in names if n.endswith((".so", ".o"))]


def test_installed_wheel_imports_silently_and_runs_on_the_torch_backend(wheel, tmp_path):
    target = tmp_path / "site"
    res = _pip("install", "--no-deps", "--no-compile", "--target", str(target), str(wheel))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    script = PRELUDE + r"""
assert not ours, ours
for name in ("cpu", "cuda"):
    assert not info[name].available, info[name]
    assert info[name].library == compiled.NOT_BUILT, info[name]
assert "not built: run `sgm-ext build`" in info["cpu"].reason, info["cpu"]
assert "--no-build-isolation" in info["cpu"].reason, info["cpu"]
assert selected("act_mul_scale", "cpu") == "torch"
# what `sgm-ext build` would compile: the sources installed with the package
csrc = build.csrc_dir()
assert csrc == os.path.join(sys.argv[1], "sgm_ext", "csrc"), csrc
assert all(os.path.isfile(f) for f in build.sources(csrc, cuda=True))
assert build.build_directory().startswith(os.environ["SGM_EXT_CACHE"])
print("ok")
"""
    out = _run_python("import os\n" + script, str(target), tmp_path / "cache")
    assert out.strip() == "ok", out


def test_installed_wheel_runs_the_demo(wheel, tmp_path):
    # `pip install sgm-ext` then `sgm-ext demo`: without the compiled library (the torch
    # backend serves) and with only the package's declared dependencies
    target = tmp_path / "site"
    res = _pip("install", "--no-deps", "--no-compile", "--target", str(target), str(wheel))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    script = ("from sgm_ext.cli import main\n"
              "sys.exit(main(['demo', '--fast', '--quiet', '--out', sys.argv[2]]))")
    out = _run_python(script, str(target), tmp_path / "cache", str(tmp_path / "demo"))
    assert "[ok] harmful rate at least halved" in out, out
    assert "MISSED" not in out, out


# ------------------------------------------------------------------ sources, flags, cache keys

def test_build_definitions_load_without_torch():
    # setup.py reads sgm_ext/ops/build.py by path in pip's isolated environment, which has no
    # torch: the module must import, and give the sources and flags, without it.
    script = r"""
import importlib.util, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("no torch in the build environment")
sys.meta_path.insert(0, NoTorch())
spec = importlib.util.spec_from_file_location("_b", sys.argv[1] + "/sgm_ext/ops/build.py")
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
print(len(b.sources("csrc", cuda=True)), b.nvcc_flags(b.DEFAULT_ARCHS)[-1])
"""
    res = subprocess.run([sys.executable, "-S", "-c", script, ROOT], capture_output=True,
                         text=True, cwd=ROOT, timeout=HANG_S)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[1] == "-gencode=arch=compute_90,code=compute_90", res.stdout


def test_every_translation_unit_is_compiled():
    # A new .cpp / .cu under csrc/ must be added to build.sources, or the library lacks it.
    units = {os.path.relpath(p, CSRC) for p in build.sources(CSRC, cuda=True, machine="x86_64")}
    wanted = {rel for rel in build.source_files(CSRC) if rel.endswith((".cpp", ".cu"))}
    assert units == wanted
    arm = {os.path.basename(p) for p in build.sources(CSRC, cuda=False, machine="aarch64")}
    assert arm == {"ops.cpp", "act_mul_scale_default.cpp"}


def test_flags_and_architectures():
    assert build.cuda_archs("9.0, 8.0;8.0") == ["8.0", "9.0"]
    assert build.cuda_archs(None, {}) == ["8.0", "9.0"]
    assert build.cuda_archs(None, {build.ARCHS_ENV: "8.6"}) == ["8.6"]
    assert build.cuda_archs(["10.0", "9.0a"]) == ["9.0a", "10.0"]
    for bad in ("", "sm_80", "8"):
        with pytest.raises(ValueError, match="GPU architectures"):
            build.cuda_archs(bad)
    assert build.nvcc_flags("8.0;9.0")[-3:] == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    assert "-ffp-contract=off" in build.CXX_FLAGS  # s_eff bit for bit (act_mul_scale.h)


def test_cache_root():
    assert build.cache_root({"SGM_EXT_CACHE": "/x/y"}) == "/x/y"
    assert build.cache_root({"XDG_CACHE_HOME": "/c"}) == os.path.join("/c", "sgm-ext")
    assert build.cache_root({}) == os.path.join(os.path.expanduser("~"), ".cache", "sgm-ext")


def test_cache_key_names_everything_the_library_depends_on():
    base = ("0.1.0", "abcdef0123", "2.14.1+cu130", "13.0", "8.0;9.0")
    key = build.build_key(*base)
    assert key == "0.1.0-abcdef0123-torch2.14.1+cu130-cuda13.0-sm80-sm90"
    for i, other in enumerate(("0.2.0", "0123abcdef", "2.15.0+cu130", "12.8", "8.0")):
        changed = list(base)
        changed[i] = other
        assert build.build_key(*changed) != key, changed
    assert build.build_key(*base[:4], "9.0,8.0") == key  # the same architectures
    assert build.build_key(*base[:4], None) == "0.1.0-abcdef0123-torch2.14.1+cu130-cuda13.0-cpu"
    assert build.build_key("0.1.0", "abcdef0123", "2.14.1+cpu", None, "8.0") \
        == "0.1.0-abcdef0123-torch2.14.1+cpu-cpu"


def test_digest_follows_the_sources_not_their_place(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(CSRC, a, ignore=IGNORED)
    shutil.copytree(CSRC, b, ignore=IGNORED)
    assert build.digest(str(a)) == build.digest(str(b)) == build.digest(CSRC)
    with open(b / "ops.h", "a") as f:
        f.write("\n// changed\n")
    assert build.digest(str(b)) != build.digest(str(a))


def test_build_directory_for_this_torch(tmp_path):
    env = {"SGM_EXT_CACHE": str(tmp_path)}
    d = build.build_directory(True, None, env)
    name = os.path.basename(d)
    assert os.path.dirname(d) == str(tmp_path)
    assert name.startswith(f"{sgm_version()}-{build.digest(CSRC)}-torch{torch.__version__}")
    if torch.version.cuda:
        assert name.endswith(f"-cuda{torch.version.cuda}-sm80-sm90"), name
        assert build.build_directory(True, "8.6", env).endswith("-sm86")
    assert build.build_directory(False, None, env).endswith("-cpu")


def sgm_version():
    from sgm_ext.version import __version__

    return __version__


def _fake_library(directory, content=b"not a library"):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "_C.so")
    with open(path, "wb") as f:
        f.write(content)
    return path


def test_cached_library_lookup_order(tmp_path):
    env = {"SGM_EXT_CACHE": str(tmp_path)}
    assert build.cached_library(env) is None
    cpu_only = _fake_library(build.build_directory(False, None, env))
    assert build.cached_library(env) == cpu_only
    if not torch.version.cuda:
        return
    other = build.build_directory(True, "8.6", env)
    os.makedirs(other)
    assert build.cached_library(env) == cpu_only  # a directory without a library is no build
    other = _fake_library(other)
    assert build.cached_library(env) == other  # other GPUs' build, when none was asked for
    assert build.cached_library(dict(env, SGM_EXT_CUDA_ARCHS="7.5")) == cpu_only
    exact = _fake_library(build.build_directory(True, None, env))
    assert build.cached_library(env) == exact
    assert build.cached_library(dict(env, SGM_EXT_CUDA_ARCHS="8.6")) == other
    # another sgm-ext's or another torch's builds are never taken
    stale = os.path.join(str(tmp_path), os.path.basename(exact).replace(torch.__version__, "0.0"))
    shutil.move(os.path.dirname(exact), stale)
    shutil.rmtree(os.path.dirname(other))
    os.remove(cpu_only)
    assert build.cached_library(env) is None


def test_build_without_sources_or_tools_says_so(monkeypatch, tmp_path):
    # Each stops the build before anything is compiled, with what to install.
    monkeypatch.setenv("SGM_EXT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(build.BuildError, match=r"needs a C\+\+ compiler .*no-such-c\+\+"):
        build.build(verbose=False, cuda=False)
    monkeypatch.setattr(build, "csrc_dir", lambda: None)
    with pytest.raises(build.BuildError, match="sources of sgm_ext._C are not installed"):
        build.build(verbose=False)


# ------------------------------------------------------------------ the loader and the cache

def test_cached_library_loads_when_the_package_has_none(tmp_path):
    # This checkout's in-package library, copied to where `sgm-ext build` would put it,
    # serves a package installed without one.
    _require_in_package_library()
    cache = tmp_path / "cache"
    directory = build.build_directory(compiled.has_kernel("cuda"), None,
                                      {"SGM_EXT_CACHE": str(cache)})
    os.makedirs(directory)
    path = os.path.join(directory, "_C.so")
    shutil.copyfile(compiled.library_path(), path)
    script = PRELUDE + r"""
assert not ours, ours
assert info["cpu"].available, info["cpu"]
assert info["cpu"].library == info["cuda"].library == f"cached build at {sys.argv[2]}", info
assert compiled.library_path() == sys.argv[2] and sys.modules["sgm_ext._C"].__file__ == sys.argv[2]
assert selected("act_mul_scale", "cpu") == "cpu"
print("ok")
"""
    out = _run_python(script, _package_copy(tmp_path / "site"), cache, path)
    assert out.strip() == "ok", out


def test_cached_library_that_does_not_load_warns_once(tmp_path):
    cache = tmp_path / "cache"
    path = _fake_library(build.build_directory(True, None, {"SGM_EXT_CACHE": str(cache)}))
    script = PRELUDE + r"""
assert len(ours) == 1 and "sgm_ext._C could not be loaded" in ours[0], ours
assert "sgm-ext build" in ours[0], ours
assert not info["cpu"].available and "did not load" in info["cpu"].reason, info["cpu"]
assert info["cpu"].library.startswith(f"built at {sys.argv[2]} but did not load"), info["cpu"]
assert selected("act_mul_scale", "cpu") == "torch"
print("ok")
"""
    out = _run_python(script, _package_copy(tmp_path / "site"), cache, path)
    assert out.strip() == "ok", out


def test_build_on_import_that_fails_warns(tmp_path):
    # SGM_EXT_BUILD_ON_IMPORT=1 builds a missing library on first use; here the sources are
    # not installed, so the build fails at once: a warning, and the torch backend serves.
    script = PRELUDE + r"""
assert len(ours) == 1 and "SGM_EXT_BUILD_ON_IMPORT=1 and the build failed" in ours[0], ours
assert "not installed" in info["cpu"].reason, info["cpu"]
assert selected("act_mul_scale", "cpu") == "torch"
print("ok")
"""
    out = _run_python(script, _package_copy(tmp_path / "site", csrc=False), tmp_path / "cache",
                      SGM_EXT_BUILD_ON_IMPORT="1")
    assert out.strip() == "ok", out


@pytest.mark.slow
def test_real_build_into_a_temporary_cache(tmp_path, monkeypatch):
    # build() as `sgm-ext build` runs it (the CPU kernels only: the CUDA part takes minutes
    # and is the same flags as setup.py's), then a package without a library loads it.
    cache = tmp_path / "cache"
    monkeypatch.setenv("SGM_EXT_CACHE", str(cache))
    path = build.build(verbose=False, cuda=False)
    assert path == os.path.join(build.build_directory(False), "_C.so") and os.path.isfile(path)
    assert build.build(verbose=False, cuda=False) == path  # up to date: nothing rebuilt
    script = PRELUDE + r"""
assert not ours, ours
sys.path.insert(0, sys.argv[3])
from reference64 import assert_matches, expected
assert info["cpu"].available and info["cpu"].library == f"cached build at {sys.argv[2]}", info
assert not info["cuda"].available and "without CUDA" in info["cuda"].reason, info["cuda"]
assert selected("act_mul_scale", "cpu") == "cpu"
for dtype in (torch.float32, torch.bfloat16):
    g, u = gate.to(dtype), up.to(dtype)
    assert_matches(sgm_ext.act_mul_scale(g, u, scale, strength=0.5),
                   expected(g, u, "silu", scale, strength=0.5))
print("ok")
"""
    out = _run_python(script, _package_copy(tmp_path / "site"), cache, path,
                      os.path.join(ROOT, "tests"))
    assert out.strip() == "ok", out



def test_setup_script_does_nothing_when_nothing_changed():
    # scripts/setup.sh ran before the tests (scripts/test.sh): run again, it must neither
    # install nor compile. Its stamp is the hash of what it depends on.
    stamp = os.path.join(ROOT, ".venv", ".sgm-ext-setup")
    if not os.path.exists(stamp):
        (pytest.fail if IN_CI else pytest.skip)("scripts/setup.sh has not run in this checkout")
    before = os.stat(stamp).st_mtime_ns
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup.sh")],
                         capture_output=True, text=True, timeout=HANG_S, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    # it writes its stamp only after installing: a stamp rewritten is a rebuild (judged by
    # what it did, not by how long it took on this machine)
    rebuilt = os.stat(stamp).st_mtime_ns != before
    if rebuilt and not IN_CI:  # the checkout changed since its last run
        pytest.skip("setup.sh rebuilt: this checkout changed since it ran")
    assert not rebuilt and not res.stdout.strip(), res.stdout[-2000:]

"""Building the compiled library sgm_ext._C (csrc/) against the torch installed here, and the
cache such builds live in.

This module holds the one definition of the library's sources and compiler flags. setup.py
reads it by path (it imports neither the package nor torch at import: pip's isolated build
environment has no torch), and `build` compiles the same sources with the same flags through
torch.utils.cpp_extension.load (ninja) for an install that came without the library: a
pure-Python wheel, built where torch was not importable, ships the sources as sgm_ext/csrc.

A build goes to a directory of the cache ($SGM_EXT_CACHE, else $XDG_CACHE_HOME/sgm-ext, else
~/.cache/sgm-ext) named by the sgm-ext version, a digest of the sources and flags, the torch
version, its CUDA version and the GPU architectures, e.g.
`0.1.0-3f2a9c0b1d-torch2.14.1+cu130-cuda13.0-sm80-sm90/_C.so` (`...-cpu` when built without
the CUDA kernels). sgm_ext.compiled loads from there (`cached_library`); nothing here builds
at import.
"""
import glob
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time

CACHE_ENV = "SGM_EXT_CACHE"
ARCHS_ENV = "SGM_EXT_CUDA_ARCHS"
DEFAULT_ARCHS = "8.0;9.0"  # A100 and H100 class; the PTX of the newest serves later GPUs
NAME = "_C"  # the extension module (PyInit__C in csrc/ops.cpp)
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")

# -fopenmp: at::parallel_for's threads. -ffp-contract=off: a * b + c stays two roundings,
# as torch computes it (s_eff must equal the Python side's bit for bit; act_mul_scale.h)
CXX_FLAGS = ("-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off")
NVCC_FLAGS = ("-O3", "-std=c++20", "--expt-relaxed-constexpr")  # + gencode_flags(archs)
LINK_FLAGS = ("-fopenmp",)

# What a build takes on a 2-core x86 CPU (the figure the progress message quotes).
BUILD_TIME = {"cuda": "about a minute", "cpu": "about 20 seconds"}


class BuildError(RuntimeError):
    pass


# ------------------------------------------------------------------ sources and flags

def csrc_dir():
    """The C++ / CUDA sources: sgm_ext/csrc in an installed package, csrc/ next to the package
    in a source checkout (an editable install); None when neither exists."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # sgm_ext/
    for path in (os.path.join(package, "csrc"), os.path.join(os.path.dirname(package), "csrc")):
        if os.path.isfile(os.path.join(path, "ops.cpp")):
            return path
    return None


def source_files(csrc):
    """Every source and header under `csrc`, as sorted '/'-separated relative paths (what the
    package ships as sgm_ext/csrc, and what the digest covers)."""
    found = []
    for parent, dirs, files in os.walk(csrc):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        rel = os.path.relpath(parent, csrc)
        found += [name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                  for name in files if name.endswith(SOURCE_SUFFIXES)]
    return sorted(found)


def sources(csrc, cuda, machine=None):
    """The translation units of the library, as paths under `csrc`: the op registration and
    the CPU kernel for each instruction set this machine has (AVX2 / AVX-512 on x86), and
    with `cuda` the CUDA kernels."""
    found = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    found.append(os.path.join(csrc, "cpu", "act_mul_scale_default.cpp"))
    if (machine or platform.machine()).lower() in ("x86_64", "amd64"):
        found += [os.path.join(csrc, "cpu", "act_mul_scale_avx2.cpp"),
                  os.path.join(csrc, "cpu", "act_mul_scale_avx512.cpp")]
    if cuda:
        found += sorted(glob.glob(os.path.join(csrc, "*.cu")))
    return found


def cuda_archs(archs=None, environ=None):
    """'8.0;9.0' (or '9.0,8.0', or a list) -> ['8.0', '9.0']: `archs`, else
    $SGM_EXT_CUDA_ARCHS, else DEFAULT_ARCHS; sorted, duplicates dropped."""
    if archs is None:
        archs = (os.environ if environ is None else environ).get(ARCHS_ENV) or DEFAULT_ARCHS
    if isinstance(archs, str):
        archs = archs.replace(",", ";").split(";")
    found = {a.strip() for a in archs if a.strip()}
    bad = [a for a in found if not re.fullmatch(r"\d+\.\d+[af]?", a)]
    if bad or not found:
        raise ValueError(f"GPU architectures must look like '8.0;9.0', got {archs!r}")
    return sorted(found, key=lambda a: tuple(int(x) for x in re.findall(r"\d+", a)))


def gencode_flags(archs):
    """'8.0;9.0' -> nvcc -gencode flags: SASS for each, PTX of the newest for later GPUs."""
    caps = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    return flags + [f"-gencode=arch=compute_{caps[-1]},code=compute_{caps[-1]}"]


def nvcc_flags(archs):
    return [*NVCC_FLAGS, *gencode_flags(archs)]


def include_dirs(csrc, torch_file, cuda_version):
    """csrc itself and, when present, the CUDA headers of the nvidia wheels torch depends on
    (torch's headers include cuBLAS / cuSPARSE headers)."""
    found = [csrc]
    wheel_headers = os.path.join(os.path.dirname(os.path.dirname(torch_file)), "nvidia",
                                 f"cu{(cuda_version or '0').split('.')[0]}", "include")
    if os.path.isdir(wheel_headers):
        found.append(wheel_headers)
    return found


def toolkit_root(environ=None):
    """The CUDA toolkit root to compile with: $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda or
    the real location of nvcc on PATH; None when there is none.

    torch guesses the root from `which nvcc`, which is wrong when nvcc on PATH is a wrapper
    script (/usr/local/bin/nvcc): the libraries are then not found at link time.
    """
    environ = os.environ if environ is None else environ
    if environ.get("CUDA_HOME") or environ.get("CUDA_PATH"):
        return environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    nvcc = _which("nvcc", environ)
    for root in ("/usr/local/cuda",
                 os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def _which(program, environ):
    import shutil

    return shutil.which(program, path=environ.get("PATH"))


def digest(csrc):
    """10 hex digits of a hash of the sources and the flags: a build from other sources is
    another cache entry, never a stale library."""
    h = hashlib.sha256(json.dumps([CXX_FLAGS, NVCC_FLAGS, LINK_FLAGS]).encode())
    for rel in source_files(csrc):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(csrc, rel), "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()[:10]


# ------------------------------------------------------------------ the cache

def cache_root(environ=None):
    """$SGM_EXT_CACHE, else $XDG_CACHE_HOME/sgm-ext, else ~/.cache/sgm-ext."""
    environ = os.environ if environ is None else environ
    if environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(environ[CACHE_ENV]))
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sgm-ext")


def _version():
    from ..version import __version__

    return __version__


def _key_prefix(version, source_digest, torch_version, cuda_version):
    prefix = f"{version}-{source_digest}-torch{torch_version}"
    return f"{prefix}-cuda{cuda_version}" if cuda_version else prefix


def build_key(version, source_digest, torch_version, cuda_version, archs):
    """The name of a build's cache directory. `cuda_version`: torch's (torch.version.cuda;
    None for a CPU-only torch); `archs`: the GPU architectures of the CUDA kernels, None for a
    library built without them."""
    prefix = _key_prefix(version, source_digest, torch_version, cuda_version)
    if not cuda_version or not archs:
        return f"{prefix}-cpu"
    return prefix + "".join(f"-sm{a.replace('.', '')}" for a in cuda_archs(archs))


def library_file(directory):
    """The library a build left in `directory`, or None."""
    path = os.path.join(directory, NAME + (".pyd" if os.name == "nt" else ".so"))
    return path if os.path.isfile(path) else None


def build_directory(cuda=True, archs=None, environ=None, csrc=None):
    """The cache directory a build for the torch imported here goes to (and where
    sgm_ext.compiled looks first): with the CUDA kernels for `archs` (default
    $SGM_EXT_CUDA_ARCHS, else 8.0;9.0) when `cuda` and torch is a CUDA build, else CPU only.
    None when the sources are not installed."""
    import torch

    csrc = csrc or csrc_dir()
    if csrc is None:
        return None
    cuda_version = torch.version.cuda
    key = build_key(_version(), digest(csrc), torch.__version__, cuda_version,
                    cuda_archs(archs, environ) if cuda and cuda_version else None)
    return os.path.join(cache_root(environ), key)


def cached_library(environ=None, csrc=None):
    """The library of a cached build for this sgm-ext, these sources and the torch imported
    here, or None. In order: the build for $SGM_EXT_CUDA_ARCHS (default 8.0;9.0); when that
    variable is not set, the newest build for other architectures; a CPU-only build."""
    import torch

    environ = os.environ if environ is None else environ
    csrc = csrc or csrc_dir()
    if csrc is None:
        return None
    root = cache_root(environ)
    prefix = _key_prefix(_version(), digest(csrc), torch.__version__, torch.version.cuda)
    candidates = []
    if torch.version.cuda:
        candidates.append(build_directory(True, None, environ, csrc))
        if not environ.get(ARCHS_ENV):
            others = glob.glob(os.path.join(glob.escape(root), glob.escape(prefix) + "-sm*"))
            candidates += sorted(others, key=_mtime, reverse=True)
    candidates.append(os.path.join(root, prefix + "-cpu"))
    for directory in candidates:
        path = library_file(directory)
        if path is not None:
            return path
    return None


def _mtime(directory):
    path = library_file(directory)
    return os.path.getmtime(path) if path else 0.0


# ------------------------------------------------------------------ the build

# Run in a fresh interpreter: the build loads the new library (checking that it loads)
# without clashing with a library this process has already loaded.
_CHILD = """\
import json, sys
from torch.utils.cpp_extension import load
load(**json.loads(sys.argv[1]))
"""


def build(verbose=True, *, cuda=None, archs=None):
    """Compile sgm_ext._C against the torch installed here, into the cache; returns the path
    of the library. Incremental: an up-to-date build returns in seconds.

    cuda: build the CUDA kernels (default: when torch is a CUDA build and a CUDA toolkit,
    nvcc, is found); archs: their GPU architectures, e.g. "8.0;9.0" (default
    $SGM_EXT_CUDA_ARCHS, else 8.0;9.0). verbose: a progress message and the compiler's
    commands on stderr. Raises BuildError when the sources are not installed or the
    compiler fails (with its output).
    """
    import torch

    env = dict(os.environ)
    csrc = csrc_dir()
    if csrc is None:
        raise BuildError("the C++ / CUDA sources of sgm_ext._C are not installed with this "
                         "package (sgm_ext/csrc): reinstall sgm-ext")
    root = toolkit_root(env)
    has_toolkit = bool(torch.version.cuda) and root is not None \
        and os.path.exists(os.path.join(root, "bin", "nvcc"))
    if cuda is None:
        cuda = has_toolkit
    elif cuda and not has_toolkit:
        raise BuildError("cannot build the CUDA kernels: " + (
            f"torch {torch.__version__} is not a CUDA build" if not torch.version.cuda else
            "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)"))
    arch_list = cuda_archs(archs, env) if cuda else None
    directory = build_directory(cuda, arch_list, env, csrc)
    os.makedirs(directory, exist_ok=True)
    if root and not (env.get("CUDA_HOME") or env.get("CUDA_PATH")):
        env["CUDA_HOME"] = root  # before torch.utils.cpp_extension guesses it
    _check_tools(env)
    files = sources(csrc, cuda)
    env.setdefault("MAX_JOBS", str(max(1, min(len(files), os.cpu_count() or 1))))
    kwargs = dict(name=NAME, sources=files, extra_cflags=list(CXX_FLAGS),
                  extra_cuda_cflags=nvcc_flags(";".join(arch_list)) if cuda else None,
                  extra_ldflags=list(LINK_FLAGS),
                  extra_include_paths=include_dirs(csrc, torch.__file__, torch.version.cuda),
                  build_directory=directory, verbose=verbose, with_cuda=cuda)
    what = (f"CPU and CUDA {torch.version.cuda} kernels for sm_" +
            ", sm_".join(a.replace(".", "") for a in arch_list)) if cuda else "CPU kernels"
    if verbose:
        _say(f"building sgm_ext._C for torch {torch.__version__} ({what}) in {directory} "
             f"({BUILD_TIME['cuda' if cuda else 'cpu']} on 2 cores)...")
    start = time.monotonic()
    tail = _run([sys.executable, "-c", _CHILD, json.dumps(kwargs)], env, echo=verbose)
    path = library_file(directory)
    if tail is not None or path is None:
        raise BuildError(f"building sgm_ext._C in {directory} failed:\n{tail or ''}")
    if verbose:
        _say(f"built {path} in {time.monotonic() - start:.0f} s")
    return path


def _check_tools(env):
    """ninja and a C++ compiler on the build's PATH (the ninja wheel's binary is added when it
    is not there: a virtual environment used without activating it), else BuildError."""
    if _which("ninja", env) is None:
        try:
            import ninja

            bin_dir = ninja.BIN_DIR
        except Exception:  # not installed, or an old ninja package
            bin_dir = os.path.dirname(sys.executable)
        if not _which("ninja", {"PATH": bin_dir}):
            raise BuildError("building sgm_ext._C needs ninja: pip install ninja")
        env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH")) if p)
    compiler = env.get("CXX") or "c++"
    if _which(compiler, env) is None and not os.path.isfile(compiler):
        raise BuildError(f"building sgm_ext._C needs a C++ compiler ({compiler} is not on PATH): "
                         "install g++ or clang++, or set CXX")


def _say(message):
    print(message, file=sys.stderr, flush=True)


def _run(command, env, echo):
    """Run the build; its output goes to stderr when `echo`. None on success, else the last
    lines of the output."""
    lines = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        for line in proc.stdout:
            lines.append(line)
            del lines[:-200]
            if echo:
                sys.stderr.write(line)
                sys.stderr.flush()
    return None if proc.returncode == 0 else "".join(lines)

"""Build script: the Python package, the Triton kernels as sgm_ext.kernels, and the compiled
library sgm_ext._C (csrc/).

`kernels/` sits at the top of the tree but is installed as `sgm_ext.kernels`: a top-level
module named `kernels` would shadow the Hugging Face package transformers imports.

sgm_ext._C is built with its CUDA kernels when torch is a CUDA build and nvcc is found
(architectures from SGM_EXT_CUDA_ARCHS, default "8.0;9.0"), with its C++ (CPU) kernels only
otherwise; SGM_EXT_NO_BUILD=1 gives a pure Python install. Build with
`pip install --no-build-isolation -e .` so the extension compiles against the installed torch.
"""
import glob
import os
import platform
import shutil

from setuptools import setup

PACKAGES = dict(
    packages=["sgm_ext", "sgm_ext.kernels"],
    package_dir={"sgm_ext": "sgm_ext", "sgm_ext.kernels": "kernels"},
    package_data={"sgm_ext": ["resources/*.txt"]},  # the demo's benign prompts
)


def find_toolkit():
    """Point torch at the CUDA toolkit root before it looks for one.

    torch guesses the root from `which nvcc`, which is wrong when nvcc on PATH is a wrapper
    script (/usr/local/bin/nvcc here): the libraries are then not found at link time.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for root in ("/usr/local/cuda", os.path.dirname(os.path.dirname(os.path.realpath(
            shutil.which("nvcc") or "/nonexistent/bin/nvcc")))):
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = root
            return


def cuda_home():
    """The CUDA toolkit root when torch is a CUDA build and nvcc exists, else None."""
    import torch
    from torch.utils import cpp_extension

    if not torch.version.cuda or cpp_extension.CUDA_HOME is None:
        return None
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    return cpp_extension.CUDA_HOME if os.path.exists(nvcc) else None


def gencode_flags(archs):
    """'8.0;9.0' -> nvcc -gencode flags: SASS for each, PTX of the newest for later GPUs."""
    caps = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    return flags + [f"-gencode=arch=compute_{caps[-1]},code=compute_{caps[-1]}"]


def extension():
    import torch
    from torch.utils import cpp_extension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob("csrc/*.cpp")) + ["csrc/cpu/act_mul_scale_default.cpp"]
    if platform.machine().lower() in ("x86_64", "amd64"):  # the AVX2 / AVX-512 variants
        sources += ["csrc/cpu/act_mul_scale_avx2.cpp", "csrc/cpu/act_mul_scale_avx512.cpp"]
    # -fopenmp: at::parallel_for's threads. -ffp-contract=off: a * b + c stays two roundings,
    # as torch computes it (s_eff must equal the Python side's bit for bit; act_mul_scale.h)
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    # torch's headers include cuBLAS / cuSPARSE headers shipped by the nvidia wheels.
    include_dirs = [os.path.join(here, "csrc")]
    wheel_headers = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia",
                                 f"cu{(torch.version.cuda or '0').split('.')[0]}", "include")
    if os.path.isdir(wheel_headers):
        include_dirs.append(wheel_headers)
    kwargs = dict(name="sgm_ext._C", include_dirs=include_dirs, extra_link_args=["-fopenmp"])
    if cuda_home() is not None:
        archs = os.environ.get("SGM_EXT_CUDA_ARCHS", "8.0;9.0")
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", *gencode_flags(archs)]
        return cpp_extension.CUDAExtension(
            sources=sources + sorted(glob.glob("csrc/*.cu")),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


if os.environ.get("SGM_EXT_NO_BUILD") == "1":
    setup(**PACKAGES)
else:
    find_toolkit()  # before torch.utils.cpp_extension is first imported
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError as e:
        raise SystemExit(f"sgm-ext compiles sgm_ext._C against the installed torch ({e}): install "
                         "torch first and build with `pip install --no-build-isolation`, or set "
                         "SGM_EXT_NO_BUILD=1 for a pure Python install") from None

    os.environ.setdefault("MAX_JOBS", "2")
    setup(ext_modules=[extension()],
          cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)}, **PACKAGES)

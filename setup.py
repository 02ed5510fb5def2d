"""Build script: the Python package, the Triton kernels as sgm_ext.kernels, the C++ / CUDA
sources as sgm_ext/csrc, and, when torch is importable here, the compiled library sgm_ext._C.

`kernels/` sits at the top of the tree but is installed as `sgm_ext.kernels`: a top-level
module named `kernels` would shadow the Hugging Face package transformers imports.

With torch importable in the build environment (`pip install --no-build-isolation`, as
scripts/setup.sh does) sgm_ext._C is compiled against it: with its CUDA kernels when torch is
a CUDA build and nvcc is found (architectures from SGM_EXT_CUDA_ARCHS, default "8.0;9.0"),
with its C++ (CPU) kernels only otherwise. Without torch (an ordinary `pip install`, whose
isolated build environment never has torch) the wheel is pure Python: it ships the sources,
and `sgm-ext build` compiles them later against the user's torch (sgm_ext/ops/build.py, which
holds the one definition of the sources and flags). SGM_EXT_NO_BUILD=1 skips the library.
"""
import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_definitions():
    """sgm_ext/ops/build.py loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_sgm_ext_build",
                                                  os.path.join(HERE, "sgm_ext", "ops", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _build_definitions()


class BuildPy(build_py):
    """build_py that also installs csrc/ as sgm_ext/csrc (the sources `sgm-ext build`
    compiles). An editable install reads csrc/ of the checkout instead."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        for rel in B.source_files(os.path.join(HERE, "csrc")):
            target = os.path.join(self.build_lib, "sgm_ext", "csrc", *rel.split("/"))
            self.mkpath(os.path.dirname(target))
            self.copy_file(os.path.join("csrc", *rel.split("/")), target)


# the layers' folders (docs/ARCHITECTURE.md); kernels/ is installed as sgm_ext.kernels
LAYERS = ("core", "ops", "patching", "profile", "evaluation", "serving", "app", "cli")
PACKAGES = dict(
    packages=["sgm_ext", "sgm_ext.kernels"] + [f"sgm_ext.{layer}" for layer in LAYERS],
    package_dir={"sgm_ext": "sgm_ext", "sgm_ext.kernels": "kernels"},
    package_data={"sgm_ext": ["resources/*.txt", "resources/*.jsonl"]},  # the demos' data
    include_package_data=False,  # package_data only (MANIFEST.in is for the sdist)
)


def find_toolkit():
    """Point torch at the CUDA toolkit root before it looks for one (B.toolkit_root: torch's
    guess is wrong when nvcc on PATH is a wrapper script)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    root = B.toolkit_root()
    if root is not None:
        os.environ["CUDA_HOME"] = root


def torch_importable():
    """Whether torch imports here; False only when it is not installed (a broken torch is an
    error, not a silent pure-Python build)."""
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        return False
    return True


def cuda_home():
    """The CUDA toolkit root when torch is a CUDA build and nvcc exists, else None."""
    import torch
    from torch.utils import cpp_extension

    if not torch.version.cuda or cpp_extension.CUDA_HOME is None:
        return None
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    return cpp_extension.CUDA_HOME if os.path.exists(nvcc) else None


def extension():
    import torch
    from torch.utils import cpp_extension

    cuda = cuda_home() is not None
    kwargs = dict(name="sgm_ext._C", sources=B.sources("csrc", cuda),
                  include_dirs=B.include_dirs(os.path.join(HERE, "csrc"), torch.__file__,
                                              torch.version.cuda),
                  extra_link_args=list(B.LINK_FLAGS))
    if cuda:
        archs = os.environ.get(B.ARCHS_ENV, B.DEFAULT_ARCHS)
        return cpp_extension.CUDAExtension(
            extra_compile_args={"cxx": list(B.CXX_FLAGS), "nvcc": B.nvcc_flags(archs)},
            **kwargs)
    return cpp_extension.CppExtension(extra_compile_args={"cxx": list(B.CXX_FLAGS)}, **kwargs)


if os.environ.get("SGM_EXT_NO_BUILD") == "1":
    setup(cmdclass={"build_py": BuildPy}, **PACKAGES)
else:
    find_toolkit()  # before torch.utils.cpp_extension is first imported
    if not torch_importable():
        print("sgm-ext: torch is not importable in this build environment (pip builds in an "
              "isolated one): building a pure-Python package that ships the C++ / CUDA "
              "sources; run `sgm-ext build` after installing to compile sgm_ext._C, or "
              "install with torch present and `pip install --no-build-isolation`",
              file=sys.stderr)
        setup(cmdclass={"build_py": BuildPy}, **PACKAGES)
    else:
        from torch.utils.cpp_extension import BuildExtension

        os.environ.setdefault("MAX_JOBS", "2")
        setup(ext_modules=[extension()],
              cmdclass={"build_py": BuildPy,
                        "build_ext": BuildExtension.with_options(use_ninja=True)},
              **PACKAGES)

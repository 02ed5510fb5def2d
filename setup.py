"""Build script: the Python package, the Triton kernels as sgm_ext.kernels.

`kernels/` sits at the top of the tree but is installed as `sgm_ext.kernels`: a top-level
module named `kernels` would shadow the Hugging Face package transformers imports.
"""
from setuptools import setup

setup(
    packages=["sgm_ext", "sgm_ext.kernels"],
    package_dir={"sgm_ext": "sgm_ext", "sgm_ext.kernels": "kernels"},
)

import os

# The Triton kernels run on CPU tensors under the interpreter; triton.jit reads this when the
# kernel modules are imported, so it must be set before anything imports sgm_ext.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("SGM_EXT_BACKEND", None)

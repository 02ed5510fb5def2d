"""Layer 5, serving in vLLM: the settings and modules that replace pieces of vLLM's MLPs
(modules.py, no vLLM import) and the vLLM general plugin (vllm_plugin.py). The names below are
those the flat layout's `sgm_ext.serving` module offered."""
from .modules import (
                      REQUEST_KEY,
                      SETTINGS_KEY,
                      ScaledActAndMul,
                      ScaledDownProj,
                      ServedModel,
                      Settings,
                      check_for_serving,
                      is_served,
                      patch_vllm_model,
                      read_settings,
                      request_strength,
)

__all__ = ["REQUEST_KEY", "SETTINGS_KEY", "ScaledActAndMul", "ScaledDownProj", "ServedModel",
           "Settings", "check_for_serving", "is_served", "patch_vllm_model", "read_settings",
           "request_strength"]

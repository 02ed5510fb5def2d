"""Layer 5, serving in vLLM: the settings, request checks and modules that replace pieces of
vLLM's MLPs (modules.py, no vLLM import), starting vLLM's server for `sgm-ext serve`
(launch.py: the port check, run_server; no vLLM import) and the vLLM general plugin
(vllm_plugin.py). The names below: those the flat layout's `sgm_ext.serving` module offered,
and the request and scale-file checks."""
from .modules import ScaledActAndMul, ScaledDownProj, ServedModel, is_served, patch_vllm_model
from .settings import (
           AMPLIFY_FLAG,
           REQUEST_KEY,
           REQUEST_PLACE,
           SETTINGS_KEY,
           ScaleFileWatch,
           Settings,
           check_amplification,
           check_for_serving,
           checked_strength,
           file_sha256,
           file_state,
           read_settings,
           request_body_problem,
           request_strength,
)

__all__ = ["AMPLIFY_FLAG", "REQUEST_KEY", "REQUEST_PLACE", "SETTINGS_KEY", "ScaleFileWatch",
           "ScaledActAndMul", "ScaledDownProj", "ServedModel", "Settings",
           "check_amplification", "check_for_serving", "checked_strength", "file_sha256",
           "file_state", "is_served", "patch_vllm_model", "read_settings",
           "request_body_problem", "request_strength"]

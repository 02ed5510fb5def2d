"""Layer 5, serving in vLLM: the settings and modules that replace pieces of vLLM's MLPs
(modules.py, no vLLM import) and the vLLM general plugin (vllm_plugin.py)."""

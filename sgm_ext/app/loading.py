"""Loading a model and its processor from a local Hugging Face directory (never downloads)."""
import glob
import json
import os

from ..core.pause import pause_point


def check_model_dir(path):
    """FileNotFoundError / ValueError naming `path` unless it is a local model directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such model directory: {path} (sgm-ext loads local "
                                "directories only; it never downloads)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
    check_weight_files(path)


def check_weight_files(path):
    """ValueError naming the first *.safetensors file of the directory whose header cannot be
    read or whose size is not what its header says (truncated, corrupt, not safetensors):
    found before a load, which would stop with the parser's traceback."""
    from safetensors import SafetensorError, safe_open

    for name in sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors"))):
        try:
            size = os.path.getsize(name)
            with open(name, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n)) if 8 + n <= size else None
            end = max((v["data_offsets"][1] for k, v in (header or {}).items()
                       if k != "__metadata__"), default=0)
            if header is None or 8 + n + end > size:
                raise ValueError("shorter than its header says")
            with safe_open(name, framework="pt"):
                pass
        except (SafetensorError, OSError, ValueError, TypeError, KeyError, IndexError) as e:
            raise ValueError(f"{name}: the model's weight file is truncated or not safetensors "
                             f"({e}); copy or download it again") from None


def context_length(path):
    """max_position_embeddings of the model's (text) config in `path`, or None."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for cfg in (config.get("text_config") or {}, config):
        n = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def check_max_length(path, max_length):
    """ValueError when --max-length is above the model's context length (from config.json,
    before the model is loaded)."""
    n = context_length(path) if max_length is not None else None
    if n is not None and max_length > n:
        raise ValueError(f"--max-length {max_length} is above the model's context length {n} "
                         f"(max_position_embeddings in {os.path.join(path, 'config.json')})")


def check_device(device):
    """ValueError for a device this machine does not have (before a model is loaded)."""
    import torch

    if device in ("auto", "cpu"):
        return
    if not device.startswith("cuda"):
        raise ValueError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible here (use --device cpu or "
                         "auto)")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")


def load_model(path, device="auto", dtype="auto", local_rank=0, world=1):
    """(model in eval mode, processor) from a local Hugging Face directory.

    device: "auto" (GPU(s) if any: device_map="auto", or the local rank's GPU when world > 1),
    "cpu", "cuda", "cuda:N". dtype: "auto" (the checkpoint's on GPU, float32 on CPU),
    "float32", "bfloat16", "float16". Vision-language configs load with
    AutoModelForImageTextToText, the others with AutoModelForCausalLM. Local files only.
    """
    import torch
    from transformers import AutoConfig

    check_model_dir(path)
    check_device(device)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText as auto_class
    else:
        from transformers import AutoModelForCausalLM as auto_class
    cuda = torch.cuda.is_available()
    kwargs = {"local_files_only": True}
    if device == "auto":
        if cuda and world > 1:
            torch.cuda.set_device(local_rank)
            kwargs["device_map"] = {"": local_rank}
        elif cuda:
            kwargs["device_map"] = "auto"
    else:
        kwargs["device_map"] = {"": device}
    on_gpu = "device_map" in kwargs and kwargs["device_map"] != {"": "cpu"}
    kwargs["dtype"] = (dtype if dtype != "auto" else ("auto" if on_gpu else "float32"))
    if kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    try:
        pause_point("load")
        model = auto_class.from_pretrained(path, **kwargs).eval()
        return model, load_processor(path)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted (Ctrl-C) while loading the model from {path}; "
                                "nothing was written") from None


def load_processor(path):
    """The directory's multimodal processor, or its tokenizer for a text-only checkpoint."""
    from transformers import AutoProcessor, AutoTokenizer

    check_model_dir(path)
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception:  # text-only checkpoints may have no processor config
        return AutoTokenizer.from_pretrained(path, local_files_only=True)

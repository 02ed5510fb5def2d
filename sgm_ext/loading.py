"""Loading a model and its processor from a local Hugging Face directory (never downloads)."""


def load_model(path, device="auto", dtype="auto", local_rank=0, world=1):
    """(model in eval mode, processor) from a Hugging Face directory.

    device: "auto" (GPU(s) if any: device_map="auto", or the local rank's GPU when world > 1),
    "cpu", "cuda", "cuda:N". dtype: "auto" (the checkpoint's on GPU, float32 on CPU),
    "float32", "bfloat16", "float16". Vision-language configs load with
    AutoModelForImageTextToText, the others with AutoModelForCausalLM.
    """
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText as auto_class
    else:
        from transformers import AutoModelForCausalLM as auto_class
    cuda = torch.cuda.is_available()
    kwargs = {}
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
    model = auto_class.from_pretrained(path, **kwargs).eval()
    return model, load_processor(path)


def load_processor(path):
    """The directory's multimodal processor, or its tokenizer for a text-only checkpoint."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except Exception:  # text-only checkpoints may have no processor config
        return AutoTokenizer.from_pretrained(path)

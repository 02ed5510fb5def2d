"""Fingerprints: short hashes that tell whether two runs saw the same model, processor and data.

- config_fingerprint: the config's sizes; a scale file records it, and patching refuses a
  file made for a model of other sizes.
- weights_fingerprint: the parameters' and buffers' names, shapes, dtypes and a fixed sample
  of their bytes; a profiling checkpoint records it, so a checkpoint of one model is never
  resumed with another of the same sizes.
- processor_fingerprint: the tokenizer's vocabulary, special tokens and chat template, and
  the image processor's settings.
"""
import hashlib
import json

import torch

SAMPLE = 1 << 16  # elements of each tensor hashed: evenly spaced over the whole tensor


def _sizes(config, prefix=""):
    """The size fields of a HF config and its sub-configs, flattened."""
    out = {}
    d = config if isinstance(config, dict) else config.to_dict()
    for key, value in sorted(d.items()):
        if isinstance(value, dict):
            out.update(_sizes(value, f"{prefix}{key}."))
        elif key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "vocab_size", "num_attention_heads", "num_key_value_heads"):
            out[prefix + key] = value
    return out


def config_fingerprint(config):
    """A short hash of a model config's sizes: scale files made for another model differ."""
    blob = json.dumps(_sizes(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_fingerprint(model):
    """A short hash of a model's weights: every parameter and buffer by name with its shape
    and dtype, and SAMPLE evenly spaced elements' bytes (weights on "meta" by shape only).
    Cheap at any size (a fixed number of elements per tensor); two models trained apart
    differ in nearly every element, so the sample tells them apart."""
    h = hashlib.sha256()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in sorted(tensors, key=lambda nt: nt[0]):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE)
        sample = flat[::step][:SAMPLE].contiguous().cpu()
        if sample.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same bits
            sample = sample.view(torch.int16)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def processor_fingerprint(processor):
    """A short hash of what a processor does to a row: the tokenizer's vocabulary, added and
    special tokens, padding side and chat template; a multimodal processor's image settings."""
    tok = getattr(processor, "tokenizer", processor)
    parts = {"vocab": sorted(tok.get_vocab().items()) if hasattr(tok, "get_vocab") else None,
             "special": {k: str(v) for k, v in sorted(getattr(tok, "special_tokens_map",
                                                              {}).items())},
             "padding_side": getattr(tok, "padding_side", None),
             "chat_template": [str(getattr(o, "chat_template", None) or "")
                               for o in (processor, tok)]}
    image = getattr(processor, "image_processor", None)
    if image is not None and hasattr(image, "to_dict"):
        parts["image_processor"] = image.to_dict()
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

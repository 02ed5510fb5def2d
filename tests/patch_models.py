"""Tiny random-weight models of the real transformers classes, with matching inputs.

Each builder returns (model, inputs): `inputs` is a dict for model(**inputs) with a batch of
two sequences, one image each for the multimodal ones. Images go through the real image
processor classes where they build offline with explicit sizes (LLaVA: CLIPImageProcessor;
Qwen2-VL / Qwen2.5-VL: Qwen2VLImageProcessor; PaliGemma / Gemma 3: SiglipImageProcessor); the
others (LLaVA-NeXT tiles, Idefics3, Mllama tiles, InternVL) get random pixel tensors of the
shape their processors produce. No tokenizer: token ids are random, image placeholders are put
where the model expects them.
Sizes are small so that a forward takes milliseconds; vocabularies are small and the image
token ids lie inside them.
"""
import torch
import transformers as T

V = 96  # vocabulary
IMG = 90  # image token id
B = 2

TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=40,
            num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
            projection_dim=32)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=40,
              num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _text_ids(n_text, seed, image_tokens=0, image_id=IMG, prefix=()):
    """[B, len(prefix) + image_tokens + n_text] ids: image placeholders then random text."""
    text = torch.randint(3, 80, (B, n_text), generator=_gen(seed))
    parts = [torch.tensor(prefix, dtype=torch.long).expand(B, -1),
             torch.full((B, image_tokens), image_id), text]
    return torch.cat(parts, dim=1)


def _pixels(shape, seed):
    return torch.rand(shape, generator=_gen(seed)) * 2 - 1


def _images(seed, grow=8):
    """B random RGB PIL images, each `grow` pixels taller and wider than the one before."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (60 + grow * i, 50 + grow * i, 3),
                                         dtype=np.uint8)) for i in range(B)]


def _clip_pixels(seed, size=28):
    """Images through the real CLIPImageProcessor (resize, crop, normalise)."""
    proc = T.CLIPImageProcessor(size={"shortest_edge": size},
                                crop_size={"height": size, "width": size})
    return proc(images=_images(seed), return_tensors="pt")["pixel_values"]


def _siglip_pixels(seed, size=28):
    proc = T.SiglipImageProcessor(size={"height": size, "width": size})
    return proc(images=_images(seed), return_tensors="pt")["pixel_values"]


def _with_mask(ids, **extra):
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}


# ---------------------------------------------------------------- text-only

def llama():
    return T.LlamaForCausalLM(T.LlamaConfig(**TEXT, mlp_bias=True)), _with_mask(_text_ids(7, 1))


def mistral():
    return T.MistralForCausalLM(T.MistralConfig(**TEXT)), _with_mask(_text_ids(7, 2))


def qwen3():
    return T.Qwen3ForCausalLM(T.Qwen3Config(**TEXT, head_dim=8)), _with_mask(_text_ids(7, 3))


def phi3():
    cfg = T.Phi3Config(**{**TEXT, "num_key_value_heads": 4})
    return T.Phi3ForCausalLM(cfg), _with_mask(_text_ids(7, 4))


# ---------------------------------------------------------------- multimodal

def llava():
    cfg = T.LlavaConfig(text_config=dict(model_type="llama", **TEXT), vision_config=CLIP,
                        image_token_index=IMG, vision_feature_layer=-1)
    # 28 / 14 = 2x2 patches; the default strategy drops CLS: 4 image tokens.
    return T.LlavaForConditionalGeneration(cfg), _with_mask(
        _text_ids(5, 5, image_tokens=4), pixel_values=_clip_pixels(5))


def llava_next_qwen2():
    cfg = T.LlavaNextConfig(text_config=dict(model_type="qwen2", **TEXT), vision_config=CLIP,
                            image_token_index=IMG, vision_feature_layer=-1,
                            image_grid_pinpoints=[[28, 28]])
    model = T.LlavaNextForConditionalGeneration(cfg)
    pixels = _pixels((B, 2, 3, 28, 28), 6)  # base image + one 28x28 tile
    sizes = torch.tensor([[28, 28]] * B)
    n = _count_image_tokens(model, pixel_values=pixels, image_sizes=sizes)
    return model, _with_mask(_text_ids(5, 6, image_tokens=n), pixel_values=pixels,
                             image_sizes=sizes)


def _count_image_tokens(model, **kw):
    with torch.no_grad():
        feats = model.model.get_image_features(**kw)
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, (list, tuple)):
        return feats[0].shape[0]
    return feats.shape[0] // B if feats.dim() == 2 else feats.shape[1]


def _qwen_vl(config_cls, model_cls, vision, seed):
    text = {**TEXT, "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2],
                                        "rope_theta": 10000.0}}
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=IMG,
                     video_token_id=91, vision_start_token_id=92, vision_end_token_id=93)
    model = model_cls(cfg)
    # The real image processor, pinned to 56 x 56 pixels: 4 x 4 patches of 14, merged 2 x 2
    # into 4 tokens per image; pixel_values [16 B, 3 * 2 * 14 * 14], image_grid_thw [B, 3].
    proc = T.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14,
                                   merge_size=2, temporal_patch_size=2)
    out = proc(images=_images(seed, grow=0), return_tensors="pt")
    pixels, grid = out["pixel_values"], out["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]] * B
    ids = _text_ids(5, seed, image_tokens=4, prefix=(92,))
    return model, _with_mask(ids, pixel_values=pixels, image_grid_thw=grid,
                             mm_token_type_ids=(ids == IMG).long())


def qwen2_vl():
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
    return _qwen_vl(T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration, vision, 7)


def qwen2_5_vl():
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=40, num_heads=2,
                  window_size=56, fullatt_block_indexes=[1])
    return _qwen_vl(T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration, vision, 8)


def idefics3():
    vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = T.Idefics3Config(text_config=dict(model_type="llama", **TEXT), vision_config=vision,
                           image_token_id=IMG, scale_factor=2)
    model = T.Idefics3ForConditionalGeneration(cfg)
    pixels = _pixels((B, 1, 3, 28, 28), 9)
    # 2x2 patches, pixel-shuffled by scale_factor 2: 1 token per image.
    return model, _with_mask(_text_ids(6, 9, image_tokens=1), pixel_values=pixels)


def paligemma():
    text = {**TEXT, "model_type": "gemma", "head_dim": 8, "num_key_value_heads": 1}
    cfg = T.PaliGemmaConfig(text_config=text, vision_config={**SIGLIP, "projection_dim": 32},
                            image_token_index=IMG, projection_dim=32, hidden_size=32)
    model = T.PaliGemmaForConditionalGeneration(cfg)
    ids = _text_ids(5, 10, image_tokens=4)
    return model, _with_mask(ids, pixel_values=_siglip_pixels(10),
                             token_type_ids=(ids == IMG).long() * 0)


def gemma3():
    text = {**TEXT, "head_dim": 8, "sliding_window": 8, "layer_types": None}
    cfg = T.Gemma3Config(text_config=text, vision_config=SIGLIP, mm_tokens_per_image=1,
                         image_token_index=IMG, boi_token_index=88, eoi_token_index=89)
    model = T.Gemma3ForConditionalGeneration(cfg)
    ids = _text_ids(5, 11, image_tokens=1)
    return model, _with_mask(ids, pixel_values=_siglip_pixels(11),
                             token_type_ids=(ids == IMG).long())


def mllama():
    vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_global_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                  max_num_tiles=1, intermediate_layers_indices=[0], vision_output_dim=64,
                  supported_aspect_ratios=[[1, 1]])
    text = {**TEXT, "num_hidden_layers": 3, "cross_attention_layers": [1]}
    text.pop("intermediate_size")
    text["intermediate_size"] = 48
    cfg = T.MllamaConfig(text_config=text, vision_config=vision, image_token_index=IMG)
    model = T.MllamaForConditionalGeneration(cfg)
    ids = _text_ids(5, 12, image_tokens=1)
    return model, _with_mask(
        ids, pixel_values=_pixels((B, 1, 1, 3, 28, 28), 12),
        aspect_ratio_ids=torch.ones(B, 1, dtype=torch.long),
        aspect_ratio_mask=torch.ones(B, 1, 1, dtype=torch.long),
        cross_attention_mask=torch.ones(B, ids.shape[1], 1, 1, dtype=torch.long))


def internvl():
    vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=2, image_size=[28, 28], patch_size=[14, 14])
    cfg = T.InternVLConfig(text_config=dict(model_type="qwen2", **TEXT), vision_config=vision,
                           image_token_id=IMG, downsample_ratio=0.5)
    model = T.InternVLForConditionalGeneration(cfg)
    return model, _with_mask(_text_ids(5, 13, image_tokens=1),
                             pixel_values=_pixels((B, 3, 28, 28), 13))


BUILDERS = {f.__name__: f for f in (llama, mistral, qwen3, phi3, llava, llava_next_qwen2,
                                     qwen2_vl, qwen2_5_vl, idefics3, paligemma, gemma3, mllama,
                                     internvl)}


def build(name, seed=0):
    torch.manual_seed(seed)
    model, inputs = BUILDERS[name]()
    return model.eval(), inputs


def python_calls(fn, *args):
    """The Python function calls made while fn(*args) runs (C functions not counted). The
    garbage collector is run first and held off meanwhile: a collection inside the call runs
    the weakref callbacks of earlier tests' objects, which would be counted as the call's."""
    import gc
    import sys

    calls = []
    gc.collect()
    gc.disable()
    sys.setprofile(lambda frame, event, arg: calls.append(frame.f_code.co_name)
                   if event == "call" else None)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def rel(a, b):
    """max |a - b| / max |b|: the relative error the tests bound."""
    return ((a - b).abs().max() / b.abs().max()).item()


def param_hash(model):
    """sha256 of every state_dict entry's name and bytes: equal before and after means the
    weights are exactly as they were."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.dtype.is_floating_point else t.cpu().numpy().tobytes())
    return h.hexdigest()

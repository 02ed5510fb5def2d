"""Model inputs from rows: chat template, image tokens, batching with padding, pooling masks.

The profiler and the evaluation encode rows the same way, here: a row (data.Row or
prompts.Prompt: text, optional image, optional response) becomes the processor's tensors;
a batch is padded to one length (left or right), and `encode_batch` also says which tokens
each sample pools over for a modality.
"""
import torch

# Which tokens a sample's responses are pooled over: "sample" (the default) the row's own
# tokens (its text and image; never the chat template's), "all" every token, "text" / "image"
# the sample's text / image tokens, "response" the tokens of the row's assistant reply.
MODALITIES = ("sample", "all", "text", "image", "response")
# How a row's text becomes the model's input: "chat" through the chat template (a user turn,
# with the generation prompt), "raw" as plain text (AurA's recipe: continuation prompts);
# "auto": chat when the processor has a chat template.
FORMATS = ("auto", "chat", "raw")


def tokenizer_of(processor):
    """The tokenizer of a multimodal processor, or the tokenizer itself."""
    return getattr(processor, "tokenizer", processor)


def pad_token_id(processor):
    """The id padding uses: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    tok = tokenizer_of(processor)
    for token_id in (tok.pad_token_id, tok.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _chat_template_owner(processor):
    for owner in (processor, tokenizer_of(processor)):
        if getattr(owner, "chat_template", None):
            return owner
    return None


def resolve_format(processor, fmt="auto"):
    """"chat" or "raw" for this processor; ValueError for chat without a chat template."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    has_template = _chat_template_owner(processor) is not None
    if fmt == "chat" and not has_template:
        raise ValueError(f"format 'chat' needs a chat template; {type(processor).__name__} has "
                         "none (use format 'raw')")
    return "chat" if fmt == "auto" and has_template else ("raw" if fmt == "auto" else fmt)


def _prompt_text(processor, row, with_response, fmt="auto"):
    """(text, from_template) for one row: the chat template's rendering in the chat format,
    the text itself (after the image token for a row with an image) in the raw one."""
    owner = _chat_template_owner(processor) if resolve_format(processor, fmt) == "chat" \
        else None
    response = row.response if with_response else None
    system = getattr(row, "system", None)  # a system prompt (evaluation's prompt defense)
    if owner is None:
        text = f"{system}\n\n{row.text}" if system else row.text
        token = getattr(processor, "image_token", None)
        if row.image is not None and token and token not in text:
            text = f"{token}\n{text}"
        return (f"{text} {response}" if response else text), False
    if owner is processor and processor is not tokenizer_of(processor):  # multimodal: typed content
        content = ([{"type": "image"}] if row.image is not None else []) + \
            [{"type": "text", "text": row.text}]
        messages = [{"role": "user", "content": content}]
        if system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        if response:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    else:
        messages = [{"role": "user", "content": row.text}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        if response:
            messages.append({"role": "assistant", "content": response})
    text = owner.apply_chat_template(messages, tokenize=False,
                                     add_generation_prompt=not response)
    return text, True


def encode_row(processor, row, with_response, image, limit=None, fmt="auto"):
    """Model inputs ({name: [1, T, ...] tensor}) for one row: text (and the row's response
    when with_response) in the format `fmt` (see FORMATS), `image` (a PIL image or None)
    through the processor; `limit` (a LengthLimit) cuts or refuses a row that is too long."""
    text, templated = _prompt_text(processor, row, with_response, fmt)
    kwargs = {"return_tensors": "pt", "add_special_tokens": not templated}
    if image is not None:
        enc = processor(text=[text], images=[image], **kwargs)
    elif processor is not tokenizer_of(processor):
        enc = processor(text=[text], **kwargs)
    else:
        enc = processor(text, **kwargs)
    enc = dict(enc)
    return enc if limit is None else limit.apply(enc, row, image is not None)


def encode(processor, row, limit=None, fmt="auto"):
    """Model inputs for one row or prompt (its image loaded), without a response: the chat
    template with the generation prompt in the chat format, the text (after the image token)
    in the raw one."""
    return encode_row(processor, row, False, load_image(row.image), limit, fmt)


def takes_images(processor):
    """Whether the processor has an image processor (a bare tokenizer has not)."""
    return processor is not tokenizer_of(processor) and \
        getattr(processor, "image_processor", None) is not None


def drop_unusable_images(rows, processor):
    """(rows, n): the rows with their images removed when the processor takes text only (a
    bare tokenizer would silently ignore them), and how many had one; rows are NamedTuples
    with an `image` field (data.Row, prompts.Prompt)."""
    with_image = sum(r.image is not None for r in rows)
    if not with_image or takes_images(processor):
        return rows, 0
    return [r._replace(image=None) for r in rows], with_image


def unusable_images_warning(n, processor, first):
    return (f"{n} rows have an image, but the processor ({type(processor).__name__}) takes "
            f"text only: their images are ignored (the first: row {first})")


# The longest input the CLI lets through by default, whatever the model's context: attention
# over T tokens holds T x T scores, and a stray huge row must not take the machine down.
LENGTH_CAP = 4096


def default_max_length(model):
    """The model's context length (max_position_embeddings of its text config), at most
    LENGTH_CAP."""
    config = model.config
    for cfg in (getattr(config, "text_config", None), config):
        n = getattr(cfg, "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return min(n, LENGTH_CAP)
    return LENGTH_CAP


class LengthLimit:
    """At most max_length tokens per row: a longer text-only row is cut to its first
    max_length tokens and counted (`truncated`), or refused when truncate is False; a row with
    an image is refused (cutting could drop image tokens the image's features must fill)."""

    def __init__(self, max_length, truncate=True):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        self.max_length, self.truncate = max_length, truncate
        self.truncated = []  # row numbers

    def apply(self, enc, row, has_image):
        n = enc["input_ids"].shape[1]
        if n <= self.max_length:
            return enc
        if not self.truncate or has_image:
            why = "it has an image, whose tokens a cut could drop" if has_image else \
                "--no-truncate"
            raise ValueError(f"row {row.number} has {n} tokens, more than the maximum length "
                             f"{self.max_length} ({why}); shorten it or raise --max-length")
        self.truncated.append(row.number)
        return {k: v[:, :self.max_length] if _per_token(k, v, n) else v for k, v in enc.items()}

    def summary(self):
        """One line about the truncated rows, or None."""
        if not self.truncated:
            return None
        return (f"{len(self.truncated)} rows were longer than {self.max_length} tokens and "
                f"were cut to it (the first: row {self.truncated[0]}); --max-length sets the "
                "limit, --no-truncate refuses such rows instead")


def _per_token(key, value, length):
    return key not in _NOT_PER_TOKEN and torch.is_tensor(value) and value.dim() >= 2 \
        and value.shape[:2] == (1, length)


def load_image(image):
    """None, a path or a PIL image -> an RGB PIL image (or None)."""
    if image is None:
        return None
    if isinstance(image, str):
        from PIL import Image

        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB")


def image_token_id(model):
    """The config's image token id (image_token_id / image_token_index), or None."""
    config = model.config
    for key in ("image_token_id", "image_token_index"):
        for cfg in (config, getattr(config, "text_config", None)):
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                return value
    return None


# Processor outputs that are never one value per token, whatever their shape happens to be.
_NOT_PER_TOKEN = {"pixel_values", "pixel_attention_mask", "image_grid_thw", "video_grid_thw",
                  "image_sizes", "pixel_values_videos"}


def collate(encodings, pad_id, padding_side):
    """Pad the per-sample token tensors [1, T_i, ...] to one length; concatenate the others
    (pixel values, image grids), which rows without an image do not have."""
    lengths = [e["input_ids"].shape[1] for e in encodings]
    longest = max(lengths)
    batch = {}
    for key in dict.fromkeys(k for e in encodings for k in e):
        parts = [e.get(key) for e in encodings]
        if key not in _NOT_PER_TOKEN and all(torch.is_tensor(p) and p.dim() >= 2 and
                                             p.shape[:2] == (1, n) for p, n in zip(parts, lengths)):
            fill = pad_id if key == "input_ids" else 0
            padded = []
            for p, n in zip(parts, lengths):
                pad = p.new_full((1, longest - n, *p.shape[2:]), fill)
                padded.append(torch.cat([pad, p] if padding_side == "left" else [p, pad], 1))
            batch[key] = torch.cat(padded)
        elif all(p is None or torch.is_tensor(p) for p in parts):
            batch[key] = torch.cat([p for p in parts if p is not None])
        else:
            raise ValueError(f"cannot batch the processor output {key!r}")
    return batch, lengths


def _sample_span(processor, row, image, ids, fmt):
    """(start, end) of the row's own tokens in its encoding `ids` [T]: what the encoding
    with the row's text and the encoding with an empty text do not share at either end (the
    template's tokens, a BOS); image tokens stay in the shared part (see encode_batch)."""
    bare = encode_row(processor, row._replace(text=""), False, image, None, fmt)["input_ids"][0]
    n, m = len(ids), len(bare)
    start = 0
    while start < min(n, m) and ids[start] == bare[start]:
        start += 1
    end = 0
    while end < min(n, m) - start and ids[n - 1 - end] == bare[m - 1 - end]:
        end += 1
    return start, n - end


def encode_batch(model, processor, rows, modality, padding_side, limit=None, fmt="auto"):
    """(inputs, select [B, T] bool): the model inputs and the tokens each sample pools over
    (see MODALITIES). limit: a LengthLimit for the rows, or None; fmt: see FORMATS."""
    images = [load_image(r.image) for r in rows]
    # "all" is every token the model reads, so a row's response too (the model's own
    # continuation in rows `sgm-ext sample` writes); "sample" / "text" / "image": the row's own
    # text and image tokens, without its response
    with_response = modality in ("response", "all")
    encodings = [encode_row(processor, r, with_response, im, limit, fmt)
                 for r, im in zip(rows, images)]
    batch, lengths = collate(encodings, pad_token_id(processor), padding_side)
    if "attention_mask" not in batch:
        raise ValueError("the processor gives no attention_mask; sgm-ext needs it to mask padding")
    select = batch["attention_mask"].bool()
    ids = batch["input_ids"]
    image_id = image_token_id(model)
    is_image = ids == image_id if image_id is not None else torch.zeros_like(select)
    if modality in ("sample", "text"):
        own = torch.zeros_like(select)
        for i, (row, n, im, enc) in enumerate(zip(rows, lengths, images, encodings)):
            start, end = _sample_span(processor, row, im, enc["input_ids"][0], fmt)
            offset = ids.shape[1] - n if padding_side == "left" else 0
            own[i, offset + start:offset + end] = True
        select = select & ((own | is_image) if modality == "sample" else (own & ~is_image))
    elif modality == "image":
        if image_id is None:
            raise ValueError(f"modality={modality!r} needs the model config's image token id "
                             f"(image_token_id); {type(model.config).__name__} has none")
        select = select & is_image
    elif modality == "response":
        longest = ids.shape[1]
        for i, (row, n, im) in enumerate(zip(rows, lengths, images)):
            if not row.response:
                raise ValueError(f"row {row.number}: modality='response' needs a response in "
                                 "every row")
            prompt_len = encode_row(processor, row, False, im, None, fmt)["input_ids"].shape[1]
            start = longest - n if padding_side == "left" else 0
            select[i, start:start + min(prompt_len, n)] = False
    empty = (select.sum(1) == 0).nonzero()
    if len(empty):
        row = rows[int(empty[0])]
        raise ValueError(f"row {row.number} has no tokens to pool for modality={modality!r}")
    return batch, select


def input_device(model):
    """Where the inputs go: the input embedding's device; with accelerate offloading (weights
    on "meta") the device its hook runs the module on."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    device = weight.device if weight is not None else next(model.parameters()).device
    if device.type == "meta":
        device = torch.device(getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
                              or "cpu")
    return device

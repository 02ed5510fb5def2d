"""Tiny models and tokenizers for the profiler tests (real transformers classes, no downloads).

The planted model is a 2-layer Llama whose weights are set so that a known set of MLP
neurons fires on "toxic" words and no other neuron can tell toxic from non-toxic text:
- every word embedding is random in dims 1.. ; dim 0 is +C for toxic words, -C for the rest
  (so every token has the same norm, whatever its class);
- attention outputs are zeroed (o_proj = 0): the residual stream is the embedding plus MLPs;
- planted neurons read dim 0 only, with gate and up weights A: mid = silu(A x0) A x0 is large
  for toxic tokens and ~0 for the others; the other neurons have zero weight on dim 0;
- no layer-0 neuron writes dim 0 and planted layer-0 neurons write nothing, so layer 1 sees
  the class only through dim 0 too.
"""
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL = ["[PAD]", "[UNK]", "<s>", "</s>", "<image>"]
TOXIC_WORDS = [f"tox{i}" for i in range(8)]
NEUTRAL_WORDS = [f"word{i}" for i in range(40)]
VOCAB = {w: i for i, w in enumerate(SPECIAL + TOXIC_WORDS + NEUTRAL_WORDS)}
PLANTED = {0: [3, 17, 40, 41], 1: [5, 22, 23, 50, 63]}  # layer -> planted mid neurons
HIDDEN, INTER = 32, 64
C, A = 4.0, 3.0


def tokenizer(padding_side="right"):
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="<s>", eos_token="</s>")
    fast.add_tokens(["<image>"], special_tokens=True)  # split out of "<image><image>..."
    fast.padding_side = padding_side
    return fast


def planted_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(VOCAB),
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3)
    model = LlamaForCausalLM(config).eval()
    toxic_ids = [VOCAB[w] for w in TOXIC_WORDS]
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_()
        emb[:, 0] = -C
        emb[toxic_ids, 0] = C
        for layer, planted in PLANTED.items():
            block = model.model.layers[layer]
            block.self_attn.o_proj.weight.zero_()
            mlp = block.mlp
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight.normal_(0, 0.3)
                lin.weight[:, 0] = 0
                lin.weight[planted] = 0
                lin.weight[planted, 0] = A
            mlp.down_proj.weight.normal_(0, 0.1)
            if layer == 0:
                mlp.down_proj.weight[0] = 0
                mlp.down_proj.weight[:, planted] = 0
        # RMSNorm weights stay 1, so every planted neuron sees +-C / rms the same way.
    return model


def planted_rows(n_per_class=24, seed=0):
    """Sentences of 3-8 neutral words; toxic ones have 1-3 toxic words mixed in."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(2 * n_per_class):
        toxic = i % 2 == 0
        n = int(torch.randint(3, 9, (1,), generator=gen))
        words = [NEUTRAL_WORDS[int(j)] for j in torch.randint(0, len(NEUTRAL_WORDS), (n,),
                                                              generator=gen)]
        if toxic:
            for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
                pos = int(torch.randint(0, len(words) + 1, (1,), generator=gen))
                words.insert(pos, TOXIC_WORDS[int(torch.randint(0, len(TOXIC_WORDS), (1,),
                                                                generator=gen))])
        rows.append({"text": " ".join(words), "label": "toxic" if toxic else "non-toxic"})
    return rows


def planted_sites():
    """{site name: set of planted neuron indices} for the mid sites."""
    return {f"model.layers.{layer}.mlp.mid": set(idx) for layer, idx in PLANTED.items()}


def readout_llama(seed, layers=3):
    """A random tiny Llama over VOCAB for the read-out recipes (attribution, safe vectors, toxic
    directions): untied unembedding, a final norm gain other than 1 so that a test can see it
    missing."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(VOCAB),
                      tie_word_embeddings=False, pad_token_id=0, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model


def readout_gemma(seed):
    """A random tiny Gemma 3 over VOCAB: a post-feed-forward norm between the MLP and the
    residual stream, and gains around 0 (Gemma's norms scale by 1 + weight)."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           vocab_size=len(VOCAB), pad_token_id=0, sliding_window=16,
                           max_position_embeddings=64)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_feedforward_layernorm.weight.uniform_(-0.5, 0.5)
        model.model.norm.weight.uniform_(-0.5, 0.5)
    return model

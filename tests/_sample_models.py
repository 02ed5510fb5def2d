"""A tiny random Llama over a word-level vocabulary that holds a few rude words (which the
profanity and jigsaw judges flag) among plain ones, and its tokenizer, with or without a chat
template: the model of the `sgm-ext sample` tests. Its logits are nearly flat, so a sampled
continuation (near-uniform over the words) is rude about half the time."""
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
RUDE = ["idiot", "stupid", "shit", "moron", "bitch"]
PLAIN = ["the", "cat", "sat", "on", "a", "mat", "garden", "book", "tree", "river", "bread",
         "warm", "quiet", "morning", "walked", "home", "blue", "small", "house", "green"]
VOCAB = {w: i for i, w in enumerate(SPECIAL + RUDE + PLAIN)}
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }}"
                 " <|end|> {% else %}<|assistant|> {{ m['content'] }} <|end|> {% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def word_tokenizer(chat=False):
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="<s>", eos_token="</s>")
    fast.add_tokens(SPECIAL[4:], special_tokens=True)
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(VOCAB),
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # flat logits: every token about as likely
        model.lm_head.weight.mul_(0.05)
    # never a special token but the end of sequence (which ends a continuation, now and then
    # before its first word: an empty continuation, left out of the rows)
    model.generation_config.suppress_tokens = [i for i in range(len(SPECIAL)) if i != 3]
    return model

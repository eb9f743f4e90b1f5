"""Tiny models and tokenizers built in-process, for tests and benchmarks (no downloads).

    tok = tiny_tokenizer()                 # word-level, with <pad>, <eos>, <unk> and a chat template
    model = tiny_causal_lm(tok, seed=0)    # a 2-layer Llama-shaped causal LM, a few 10k parameters
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

WORDS = (
    "the a an this that film movie book story plot actor music scene ending end was is were are very so quite "
    "good great wonderful brilliant fine bad awful boring dull terrible and but or not it i we you they loved "
    "hated liked enjoyed watched read of to in on with for at by . , ! ? 0 1 2 3 4 5 6 7 8 9 + - * = what "
    "answer user assistant system hello hi yes no"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' <eos> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def tiny_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over WORDS; ids 0,1,2 are <pad>, <eos>, <unk>."""
    special = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>", "<system>"]
    vocab = {w: i for i, w in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4):
    """A random Llama-shaped causal LM sized for unit tests (dropout off, fp32)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def save_tiny(path, chat_template: bool = False, seed: int = 0, **kw):
    """Write a tiny tokenizer + model as a normal HF directory; returns the path."""
    tok = tiny_tokenizer(chat_template=chat_template)
    model = tiny_causal_lm(tok, seed=seed, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

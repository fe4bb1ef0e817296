"""A tiny chat model of the Llama 3 architecture, with random weights, saved under the real id
of the `/llm` route's default model (`write_tiny_models` in runtime/tiny.py calls it).

The model is a `LlamaForCausalLM` with grouped-query attention as Llama 3.1 has, a few
thousand parameters. The tokenizer is a real byte-level BPE, trained here on a few lines of text
(so no file is downloaded), with Llama 3's special tokens and a Llama-3-style chat template; it
is saved as `tokenizer.json` like the real one and loads through `AutoTokenizer`. Every byte is
in its alphabet, so the random model can emit half of a multi-byte character, which is what
the route's incremental detokenizing must survive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LLAMA_31_8B_INSTRUCT = "meta-llama/Meta-Llama-3.1-8B-Instruct"

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
EOT = "<|eot_id|>"  # the end of a turn: what an Instruct model stops on
SPECIAL_TOKENS = [BEGIN_OF_TEXT, END_OF_TEXT, "<|start_header_id|>", "<|end_header_id|>", EOT]

# Llama 3's chat template, without its tool-calling and date preamble (which the real 3.1
# template adds to a system turn): one header per turn, the content, <|eot_id|>.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

CONTEXT = 1024
"""Positions of the tiny model (the real one has 131072): small, so a test can pass it."""

# What the tokenizer learns its merges from: English words, and some characters of two to four
# bytes in UTF-8, so that a few merges join the bytes of one character.
_TEXT = [
    "You are a helpful assistant. Answer the question in one short sentence.",
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
    "A lighthouse stands at the end of the pier; its light turns once every ten seconds.",
    "Write a haiku about the sea. The sea is calm today, and the boats are out early.",
    "What is the capital of France? Paris is the capital of France.",
    "café, naïve, déjà vu, straße, smörgåsbord, señor, ½ and ¼ — “quotes” ✓ ★ ♥ 日本語 🙂",
]


def _tokenizer() -> Any:
    """The byte-level BPE tokenizer, trained in memory, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        show_progress=False,
    )
    bpe.train_from_iterator(_TEXT * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BEGIN_OF_TEXT,
        eos_token=EOT,  # as Llama-3.1-8B-Instruct's tokenizer_config.json has it
        model_max_length=CONTEXT,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama3(folder: Path, seed: int = 0) -> Path:
    """A Meta-Llama-3.1-8B-Instruct-shaped folder: config.json, generation_config.json, the
    weights, tokenizer.json and tokenizer_config.json with the chat template."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    bos = tokenizer.convert_tokens_to_ids(BEGIN_OF_TEXT)
    # The Instruct model ends on either: <|end_of_text|> or <|eot_id|>.
    eos = [tokenizer.convert_tokens_to_ids(END_OF_TEXT), tokenizer.convert_tokens_to_ids(EOT)]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as Llama 3
        max_position_embeddings=CONTEXT,
        rope_theta=500000.0,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, do_sample=True, temperature=0.6, top_p=0.9
    )
    folder.mkdir(parents=True, exist_ok=True)
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a bar per tiny file is noise
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    return folder

"""Tiny audio models of the real architectures, with random weights, for the audio routes:
Whisper (speech to text) under `openai/whisper-large-v3` and VITS / MMS-TTS (text to speech)
under `facebook/mms-tts-eng`.

Each folder is what `save_pretrained` writes for the real model, model and processor alike,
and loads back offline with the classes the routes use. What is kept real, because the routes
depend on it: Whisper's 128 mel bins (large-v3), 30 s windows (1500 encoder positions), its
special tokens and the 1501 timestamp tokens `<|0.00|>`..`<|30.00|>` after them (the
tokenizer and `generate` find timestamps by that layout), and VITS' 256x upsampling (one
spectrogram frame per 256 samples at 16 kHz). What is tiny: widths, depths, the BPE vocabulary
(bytes and three merges), the number of languages, and Whisper's `max_length` (16 tokens a
window instead of 448, so that tests of a 10-minute input stay quick).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

WHISPER = "openai/whisper-large-v3"
MMS_TTS = "facebook/mms-tts-eng"

WHISPER_LANGUAGES = ("en", "zh", "de", "es", "fr")
WHISPER_MAX_LENGTH = 16
_WHISPER_MERGES = ["Ġ t", "h e", "Ġt he"]


def _save(model: Any, folder: Path) -> None:
    """save_pretrained without transformers' per-file progress bar."""
    from transformers.utils import logging as transformers_logging

    folder.mkdir(parents=True, exist_ok=True)
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _whisper_tokenizer():  # type: ignore[no-untyped-def]
    """A WhisperTokenizer laid out as the real one: the byte-level BPE vocabulary, then
    <|endoftext|>, <|startoftranscript|>, the language tokens, the task and control tokens
    ending with <|notimestamps|>, then the timestamp tokens (not special: `decode` drops them
    by id, `timestamp_begin` is the last special id + 1)."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab: dict[str, int] = {}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
    for merge in _WHISPER_MERGES:
        vocab[merge.replace(" ", "")] = len(vocab)
    merges = [tuple(merge.split()) for merge in _WHISPER_MERGES]
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)  # adds <|endoftext|>
    specials = [
        "<|startoftranscript|>",
        *(f"<|{language}|>" for language in WHISPER_LANGUAGES),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tokenizer.add_tokens(
        [AddedToken(t, lstrip=False, rstrip=False, normalized=False) for t in timestamps]
    )
    return tokenizer


def build_tiny_whisper(folder: Path, seed: int = 0, multilingual: bool = True) -> Path:
    """A whisper-large-v3-shaped folder: WhisperForConditionalGeneration with its generation
    config (languages, tasks, timestamp and alignment settings), WhisperFeatureExtractor with
    128 mel bins and the tokenizer, saved as WhisperProcessor. `multilingual=False` gives an
    English-only model's generation config (as `openai/whisper-*.en`: no language, no task)."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = _whisper_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    eot, start = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=128,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=1500,  # 30 s of 10 ms mel frames, halved by the conv stride
        max_target_positions=448,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=start,
        # Generation settings live in the generation config (transformers 5 warns otherwise).
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=start,
        max_length=WHISPER_MAX_LENGTH,
        is_multilingual=multilingual,
        **(
            {
                "lang_to_id": {f"<|{lang}|>": ids(f"<|{lang}|>") for lang in WHISPER_LANGUAGES},
                "task_to_id": {
                    "transcribe": ids("<|transcribe|>"),
                    "translate": ids("<|translate|>"),
                },
            }
            if multilingual
            else {}
        ),
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50,
        begin_suppress_tokens=[ids("Ġ"), eot],
        suppress_tokens=[],
        # Decoder cross-attention heads used for word timestamps, as (layer, head).
        alignment_heads=[[0, 0], [0, 1]],
        return_timestamps=False,
    )
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer
    )
    _save(model, folder)
    processor.save_pretrained(folder)
    return folder


# mms-tts-eng's characters: lower-case letters, digits, space and the few marks it keeps;
# id 0 is the blank that `add_blank` puts between characters.
_VITS_CHARS = ["_", " ", "'", "-", *"abcdefghijklmnopqrstuvwxyz", *"0123456789"]


def build_tiny_vits(folder: Path, seed: int = 0) -> Path:
    """An mms-tts-eng-shaped folder: VitsModel (text encoder, stochastic duration predictor,
    flow, HiFi-GAN decoder upsampling 8x8x2x2 = 256) at 16 kHz, and VitsTokenizer on a
    character vocabulary (normalized, no phonemizer, blanks between characters)."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    torch.manual_seed(seed)
    vocab = {char: i for i, char in enumerate([*_VITS_CHARS, "<unk>"])}
    with tempfile.TemporaryDirectory(prefix="tiny-vits-") as scratch:
        vocab_file = Path(scratch) / "vocab.json"
        vocab_file.write_text(json.dumps(vocab))
        tokenizer = VitsTokenizer(
            vocab_file=str(vocab_file),
            pad_token="_",
            unk_token="<unk>",
            language="eng",
            add_blank=True,
            normalize=True,
            phonemize=False,
            is_uroman=False,
        )
    config = VitsConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        flow_size=16,
        spectrogram_bins=33,
        upsample_initial_channel=32,
        upsample_rates=[8, 8, 2, 2],
        upsample_kernel_sizes=[16, 16, 4, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        duration_predictor_filter_channels=16,
        duration_predictor_num_flows=1,
        depth_separable_num_layers=1,
        prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1,
        posterior_encoder_num_wavenet_layers=1,
        sampling_rate=16_000,
        pad_token_id=0,
    )
    model = VitsModel(config)
    _save(model, folder)
    tokenizer.save_pretrained(folder)
    return folder

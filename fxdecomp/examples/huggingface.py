"""Tiny transformers models (random weights, seeded): GPT-2, Llama, BERT, ViT, a Whisper encoder.

Each entry builds a model in eval mode and example inputs at a (batch, sequence) size;
``free`` names what the model leaves free (ViT and the Whisper encoder fix their
sequence length: ViT to its image size, Whisper to 2 x max_source_positions frames).
transformers is imported when a model is built, not when this module is.

Example::

    spec = TINY["gpt2"]
    model = spec.build()
    ids = spec.inputs(2, 8)          # (input_ids,)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TinyModel:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], tuple[torch.Tensor, ...]]  # (batch, sequence) -> example inputs
    sequence_free: bool  # False: the model fixes the sequence length (the second size is ignored)
    causal_lm: bool = False


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def _ids(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 * batch + seq)
    return (torch.randint(2, 100, (batch, seq), generator=g),)


def gpt2() -> nn.Module:
    _quiet()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, initializer_range=0.3,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return GPT2LMHeadModel(config).eval()


def llama() -> nn.Module:
    _quiet()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def bert() -> nn.Module:
    _quiet()
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def vit() -> nn.Module:
    _quiet()
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )
    return ViTModel(config).eval()


def _pixels(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 3, 16, 16, generator=g),)


def whisper_encoder() -> nn.Module:
    _quiet()
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=100, num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=2, decoder_layers=1,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=16, pad_token_id=1, bos_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return WhisperEncoder(config).eval()


def _features(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, 16, 32, generator=g),)  # 2 x max_source_positions frames, fixed by Whisper


TINY = {
    "gpt2": TinyModel("gpt2", gpt2, _ids, True, causal_lm=True),
    "llama": TinyModel("llama", llama, _ids, True, causal_lm=True),
    "bert": TinyModel("bert", bert, _ids, True),
    "vit": TinyModel("vit", vit, _pixels, False),
    "whisper_encoder": TinyModel("whisper_encoder", whisper_encoder, _features, False),
}

"""A tiny LLaVA-style model (CLIP or SigLIP tower + projector + 2-layer Llama) and a character tokenizer with the
``<image>`` token, built from a config in a second: the model every multimodal test runs on."""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

from llm_limits.evals.vlm import IMAGE_TOKEN
from llm_limits.trainers.build.tokenizers import build_char_tokenizer


def tiny_tokenizer() -> Any:
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def tiny_vlm(vision: str = "clip", *, hidden: int = 32, image_size: int = 16, patch_size: int = 8, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): ``(image_size / patch_size) ** 2`` image tokens per image (4 by default)."""
    tok = tiny_tokenizer()
    cls = CLIPVisionConfig if vision == "clip" else SiglipVisionConfig
    vc = cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
             image_size=image_size, patch_size=patch_size, num_channels=3)
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(),
                         image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default" if vision == "clip" else "full",
                         vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, tok

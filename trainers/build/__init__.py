"""Builders: models, tokenizers, data, vision-language models, injected domain pieces."""

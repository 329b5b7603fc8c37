"""Text: tokenizers (UTF-8 bytes or a tokenizer.json) and DeepSeek-V4's chat format."""

from model1_jax.text.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]

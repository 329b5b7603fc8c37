"""Text: tokenizers (UTF-8 bytes or a tokenizer.json) and the DeepSeek-V4 chat format (messages ⇄ prompt text ⇄
token ids)."""

from model1_jax.text.chat import ChatEncoder, effort_prefix, encode_messages, parse_completion
from model1_jax.text.chat_tools import ChatFormatError
from model1_jax.text.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "ChatEncoder", "ChatFormatError", "HFTokenizer", "effort_prefix", "encode_messages",
           "load_tokenizer", "parse_completion"]

"""Text: the DeepSeek-V4 chat format (messages ⇄ prompt text ⇄ token ids)."""

from model1_jax.text.chat import ChatEncoder, effort_prefix, encode_messages, parse_completion
from model1_jax.text.chat_tools import ChatFormatError

__all__ = ["ChatEncoder", "ChatFormatError", "effort_prefix", "encode_messages", "parse_completion"]

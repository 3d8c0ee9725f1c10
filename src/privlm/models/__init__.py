"""Models: a small byte-level transformer trained from scratch."""

from privlm.models.tokenizer import ByteTokenizer
from privlm.models.transformer import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "ByteTokenizer"]

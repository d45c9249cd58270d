"""The built-in example set, a locally built tiny Qwen2 and tokenizer, and ``dcr-fast demo``."""

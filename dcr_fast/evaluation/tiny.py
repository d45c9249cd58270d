"""Kept for ``dcr_fast.ntk``, which imports the tiny builders from here: use ``dcr_fast.tiny``.

Remove once ``dcr_fast.ntk`` imports ``dcr_fast.tiny`` directly.
"""

from dcr_fast.tiny import tiny_model, tiny_tokenizer

__all__ = ["tiny_model", "tiny_tokenizer"]

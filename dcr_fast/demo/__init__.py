"""The built-in example set and ``dcr-fast demo`` (its tiny model and tokenizer come from ``dcr_fast.tiny``)."""

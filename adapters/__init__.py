"""Adapters: PEFT loading and validation, registry, tiered paging."""

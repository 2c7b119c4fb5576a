"""Shared test set-up: CPU only, Triton under its interpreter, quiet progress bars."""

from __future__ import annotations

import os

# Set before anything imports triton: @triton.jit reads it when a kernel is decorated.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

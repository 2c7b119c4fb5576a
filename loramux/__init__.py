"""loramux: a multi-tenant LoRA inference server (see shared/DESIGN.md for the map)."""

__version__ = "0.1.0"

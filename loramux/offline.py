"""No code and no requests from a model hub at run time: the switches, set before the imports.

transformers, bitsandbytes and the `kernels` package (a transformers dependency) can all reach
the Hugging Face Hub on their own, and `kernels` downloads compiled code and runs it:

- importing bitsandbytes on a CPU with AVX512-BF16 calls `kernels.get_kernel(
  "kernels-community/quantization-bitsandbytes")` (a publisher check and a download), and
  falls back to bitsandbytes' own CPU kernel when that fails; it has no switch of its own;
- `from_pretrained` kernelizes the model by default (`use_kernels`): loaded onto CUDA, its
  mapping swaps the forward of RMSNorm, SiLU and the rotary embedding for Hub kernels;
- huggingface_hub resolves names, sends telemetry and retries a missing connection.

`forbid_hub_code()` sets the documented switches of all three with `os.environ.setdefault`, so
an operator's explicit value wins. Most are read when their package is first imported: call it
before anything imports huggingface_hub, transformers, kernels or bitsandbytes (loramux's
`__init__` does).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# variable -> (value, the package whose first import reads it, so setting it after that import
# is too late; None: read on every use)
HUB_SWITCHES: dict[str, tuple[str, str | None]] = {
    # huggingface_hub (so transformers, peft and kernels too): no HTTP at all, local files only.
    # Not TRANSFORMERS_OFFLINE: huggingface_hub ORs it in, so defaulting it would defeat an
    # operator's HF_HUB_OFFLINE=0.
    "HF_HUB_OFFLINE": ("1", "huggingface_hub"),
    # No telemetry even where an operator turns offline mode off.
    "HF_HUB_DISABLE_TELEMETRY": ("1", "huggingface_hub"),
    # transformers: from_pretrained does not kernelize with Hub kernels (its default is to).
    "USE_HUB_KERNELS": ("NO", None),
    # kernels: kernelize() keeps every layer's own forward, whoever calls it.
    "DISABLE_KERNEL_MAPPING": ("1", "kernels"),
    # kernels looks for Hub kernels only here (bitsandbytes' import asks it for one); the null
    # device can hold none, so a kernel an earlier online run left in HF_HOME is never loaded
    # either, and bitsandbytes uses its built-in kernel. LOCAL_KERNELS still loads vetted ones.
    "KERNELS_CACHE": (os.devnull, "bitsandbytes"),
}

# (logger, message start) of warnings that only say a refused Hub kernel was not loaded
_REFUSAL_NOISE = (
    ("bitsandbytes.backends.cpu.ops",
     "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check"),
)


class _DropPrefix(logging.Filter):
    """Drops a logger's records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def forbid_hub_code() -> dict[str, str]:
    """Turn off hub access and hub kernels unless the environment already decides; idempotent.

    Returns the variables it set (those the environment did not have).
    """
    set_here = {name: value for name, (value, _) in HUB_SWITCHES.items()
                if name not in os.environ}
    for name, value in set_here.items():
        os.environ.setdefault(name, value)
    # Variables set here that a package already imported has read (and will not read again).
    late = {name: module for name, (_, module) in HUB_SWITCHES.items()
            if name in set_here and module is not None and module in sys.modules}
    if late:
        # Not a warning: a script that imports transformers first chose its own hub settings,
        # and `loramux serve` always imports loramux first (the image and chart set them too).
        log.info("%s imported before loramux: %s may not take effect",
                    ", ".join(sorted(set(late.values()))), ", ".join(late))
    if os.environ.get("KERNELS_CACHE") == os.devnull:
        # bitsandbytes asks for its Hub kernel on import whatever the switches say; the refusal
        # is by design here, and its warning (advice to install `kernels`) would mislead.
        for name, prefix in _REFUSAL_NOISE:
            logger = logging.getLogger(name)
            if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
                logger.addFilter(_DropPrefix(prefix))
    return set_here

"""Engine: scheduler, paged KV cache, model runner, sampler.

Map: engine.py (LLMEngine: add_request / abort / step) and async_engine.py (the step loop in
a thread, streams for asyncio); scheduler.py (continuous batching, preemption, adapter
waits) over kv_cache.py (blocks and cache tensors) and request.py (sequence state, outputs);
model.py (the Llama-family forward) with attention.py (paged attention) and lora.py (segment
metadata and LoRA application through loramux.kernels); sampler.py, stop.py, detokenizer.py
(turning logits into tokens and text).
"""

from loramux.engine.async_engine import AsyncEngine
from loramux.engine.config import EngineConfig
from loramux.engine.engine import EngineStats, LLMEngine, merge_outputs
from loramux.engine.model import UnsupportedModel
from loramux.engine.request import RequestOutput
from loramux.engine.sampler import TopLogprobs
from loramux.engine.sampling_params import SamplingParams

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "TopLogprobs",
    "UnsupportedModel",
    "merge_outputs",
]

"""Engine: scheduler, paged KV cache, model runner, sampler."""

"""HTTP layer: OpenAI API, admin API, auth, metrics and the `loramux` CLI.

Map: cli.py (`loramux serve`: flags, uvicorn, SIGTERM drain) builds config.py's ServerConfig,
a local_engine.py LocalEngineClient (the engine and adapter registry behind the small
engine_client.py interface) and app.py's FastAPI app (completions, chat, models, probes,
metrics). Around it: openai_schemas.py (request/response models), errors.py (OpenAI error
bodies), tenants.py (API keys and adapter access), limits.py (rate, concurrency and queue
bounds), metrics.py (Prometheus, vLLM router gauges), admin.py (adapter admin API) and
logging.py (request ids, access log).
"""

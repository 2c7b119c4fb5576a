"""The FastAPI app: OpenAI completions and chat, models, health, readiness, metrics, admin.

One request, in order (docs/design.md, "Data flow"): authenticate the key to a tenant;
parse the body (pydantic; a bad body is a 400); the cheap refusals: a tenant over its
limits (429, `Limiter.check`, charging nothing) and prompt text longer than the context
could hold (400); resolve `model` to the base or an adapter the tenant may use (anything
else is the same 404); tokenize and check lengths and sampling parameters (400); admit it
past the tenant's limits with the exact token count (429) and the global queue bound (503);
then stream it from the engine. Admission is given back, and the engine request aborted if
it is still running, on every way out: normal end, error, client disconnect, or the end of a
drain's grace (a `shutting_down` error; in a stream, an error event before [DONE]).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from loramux.adapters.types import AdapterError, AdapterNotFound, refused_rule
from loramux.engine.sampling_params import SamplingParams
from loramux.server.admin import (
    bearer_is,
    build_admin_router,
    clean_upload_leftovers,
    unrouted_admin,
)
from loramux.server.config import ServerConfig
from loramux.server.engine_client import (
    EngineClient,
    GenerationChunk,
    GenerationFailed,
)
from loramux.server.errors import (
    APIError,
    bad_request,
    install_error_handlers,
    model_not_found,
    shutting_down,
    unauthorized,
)
from loramux.server.limits import Admission, Limiter
from loramux.server.logging import RequestIdMiddleware
from loramux.server.metrics import ServerMetrics
from loramux.server.openapi import install_openapi
from loramux.server.openai_schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
    parse_body,
    read_body,
)
from loramux.server.tenants import Tenant, TenantTable, load_tenants

log = logging.getLogger("loramux.server")

_DISCONNECT_POLL_S = 0.1
_DRAIN_POLL_S = 0.1


@dataclass
class AppState:
    """What every handler reads; one per app."""

    config: ServerConfig
    engine: EngineClient
    tenants: TenantTable
    limiter: Limiter
    metrics: ServerMetrics
    draining: bool = False
    start_error: BaseException | None = None
    on_fatal: Callable[[BaseException], None] | None = None
    # Awaited before /ready answers 200 (the CLI prints its banner there first).
    before_ready: Callable[[], Awaitable[None]] | None = None
    started_at: int = field(default_factory=lambda: int(time.time()))
    # Set once a drain's grace is over: running requests then end with `shutting_down`.
    cut: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def base_name(self) -> str:
        return self.config.served_model_name or self.engine.model.name


def get_state(request: Request) -> AppState:
    return request.app.state.loramux  # type: ignore[no-any-return]


def adapter_unavailable(name: str, exc: AdapterError) -> APIError:
    """The 400 for an adapter that exists but cannot be served, the same whether the refusal
    came when the name was resolved or when its weights were paged in: it names the rule that
    failed, never the refusal's detail (server paths, digests: the log has those), and has no
    Retry-After, since retrying changes nothing until an administrator acts."""
    rule = refused_rule(exc)
    cause = f" ({rule})" if rule else ""
    return APIError(400, f"The adapter `{name}` cannot be served{cause}; the server's log has "
                    "the details.", code="adapter_unavailable", param="model")


async def authenticate(request: Request) -> Tenant:
    """The tenant of the request's `Authorization: Bearer` key (401 without a valid one)."""
    state = get_state(request)
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    tenant = state.tenants.authenticate(key.strip() if scheme.lower() == "bearer" else None)
    if tenant is None:
        raise unauthorized()
    request.state.tenant = tenant.name
    return tenant


TenantDep = Annotated[Tenant, Depends(authenticate)]


# ============================================================================ one generation


@dataclass
class _Seq:
    """One sequence of a request: a (prompt, choice) pair."""

    index: int  # choice index in the response
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str


@dataclass
class _Run:
    """Book-keeping of one admitted request, finished exactly once."""

    state: AppState
    admission: Admission
    seqs: list[_Seq]
    arrival: float
    prompt_tokens: int
    first_token: float | None = None
    completion_tokens: dict[int, int] = field(default_factory=dict)
    finished: bool = False

    @property
    def output_tokens(self) -> int:
        return sum(self.completion_tokens.values())

    def note(self, seq: _Seq, chunk: GenerationChunk) -> None:
        if chunk.token_ids and self.first_token is None:
            self.first_token = time.monotonic()
        self.completion_tokens[seq.index] = chunk.completion_tokens
        if chunk.finish_reason is not None:
            self.state.metrics.finished.labels(chunk.finish_reason).inc()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.admission.release(self.prompt_tokens + self.output_tokens)
        self.state.metrics.in_flight.dec()
        self.state.metrics.observe_request(
            arrival=self.arrival, first_token=self.first_token, end=time.monotonic(),
            prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens,
        )


async def _close(gen: AsyncIterator[Any]) -> None:
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        await aclose()


def _cut_off() -> APIError:
    return shutting_down("The server is shutting down; this request ran past the shutdown "
                         "grace period and was stopped.")


async def _stream_seqs(engine: EngineClient, seqs: list[_Seq], adapter: Any | None,
                       cut: asyncio.Event | None = None
                       ) -> AsyncGenerator[tuple[_Seq, GenerationChunk], None]:
    """Interleave the chunks of every sequence as they come. Closing it aborts them all.

    Once `cut` is set (a drain's grace is over) it raises the `shutting_down` 503 instead of
    waiting for the next chunk, which a stream sends as its error event.
    """
    queue: asyncio.Queue[tuple[_Seq | None, GenerationChunk | None, BaseException | None]] = \
        asyncio.Queue()

    async def pump(seq: _Seq) -> None:
        gen = engine.generate(seq.request_id, seq.prompt_ids, seq.params, adapter)
        try:
            async for chunk in gen:
                queue.put_nowait((seq, chunk, None))
            queue.put_nowait((seq, None, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer below
            queue.put_nowait((seq, None, exc))
        finally:
            await _close(gen)

    async def watch(event: asyncio.Event) -> None:
        await event.wait()
        queue.put_nowait((None, None, _cut_off()))

    tasks = [asyncio.create_task(pump(seq)) for seq in seqs]
    if cut is not None:
        tasks.append(asyncio.create_task(watch(cut)))
    try:
        remaining = len(seqs)
        while remaining:
            done_seq, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                remaining -= 1
                continue
            assert done_seq is not None
            yield done_seq, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only that is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            request.state.disconnected = True
            return


class _Stream(StreamingResponse):
    """A streaming response that runs `on_close` however it ends, even if never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def _message_chars(content: Any) -> int:
    """Characters of text in one message's content (a string or content parts)."""
    if isinstance(content, str):
        return len(content)
    return sum(len(getattr(part, "text", None) or "") for part in content or ())


# ============================================================================ the app


def create_app(config: ServerConfig, engine: EngineClient, *,
               tenants: TenantTable | None = None) -> FastAPI:
    """The loramux HTTP app around `engine` (started in the lifespan; /ready waits for it)."""
    table = tenants if tenants is not None else load_tenants(config.api_keys)
    if table.open:
        log.warning("NO API-KEYS FILE: the server is OPEN; anyone who can reach it may use "
                    "the base model and every adapter. Pass --api-keys FILE to require keys.")
    else:
        log.info("API keys: %d tenants loaded from %s", len(table.tenants), config.api_keys)
    if config.admin_token is None:
        log.info("admin API off (no --admin-token)")
    if config.metrics_token is None and not table.open:
        log.warning("/metrics is open (no --metrics-token): it names every tenant's adapters, "
                    "so keep tenants off this port or set a metrics token.")

    metrics = ServerMetrics(engine.stats, config.served_model_name or engine.model.name)
    state = AppState(
        config=config, engine=engine, tenants=table, metrics=metrics,
        limiter=Limiter(capacity=config.engine.max_num_seqs + config.max_queue),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def start() -> None:
            try:
                await engine.start()
                log.info("ready: serving %s", state.base_name)
            except Exception as exc:
                state.start_error = exc
                log.error("engine start failed: %s", exc, exc_info=exc)
                if state.on_fatal is not None:
                    state.on_fatal(exc)

        # Before the first request: a live upload of this process must never look like a
        # dead one's leftover.
        await asyncio.to_thread(clean_upload_leftovers, engine.adapter_root)

        async def cut_after_grace() -> None:
            # A drain (SIGTERM, server/cli.py) only sets `draining`; running requests then
            # have the grace to finish, and end with a `shutting_down` error after it, before
            # uvicorn cancels what is left (a stream cut there would end with no error event).
            while not state.draining:
                await asyncio.sleep(_DRAIN_POLL_S)
            await asyncio.sleep(config.shutdown_grace_seconds)
            state.cut.set()

        starter = asyncio.create_task(start())
        cutter = asyncio.create_task(cut_after_grace())
        try:
            yield
        finally:
            state.draining = True
            for task in (starter, cutter):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await engine.shutdown()

    app = FastAPI(title="loramux", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.loramux = state
    install_error_handlers(app, unrouted=unrouted_admin)
    install_openapi(app)
    app.add_middleware(RequestIdMiddleware, on_response=metrics.count_response)
    app.include_router(build_admin_router())

    # ------------------------------------------------------------------ probes and metrics

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", response_model=None)
    async def ready() -> dict[str, str] | JSONResponse:
        if state.draining:
            return APIError(503, "shutting down", code="shutting_down", retry_after=5).response()
        if state.start_error is not None:
            return APIError(503, "the model failed to load", code="not_ready").response()
        if not engine.is_ready():
            return APIError(503, "the model is loading", code="not_ready",
                            retry_after=5).response()
        if state.before_ready is not None:
            await state.before_ready()
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        # Metrics are the operators' and routers' (docs/design.md): with a metrics token,
        # a tenant's API key is no way in, as adapter names of all tenants are in the labels.
        token = config.metrics_token
        if token is not None and not (bearer_is(request, token)
                                      or bearer_is(request, config.admin_token)):
            raise APIError(401, "Invalid or missing metrics token.",
                           code="invalid_metrics_token")
        body = await asyncio.to_thread(metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ models

    def visible_models(tenant: Tenant) -> list[ModelCard]:
        base = state.base_name
        cards: list[ModelCard] = []
        info = engine.model
        if tenant.may_use(base, base):
            cards.append(ModelCard(id=base, created=info.created, root=base,
                                   max_model_len=info.max_model_len))
        names = sorted(set(engine.adapter_names()) | set(engine.lazy_adapter_names()))
        for name in names:
            if name != base and tenant.may_use(name, base):
                cards.append(ModelCard(id=name, created=state.started_at, root=name,
                                       parent=base, max_model_len=info.max_model_len))
        return cards

    @app.get("/v1/models")
    async def list_models(tenant: TenantDep) -> dict[str, Any]:
        return ModelList(data=visible_models(tenant)).model_dump(mode="json")

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, tenant: TenantDep
                        ) -> dict[str, Any]:
        for card in visible_models(tenant):
            if card.id == model_id:
                return card.model_dump(mode="json")
        raise model_not_found(model_id)

    # ------------------------------------------------------------------ shared request path

    def check_serving() -> None:
        if state.draining:
            raise APIError(503, "The server is shutting down.", code="shutting_down",
                           retry_after=1.0)
        if not engine.is_ready():
            raise APIError(503, "The model is still loading.", code="not_ready",
                           retry_after=5.0)

    async def resolve_model(request: Request, tenant: Tenant, model: str) -> Any | None:
        """None for the base; an adapter handle otherwise. One 404 for unknown and forbidden."""
        base = state.base_name
        request.state.adapter = model
        if not tenant.may_use(model, base):
            raise model_not_found(model)
        if model == base:
            request.state.adapter = "-"
            return None
        try:
            return await engine.resolve_adapter(model)
        except AdapterNotFound:
            raise model_not_found(model) from None
        except AdapterError as exc:
            log.warning("adapter %s cannot be served: %s", model, exc)
            raise adapter_unavailable(model, exc) from None

    def check_prompt_chars(chars: int, param: str) -> None:
        """400 for prompt text longer than the context could hold, before it is tokenized."""
        limit = engine.model.max_model_len
        if limit is None:
            return
        bound = config.prompt_char_limit(limit)
        if chars > bound:
            raise bad_request(
                f"The prompt has {chars} characters; this server tokenizes at most {bound} "
                f"(this model's maximum context length is {limit} tokens).", param)

    def check_length(prompt_len: int, requested: int | None, param: str) -> int:
        limit = engine.model.max_model_len
        if limit is None:  # defensive: an EngineClient ready before it knows its length
            raise APIError(503, "The model is still loading.", code="not_ready",
                           retry_after=5.0)
        if prompt_len == 0:
            raise bad_request("The prompt is empty.", "prompt")
        if prompt_len >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens; the prompt has "
                f"{prompt_len} tokens.", "prompt")
        if requested is None:
            return limit - prompt_len
        if requested < 1:
            raise bad_request(f"{param} must be at least 1.", param)
        if requested > 10**18:  # Python refuses to print ints over 4,300 digits
            raise bad_request(f"This model's maximum context length is {limit} tokens; "
                              f"{param} must be at most that.", param)
        if prompt_len + requested > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                f"{requested} in the completion). Reduce the prompt or {param}.", param)
        return requested

    def make_seqs(request: Request, prompts: list[list[int]], n: int,
                  max_tokens: list[int], build: Callable[[int, int | None], SamplingParams],
                  seed: int | None) -> list[_Seq]:
        rid = getattr(request.state, "request_id", "req")
        unique = uuid.uuid4().hex[:12]
        seqs: list[_Seq] = []
        for p, ids in enumerate(prompts):
            for j in range(n):
                index = p * n + j
                # Distinct seeds per choice, else n seeded choices would be n copies.
                choice_seed = None if seed is None else seed + j
                try:
                    params = build(max_tokens[p], choice_seed)
                except ValueError as exc:
                    raise bad_request(str(exc)) from None
                # The engine's id is unique even when clients reuse an X-Request-Id.
                seqs.append(_Seq(index=index, prompt_index=p, prompt_ids=ids, params=params,
                                 request_id=f"{rid}-{unique}-{index}"))
        return seqs

    def admit(tenant: Tenant, seqs: list[_Seq]) -> _Run:
        prompt_tokens = sum(len(ids) for ids in {id(s.prompt_ids): s.prompt_ids
                                                   for s in seqs}.values())
        budget = prompt_tokens + sum(s.params.max_tokens for s in seqs)
        admission = state.limiter.admit(tenant, budget, sequences=len(seqs))
        metrics.in_flight.inc()
        return _Run(state=state, admission=admission, seqs=seqs, arrival=time.monotonic(),
                    prompt_tokens=prompt_tokens)

    async def collect(request: Request, run: _Run, adapter: Any | None
                      ) -> dict[int, list[GenerationChunk]]:
        """Run to the end; a client disconnect cancels (and so aborts) the generation."""
        chunks: dict[int, list[GenerationChunk]] = {s.index: [] for s in run.seqs}

        async def consume() -> None:
            stream = _stream_seqs(engine, run.seqs, adapter, state.cut)
            async with contextlib.aclosing(stream):
                async for seq, chunk in stream:
                    run.note(seq, chunk)
                    chunks[seq.index].append(chunk)

        work = asyncio.create_task(consume())
        watcher = asyncio.create_task(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                raise APIError(499, "client disconnected")
            work.result()
        finally:
            for task in (work, watcher):
                task.cancel()
            await asyncio.gather(work, watcher, return_exceptions=True)
            run.finish()
        return chunks

    def engine_failure(exc: Exception) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, GenerationFailed):
            if exc.code == "adapter_unavailable":  # the message names the rule, not the files
                return APIError(400, str(exc), code="adapter_unavailable", param="model")
            if exc.code == "non_finite_logits":  # retrying computes the same numbers
                return APIError(500, str(exc), code="non_finite_logits")
            return APIError(503, str(exc), retry_after=1.0)
        if isinstance(exc, AdapterNotFound):
            return model_not_found(str(exc).strip("'\""))
        if isinstance(exc, AdapterError | ValueError):
            return bad_request(str(exc))
        log.error("generation failed: %s", type(exc).__name__, exc_info=exc)
        return APIError(500, "Internal server error.")

    def stream_response(request: Request, run: _Run, adapter: Any | None,
                        render: Callable[[_Seq, GenerationChunk], list[dict[str, Any]]],
                        opening: list[dict[str, Any]], usage_chunk: Callable[[], dict[str, Any]]
                        | None) -> _Stream:
        async def events() -> AsyncIterator[str]:
            try:
                for payload in opening:
                    yield _sse(payload)
                last_check = time.monotonic()
                stream = _stream_seqs(engine, run.seqs, adapter, state.cut)
                async with contextlib.aclosing(stream):
                    async for seq, chunk in stream:
                        run.note(seq, chunk)
                        for payload in render(seq, chunk):
                            yield _sse(payload)
                        now = time.monotonic()
                        if now - last_check > _DISCONNECT_POLL_S:
                            last_check = now
                            if await request.is_disconnected():
                                request.state.disconnected = True
                                return  # closing the stream aborts the engine requests
                if usage_chunk is not None:
                    yield _sse(usage_chunk())
            except asyncio.CancelledError:
                request.state.disconnected = True
                raise
            except Exception as exc:  # noqa: BLE001 - sent as an error event, mapped
                err = engine_failure(exc)
                yield _sse(err.body())
            finally:
                run.finish()
            yield "data: [DONE]\n\n"

        return _Stream(events(), on_close=run.finish)

    def usage_of(run: _Run) -> Usage:
        return Usage(prompt_tokens=run.prompt_tokens, completion_tokens=run.output_tokens,
                     total_tokens=run.prompt_tokens + run.output_tokens)

    # ------------------------------------------------------------------ completions

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request, tenant: TenantDep) -> Any:
        body = parse_body(await read_body(request), CompletionRequest)
        problem = body.unsupported()
        if problem is not None:
            raise bad_request(problem[1], problem[0])
        check_serving()
        raw_prompts = body.prompts()
        # The cheap refusals first: resolving may read an adapter folder, and tokenizing
        # megabytes of text takes seconds. Every prompt is at least one token.
        state.limiter.check(tenant, sum(len(p) if isinstance(p, list) else 1
                                        for p in raw_prompts)
                            + len(raw_prompts) * body.n * (body.max_tokens or 1))
        check_prompt_chars(sum(len(p) for p in raw_prompts if isinstance(p, str)), "prompt")
        adapter = await resolve_model(request, tenant, body.model)
        if not raw_prompts:
            raise bad_request("prompt must not be empty", "prompt")
        prompts: list[list[int]] = []
        vocab = engine.model.vocab_size
        try:  # off the event loop: long prompts take a while to tokenize
            encoded = await asyncio.to_thread(
                lambda: [engine.encode(raw) if isinstance(raw, str) else list(raw)
                         for raw in raw_prompts])
        except ValueError as exc:  # no tokenizer, or text it cannot encode
            raise bad_request(str(exc), "prompt") from None
        for ids in encoded:
            if vocab is not None and any(not 0 <= t < vocab for t in ids):
                raise bad_request(f"prompt token ids must be in [0, {vocab}).", "prompt")
            prompts.append(ids)
        max_tokens = [check_length(len(ids), body.max_tokens, "max_tokens") for ids in prompts]
        if config.log_prompts:
            log.debug("%s prompt: %r", request.state.request_id, raw_prompts)
        seqs = make_seqs(request, prompts, body.n, max_tokens,
                         lambda mt, seed: body.sampling_params(mt, body.logprobs, seed),
                         body.seed)
        echo_text = {p: (raw if isinstance(raw, str) else engine.decode(raw))
                     for p, raw in enumerate(raw_prompts)} if body.echo else {}
        run = admit(tenant, seqs)
        rid = f"cmpl-{request.state.request_id}"
        created = int(time.time())
        offsets: dict[int, int] = {s.index: len(echo_text.get(s.prompt_index, ""))
                                   for s in seqs}

        def logprobs_of(seq: _Seq, chunk: GenerationChunk) -> CompletionLogprobs | None:
            if body.logprobs is None or chunk.logprobs is None:
                return None
            out = CompletionLogprobs()
            for lp in chunk.logprobs:
                token = lp.token
                out.tokens.append(token)
                out.token_logprobs.append(lp.logprob)
                out.top_logprobs.append({_tok: v for _, _tok, v in lp.top})
                out.text_offset.append(offsets[seq.index])
                offsets[seq.index] += len(token)
            return out

        if body.stream:
            started: set[int] = set()

            def render(seq: _Seq, chunk: GenerationChunk) -> list[dict[str, Any]]:
                text = chunk.text
                if seq.index not in started:
                    started.add(seq.index)
                    text = echo_text.get(seq.prompt_index, "") + text
                if not text and not chunk.finish_reason and not chunk.logprobs:
                    return []
                choice = CompletionChoice(index=seq.index, text=text,
                                          logprobs=logprobs_of(seq, chunk),
                                          finish_reason=chunk.finish_reason)
                return [CompletionResponse(id=rid, created=created, model=body.model,
                                           choices=[choice]).model_dump(mode="json")]

            def usage() -> dict[str, Any]:
                return CompletionResponse(id=rid, created=created, model=body.model,
                                          choices=[], usage=usage_of(run)).model_dump(mode="json")

            return stream_response(request, run, adapter, render, [],
                                   usage if body.include_usage else None)

        try:
            chunks = await collect(request, run, adapter)
        except Exception as exc:  # noqa: BLE001 - engine_failure maps every kind
            raise engine_failure(exc) from None
        choices = []
        for seq in seqs:
            parts = chunks[seq.index]
            logprobs = None
            if body.logprobs is not None:
                logprobs = CompletionLogprobs()
                for chunk in parts:
                    more = logprobs_of(seq, chunk)
                    if more is not None:
                        logprobs.tokens += more.tokens
                        logprobs.token_logprobs += more.token_logprobs
                        logprobs.top_logprobs += more.top_logprobs
                        logprobs.text_offset += more.text_offset
            choices.append(CompletionChoice(
                index=seq.index,
                text=echo_text.get(seq.prompt_index, "") + "".join(c.text for c in parts),
                logprobs=logprobs,
                finish_reason=parts[-1].finish_reason if parts else "abort",
            ))
        return CompletionResponse(id=rid, created=created, model=body.model, choices=choices,
                                  usage=usage_of(run)).model_dump(mode="json")

    # ------------------------------------------------------------------ chat

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request, tenant: TenantDep
                               ) -> Any:
        body = parse_body(await read_body(request), ChatCompletionRequest)
        problem = body.unsupported()
        if problem is not None:
            raise bad_request(problem[1], problem[0])
        check_serving()
        # The cheap refusals first (see completions).
        state.limiter.check(tenant, 1 + body.n * (body.requested_max_tokens() or 1))
        check_prompt_chars(sum(_message_chars(m.content) for m in body.messages), "messages")
        adapter = await resolve_model(request, tenant, body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt = await asyncio.to_thread(
                engine.chat_prompt, messages, add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                template_kwargs=dict(body.chat_template_kwargs or {}),
            )
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from None
        param = "max_completion_tokens" if body.max_completion_tokens is not None \
            else "max_tokens"
        max_tokens = check_length(len(prompt), body.requested_max_tokens(), param)
        if config.log_prompts:
            log.debug("%s messages: %r", request.state.request_id, messages)
        count = body.logprobs_count()
        seqs = make_seqs(request, [prompt], body.n, [max_tokens],
                         lambda mt, seed: body.sampling_params(mt, count, seed), body.seed)
        run = admit(tenant, seqs)
        rid = f"chatcmpl-{request.state.request_id}"
        created = int(time.time())

        def logprobs_of(chunk: GenerationChunk) -> ChatLogprobs | None:
            if count is None or chunk.logprobs is None:
                return None
            content = []
            for lp in chunk.logprobs:
                token = lp.token
                content.append(ChatTokenLogprob(
                    token=token, logprob=lp.logprob, bytes=list(token.encode("utf-8")),
                    top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode("utf-8")))
                                  for _, t, v in lp.top],
                ))
            return ChatLogprobs(content=content)

        if body.stream:
            def chunk_of(choices: list[ChatChunkChoice]) -> dict[str, Any]:
                payload = ChatCompletionChunk(id=rid, created=created, model=body.model,
                                              choices=choices).model_dump(mode="json")
                for choice in payload["choices"]:  # OpenAI's deltas omit unset fields
                    choice["delta"] = {k: v for k, v in choice["delta"].items()
                                       if v is not None}
                return payload

            opening = [chunk_of([ChatChunkChoice(index=s.index,
                                                 delta=ChatDelta(role="assistant", content=""))
                                 for s in seqs])]

            def render(seq: _Seq, chunk: GenerationChunk) -> list[dict[str, Any]]:
                if not chunk.text and not chunk.finish_reason and not chunk.logprobs:
                    return []
                return [chunk_of([ChatChunkChoice(
                    index=seq.index,
                    delta=ChatDelta(content=chunk.text) if chunk.text else ChatDelta(),
                    logprobs=logprobs_of(chunk), finish_reason=chunk.finish_reason,
                )])]

            def usage() -> dict[str, Any]:
                return ChatCompletionChunk(id=rid, created=created, model=body.model,
                                           choices=[], usage=usage_of(run)
                                           ).model_dump(mode="json")

            return stream_response(request, run, adapter, render, opening,
                                   usage if body.include_usage else None)

        try:
            chunks = await collect(request, run, adapter)
        except Exception as exc:  # noqa: BLE001 - engine_failure maps every kind
            raise engine_failure(exc) from None
        choices = []
        for seq in seqs:
            parts = chunks[seq.index]
            logprobs = None
            if count is not None:
                logprobs = ChatLogprobs(content=[])
                for chunk in parts:
                    more = logprobs_of(chunk)
                    if more is not None and more.content:
                        logprobs.content = (logprobs.content or []) + more.content
            choices.append(ChatChoice(
                index=seq.index,
                message=ChatResponseMessage(content="".join(c.text for c in parts)),
                logprobs=logprobs,
                finish_reason=parts[-1].finish_reason if parts else "abort",
            ))
        return ChatCompletionResponse(id=rid, created=created, model=body.model,
                                      choices=choices, usage=usage_of(run)
                                      ).model_dump(mode="json")

    return app


__all__ = ["AppState", "create_app"]

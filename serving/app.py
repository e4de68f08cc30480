"""The OpenAI-compatible HTTP server (FastAPI): `dlm serve MODEL_DIR`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /tokenizer_info,
POST /tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus). A route checks the
body (serving/handlers.py), compiles its constraint and sets up its jobs in worker threads (the
event loop never waits on a compile or a grammar search), hands the jobs to the scheduler
(serving/scheduler.py), which batches the denoising steps of all live requests, and streams or
returns the results.

Errors use the OpenAI body {"error": {"message", "type", "param", "code"}}: bad input is a 400
(never a 500), a full queue a 429 with Retry-After, a missing or wrong API key a 401; a request
that fails while decoding gets its own error, and the requests beside it are unaffected.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dlm.decoding.config import DecodeConfig
from dlm.decoding.state import DecodeResult
from dlm.errors import DLMError

from .handlers import Plan, Service
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from .scheduler import Job, QueueFull, Scheduler


@dataclass
class ServerSettings:
    model_dir: str
    served_model_name: Optional[str] = None
    tokenizer: Optional[str] = None
    device: Optional[str] = None
    api_key: Optional[str] = None
    max_batch: int = 32
    max_queue: int = 256
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    trust_remote_code: bool = False
    defaults: DecodeConfig = None  # server-side decoding defaults (flags)
    default_temperature: float = 1.0
    default_max_tokens: int = 16
    compile_limits: object = None  # dlm.constraints.CompileLimits (flags --constraint-*)
    compile_workers: int = 4  # threads that compile constraints and set up jobs


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def create_app(settings: ServerSettings, model=None, tokenizer=None) -> FastAPI:
    """Build the app. `model` / `tokenizer` may be passed in (tests, or a caller that loaded
    them already); else they are loaded from settings."""
    import weakref

    import torch

    from dlm.families import family_of
    from dlm.loading import load_tokenizer_for
    from dlm.model import load_model
    from dlm.tokenizer import check_tokenizer_for_model, load_tokenizer

    if model is None:
        dev = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(settings.model_dir).to(dev).eval()  # dlm's own classes: never remote code
    own = family_of(model.config).format is None
    if tokenizer is None and own:
        tokenizer = load_tokenizer(settings.tokenizer or settings.model_dir, trust_remote_code=settings.trust_remote_code)
    elif tokenizer is None:  # a published model's tokenizer, as it is
        tokenizer = load_tokenizer_for(settings.model_dir, model.config, tokenizer=settings.tokenizer)
    check_tokenizer_for_model(tokenizer, model.config, roles=own)
    svc = Service(settings, model, tokenizer)
    holder: dict = {}
    metrics = Metrics(lambda: holder.get("scheduler"))
    scheduler = Scheduler(svc.decoder, max_batch=settings.max_batch, max_queue=settings.max_queue, metrics=metrics)
    holder["scheduler"] = scheduler
    pool = ThreadPoolExecutor(max_workers=settings.compile_workers, thread_name_prefix="dlm-compile")
    if svc.compiler is not None:
        pool.submit(svc.compiler.warm)  # start the automaton builders off the request path

    app = FastAPI(title="dlm", version="0.1.0",
                  description="OpenAI-compatible server for masked diffusion language models")
    app.state.scheduler, app.state.settings, app.state.service = scheduler, settings, svc

    def _close():
        scheduler.close()
        pool.shutdown(wait=False, cancel_futures=True)

    weakref.finalize(app, _close)
    app.state.close = _close

    async def blocking(fn, *args):
        """Run fn in a worker thread: the event loop keeps answering (health, other requests)."""
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # -------------------------------------------------------------- middleware & errors
    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if settings.api_key and (path.startswith("/v1") or path in ("/tokenize", "/detokenize")):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or key.strip() != settings.api_key:
                metrics.requests.labels(path, "401").inc()
                return JSONResponse(error_body("missing or invalid API key (Authorization: Bearer KEY)",
                                               "authentication_error", None, "invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            metrics.requests.labels(path, "413").inc()
            return JSONResponse(error_body(f"request body larger than {settings.max_body_bytes} bytes",
                                           code="body_too_large"), status_code=413)
        try:
            response = await call_next(request)
        except Exception as exc:  # answered here: the connection stays usable (Starlette would drop it)
            response = JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                                    status_code=500)
        metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        return JSONResponse(error_body(f"{'.'.join(loc) + ': ' if loc else ''}{msg}", param=".".join(loc) or None),
                            status_code=400)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(DLMError)
    async def _dlm_error(request: Request, exc: DLMError):
        return _error_response(svc.error_of(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    # -------------------------------------------------------------- running jobs
    async def start(plan: Plan, stream: bool) -> list[Job]:
        """Compile the constraint, make and prepare the jobs (worker threads), then queue them."""
        t0 = time.perf_counter()
        compiled = await blocking(svc.compile, plan.constraint) if plan.constraint is not None else None
        if compiled is not None:
            metrics.compile_s.observe(time.perf_counter() - t0)
        jobs = svc.make_jobs(plan, compiled)
        await blocking(svc.prepare, jobs)
        for j in jobs:
            j.stream = stream
        try:
            scheduler.submit(jobs)
        except QueueFull:
            raise APIError(429, "the server is at capacity; retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        return jobs

    async def run_jobs(request: Request, jobs: list[Job]) -> list:
        """Wait for the jobs; a client that goes away cancels them (slots freed at the next step)."""
        results: list = [None] * len(jobs)
        pending = set(range(len(jobs)))
        events = jobs[0].events
        checked = time.perf_counter()
        try:
            while pending:
                try:
                    i, kind, value = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    kind = None
                if time.perf_counter() - checked > 0.25:  # progress events must not hide a disconnect
                    checked = time.perf_counter()
                    if await request.is_disconnected():
                        raise asyncio.CancelledError()
                if kind == "done":
                    results[i] = value
                    pending.discard(i)
                elif kind == "error":
                    raise svc.error_of(value)
        finally:
            for j in jobs:
                if not (j.request and j.request.finished):
                    scheduler.cancel(j)
        return results

    # -------------------------------------------------------------- endpoints
    @app.get("/health")
    def health():
        return {"status": "ok", "model": svc.name, "running": scheduler.running, "queued": scheduler.queue_depth}

    @app.get("/metrics")
    def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": svc.name, "object": "model", "created": svc.created,
                                            "owned_by": "dlm", "max_model_len": svc.cfg.max_position_embeddings,
                                            "objective": svc.cfg.objective}]}

    @app.get("/tokenizer_info")
    def tokenizer_info():
        tok = svc.tokenizer
        return {"tokenizer_class": type(tok).__name__, "vocab_size": len(tok),
                "model_max_length": svc.cfg.max_position_embeddings, "eos_token": tok.eos_token,
                "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                "mask_token": tok.convert_ids_to_tokens(svc.cfg.mask_token_id),
                "chat_template": getattr(tok, "chat_template", None)}

    @app.post("/tokenize")
    def tokenize(body: TokenizeRequest):
        svc.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        text = body.prompt if body.prompt is not None else svc.chat_prompt(body.messages)
        ids = svc.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": svc.cfg.max_position_embeddings}

    @app.post("/detokenize")
    def detokenize(body: DetokenizeRequest):
        svc.check_model(body.model)
        svc.check_ids([body.tokens])
        return {"prompt": svc.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        plan = svc.completion_plan(body)
        if plan.score_only:  # max_tokens 0 with echo: the prompt's logprobs, nothing decoded
            jobs = svc.make_jobs(plan, None)
            return await blocking(svc.completion_body, plan, jobs, [DecodeResult([], "length", {})] * len(jobs))
        if body.stream:
            jobs = await start(plan, stream=True)
            return sse(request, plan, jobs, lambda i, text, reason: {
                "id": plan.rid, "object": "text_completion", "created": plan.created, "model": svc.name,
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]},
                usage_chunk=lambda u: {"id": plan.rid, "object": "text_completion", "created": plan.created,
                                       "model": svc.name, "choices": [], "usage": u}
                if (body.stream_options or {}).get("include_usage") else None)
        jobs = await start(plan, stream=False)
        results = await run_jobs(request, jobs)
        return await blocking(svc.completion_body, plan, jobs, results)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        plan = svc.chat_plan(body)
        jobs = await start(plan, stream=body.stream)
        if body.stream:
            started: set[int] = set()

            def chunk(i, text, reason):
                delta = {} if text == "" and reason else {"content": text}
                if i not in started:
                    started.add(i)
                    delta = {"role": "assistant", **delta}
                return {"id": plan.rid, "object": "chat.completion.chunk", "created": plan.created, "model": svc.name,
                        "choices": [{"index": i, "delta": delta, "finish_reason": reason}]}
            return sse(request, plan, jobs, chunk,
                       usage_chunk=lambda u: {"id": plan.rid, "object": "chat.completion.chunk",
                                              "created": plan.created, "model": svc.name, "choices": [], "usage": u}
                       if (body.stream_options or {}).get("include_usage") else None)
        results = await run_jobs(request, jobs)
        return await blocking(svc.chat_body, plan, jobs, results)

    def sse(request: Request, plan: Plan, jobs: list[Job], make_chunk, usage_chunk) -> StreamingResponse:
        """Server-sent events: a chunk whenever a job's final prefix grows (at the latest when a
        block is finalised), then one with the finish reason, then [DONE]. A job that fails
        sends its own error event; the others go on."""
        stops = plan.stops
        hold = max((len(s) for s in stops), default=1) - 1  # text that may still become a stop string
        events = jobs[0].events
        eos = svc.cfg.eos_token_id

        async def stream():
            sent_text = [""] * len(jobs)
            done = [False] * len(jobs)
            used = 0
            try:
                while not all(done):
                    try:
                        i, kind, value = await asyncio.wait_for(events.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    if done[i]:
                        continue
                    if kind == "error":
                        e = svc.error_of(value)
                        yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
                        done[i] = True
                    elif kind == "tokens":
                        text, reason = svc.finish_text(_cut_eos(value, eos), "", stops)
                        if reason == "stop" and len(text) < len(svc.tokenizer.decode(value, skip_special_tokens=True)):
                            visible = text  # a stop string appeared: everything before it is final
                        else:
                            visible = text[: max(0, len(text) - hold)] if hold else text
                            if visible.endswith("\ufffd"):  # half a UTF-8 character: wait
                                visible = visible[:-1]
                        if len(visible) > len(sent_text[i]) and visible.startswith(sent_text[i]):
                            yield f"data: {json.dumps(make_chunk(i, visible[len(sent_text[i]):], None))}\n\n"
                            sent_text[i] = visible
                    elif kind == "done":
                        text, reason = svc.finish_text(value.tokens, value.finish_reason, stops)
                        if len(text) > len(sent_text[i]) and text.startswith(sent_text[i]):
                            yield f"data: {json.dumps(make_chunk(i, text[len(sent_text[i]):], None))}\n\n"
                        yield f"data: {json.dumps(make_chunk(i, '', reason))}\n\n"
                        used += len(value.tokens)
                        done[i] = True
                u = usage_chunk(svc.usage(plan, used))
                if u is not None:
                    yield f"data: {json.dumps(u)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free the slots now
                for j in jobs:
                    if not (j.request and j.request.finished):
                        scheduler.cancel(j)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _cut_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens

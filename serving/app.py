"""The OpenAI-compatible HTTP server (FastAPI): `dlm serve MODEL_DIR`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /tokenizer_info,
POST /tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus). A route checks the
body (serving/handlers.py), hands its jobs to the engine (serving/engine.py: by default a
process of its own, which compiles the constraint and sets the jobs up in worker threads, and
whose scheduler batches the denoising steps of all live requests), and streams or returns the
results. The front end holds the tokenizer and the model's config, never its weights.

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

from .engine import EngineSpec, LocalEngine, ProcessEngine, build_core, load_server_tokenizer
from .handlers import Plan, Service
from .replicas import ReplicatedEngine
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
)
from .scheduler import EngineUnavailable, Job, JobTimeout


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
    engine: str = "process"  # "process": the engine in a process of its own; "thread": in this one
    threads: Optional[int] = None  # torch threads per engine rank (default: this process's / ranks)
    tensor_parallel: int = 1  # engine ranks the model is split over (process engine only)
    data_parallel: int = 1  # engine replicas behind this front end (process engine only)
    compile: bool = False  # the engine's model through torch.compile (dlm.runtime.compile_model)

    def engine_spec(self, replica: int = 0) -> EngineSpec:
        """What engine replica `replica` is built from: on GPUs its ranks take the GPUs after the
        previous replicas'; on CPU the cores are shared among all ranks of all replicas."""
        import torch

        device, threads = self.device, self.threads
        ranks = self.tensor_parallel * self.data_parallel
        if threads is None and ranks > 1:
            threads = max(1, torch.get_num_threads() // ranks)
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if cuda and self.data_parallel > 1 and self.tensor_parallel == 1 and device in (None, "cuda"):
            device = f"cuda:{replica}"
        return EngineSpec(model_dir=self.model_dir, device=device, tokenizer=self.tokenizer,
                          trust_remote_code=self.trust_remote_code, max_batch=self.max_batch, max_queue=self.max_queue,
                          compile_limits=self.compile_limits, compile_workers=self.compile_workers,
                          threads=threads, tensor_parallel=self.tensor_parallel,
                          first_gpu=replica * self.tensor_parallel, compile=self.compile)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def create_app(settings: ServerSettings, model=None, tokenizer=None) -> FastAPI:
    """Build the app. `model` / `tokenizer` may be passed in (tests, or a caller that loaded
    them already): the engine then runs in this process. Else settings.engine says where: in a
    process of its own ("process", which loads the model there) or in this one ("thread")."""
    import weakref

    from dlm.errors import DLMError as _DLMError

    if settings.engine not in ("process", "thread"):
        raise _DLMError(f"unknown engine mode {settings.engine!r}; use process or thread")
    if max(settings.tensor_parallel, settings.data_parallel) > 1 and (model is not None or settings.engine != "process"):
        raise _DLMError("--tensor-parallel / --data-parallel run the engine in processes of its own: use --engine "
                        "process (the default) and let it load the model")
    if settings.data_parallel < 1 or settings.tensor_parallel < 1:
        raise _DLMError("--tensor-parallel and --data-parallel must be at least 1")
    if model is None and settings.engine == "process":
        from dlm.loading import load_config

        cfg = load_config(settings.model_dir)
        if settings.tensor_parallel > 1:
            from dlm.parallel import check_shardable

            check_shardable(cfg, settings.tensor_parallel)
        if tokenizer is None:
            tokenizer = load_server_tokenizer(settings.model_dir, cfg, settings.tokenizer, settings.trust_remote_code)
        if settings.data_parallel > 1:
            engine = ReplicatedEngine([ProcessEngine(settings.engine_spec(replica=i))
                                       for i in range(settings.data_parallel)])
        else:
            engine = ProcessEngine(settings.engine_spec())  # loads the model there; DLMError if it cannot
    else:
        core = build_core(settings.engine_spec(), model=model, tokenizer=tokenizer)
        engine, cfg, tokenizer = LocalEngine(core), core.model.config, core.tokenizer
    svc = Service(settings, cfg, tokenizer, scorer=engine.score)
    metrics = Metrics(engine)
    pool = ThreadPoolExecutor(max_workers=settings.compile_workers, thread_name_prefix="dlm-http")

    app = FastAPI(title="dlm", version="0.1.0",
                  description="OpenAI-compatible server for masked diffusion language models")
    app.state.engine, app.state.settings, app.state.service = engine, settings, svc

    def _close():
        engine.close()
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

    @app.exception_handler(EngineUnavailable)
    async def _engine_gone(request: Request, exc: EngineUnavailable):
        return _error_response(svc.error_of(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    # -------------------------------------------------------------- running jobs
    def ended(job: Job, kind: str, value) -> None:  # in the event loop, when a job's end arrives
        if kind == "done":
            metrics.finished(job, value)
        elif isinstance(value, JobTimeout):
            metrics.cancelled()
        else:
            metrics.failed()

    async def start(plan: Plan, stream: bool) -> list[Job]:
        """Make the jobs and hand them to the engine, which compiles the constraint and sets
        them up (worker threads) and queues them; its refusal is this request's error."""
        jobs = svc.make_jobs(plan)
        events, loop = asyncio.Queue(), asyncio.get_running_loop()
        for i, j in enumerate(jobs):
            j.stream, j.loop, j.events, j.index, j.on_end = stream, loop, events, i, ended
        try:
            compile_s = await engine.start(jobs)
        except Exception as e:
            raise svc.error_of(e) from None
        if compile_s is not None:
            metrics.compile_s.observe(compile_s)
        return jobs

    def cancel(jobs: list[Job]) -> None:
        """The client went away (or the request failed): free the unfinished jobs' slots."""
        for j in jobs:
            if not j.finished:
                metrics.cancelled()
                engine.cancel(j)

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
            cancel(jobs)
        return results

    # -------------------------------------------------------------- endpoints
    @app.get("/health")
    def health():
        st = engine.stats()
        if not engine.healthy:
            return JSONResponse({"status": "unhealthy", "model": svc.name, "reason": "the engine is restarting"},
                                status_code=503)
        return {"status": "ok", "model": svc.name, "engine": engine.mode, "running": st["running"],
                "queued": st["queued"]}

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
            jobs = svc.make_jobs(plan)
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
                cancel(jobs)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _cut_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens

"""The OpenAI-compatible HTTP server (FastAPI): `dlm serve MODEL_DIR`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /tokenizer_info,
POST /tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus). Every request goes to
the scheduler (serving/scheduler.py), which batches the denoising steps of all live requests.

Errors use the OpenAI body {"error": {"message", "type", "param", "code"}}: bad input is a 400
(never a 500), a full queue a 429 with Retry-After, a missing or wrong API key a 401.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from dlm.decode import DecodeConfig
from dlm.errors import DLMError

from .scheduler import Job, QueueFull, Scheduler


# ------------------------------------------------------------------ settings
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


# ------------------------------------------------------------------ request bodies
class DecodeOptions(BaseModel):
    """dlm's decoding options, accepted as extra fields of any generation request."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    block_length: Optional[int] = Field(None, ge=1)
    steps: Optional[int] = Field(None, ge=1)
    unmask: Optional[str] = None
    threshold: Optional[float] = None
    factor: Optional[float] = None
    early_commit: Optional[bool] = None
    early_commit_scope: Optional[Literal["block", "answer"]] = None
    cache: Optional[str] = None
    top_k: Optional[int] = Field(None, ge=1)
    ignore_eos: Optional[bool] = None


class StructuredOutputs(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    json_schema: Optional[Union[dict, str]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class GenerationFields(DecodeOptions):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    guided_json: Optional[Union[dict, str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None


class CompletionRequest(GenerationFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict], None] = None


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    tokens: list[int]


# ------------------------------------------------------------------ errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                 headers=None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


# ------------------------------------------------------------------ metrics
class Metrics:
    def __init__(self, scheduler_ref):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("dlm_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.tokens = Counter("dlm_generated_tokens", "generated tokens (up to EOS)", registry=r)
        self.nfe = Counter("dlm_forward_passes", "network calls per request, summed", registry=r)
        self.cancels = Counter("dlm_cancelled_jobs", "jobs cancelled (client gone, timeout)", registry=r)
        self.latency = Histogram("dlm_request_latency_seconds", "job latency, submit to finish", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.ttft = Histogram("dlm_time_to_first_token_seconds", "submit to the first final token", registry=r,
                              buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.tps = Gauge("dlm_tokens_per_second", "generated tokens per second over the last 10 s", registry=r)
        self.queue = Gauge("dlm_queue_depth", "jobs waiting for a slot", registry=r)
        self.running = Gauge("dlm_running_jobs", "jobs in the batch", registry=r)
        self.queue.set_function(lambda: scheduler_ref().queue_depth if scheduler_ref() else 0)
        self.running.set_function(lambda: scheduler_ref().running if scheduler_ref() else 0)
        self.steps = Gauge("dlm_scheduler_steps", "batched decoding steps so far", registry=r)
        self.stepped = Gauge("dlm_scheduler_stepped_jobs", "sum of batch sizes over steps (/ steps = mean batch)",
                             registry=r)
        self.step_s = Gauge("dlm_scheduler_step_seconds", "seconds spent in decoding steps", registry=r)
        self.steps.set_function(lambda: scheduler_ref().steps if scheduler_ref() else 0)
        self.stepped.set_function(lambda: scheduler_ref().stepped_jobs if scheduler_ref() else 0)
        self.step_s.set_function(lambda: scheduler_ref().step_seconds if scheduler_ref() else 0)
        self._recent: list[tuple[float, int]] = []
        self.tps.set_function(self._rate)

    def _rate(self) -> float:
        self._prune(time.perf_counter())
        return sum(n for _, n in self._recent) / 10.0

    def _prune(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] >= 10:  # oldest first
            self._recent.pop(0)

    def finished(self, job: Job, result) -> None:
        now = time.perf_counter()
        n = result.stats.get("generated_tokens", 0)
        self.tokens.inc(n)
        self.nfe.inc(result.stats.get("nfe", 0))
        self.latency.observe(now - job.submitted)
        if job.first_token is not None:
            self.ttft.observe(job.first_token - job.submitted)
        self._recent.append((now, n))
        self._prune(now)  # bounded even when nobody scrapes /metrics

    def cancelled(self) -> None:
        self.cancels.inc()


# ------------------------------------------------------------------ the application
def create_app(settings: ServerSettings, model=None, tokenizer=None) -> FastAPI:
    """Build the app. `model` / `tokenizer` may be passed in (tests); else loaded from settings."""
    import weakref

    import torch

    from dlm.constraints import ConstraintCompiler
    from dlm.decode import ARDecoder, Decoder
    from dlm.model import load_model
    from dlm.tokenizer import check_tokenizer_for_model, load_tokenizer

    if model is None:
        dev = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(settings.model_dir).to(dev).eval()  # dlm's own classes: never remote code
    if tokenizer is None:
        tokenizer = load_tokenizer(settings.tokenizer or settings.model_dir, trust_remote_code=settings.trust_remote_code)
    check_tokenizer_for_model(tokenizer, model.config)
    cfg = model.config
    name = settings.served_model_name or settings.model_dir.rstrip("/").split("/")[-1] or "dlm"
    defaults = settings.defaults or DecodeConfig(cache="exact" if cfg.objective in ("bd3lm", "e2d2") else "none")
    # the AR baseline through the same scheduler: one token per request per step, exact logprobs
    decoder = ARDecoder(model) if cfg.objective == "ar" else Decoder(model)
    compiler = ConstraintCompiler(tokenizer, cfg.vocab_size, cfg.eos_token_id)
    holder: dict[str, Any] = {}
    metrics = Metrics(lambda: holder.get("scheduler"))
    scheduler = Scheduler(decoder, max_batch=settings.max_batch, max_queue=settings.max_queue, metrics=metrics)
    holder["scheduler"] = scheduler
    created = int(time.time())

    app = FastAPI(title="dlm", version="0.1.0",
                  description="OpenAI-compatible server for masked diffusion language models")
    app.state.scheduler = scheduler
    app.state.settings = settings
    weakref.finalize(app, scheduler.close)

    # -------------------------------------------------------------- middleware & errors
    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if settings.api_key and (path.startswith("/v1") or path in ("/tokenize", "/detokenize")):
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {settings.api_key}":
                metrics.requests.labels(path, "401").inc()
                return JSONResponse(error_body("missing or invalid API key (Authorization: Bearer KEY)",
                                               "authentication_error", None, "invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            metrics.requests.labels(path, "413").inc()
            return JSONResponse(error_body(f"request body larger than {settings.max_body_bytes} bytes",
                                           code="body_too_large"), status_code=413)
        response = await call_next(request)
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
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # last resort; the tests require none
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    # -------------------------------------------------------------- helpers
    def check_model(requested: Optional[str]) -> None:
        if requested not in (None, "", name):
            raise APIError(400, f"model {requested!r} is not served here; this server serves {name!r}",
                           param="model", code="model_not_found")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def decode_config(body: GenerationFields, max_tokens: int) -> DecodeConfig:
        over = {k: getattr(body, k) for k in ("block_length", "steps", "unmask", "threshold", "factor",
                                               "early_commit", "early_commit_scope", "cache", "top_k")
                if getattr(body, k) is not None}
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        if max_tokens > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of "
                                f"{settings.max_tokens_limit}", param="max_tokens")
        if body.block_length is None and defaults.block_length and max_tokens % defaults.block_length:
            # the server's default block length does not divide this request's length: one block
            over["block_length"] = None
        c = replace(defaults, max_new_tokens=max_tokens,
                    temperature=settings.default_temperature if body.temperature is None else body.temperature,
                    top_p=body.top_p if body.top_p is not None else defaults.top_p,
                    stop=[encode(s) for s in stops if encode(s)],
                    stop_at_eos=not body.ignore_eos if body.ignore_eos is not None else defaults.stop_at_eos, **over)
        c.validate(cfg.block_size if cfg.objective in ("bd3lm", "e2d2") else None)
        return c

    def constraint_of(body: GenerationFields):
        from dlm.constraints import make_constraint

        fields = {}
        so = body.structured_outputs
        if so is not None:
            fields = {k: v for k, v in (("json_schema", so.json_schema), ("regex", so.regex), ("choice", so.choice),
                                        ("grammar", so.grammar)) if v is not None}
        legacy = {k: v for k, v in (("json_schema", body.guided_json), ("regex", body.guided_regex),
                                    ("choice", body.guided_choice), ("grammar", body.guided_grammar)) if v is not None}
        rf = body.response_format
        if rf is not None and rf.type == "json_object":
            legacy["json_object"] = True
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
            legacy["json_schema"] = rf.json_schema.schema_
        given = {**fields, **legacy}
        if len(given) > 1:
            raise APIError(400, f"give at most one structured output constraint; got {', '.join(given)}",
                           param="structured_outputs")
        c = make_constraint(**given) if given else None
        return compiler.compile(c) if c is not None else None

    def stop_strings(body) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    def finish_text(tokens: list[int], reason: str, stops: list[str]) -> tuple[str, str]:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], "stop"
        return text, "length" if reason == "length" else "stop"

    async def run_jobs(request: Request, jobs: list[Job]) -> list:
        """Submit and wait; a client that goes away cancels its jobs (slots freed at the next step)."""
        submit(jobs)
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
                    raise job_error(value)
        finally:
            for j in jobs:
                if not (j.request and j.request.finished):
                    scheduler.cancel(j)
        return results

    def job_error(msg: str) -> APIError:
        if msg == "timeout":
            return APIError(408, f"the request took longer than {settings.request_timeout} s", "timeout_error",
                            code="timeout")
        return APIError(503, msg, "server_error", code="unavailable", headers={"Retry-After": "1"})

    def submit(jobs: list[Job]) -> None:
        try:
            scheduler.submit(jobs)
        except QueueFull:
            raise APIError(429, "the server is at capacity; retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None

    def make_jobs(prompts: list[list[int]], config: DecodeConfig, n: int, seed: Optional[int], constraint) -> list[Job]:
        base = config.seed if seed is None else seed
        deadline = time.perf_counter() + settings.request_timeout
        jobs = []
        for p in prompts:
            if len(p) + 1 + config.max_new_tokens > cfg.max_position_embeddings:
                raise APIError(400, f"prompt ({len(p)} tokens) + max_tokens {config.max_new_tokens} exceed the "
                                    f"model's context of {cfg.max_position_embeddings} positions", param="prompt",
                               code="context_length_exceeded")
            if not p:
                raise APIError(400, "the prompt is empty", param="prompt")
            for j in range(n):
                jobs.append(Job(prompt=p, config=config, seed=base + j, constraint=constraint, deadline=deadline))
        return jobs

    def completion_prompts(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [encode(prompt)]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [encode(p) for p in prompt]
        if all(isinstance(p, list) for p in prompt):
            return [list(p) for p in prompt]
        raise APIError(400, "prompt must be a string, a list of strings, token ids or lists of token ids",
                       param="prompt")

    def check_ids(prompts: list[list[int]]) -> None:
        for p in prompts:
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is out of range [0, {cfg.vocab_size})", param="prompt")

    def logprobs_block(ids: list[int], n_prompt: int, echo: bool) -> dict:
        """Legacy completions logprobs for [prompt (if echo) + generated] tokens (dlm.scoring)."""
        from dlm.scoring import token_logprobs

        full = [cfg.bos_token_id, *ids]
        # generated tokens are scored on the whole sequence; prompt tokens (echo) on the prompt
        # alone, because the chain masks everything after a token and appended output would
        # change their scores: what an in-process scorer computes
        lp, top, top_lp = token_logprobs(model, full, start=1 + n_prompt)
        if echo:
            p_lp, p_top, p_top_lp = token_logprobs(model, full[: 1 + n_prompt])
            lp[: 1 + n_prompt], top[: 1 + n_prompt], top_lp[: 1 + n_prompt] = p_lp, p_top, p_top_lp
        start = 1 if echo else 1 + n_prompt
        toks = [tokenizer.decode([t]) for t in full[start:]]
        offsets, pos = [], 0
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        tops = [None if top_lp[i] is None else {tokenizer.decode([top[i]]): top_lp[i]} for i in range(start, len(full))]
        token_lps = lp[start:]
        if echo and token_lps:  # OpenAI convention: nothing scores the first token
            token_lps = [None, *token_lps[1:]]
            tops = [None, *tops[1:]]
        return {"tokens": toks, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    # -------------------------------------------------------------- endpoints
    @app.get("/health")
    def health():
        return {"status": "ok", "model": name, "running": scheduler.running, "queued": scheduler.queue_depth}

    @app.get("/metrics")
    def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "dlm",
                                            "max_model_len": cfg.max_position_embeddings,
                                            "objective": cfg.objective}]}

    @app.get("/tokenizer_info")
    def tokenizer_info():
        return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
                "model_max_length": cfg.max_position_embeddings, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "mask_token": tokenizer.convert_ids_to_tokens(cfg.mask_token_id),
                "chat_template": getattr(tokenizer, "chat_template", None)}

    @app.post("/tokenize")
    def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        text = body.prompt if body.prompt is not None else chat_prompt(body.messages)
        ids = tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": cfg.max_position_embeddings}

    @app.post("/detokenize")
    def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        check_ids([body.tokens])
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = completion_prompts(body.prompt)
        check_ids(prompts)
        max_tokens = body.max_tokens or settings.default_max_tokens
        config = decode_config(body, max_tokens)
        constraint = constraint_of(body)
        jobs = make_jobs(prompts, config, body.n, body.seed, constraint)
        stops = stop_strings(body)
        rid, t = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if body.echo or body.logprobs is not None:
                raise APIError(400, "logprobs and echo are not available with stream", param="stream")
            return sse(request, jobs, stops, lambda i, text, reason: {
                "id": rid, "object": "text_completion", "created": t, "model": name,
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]},
                usage_chunk=lambda u: {"id": rid, "object": "text_completion", "created": t, "model": name,
                                       "choices": [], "usage": u} if (body.stream_options or {}).get("include_usage") else None)
        results = await run_jobs(request, jobs)
        choices, used = [], 0
        for i, (job, res) in enumerate(zip(jobs, results)):
            text, reason = finish_text(res.tokens, res.finish_reason, stops)
            lp = None
            if body.logprobs is not None:
                gen_ids = encode(text) if text != tokenizer.decode(res.tokens, skip_special_tokens=True) else res.tokens
                lp = await asyncio.get_running_loop().run_in_executor(
                    None, logprobs_block, job.prompt + list(gen_ids), len(job.prompt), body.echo)
            if body.echo:
                text = tokenizer.decode(job.prompt) + text
            used += len(res.tokens)
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason,
                            "stats": _round(res.stats)})
        n_prompt = sum(len(p) for p in prompts)
        return {"id": rid, "object": "text_completion", "created": t, "model": name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used}}

    def chat_prompt(messages: list[ChatMessage]) -> str:
        msgs = []
        for m in messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            msgs.append({"role": m.role, "content": content or ""})
        if getattr(tokenizer, "chat_template", None):
            try:
                return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # a broken template is the server's problem, but say so clearly
                raise APIError(400, f"the tokenizer's chat template failed: {e}") from None
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        prompt = encode(chat_prompt(body.messages))
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        config = decode_config(body, max_tokens)
        constraint = constraint_of(body)
        jobs = make_jobs([prompt], config, body.n, body.seed, constraint)
        stops = stop_strings(body)
        rid, t = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            started: set[int] = set()

            def chunk(i, text, reason):
                delta = {} if text == "" and reason else {"content": text}
                if i not in started:
                    started.add(i)
                    delta = {"role": "assistant", **delta}
                return {"id": rid, "object": "chat.completion.chunk", "created": t, "model": name,
                        "choices": [{"index": i, "delta": delta, "finish_reason": reason}]}
            return sse(request, jobs, stops, chunk,
                       usage_chunk=lambda u: {"id": rid, "object": "chat.completion.chunk", "created": t,
                                              "model": name, "choices": [], "usage": u}
                       if (body.stream_options or {}).get("include_usage") else None)
        results = await run_jobs(request, jobs)
        choices, used = [], 0
        for i, res in enumerate(results):
            text, reason = finish_text(res.tokens, res.finish_reason, stops)
            used += len(res.tokens)
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                            "stats": _round(res.stats)})
        return {"id": rid, "object": "chat.completion", "created": t, "model": name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": used, "total_tokens": len(prompt) + used}}

    def sse(request: Request, jobs: list[Job], stops: list[str], make_chunk, usage_chunk) -> StreamingResponse:
        """Server-sent events: a chunk whenever a job's final prefix grows (at the latest when a
        block is finalised), then one with the finish reason, then [DONE]."""
        for j in jobs:
            j.stream = True
        submit(jobs)
        hold = max((len(s) for s in stops), default=1) - 1  # text that may still become a stop string

        events = jobs[0].events

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
                        e = job_error(value)
                        yield f"data: {json.dumps(error_body(e.message, e.type, None, e.code))}\n\n"
                        done[i] = True
                    elif kind == "tokens":
                        text, reason = finish_text(_cut_eos(value, cfg.eos_token_id), "", stops)
                        if reason == "stop" and len(text) < len(tokenizer.decode(value, skip_special_tokens=True)):
                            visible = text  # a stop string appeared: everything before it is final
                        else:
                            visible = text[: max(0, len(text) - hold)] if hold else text
                            if visible.endswith("\ufffd"):  # half a UTF-8 character: wait
                                visible = visible[:-1]
                        if len(visible) > len(sent_text[i]) and visible.startswith(sent_text[i]):
                            yield f"data: {json.dumps(make_chunk(i, visible[len(sent_text[i]):], None))}\n\n"
                            sent_text[i] = visible
                    elif kind == "done":
                        text, reason = finish_text(value.tokens, value.finish_reason, stops)
                        if len(text) > len(sent_text[i]) and text.startswith(sent_text[i]):
                            yield f"data: {json.dumps(make_chunk(i, text[len(sent_text[i]):], None))}\n\n"
                        yield f"data: {json.dumps(make_chunk(i, '', reason))}\n\n"
                        used += len(value.tokens)
                        done[i] = True
                u = usage_chunk({"prompt_tokens": sum(len(j.prompt) for j in jobs[:1]), "completion_tokens": used,
                                 "total_tokens": sum(len(j.prompt) for j in jobs[:1]) + used})
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


def _round(stats: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}

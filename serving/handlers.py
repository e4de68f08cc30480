"""Between an HTTP body and the scheduler, without HTTP: request bodies -> decoder jobs, and
decoder results -> response bodies. Unit-testable on their own (tests/test_serving_handlers.py).

    svc = Service(settings, model.config, tokenizer, scorer=engine.score)
    plan = svc.completion_plan(CompletionRequest(prompt="the cat", max_tokens=8))
    jobs = svc.make_jobs(plan)
    ... the engine compiles the constraint, sets the jobs up and runs them (serving/engine.py) ...
    body = svc.completion_body(plan, jobs, results)   # blocking (logprobs): a worker thread

Every method that checks input raises `APIError` (a 400 naming the field); `error_of` maps what
a job failed with to its own response (nothing of any other request is in it).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Optional

from dlm.decoding.config import DecodeConfig, OptionError
from dlm.decoding.state import DecodeResult
from dlm.errors import DLMError
from dlm.families import family_of

from .protocol import (
    DECODE_OPTIONS,
    DIFFUSION_OPTIONS,
    APIError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerationFields,
)
from .scheduler import EngineUnavailable, InternalError, Job, JobTimeout, QueueFull, ShuttingDown


@dataclass
class Plan:
    """What a generation request asks for, checked: the jobs are made from it."""

    prompts: list[list[int]]
    config: DecodeConfig
    stops: list[str]
    n: int
    seed: Optional[int]
    constraint: object = None  # dlm.constraints.Constraint (the engine compiles it)
    echo: bool = False
    logprobs: Optional[int] = None  # completions: top-k per token; chat: top_logprobs (0 = just the token)
    score_only: bool = False  # max_tokens 0 with echo: no decoding, prompt logprobs only
    rid: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


class Service:
    """The front end's view of one served model: its config and tokenizer (no weights). Token
    logprobs come from `scorer(ids, k, start)` (the engine's score)."""

    def __init__(self, settings, cfg, tokenizer, scorer=None):
        self.settings, self.cfg, self.tokenizer, self.scorer = settings, cfg, tokenizer, scorer
        self.name = settings.served_model_name or settings.model_dir.rstrip("/").split("/")[-1] or "dlm"
        self.family = family_of(cfg)
        self.is_ar = self.family.autoregressive
        self.defaults = settings.defaults or DecodeConfig.for_family(self.family, cfg.block_size, cache=self.family.default_cache)
        self.created = int(time.time())

    # ---------------------------------------------------------- checks
    def check_model(self, requested: Optional[str]) -> None:
        if requested not in (None, "", self.name):
            raise APIError(400, f"model {requested!r} is not served here; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def encode(self, text: str) -> list[int]:
        return self.family.encode(self.tokenizer, text)

    def check_ids(self, prompts: list[list[int]]) -> None:
        for p in prompts:
            bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is out of range [0, {self.cfg.vocab_size})", param="prompt")

    def completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.encode(prompt)]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [self.encode(p) for p in prompt]
        if all(isinstance(p, list) for p in prompt):
            return [list(p) for p in prompt]
        raise APIError(400, "prompt must be a string, a list of strings, token ids or lists of token ids",
                       param="prompt")

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        msgs = []
        for m in messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            msgs.append({"role": m.role, "content": content or ""})
        if getattr(self.tokenizer, "chat_template", None):
            try:
                return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # a broken template is the server's problem, but say so clearly
                raise APIError(400, f"the tokenizer's chat template failed: {e}") from None
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"

    def decode_config(self, body: GenerationFields, max_tokens: int) -> DecodeConfig:
        """The request's decoding configuration: the server's defaults, overridden by the body's
        decoding fields (DecodeConfig's server-exposed options), checked by DecodeConfig.validate."""
        given = [k for k in DIFFUSION_OPTIONS if getattr(body, k) is not None]
        if self.is_ar and given:
            raise APIError(400, f"{', '.join(given)}: diffusion decoding options; this server runs the "
                                "autoregressive baseline, which decodes one token per step", param=given[0])
        over = {k: DecodeConfig.coerce(k, getattr(body, k)) for k in DECODE_OPTIONS if getattr(body, k) is not None}
        stops = self.stop_strings(body)
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        limit = self.settings.max_tokens_limit
        if max_tokens > limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {limit}",
                           param="max_tokens")
        if (body.block_length is None and self.defaults.block_length and not self.family.block_causal
                and max_tokens % self.defaults.block_length):
            over["block_length"] = None  # the server's default block length does not divide this length: one block
        c = replace(self.defaults, max_new_tokens=max_tokens,
                    temperature=self.settings.default_temperature if body.temperature is None else body.temperature,
                    top_p=body.top_p if body.top_p is not None else self.defaults.top_p,
                    stop=[self.encode(s) for s in stops if self.encode(s)],
                    stop_at_eos=not body.ignore_eos if body.ignore_eos is not None else self.defaults.stop_at_eos,
                    **over)
        try:
            c.validate(self.family, self.cfg.block_size)
        except OptionError as e:
            raise APIError(400, str(e), param=e.option) from None
        except DLMError as e:
            raise APIError(400, str(e)) from None
        return c

    @staticmethod
    def stop_strings(body) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    def constraint_of(self, body: GenerationFields):
        """The request's structured-output constraint (checked, not compiled), or None."""
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
        if not given:
            return None
        if self.is_ar:  # refused before any work
            raise APIError(400, "structured outputs (regex, JSON schema, choice, grammar) need a diffusion model; "
                                "this server runs the autoregressive baseline", param="structured_outputs")
        if len(given) > 1:
            raise APIError(400, f"give at most one structured output constraint; got {', '.join(given)}",
                           param="structured_outputs")
        try:
            return make_constraint(**given)
        except DLMError as e:
            raise APIError(400, str(e), param="structured_outputs") from None

    # ---------------------------------------------------------- plans and jobs
    def completion_plan(self, body: CompletionRequest) -> Plan:
        self.check_model(body.model)
        prompts = self.completion_prompts(body.prompt)
        self.check_ids(prompts)
        max_tokens = self.settings.default_max_tokens if body.max_tokens is None else body.max_tokens
        score_only = max_tokens == 0
        if score_only and not body.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is accepted with echo, to score the prompt)",
                           param="max_tokens")
        if body.stream and (body.echo or body.logprobs is not None):
            raise APIError(400, "logprobs and echo are not available with stream", param="stream")
        config = self.decode_config(body, max(1, max_tokens))
        constraint = None if score_only else self.constraint_of(body)
        plan = Plan(prompts, config, self.stop_strings(body), body.n, body.seed, constraint, echo=body.echo,
                    logprobs=body.logprobs, score_only=score_only, rid=f"cmpl-{uuid.uuid4().hex}")
        self._check_lengths(plan)
        return plan

    def chat_plan(self, body: ChatRequest) -> Plan:
        self.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        text = self.chat_prompt(body.messages)
        # a published model's template writes its own special tokens (BOS, role markers) as text
        prompt = self.encode(text) if self.family.prepend_bos else self.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens or body.max_tokens or self.settings.default_max_tokens
        config = self.decode_config(body, max_tokens)
        plan = Plan([prompt], config, self.stop_strings(body), body.n, body.seed, self.constraint_of(body),
                    logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                    rid=f"chatcmpl-{uuid.uuid4().hex}")
        self._check_lengths(plan)
        return plan

    def _check_lengths(self, plan: Plan) -> None:
        for p in plan.prompts:
            if not p:
                raise APIError(400, "the prompt is empty", param="prompt")
            if len(p) + 1 + (0 if plan.score_only else plan.config.max_new_tokens) > self.cfg.max_position_embeddings:
                raise APIError(400, f"prompt ({len(p)} tokens) + max_tokens {plan.config.max_new_tokens} exceed the "
                                    f"model's context of {self.cfg.max_position_embeddings} positions", param="prompt",
                               code="context_length_exceeded")

    def make_jobs(self, plan: Plan) -> list[Job]:
        base = plan.config.seed if plan.seed is None else plan.seed
        deadline = time.perf_counter() + self.settings.request_timeout
        return [Job(prompt=p, config=plan.config, seed=(base + j) % 2**64, constraint=plan.constraint,
                    deadline=deadline) for p in plan.prompts for j in range(plan.n)]

    # ---------------------------------------------------------- responses
    def finish_text(self, tokens: list[int], reason: str, stops: list[str]) -> tuple[str, str]:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], "stop"
        return text, "length" if reason == "length" else "stop"

    def usage(self, plan: Plan, completion_tokens: int) -> dict:
        n_prompt = sum(len(p) for p in plan.prompts)
        return {"prompt_tokens": n_prompt, "completion_tokens": completion_tokens,
                "total_tokens": n_prompt + completion_tokens}

    def completion_body(self, plan: Plan, jobs: list[Job], results: list[DecodeResult]) -> dict:
        """The completions response (logprobs computed here: call it off the event loop)."""
        choices, used = [], 0
        for i, (job, res) in enumerate(zip(jobs, results)):
            text, reason = self.finish_text(res.tokens, res.finish_reason, plan.stops)
            lp = None
            if plan.logprobs is not None:
                raw = self.tokenizer.decode(res.tokens, skip_special_tokens=True)
                gen_ids = self.encode(text) if text != raw else res.tokens  # cut at a stop string
                lp = self.logprobs_block(job.prompt + list(gen_ids), len(job.prompt), plan.echo, max(1, plan.logprobs))
            if plan.echo:
                text = self.tokenizer.decode(job.prompt) + text
            used += len(res.tokens)
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason,
                            "stats": _round(res.stats)})
        return {"id": plan.rid, "object": "text_completion", "created": plan.created, "model": self.name,
                "choices": choices, "usage": self.usage(plan, used)}

    def chat_body(self, plan: Plan, jobs: list[Job], results: list[DecodeResult]) -> dict:
        choices, used = [], 0
        for i, (job, res) in enumerate(zip(jobs, results)):
            text, reason = self.finish_text(res.tokens, res.finish_reason, plan.stops)
            lp = None
            if plan.logprobs is not None:
                raw = self.tokenizer.decode(res.tokens, skip_special_tokens=True)
                gen_ids = self.encode(text) if text != raw else res.tokens
                lp = self.chat_logprobs(job.prompt, list(gen_ids), plan.logprobs)
            used += len(res.tokens)
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": reason, "stats": _round(res.stats)})
        return {"id": plan.rid, "object": "chat.completion", "created": plan.created, "model": self.name,
                "choices": choices, "usage": self.usage(plan, used)}

    def logprobs_block(self, ids: list[int], n_prompt: int, echo: bool, k: int = 1) -> dict:
        """Legacy completions logprobs for [prompt (if echo) + generated] tokens (dlm.likelihood):
        generated tokens are scored on the whole sequence; prompt tokens (echo) on the prompt
        alone, because the chain masks everything after a token and appended output would change
        their scores (what an in-process scorer computes)."""
        full = self.family.prefix(ids, self.cfg.bos_token_id)  # BOS + ids for dlm's own models
        off = len(full) - len(ids)
        lp, tops = self.scorer(full, k, max(1, off + n_prompt))
        if echo:
            p_lp, p_tops = self.scorer(full[: off + n_prompt], k, 1)
            lp[: off + n_prompt], tops[: off + n_prompt] = p_lp, p_tops
        start = off if echo else off + n_prompt
        toks = [self.tokenizer.decode([t]) for t in full[start:]]
        offsets, pos = [], 0
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        top_dicts = [None if tops[i] is None else self._top_dict(tops[i]) for i in range(start, len(full))]
        token_lps = lp[start:]
        if echo and token_lps:  # OpenAI convention: nothing scores the first token
            token_lps = [None, *token_lps[1:]]
            top_dicts = [None, *top_dicts[1:]]
        return {"tokens": toks, "token_logprobs": token_lps, "top_logprobs": top_dicts, "text_offset": offsets}

    def _top_dict(self, pairs: list[tuple[int, float]]) -> dict:
        out: dict[str, float] = {}
        for t, v in pairs:  # two ids can decode to one string: keep the better
            out.setdefault(self.tokenizer.decode([t]), v)
        return out

    def chat_logprobs(self, prompt: list[int], gen: list[int], k: int) -> dict:
        """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
        full = self.family.prefix([*prompt, *gen], self.cfg.bos_token_id)
        first = len(full) - len(gen)
        lp, tops = self.scorer(full, max(1, k), max(1, first))

        def entry(t: int, v: float) -> dict:
            text = self.tokenizer.decode([t])
            return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

        content = []
        for i in range(first, len(full)):
            e = entry(full[i], lp[i])
            e["top_logprobs"] = [entry(t, v) for t, v in (tops[i] or [])[:k]]
            content.append(e)
        return {"content": content, "refusal": None}

    def error_of(self, exc: BaseException) -> APIError:
        """The response for what a job failed with (its own cause only)."""
        from dlm.constraints import ConstraintUnsatisfiable, ConstraintViolation

        from .engine import ConstraintRefused

        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, QueueFull):
            return APIError(429, "the server is at capacity; retry shortly", "rate_limit_error", code="queue_full",
                            headers={"Retry-After": "1"})
        if isinstance(exc, EngineUnavailable):
            return APIError(503, str(exc), "server_error", code="engine_unavailable", headers={"Retry-After": "2"})
        if isinstance(exc, ConstraintRefused):
            return APIError(400, str(exc), param="structured_outputs", code="unsupported_constraint")
        if isinstance(exc, JobTimeout):
            return APIError(408, f"the request took longer than {self.settings.request_timeout} s", "timeout_error",
                            code="timeout")
        if isinstance(exc, ShuttingDown):
            return APIError(503, str(exc), "server_error", code="shutting_down", headers={"Retry-After": "1"})
        if isinstance(exc, ConstraintUnsatisfiable):
            return APIError(400, str(exc), param="max_tokens", code="constraint_unsatisfiable")
        if isinstance(exc, ConstraintViolation):
            return APIError(422, str(exc), code="constraint_not_satisfied")
        if isinstance(exc, DLMError):
            return APIError(400, str(exc))
        if isinstance(exc, InternalError):
            return APIError(500, str(exc), "server_error", code="internal_error")
        return APIError(500, f"decoding failed: {type(exc).__name__}: {str(exc)[:300]}", "server_error",
                        code="decode_error")


def _round(stats: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}

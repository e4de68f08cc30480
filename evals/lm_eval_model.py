"""dlm as an lm-eval model: `import dlm.evals.lm_eval_model` registers it under the name "dlm".

    import dlm.evals.lm_eval_model, lm_eval
    lm_eval.simple_evaluate(model="dlm", model_args="pretrained=runs/mdlm/model,mc_samples=64", tasks=[...])
    dlm eval --model_args pretrained=runs/mdlm/model --tasks dlm_add    # lm-eval's own CLI

Request types, for every model type (AR, MDLM, RADD, BD3-LM, E2D2):

* loglikelihood(context, continuation): AR models give the exact sum of token log-probs.
  Diffusion models give minus a Monte Carlo estimate of the NELBO of the continuation given the
  clean context: per sample, k ~ U{1..n} continuation tokens are masked (k stratified across the
  samples) and the masked tokens' NLL is weighted by n / k (RADD's k-DCE / LLaDA's estimator;
  for the absorbing process it has the same expectation as MDLM's continuous-time bound). The
  estimate is unbiased for a lower bound on log p(continuation | context). Block models use their
  block structure: each block's continuation tokens get their own k_b ~ U{1..n_b} and weight
  n_b / k_b, conditioned on the clean earlier blocks (one forward per sample). `is_greedy` is the
  greedy check (every continuation token is the argmax when all of them are masked together;
  for AR models the usual left-to-right check).
* loglikelihood_rolling(text): lm-eval's rolling windows (disjoint continuations of up to the
  model's window, each conditioned on the tokens just before it), each scored as above. For a
  diffusion model the sum is an estimate of a lower bound on the log-likelihood of the windowed
  factorisation (the same windows HF models are scored with), so word perplexity and bits per
  byte come out as upper bounds, comparable to the NELBO perplexities of `dlm ppl`.
* generate_until(context, gen_kwargs): the dlm decoder (dlm.decoding) with every option available
  as a model argument (unmask, threshold, factor, block_length, steps, cache, early_commit, ...)
  and `until`, `max_gen_toks`, `temperature`, `do_sample` from gen_kwargs; AR models decode
  greedily (or sample) left to right with a KV cache.

Model arguments: pretrained (directory), tokenizer (default: the model's), device, batch_size,
mc_samples (default 32), max_length (default: the model's positions), seed, and decoder options.
"""

from __future__ import annotations

from typing import Optional

# lm-eval fills its registry with the built-in models (hf, local-completions, ...) only when the
# registry is empty; load them first so registering "dlm" does not hide them.
import lm_eval.models  # noqa: E402, F401, I001
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dlm.errors import DLMError

from dlm.decoding.config import DecodeConfig, lm_eval_args
from dlm.families import family_of

# The decoder's options as model arguments: DecodeConfig's lm-eval-exposed fields.
DECODER_ARGS = lm_eval_args()


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("dlm")
class DLMEvalModel(LM):
    def __init__(self, pretrained: str = None, tokenizer: Optional[str] = None, device: Optional[str] = None,
                 batch_size=8, mc_samples=32, max_length=None, seed=0, loglikelihood="elbo", **decoder_args):
        super().__init__()
        from dlm.loading import load_tokenizer_for
        from dlm.loading import load_model
        from dlm.tokenizer import check_tokenizer_for_model

        if not pretrained:
            raise DLMError("model_args needs pretrained=DIR (a model directory written by `dlm train`, a published "
                           "checkpoint's directory or a hub id)")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(pretrained).to(dev).eval()
        own = family_of(self.model.config).format is None
        self.tok = load_tokenizer_for(pretrained, self.model.config, tokenizer=tokenizer)
        check_tokenizer_for_model(self.tok, self.model.config, roles=own)
        self.cfg = self.model.config
        self.device_ = dev
        self.batch_size_ = int(batch_size) if str(batch_size) != "auto" else 8
        self.mc_samples = int(mc_samples)
        if self.mc_samples < 1:
            raise DLMError(f"mc_samples must be at least 1, got {mc_samples}")
        self.max_length = int(max_length or self.cfg.max_position_embeddings)
        self.seed = int(seed)
        if loglikelihood not in ("elbo", "chain"):
            raise DLMError(f"loglikelihood must be 'elbo' (Monte Carlo ELBO) or 'chain' (left-to-right chain, "
                           f"what `dlm serve` returns for echo + logprobs), got {loglikelihood!r}")
        self.ll_method = loglikelihood
        unknown = sorted(set(decoder_args) - set(DECODER_ARGS))
        if unknown:
            raise DLMError(f"unknown model_args {', '.join(unknown)}; decoder options are {', '.join(DECODER_ARGS)}")
        self.decoder_args = {k: DecodeConfig.coerce(k, v) for k, v in decoder_args.items()}
        self.family = family_of(self.cfg)
        self.is_ar = self.family.autoregressive
        self.objective = None
        if not self.is_ar:
            from dlm.objectives import make_objective

            self.objective = make_objective(self.cfg)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("device", "batch_size")}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            extra.pop("device")  # lm-eval's default device; fall back to what this machine has
        return cls(**{**extra, **arg_dict})

    # -------------------------------------------------------------- tokens
    def _encode(self, text: str) -> list[int]:
        return self.family.encode(self.tok, text)

    @property
    def _prefix_token(self) -> int:
        """What starts a context: BOS, or EOS for a tokenizer without one (as lm-eval's HF model)."""
        return self.cfg.bos_token_id if self.cfg.bos_token_id is not None else self.cfg.eos_token_id

    def _with_bos(self, ids: list[int]) -> list[int]:
        """dlm's own models: BOS + ids. Published ones: the ids as tokenized (the prefix token
        alone for an empty context)."""
        if not self.family.prepend_bos:
            return list(ids) if ids else [self._prefix_token]
        return ids if ids[:1] == [self.cfg.bos_token_id] else [self.cfg.bos_token_id, *ids]

    # -------------------------------------------------------------- loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = []
        for req in requests:
            context, continuation = req.args
            # Split like lm-eval's HF model: trailing spaces of the context move to the continuation.
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                continuation = context[-n_spaces:] + continuation
                context = context[:-n_spaces]
            whole = self._encode(context + continuation)
            ctx = self._encode(context)
            pairs.append((self._with_bos(whole[: len(ctx)]), whole[len(ctx):]))
        return self.score_pairs(pairs, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self._encode(text), prefix_token=self._prefix_token,
                max_seq_len=self.max_length - 1, context_len=1)]
            scores = self.score_pairs([(self._with_bos(c), t) for c, t in windows], disable_tqdm=True)
            out.append(sum(s for s, _ in scores))
        return out

    @torch.no_grad()
    def score_pairs(self, pairs, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(context ids incl. BOS, continuation ids) -> (log-likelihood or its bound, is_greedy)."""
        results = []
        for ctx, cont in pairs:
            if not cont:
                results.append((0.0, True))
                continue
            keep = self.max_length - len(cont)
            if keep < 1:
                raise DLMError(f"a continuation of {len(cont)} tokens does not fit the model's "
                               f"{self.max_length} positions")
            if len(ctx) > keep:  # keep BOS, drop the oldest context tokens
                tail = ctx[1:]
                ctx = [ctx[0], *tail[len(tail) - (keep - 1):]] if keep > 1 else [ctx[0]]
            if self.is_ar:
                results.append(self._ar_score(ctx, cont))
            elif getattr(self, "ll_method", "elbo") == "chain":
                results.append(self._chain_score(ctx, cont))
            else:
                results.append((self.elbo(ctx, cont), self._greedy(ctx, cont)))
        return results

    def _ar_score(self, ctx, cont):
        from dlm.likelihood import ar_continuation

        return ar_continuation(self.model, ctx, cont)

    def _chain_score(self, ctx, cont):
        """Left-to-right chain (dlm.likelihood): deterministic, what the server's echo logprobs sum to."""
        from dlm.likelihood import chain_continuation

        return chain_continuation(self.model, ctx, cont, objective=self.objective)

    def elbo(self, ctx, cont, samples: Optional[int] = None, seed: Optional[int] = None) -> float:
        """Monte Carlo estimate of the ELBO (a lower bound on log p(cont | ctx)), dlm.likelihood."""
        from dlm.likelihood import continuation_elbo

        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return continuation_elbo(self.model, ctx, cont, samples or self.mc_samples, gen, self.batch_size_,
                                 objective=self.objective)

    def _greedy(self, ctx, cont) -> bool:
        from dlm.likelihood import greedy_continuation

        return greedy_continuation(self.model, ctx, cont, objective=self.objective)

    # -------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False):
        """Requests with the same generation settings are decoded together, `batch_size` at a
        time (a batch gives each request the output it would get alone; tested in test_decode)."""
        from dlm.decoding import ARDecoder, Decoder

        dec = ARDecoder(self.model) if self.is_ar else Decoder(self.model)
        jobs = []  # (index, prompt ids, until, settings key, DecodeConfig kwargs)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            gk = dict(gen_kwargs or {})
            until = gk.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(gk.pop("max_gen_toks", 256))
            do_sample = _as_bool(gk.pop("do_sample", False))
            temperature = float(gk.pop("temperature", 0.0)) if do_sample else 0.0
            opts = {**self.decoder_args, **{k: DecodeConfig.coerce(k, v) for k, v in gk.items() if k in DECODER_ARGS}}
            if self.is_ar:  # the decoding options of diffusion models do not apply
                opts = {k: v for k, v in opts.items() if k in ("top_k", "top_p")}
            keep = self.max_length - max_new - 1
            if keep < 1:
                raise DLMError(f"max_gen_toks {max_new} leaves no room for the prompt in {self.max_length} positions")
            prompt = self._encode(context)[-keep:] or [self.cfg.eos_token_id]
            if opts.get("block_length") and max_new % opts["block_length"]:
                max_new = -(-max_new // opts["block_length"]) * opts["block_length"]
            kwargs = dict(max_new_tokens=max_new, temperature=temperature,
                          stop=[self._encode(s) for s in until if self._encode(s)], **opts)
            jobs.append((i, prompt, until, repr(sorted(kwargs.items())), kwargs))
        texts: list[str] = [""] * len(jobs)
        groups: dict[str, list] = {}
        for job in jobs:
            groups.setdefault(job[3], []).append(job)
        for group in groups.values():
            for b in range(0, len(group), self.batch_size_):
                chunk = group[b : b + self.batch_size_]
                kw = chunk[0][4]
                config = DecodeConfig(**kw) if self.is_ar else DecodeConfig.for_family(self.family, self.cfg.block_size, **kw)
                res = _generate(dec, [j[1] for j in chunk], config, [self.seed + j[0] for j in chunk])
                outs = [r.tokens for r in res]
                for (i, _, until, _, _), tokens in zip(chunk, outs):
                    text = self.tok.decode(tokens, skip_special_tokens=True)
                    for s in until:  # token boundaries may hide a stop string: cut on the text too
                        if s and s in text:
                            text = text[: text.index(s)]
                    texts[i] = text
        return texts



def _generate(decoder, prompts, config, seeds):
    """Decode prompts with the decoder's step interface (Decoder and ARDecoder alike)."""
    reqs = [decoder.new_request(p, config, s, rid=i) for i, (p, s) in enumerate(zip(prompts, seeds))]
    while decoder.step(reqs):
        pass
    return [r.result for r in reqs]

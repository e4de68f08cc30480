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
* generate_until(context, gen_kwargs): the dlm decoder (dlm.decode) with every option available
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

DECODER_ARGS = {"unmask": str, "threshold": float, "factor": float, "block_length": int, "steps": int,
                "cache": str, "early_commit": bool, "early_commit_scope": str, "top_k": int, "top_p": float}


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("dlm")
class DLMEvalModel(LM):
    def __init__(self, pretrained: str = None, tokenizer: Optional[str] = None, device: Optional[str] = None,
                 batch_size=8, mc_samples=32, max_length=None, seed=0, loglikelihood="elbo", **decoder_args):
        super().__init__()
        from dlm.model import load_model
        from dlm.tokenizer import check_tokenizer_for_model, load_tokenizer

        if not pretrained:
            raise DLMError("model_args needs pretrained=DIR (a model directory written by `dlm train`)")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(pretrained).to(dev).eval()
        self.tok = load_tokenizer(tokenizer or pretrained)
        check_tokenizer_for_model(self.tok, self.model.config)
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
        self.decoder_args = {k: (_as_bool(v) if DECODER_ARGS[k] is bool else DECODER_ARGS[k](v))
                             for k, v in decoder_args.items()}
        self.is_ar = self.cfg.objective == "ar"
        self.is_block = self.cfg.objective in ("bd3lm", "e2d2")
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
        return self.tok.encode(text, add_special_tokens=False)

    def _with_bos(self, ids: list[int]) -> list[int]:
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
                token_list=self._encode(text), prefix_token=self.cfg.bos_token_id,
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
        ids = torch.tensor([ctx + cont], device=self.device_)
        logits = self.model(ids, is_causal=True).logits[0, len(ctx) - 1 : -1].float()
        logp = logits.log_softmax(-1)
        target = torch.tensor(cont, device=self.device_)
        ll = logp.gather(-1, target[:, None]).sum().item()
        return ll, bool((logits.argmax(-1) == target).all())

    def _chain_score(self, ctx, cont):
        """Left-to-right chain (dlm.scoring): deterministic, what the server's echo logprobs sum to."""
        from dlm.scoring import token_logprobs

        n = len(ctx)
        lp, top, _ = token_logprobs(self.model, ctx + cont, objective=self.objective, start=n)
        return float(sum(lp[n:])), all(top[i] == t for i, t in enumerate(cont, start=n))

    def _layout(self, ctx, cont):
        """Canvas (1, T) padded to whole blocks for block models, and the continuation positions."""
        ids = ctx + cont
        T = len(ids)
        if self.is_block:
            T = -(-T // self.cfg.block_size) * self.cfg.block_size
        x = torch.full((1, T), self.cfg.pad_token_id, dtype=torch.long, device=self.device_)
        x[0, : len(ids)] = torch.tensor(ids, device=self.device_)
        am = torch.zeros_like(x)
        am[0, : len(ids)] = 1
        cpos = torch.arange(len(ctx), len(ids), device=self.device_)
        return x, am, cpos

    def _logits(self, x0, xt, am, out_pos):
        """Logits at out_pos (N, V) of the denoiser given clean x0 and noisy xt."""
        if self.is_block:
            a = None if bool(am.all()) else am.expand_as(x0)
            return self.objective.masked_logits(self.model, x0, xt, a, out_pos)
        a = None if bool(am.all()) else am.expand_as(xt)
        return self.model(xt, attention_mask=a, output_positions=out_pos).logits

    def elbo(self, ctx, cont, samples: Optional[int] = None, seed: Optional[int] = None) -> float:
        """Monte Carlo estimate of the ELBO (a lower bound on log p(cont | ctx))."""
        K = samples or self.mc_samples
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        x0, am, cpos = self._layout(ctx, cont)
        mask_id = self.cfg.mask_token_id
        # groups of continuation positions that share one k: the whole continuation, or per block
        if self.is_block:
            blk = cpos // self.cfg.block_size
            groups = [cpos[blk == b] for b in blk.unique()]
        else:
            groups = [cpos]
        total = 0.0
        for start in range(0, K, self.batch_size_):
            kk = min(self.batch_size_, K - start)
            xt = x0.repeat(kk, 1)
            weight = torch.zeros(xt.shape, dtype=torch.float64, device=self.device_)
            for g in groups:
                n = g.numel()
                # stratified k across all K samples: sample s gets k from stratum s of [0, 1)
                u = (torch.rand(1, generator=gen).item() + torch.arange(start, start + kk) / K) % 1.0
                ks = (u * n).floor().long() + 1
                for r in range(kk):
                    order = torch.randperm(n, generator=gen)[: ks[r]].to(self.device_)
                    xt[r, g[order]] = mask_id
                    weight[r, g[order]] = n / ks[r].item()
            masked = xt == mask_id
            logits = self._logits(x0.expand_as(xt), xt, am, masked).double()
            logits[:, mask_id] = float("-inf")
            logp = logits.log_softmax(-1).gather(-1, x0.expand_as(xt)[masked][:, None])[:, 0]
            total += (logp * weight[masked]).sum().item()
        return total / K

    def _greedy(self, ctx, cont) -> bool:
        x0, am, cpos = self._layout(ctx, cont)
        xt = x0.clone()
        xt[0, cpos] = self.cfg.mask_token_id
        masked = xt == self.cfg.mask_token_id
        logits = self._logits(x0, xt, am, masked)
        logits[:, self.cfg.mask_token_id] = float("-inf")
        return bool((logits.argmax(-1) == x0[masked]).all())

    # -------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False):
        """Requests with the same generation settings are decoded together, `batch_size` at a
        time (a batch gives each request the output it would get alone; tested in test_decode)."""
        from dlm.decode import DecodeConfig, Decoder

        dec = None if self.is_ar else Decoder(self.model)
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
            opts = {**self.decoder_args, **{k: DECODER_ARGS[k](v) for k, v in gk.items() if k in DECODER_ARGS}}
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
            for b in range(0, len(group), 1 if self.is_ar else self.batch_size_):
                chunk = group[b : b + (1 if self.is_ar else self.batch_size_)]
                kw = chunk[0][4]
                if self.is_ar:
                    i, prompt = chunk[0][0], chunk[0][1]
                    outs = [self._ar_generate(prompt, kw["max_new_tokens"], kw["temperature"], self.seed + i)]
                else:
                    res = dec.generate([j[1] for j in chunk], DecodeConfig(**kw), seeds=[self.seed + j[0] for j in chunk])
                    outs = [r.tokens for r in res]
                for (i, _, until, _, _), tokens in zip(chunk, outs):
                    text = self.tok.decode(tokens, skip_special_tokens=True)
                    for s in until:  # token boundaries may hide a stop string: cut on the text too
                        if s and s in text:
                            text = text[: text.index(s)]
                    texts[i] = text
        return texts

    def _ar_generate(self, prompt, max_new, temperature, seed):
        from dlm.sample import sample_ar, strip_after_eos

        res = sample_ar(self.model, prompt, n=1, length=max_new, temperature=temperature, seed=seed)
        return strip_after_eos(res.tokens[0, 1 + len(prompt):].tolist(), self.cfg.eos_token_id)


def exact_elbo(model: DLMEvalModel, ctx: list[int], cont: list[int]) -> float:
    """The ELBO by enumeration over every k and every set of k masked continuation positions
    (whole continuation as one group; for tests of the Monte Carlo estimator on short inputs)."""
    from itertools import combinations

    x0, am, cpos = model._layout(ctx, cont)
    n = len(cont)
    mask_id = model.cfg.mask_token_id
    total = 0.0
    with torch.no_grad():
        for k in range(1, n + 1):
            subsets = list(combinations(range(n), k))
            acc = 0.0
            for S in subsets:
                xt = x0.clone()
                xt[0, cpos[list(S)]] = mask_id
                masked = xt == mask_id
                logits = model._logits(x0, xt, am, masked).double()
                logits[:, mask_id] = float("-inf")
                acc += logits.log_softmax(-1).gather(-1, x0[masked][:, None]).sum().item() * n / k
            total += acc / len(subsets) / n
    return total

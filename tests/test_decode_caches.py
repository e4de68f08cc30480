"""The decoder's caches (exact block caches, approximate prefix / dual caches) against the full
computation, and batches that change between steps: requests joining, leaving, cancelled, and
the batched threshold commit."""

import dataclasses

import pytest
import torch

from dlm.decoding import DecodeConfig, Decoder
from dlm.errors import DLMError

from decode_helpers import BOS, CONF, EOS, MASK, V, WIN, KnownModel, peaked_table, real_model, run
from helpers import SyncCounter

# ---------------------------------------------------------------- caches
@pytest.mark.parametrize("objective", ["bd3lm", "e2d2"])
@pytest.mark.parametrize("unmask,temperature", [("confidence", 0.0), ("threshold", 0.0), ("ancestral", 1.0)])
def test_exact_cache_gives_identical_tokens(objective, unmask, temperature):
    model = real_model(objective, 4, seed=1)
    dec = Decoder(model)
    # different prompt lengths: the batched cached steps pack rows of different lengths
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
    base = DecodeConfig(max_new_tokens=12, unmask=unmask, threshold=0.2, temperature=temperature, seed=3,
                        stop_at_eos=False)
    plain = dec.generate(prompts, base)
    cached = dec.generate(prompts, DecodeConfig(**{**base.__dict__, "cache": "exact"}))
    assert [r.tokens for r in plain] == [r.tokens for r in cached]
    assert [r.stats["nfe"] for r in cached] == [r.stats["nfe"] for r in plain]


def _requests(dec, canvases, prompt_lens, config):
    """Decoder requests whose canvases are set by hand (prompt + answer as given)."""
    reqs = []
    for row, P in zip(canvases, prompt_lens):
        r = dec.new_request(row[1:P].tolist(), dataclasses.replace(config, max_new_tokens=len(row) - P))
        r.canvas[:] = row
        r.host = row.tolist()  # the decoder's host copy of the canvas
        reqs.append(r)
    return reqs


@pytest.mark.parametrize("objective", ["bd3lm", "e2d2"])
def test_exact_cache_logits_match_the_full_computation(objective):
    model = real_model(objective, 4, seed=2)
    dec = Decoder(model)
    canvas = torch.randint(3, MASK, (2, 16))
    canvas[:, 0] = BOS
    canvas[:, 9:] = MASK
    canvas[:, 13] = 7
    canvas[1, 5:] = MASK  # the second request has a shorter prompt: its blocks start earlier
    canvas[1, 10] = 8
    with torch.no_grad():
        full = dec.objective.masked_logits(model, canvas, canvas, None, torch.ones_like(canvas, dtype=torch.bool))
        full = full.view(2, 16, -1)
        reqs = _requests(dec, canvas, [9, 5], DecodeConfig(max_new_tokens=7, cache="exact"))
        partial = []
        for step in range(3):  # the two requests sit in different blocks: batched with padded caches
            for r in reqs:
                r.bi = min(step, len(r.blocks) - 1)
            dec._forward(reqs)
            for i, r in enumerate(reqs):
                lo, hi = r.block
                # the logits that are read: the block's masked columns (the exact cache computes
                # the LM head there only)
                open_ = canvas[i, lo:hi] == MASK
                partial.append(bool(open_.any()) and not bool(open_.all()))
                assert torch.allclose(r.logits[open_], full[i, lo:hi][open_], atol=1e-5), (step, i)
    assert any(partial)  # some blocks hold committed tokens too


def test_approximate_caches_are_exact_at_refresh_and_close_after():
    model = real_model("mdlm", seed=3)
    dec = Decoder(model)
    canvas = torch.randint(3, MASK, (2, 24))
    canvas[:, 0] = BOS
    canvas[:, 8:] = MASK

    def full_logits(c):
        return model(c).logits

    with torch.no_grad():
        for mode in ("prefix", "dual"):
            reqs = _requests(dec, canvas, [8, 8], DecodeConfig(max_new_tokens=16, block_length=8, cache=mode))
            dec._forward(reqs)  # the block's first step: a full forward that keeps the K/V
            first = torch.stack([r.logits for r in reqs])
            assert torch.allclose(first, full_logits(canvas)[:, 8:], atol=1e-5)
            # commit two tokens of the block: the cached K/V of the rest are now stale
            for r in reqs:
                r.canvas[9], r.canvas[12] = 5, 6
                r.s_in_block = 1
            dec._forward(reqs)
            approx = torch.stack([r.logits for r in reqs])
            c2 = torch.stack([r.canvas for r in reqs])
            exact = full_logits(c2)[:, 8 : 8 + approx.shape[1]]
            err = (approx - exact).abs().max().item()
            assert 0 < err < 0.1 * exact.abs().max().item(), (mode, err)
            # with nothing changed the cached step reproduces the refresh exactly
            for r in reqs:
                r.canvas[:] = canvas[0]
            dec._forward(reqs)
            same = torch.stack([r.logits for r in reqs])
            assert torch.allclose(same, first[:, : same.shape[1]], atol=1e-5)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_approximate_caches_decode_batches_like_single_prompts(cache):
    model = real_model("mdlm", seed=4)
    dec = Decoder(model)
    prompts = [[5, 6, 7, 8, 9], [10]]
    cfg = DecodeConfig(max_new_tokens=8, block_length=4, cache=cache, unmask="threshold", threshold=0.3)
    together = dec.generate(prompts, cfg)
    for p, t in zip(prompts, together):
        assert dec.generate([p], cfg)[0].tokens == t.tokens


@pytest.mark.parametrize("objective,block", [("mdlm", None), ("bd3lm", 4), ("e2d2", 4)])
def test_flex_attention_masks_decode_the_sdpa_tokens(objective, block, monkeypatch):
    """attention_backend flex: every cache mode's step masks go to the model as FlexAttention
    block masks (checked: Flex ran, on each step with a mask), and the
    tokens equal SDPA's under the dense masks. Prompts of different lengths, so the batched steps
    carry padding masks."""
    import dlm.layers as layers

    calls = {"flex": 0}
    real = layers._flex_attention

    def counting():
        fn = real()

        def run(*a, **kw):
            calls["flex"] += 1
            return fn(*a, **kw)
        return run

    monkeypatch.setattr(layers, "_flex_attention", counting)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    sdpa = real_model(objective, block=block, seed=3)
    flex = real_model(objective, block=block, seed=3)
    flex.config.attention_backend = "flex"
    assert Decoder(flex).flex and not Decoder(sdpa).flex
    sdpa.config.attention_backend = "auto"  # (SDPA in decode steps until Flex is measured on a GPU)
    assert not Decoder(sdpa).flex
    for cache in Decoder(sdpa).family.caches:
        cfg = DecodeConfig(max_new_tokens=12, unmask="threshold", threshold=0.3, cache=cache, stop_at_eos=False,
                           **({} if block else {"block_length": 4}))
        want = [r.tokens for r in Decoder(sdpa).generate(prompts, cfg)]
        before = calls["flex"]
        got = [r.tokens for r in Decoder(flex).generate(prompts, cfg)]
        assert got == want, cache
        assert calls["flex"] > before, cache


def test_cache_kinds_are_checked():
    with pytest.raises(DLMError, match="exact"):
        Decoder(real_model("mdlm")).generate([[5]], DecodeConfig(cache="exact"))
    with pytest.raises(DLMError, match="dual"):
        Decoder(real_model("bd3lm", 4)).generate([[5]], DecodeConfig(cache="dual"))


def test_finished_rows_leave_the_batch():
    """Row A meets EOS at absolute position 4 (its third answer token); row B, whose answer starts
    at position 6, never does. A leaves as soon as its decided prefix holds EOS (mid-block: its
    fourth slot would be cut anyway); then only B is decoded, and both outputs equal solo runs."""
    win = [5] * 32
    win[4] = EOS
    model = KnownModel(peaked_table(32, win, [0.9]))
    dec = Decoder(model)
    cfg = DecodeConfig(max_new_tokens=8, block_length=4)
    both = dec.generate([[3], [3, 3, 3, 3, 3]], cfg)
    assert model.batch_sizes == [2, 2, 2] + [1] * 5
    assert both[0].tokens == [5, 5] and both[0].finish_reason == "stop"
    assert both[1].tokens == [5] * 8 and both[1].finish_reason == "length"
    for p, r in zip([[3], [3, 3, 3, 3, 3]], both):
        assert dec.generate([p], cfg)[0].tokens == r.tokens


@pytest.mark.parametrize("objective,block,cache", [("mdlm", None, "dual"), ("mdlm", None, "prefix"),
                                                    ("bd3lm", 4, "exact"), ("e2d2", 4, "exact")])
def test_row_removal_keeps_caches_consistent(objective, block, cache):
    """Random models with EOS made likely: rows finish at different blocks; each output still
    equals its solo run with the same cache."""
    model = real_model(objective, block, seed=5)
    with torch.no_grad():
        model.lm_head.weight[EOS] += 0.5 * model.lm_head.weight.abs().mean() * torch.randn_like(model.lm_head.weight[EOS])
    dec = Decoder(model)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]] if block else [[5, 6], [7], [8, 9, 10]]
    cfg = DecodeConfig(max_new_tokens=16, block_length=None if block else 4, cache=cache, temperature=1.0)
    together = dec.generate(prompts, cfg, seeds=[1, 2, 3])
    for p, sd, t in zip(prompts, [1, 2, 3], together):
        assert dec.generate([p], cfg, seeds=[sd])[0].tokens == t.tokens


@pytest.mark.parametrize("objective,block,cache", [("mdlm", None, "none"), ("mdlm", None, "dual"),
                                                   ("mdlm", None, "prefix"), ("bd3lm", 4, "exact"),
                                                   ("bd3lm", 4, "none"), ("e2d2", 4, "exact")])
def test_requests_join_and_leave_between_steps(objective, block, cache):
    """A scheduler adds requests while others are mid-way (other prompt lengths, block positions
    and policies): each output equals the request decoded alone, and the steps are shared."""
    model = real_model(objective, block, seed=5)
    dec = Decoder(model)
    cfg_a = DecodeConfig(max_new_tokens=8, block_length=4 if objective == "mdlm" else None, cache=cache,
                         unmask="threshold", threshold=0.3)
    cfg_b = dataclasses.replace(cfg_a, unmask="confidence", max_new_tokens=12, temperature=1.0)
    alone_a = dec.generate([[5, 6, 7]], cfg_a, seeds=[1])[0].tokens
    alone_b = dec.generate([[9]], cfg_b, seeds=[2])[0].tokens
    a = dec.new_request([5, 6, 7], cfg_a, seed=1)
    b = dec.new_request([9], cfg_b, seed=2)
    live = [a]
    model_calls = []
    dec.step(live)
    dec.step(live)
    live.append(b)
    while True:
        stepped = dec.step(live)
        if not stepped:
            break
        model_calls.append(len(stepped))
    assert a.result.tokens == alone_a and b.result.tokens == alone_b
    assert 2 in model_calls  # they did share steps


def test_cancel_frees_the_request():
    dec = Decoder(real_model("mdlm", seed=6))
    r = dec.new_request([5, 6], DecodeConfig(max_new_tokens=8, cache="dual", block_length=4))
    dec.step([r])
    assert r.cache.kv is not None  # the dual cache's K/V of the canvas
    dec.cancel(r)
    assert r.finished and r.result.finish_reason == "cancelled" and r.cache.kv is None
    assert dec.step([r]) == []
    # the exact cache's slab slot goes back for the next request
    dec = Decoder(real_model("bd3lm", 4, seed=6))
    r = dec.new_request([5, 6, 7, 8, 9], DecodeConfig(max_new_tokens=8, cache="exact"))
    dec.step([r])
    dec.step([r])
    slot = r.cache.slot
    assert slot is not None
    dec.cancel(r)
    assert r.cache.slot is None and dec.backends["exact"].slab.free == [slot]


@pytest.mark.parametrize("objective,block,cache", [("mdlm", None, "none"), ("mdlm", None, "dual"),
                                                   ("mdlm", None, "prefix"), ("bd3lm", 4, "exact"),
                                                   ("e2d2", 4, "exact")])
def test_batched_greedy_threshold_commit_equals_per_request(objective, block, cache, monkeypatch):
    """The batched commit for greedy threshold requests makes exactly the per-request decisions,
    also with requests joining mid-way (different prompt lengths and block positions)."""
    model = real_model(objective, block, seed=7)
    with torch.no_grad():  # confident enough that the thresholds below split the positions
        model.lm_head.weight.mul_(40.0)
    dec = Decoder(model)
    cfg = DecodeConfig(max_new_tokens=12, block_length=4 if objective == "mdlm" else None, cache=cache,
                       unmask="threshold", threshold=0.3)
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13, 14, 15], [4, 4]]

    def run():
        reqs = [dec.new_request(p, dataclasses.replace(cfg, threshold=0.3 + 0.2 * i), seed=i)
                for i, p in enumerate(prompts)]
        live, steps = reqs[:2], 0
        while True:
            if steps == 2:
                live += reqs[2:]
            if not dec.step(live):
                break
            steps += 1
        return [r.result.tokens for r in reqs]

    from dlm.decoding.policies import Threshold

    calls = []
    real = Threshold.commit_batched
    monkeypatch.setattr(Threshold, "commit_batched", staticmethod(lambda rs, m: calls.append(len(rs)) or real(rs, m)))
    batched = run()
    assert calls and max(calls) == 4
    assert any(len(set(t)) > 1 for t in batched)  # not a degenerate run
    monkeypatch.setattr(Threshold, "batchable", classmethod(lambda cls, r: False))
    assert run() == batched


def test_stop_sequences_cut_at_the_earliest_occurrence_whatever_their_order():
    from dlm.decoding.stopping import cut_output as _cut_output

    toks = [4, 7, 8, 9, 5]
    for stop in ([[7, 8, 9], [8]], [[8], [7, 8, 9]]):
        assert _cut_output(toks, DecodeConfig(stop=stop), EOS) == ([4], "stop")
    assert _cut_output([4, 7, EOS, 8], DecodeConfig(stop=[[EOS, 8]]), EOS) == ([4, 7], "stop")
    assert _cut_output([4, 7], DecodeConfig(stop=[[7, 8]]), EOS) == ([4, 7], "length")


def test_a_request_stops_once_its_decided_prefix_fixes_the_output():
    """EOS in the decided prefix stops it mid-block; a stop sequence only when no longer one could
    still start before it and finish among the undecided slots."""
    from dlm.decoding.stopping import decided

    def stopped(tokens, config):
        return decided(tokens, config, EOS, MASK)

    assert stopped([4, EOS, MASK, MASK], DecodeConfig())
    assert not stopped([4, MASK, EOS], DecodeConfig())  # the MASK could still be anything
    assert not stopped([4, EOS, MASK], DecodeConfig(stop_at_eos=False))
    stop = [[8], [7, 8, 9]]
    assert not stopped([4, 7, 8, MASK, MASK], DecodeConfig(stop=stop))  # 7 8 9 may still come
    assert stopped([4, 7, 8, 5, MASK], DecodeConfig(stop=stop))
    assert stopped([4, 8, 5, 5, MASK], DecodeConfig(stop=stop))
    # and decoding with stop sequences gives what the full canvas, cut afterwards, gives
    win = [5] * 32
    win[4:7] = [7, 8, 9]
    model = KnownModel(peaked_table(32, win, [0.9]))
    cfg = DecodeConfig(max_new_tokens=8, block_length=8, stop=stop)
    out = Decoder(model).generate([[3]], cfg)[0]
    full = Decoder(model).generate([[3]], dataclasses.replace(cfg, stop=(), stop_at_eos=False))[0]
    assert out.tokens == full.tokens[:2] == [5, 5] and out.finish_reason == "stop"
    assert out.stats["nfe"] < full.stats["nfe"]


def test_output_reuse_when_nothing_changed():
    """Ancestral steps that reveal nothing reuse the last network output (RADD's caching): fewer
    forwards than steps, same tokens. Statistics split the wall time into forward and the rest."""
    model = KnownModel(peaked_table(32, WIN, CONF))
    steps = []
    res = Decoder(model).generate([[3]], DecodeConfig(max_new_tokens=8, unmask="ancestral", steps=64),
                                  on_step=lambda rows, answers: steps.append(1))[0]
    assert res.tokens == [WIN[(2 + i) % 8] for i in range(8)]
    assert model.calls == res.stats["nfe"] <= 8 < len(steps)  # at most one call per revealing step
    st = res.stats
    assert 0 <= st["forward_s"] <= st["wall_s"] and st["other_s"] == pytest.approx(st["wall_s"] - st["forward_s"])
    assert st["tokens_per_forward"] == pytest.approx(8 / st["nfe"])


@pytest.mark.parametrize("objective,block", [("mdlm", None), ("bd3lm", 4)])
def test_a_request_whose_forward_fails_fails_alone(objective, block):
    """The batched forward raises when one request's canvas holds a poisoned token: the decoder
    runs each request alone, that one finishes with finish_reason "error" and its exception,
    the others decode exactly as without it."""
    model = real_model(objective, block)
    poison = 17

    class Poisoned(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, *a, **kw):
            if bool((input_ids == poison).any()):
                raise RuntimeError("poisoned canvas")
            return self.inner(input_ids, *a, **kw)

    cfg = DecodeConfig(max_new_tokens=8, unmask="threshold", threshold=0.5,
                       cache="exact" if block else "none")
    good = [[5, 6], [7, 8, 9]]
    alone = Decoder(model).generate(good, cfg)
    res = Decoder(Poisoned(model)).generate([good[0], [4, poison], good[1]], cfg, seeds=[0, 1, 1],
                                            raise_errors=False)
    assert res[1].finish_reason == "error" and "poisoned" in str(res[1].error) and res[1].tokens == []
    assert [res[0].tokens, res[2].tokens] == [alone[0].tokens, alone[1].tokens]
    with pytest.raises(RuntimeError, match="poisoned"):
        Decoder(Poisoned(model)).generate([[4, poison]], cfg)


def _count_syncs(dec, prompts, config, join_at=2):
    """Step requests by hand (half of them join after `join_at` steps, so some steps add clean
    blocks and pack rows of different lengths) and count each step's syncs."""
    reqs = [dec.new_request(p, config, seed=i) for i, p in enumerate(prompts)]
    first, later = reqs[: len(reqs) // 2], reqs[len(reqs) // 2 :]
    per_step, live, n = [], list(first), 0
    while True:
        if n == join_at:
            live += later
        with SyncCounter() as sc:
            stepped = dec.step(live)
        if not stepped:
            break
        per_step.append(sc.calls)
        n += 1
    return reqs, per_step


@pytest.mark.parametrize("kind,cache", [("bd3lm", "exact"), ("bd3lm", "none"), ("e2d2", "exact"), ("mdlm", "none"),
                                        ("mdlm", "prefix"), ("mdlm", "dual"), ("fast_dllm_v2", "exact")])
def test_a_greedy_threshold_step_syncs_with_the_host_once(kind, cache, tmp_path):
    """The GPU-grade step (issue 18): on the greedy threshold path a step reads the device once
    (the canvases, copied to the host together for the next step's checks and streaming), with
    requests joining mid-way, prompts of different lengths, blocks finishing, and a family whose
    logits come one position late. The tokens are those of `generate`."""
    if kind == "fast_dllm_v2":
        from published import write_qwen

        from dlm import load_model

        write_qwen(str(tmp_path), "fast_dllm_v2", seed=7)
        model = load_model(str(tmp_path))
        model.config.mask_token_id = 93  # its tiny config has no mask token: use the last id
    else:
        model = real_model(kind, None if kind == "mdlm" else 4, seed=1)
    dec = Decoder(model)
    config = DecodeConfig(max_new_tokens=12, unmask="threshold", threshold=0.3, cache=cache, stop_at_eos=False,
                          block_length=None if kind != "mdlm" else 4)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [21, 22, 23]]
    reqs, per_step = _count_syncs(dec, prompts, config)
    assert len(per_step) > 4
    assert all(calls == ["tolist"] for calls in per_step), per_step
    want = Decoder(model).generate(prompts, config)
    assert [r.result.tokens for r in reqs] == [w.tokens for w in want]


def test_the_sync_counter_sees_the_per_request_path():
    """The counter is not blind: a sampled step (per-request commits) reads the device many times."""
    dec = Decoder(real_model("bd3lm", 4, seed=1))
    config = DecodeConfig(max_new_tokens=8, unmask="confidence", temperature=1.0, cache="exact", stop_at_eos=False)
    _, per_step = _count_syncs(dec, [[5, 6], [7, 8, 9]], config, join_at=0)
    assert max(len(c) for c in per_step) > 2


@pytest.mark.slow
def test_a_compiled_model_decodes_the_eager_tokens():
    """--compile (dlm.runtime.compile_model: torch.compile, dynamic shapes): the dual cache's
    prefix, refresh and block calls of changing lengths give the eager model's tokens."""
    from decode_helpers import real_model

    from dlm.runtime import compile_model

    cfg = DecodeConfig(max_new_tokens=16, unmask="threshold", threshold=0.3, cache="dual", block_length=8,
                       temperature=0.0, stop_at_eos=False)
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14]]
    want = [r.tokens for r in Decoder(real_model("mdlm")).generate(prompts, cfg)]
    from torch._dynamo.utils import counters

    counters.clear()
    model = compile_model(real_model("mdlm"))
    assert model.compiled and want == [r.tokens for r in Decoder(model).generate(prompts, cfg)]
    assert counters["stats"]["unique_graphs"] > 0  # compiled graphs ran, not eager


@pytest.mark.slow
def test_a_model_compiled_for_graphs_decodes_the_eager_tokens():
    """compile_model(graphs=True) (on CUDA by default: CUDA graphs): the exact cache's block steps
    go through `graph_forward` in bucketed shapes and give the eager model's tokens."""
    from dlm.runtime import compile_model

    cfg = DecodeConfig(max_new_tokens=8, unmask="threshold", threshold=0.3, cache="exact", stop_at_eos=False)
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    want = [r.tokens for r in Decoder(real_model("bd3lm", 4, seed=1)).generate(prompts, cfg)]
    model = compile_model(real_model("bd3lm", 4, seed=1), graphs=True)
    calls = []
    graph = model.graph_forward
    model.graph_forward = lambda *a, **kw: calls.append(1) or graph(*a, **kw)
    dec = Decoder(model)
    assert dec.static_shapes and want == [r.tokens for r in dec.generate(prompts, cfg)]
    assert calls


def test_bucket_sizes():
    from dlm.decoding.caches import bucket

    assert [bucket(n) for n in (0, 1, 2, 3, 5, 16, 17)] == [0, 1, 2, 4, 8, 16, 32]
    assert [bucket(n, 64) for n in (0, 1, 64, 65, 130, 300)] == [0, 64, 64, 128, 256, 512]
    assert [bucket(n, 4) for n in (0, 3, 4, 9)] == [0, 4, 4, 16]


@pytest.mark.parametrize("kind", ["bd3lm", "fast_dllm_v2"])
def test_static_shapes_decode_the_same_tokens(kind, tmp_path):
    """The exact cache's block steps in bucketed shapes (padded rows, cache and clean lengths;
    what CUDA graphs capture) give the dynamic steps' tokens, with requests joining mid-way, and
    the shapes the network saw are a few buckets."""
    if kind == "fast_dllm_v2":
        from published import write_qwen

        from dlm import load_model

        write_qwen(str(tmp_path), "fast_dllm_v2", seed=7)
        model = load_model(str(tmp_path))
        model.config.mask_token_id = 93
    else:
        model = real_model(kind, 4, seed=1)
    shapes = []
    model.register_forward_pre_hook(lambda m, args, kw: shapes.append((tuple(args[0].shape), kw["cache"].length)),
                                    with_kwargs=True)
    config = DecodeConfig(max_new_tokens=12, unmask="threshold", threshold=0.3, cache="exact", stop_at_eos=False)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [21, 22, 23], [24]]
    want, _ = _count_syncs(Decoder(model, static_shapes=False), prompts, config)
    n_dynamic = len(set(shapes))
    shapes.clear()
    got, per_step = _count_syncs(Decoder(model, static_shapes=True), prompts, config)
    assert [r.result.tokens for r in got] == [r.result.tokens for r in want]
    assert all(calls == ["tolist"] for calls in per_step)
    bs = model.config.block_size
    for (rows, width), cached in shapes:
        assert rows in (1, 2, 4, 8) and (width - bs) in (0, bs, 2 * bs, 4 * bs) and cached in (0, 64, 128), (rows, width, cached)
    assert len(set(shapes)) <= n_dynamic and any(w > bs for (_, w), _ in shapes) and any(r > 1 for (r, _), _ in shapes)

"""The decoder's policies against a hand-built model whose logits are known, plus batching,
seeds, stopping and bad input on real (tiny, random) models."""

import dataclasses
import math

import pytest
import torch

from dlm.decode import (
    DecodeConfig,
    Decoder,
    TokenChooser,
    filter_logits,
    prophet_threshold,
    select_factor,
    select_threshold,
)
from dlm.errors import DLMError
from dlm.model import DLMConfig, DLMModel

V, BOS, EOS, PAD, MASK = 32, 0, 1, 2, 31


class KnownModel(torch.nn.Module):
    """Logits depend only on the absolute position: row p of `table`. So the token each position
    ends up with, and how confident the model is about it, are known in advance."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = DLMConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                mask_token_id=MASK, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                                max_position_embeddings=table.shape[0])
        self.calls = 0
        self.batch_sizes = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        self.calls += 1
        self.batch_sizes.append(input_ids.shape[0])
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1])[None].expand(input_ids.shape[0], -1)
        logits = self.table[position_ids]
        if kw.get("output_positions") is not None:  # like DLMModel: only there, flattened
            logits = logits[kw["output_positions"]]
        return type("Out", (), {"logits": logits})()


def peaked_table(n_pos: int, winners: list[int], probs: list[float]) -> torch.Tensor:
    """Position p: token winners[p] with probability probs[p], the rest spread evenly (no MASK)."""
    t = torch.full((n_pos, V), -1e9)
    for p in range(n_pos):
        w, q = winners[p % len(winners)], probs[p % len(probs)]
        rest = (1 - q) / (V - 2)
        t[p, :MASK] = math.log(rest)
        t[p, w] = math.log(q)
    return t


class Recorder(TokenChooser):
    """The default chooser, also recording the masked positions it was asked about at each step."""

    log: list = []

    def choose(self, logits, rows, positions, canvas, generators):
        Recorder.log.append(sorted(positions.tolist()))
        return super().choose(logits, rows, positions, canvas, generators)


def commit_order(log: list) -> list:
    """Positions committed at each step, from the masked sets before each step."""
    out = []
    for a, b in zip(log, log[1:] + [[]]):
        out.append(sorted(set(a) - set(b)))
    return out


def run(model, prompt, cfg, record=False):
    Recorder.log = []
    factory = (lambda c: Recorder(c, MASK)) if record else None
    return Decoder(model, chooser_factory=factory).generate([prompt], cfg)[0]


# ---------------------------------------------------------------- policies
WIN = [5, 6, 7, 8, 9, 10, 11, 12]
CONF = [0.5, 0.97, 0.6, 0.99, 0.7, 0.3, 0.95, 0.8]


def test_greedy_takes_the_argmax_of_every_position():
    model = KnownModel(peaked_table(32, WIN, CONF))
    res = run(model, [3, 4], DecodeConfig(max_new_tokens=8))
    # prompt = BOS + 2 tokens: generation starts at position 3
    assert res.tokens == [WIN[(3 + i) % 8] for i in range(8)]
    assert res.finish_reason == "length" and res.stats["nfe"] == 8  # one token per step


def test_confidence_policy_commits_most_confident_first():
    model = KnownModel(peaked_table(32, WIN, CONF))
    run(model, [3], DecodeConfig(max_new_tokens=8), record=True)
    order = commit_order(Recorder.log)
    expect = sorted(range(2, 10), key=lambda p: -CONF[p % 8])
    assert [o[0] for o in order] == expect


def test_margin_and_entropy_policies_follow_their_scores():
    model = KnownModel(peaked_table(32, WIN, CONF))
    for policy in ("margin", "entropy"):
        run(model, [3], DecodeConfig(max_new_tokens=8, unmask=policy), record=True)
        order = [o[0] for o in commit_order(Recorder.log)]
        # one peak + flat rest: margin and -entropy are both increasing in the peak probability
        assert order == sorted(range(2, 10), key=lambda p: -CONF[p % 8]), policy


def test_fixed_k_by_steps():
    model = KnownModel(peaked_table(32, WIN, CONF))
    res = run(model, [3], DecodeConfig(max_new_tokens=8, steps=2), record=True)
    assert res.stats["nfe"] == 2 and [len(o) for o in commit_order(Recorder.log)] == [4, 4]


def test_threshold_policy():
    model = KnownModel(peaked_table(32, WIN, CONF))
    res = run(model, [3], DecodeConfig(max_new_tokens=8, unmask="threshold", threshold=0.9), record=True)
    order = commit_order(Recorder.log)
    high = [p for p in range(2, 10) if CONF[p % 8] >= 0.9]
    assert order[0] == sorted(high)  # all confident ones at once
    assert all(len(o) == 1 for o in order[1:])  # then the single best each step
    assert res.stats["nfe"] == 1 + (8 - len(high))
    assert res.tokens == [WIN[(2 + i) % 8] for i in range(8)]


def test_factor_rule_matches_its_definition():
    conf = torch.tensor([0.99, 0.95, 0.9, 0.6, 0.3])
    # (n+1)(1-c_n): n=1: 2*0.01=0.02, n=2: 3*0.05=0.15, n=3: 4*0.1=0.4, n=4: 5*0.4=2.0 -> with f=1, n=3
    assert select_factor(conf, 1.0).tolist() == [True, True, True, False, False]
    assert select_factor(torch.tensor([0.2, 0.1]), 1.0).tolist() == [True, False]  # at least one
    assert select_threshold(torch.tensor([0.2, 0.5]), 0.9).tolist() == [False, True]


def test_random_policy_is_seeded():
    model = KnownModel(peaked_table(32, WIN, CONF))
    run(model, [3], DecodeConfig(max_new_tokens=8, unmask="random", seed=1), record=True)
    a = commit_order(Recorder.log)
    run(model, [3], DecodeConfig(max_new_tokens=8, unmask="random", seed=1), record=True)
    assert commit_order(Recorder.log) == a
    run(model, [3], DecodeConfig(max_new_tokens=8, unmask="random", seed=2), record=True)
    assert commit_order(Recorder.log) != a


def test_ancestral_policy_reveals_everything_in_its_steps():
    model = KnownModel(peaked_table(32, WIN, CONF))
    res = run(model, [3], DecodeConfig(max_new_tokens=8, unmask="ancestral", steps=4))
    assert res.tokens == [WIN[(2 + i) % 8] for i in range(8)]
    assert res.stats["nfe"] <= 4


def test_first_hitting_reveals_one_random_mask_per_step():
    model = KnownModel(peaked_table(32, WIN, CONF))
    res = run(model, [3], DecodeConfig(max_new_tokens=8, unmask="first_hitting", seed=3), record=True)
    order = commit_order(Recorder.log)
    assert res.stats["nfe"] == 8 and all(len(o) == 1 for o in order)
    assert res.tokens == [WIN[(2 + i) % 8] for i in range(8)]  # greedy: the known argmax
    orders = set()
    for seed in range(12):
        run(model, [3], DecodeConfig(max_new_tokens=8, unmask="first_hitting", seed=seed), record=True)
        orders.add(tuple(o[0] for o in commit_order(Recorder.log)))
    confident = tuple(sorted(range(2, 10), key=lambda p: -CONF[p % 8]))
    assert len(orders) >= 10 and confident not in orders  # random order, not by confidence
    run(model, [3], DecodeConfig(max_new_tokens=8, unmask="first_hitting", seed=3), record=True)
    assert commit_order(Recorder.log) == order  # seeded


class TimedModel(KnownModel):
    """A time-conditioned KnownModel that records the noise level of every call."""

    def __init__(self, table):
        super().__init__(table)
        self.config.time_conditioning = True
        self.sigmas = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, sigma=None, **kw):
        self.sigmas.append(sigma.double().clone())
        return super().forward(input_ids, attention_mask, position_ids, **kw)


def test_first_hitting_calls_the_network_at_the_sampled_hitting_times():
    """With n masks left at time t, the next reveal happens at tau = t * u^(1/n): so the
    network's times fall at every call and -n log(tau / t) is Exp(1) distributed."""
    from dlm.noise import LogLinearSchedule

    eps = LogLinearSchedule().eps
    model = TimedModel(peaked_table(32, WIN, CONF))
    draws = []
    for seed in range(60):
        model.sigmas = []
        run(model, [3], DecodeConfig(max_new_tokens=8, unmask="first_hitting", temperature=1.0, seed=seed,
                                     stop_at_eos=False))  # one call per token: no early stop
        times = [float((1 - torch.exp(-s)) / (1 - eps)) for s in model.sigmas]
        assert len(times) == 8 and all(b < a for a, b in zip(times, times[1:]) if b > 1.01e-3)
        prev = 1.0
        for n, t in zip(range(8, 0, -1), times):
            if t <= 1.01e-3:  # the decoder clamps t at 1e-3
                break
            draws.append(-n * math.log(t / prev))
            prev = t
    draws = torch.tensor(draws)
    assert len(draws) > 300
    assert abs(float(draws.mean()) - 1.0) < 0.15  # Exp(1): mean 1
    assert abs(float((draws < math.log(2)).double().mean()) - 0.5) < 0.08  # median ln 2
    # the masked fraction (what the other policies pass) would give (n - 1) / 8 exactly
    model.sigmas = []
    run(model, [3], DecodeConfig(max_new_tokens=8, unmask="random"))
    times = [float((1 - torch.exp(-s)) / (1 - eps)) for s in model.sigmas]
    assert times[:3] == pytest.approx([1.0, 7 / 8, 6 / 8], abs=1e-5)


def test_semi_autoregressive_blocks_go_left_to_right():
    model = KnownModel(peaked_table(32, WIN, CONF))
    run(model, [3], DecodeConfig(max_new_tokens=8, block_length=4), record=True)
    order = [o[0] for o in commit_order(Recorder.log)]
    assert set(order[:4]) == {2, 3, 4, 5} and set(order[4:]) == {6, 7, 8, 9}


def test_prophet_early_commit_fills_the_block_or_answer():
    # logit gaps of ~ln(0.99 / 0.0003) ~ 8 > 7.5: commit everything at the first step
    model = KnownModel(peaked_table(32, WIN, [0.99]))
    res = run(model, [3], DecodeConfig(max_new_tokens=8, block_length=4, early_commit=True))
    assert res.stats["nfe"] == 2 and res.tokens == [WIN[(2 + i) % 8] for i in range(8)]
    res = run(model, [3], DecodeConfig(max_new_tokens=8, block_length=4, early_commit=True,
                                       early_commit_scope="answer"))
    assert res.stats["nfe"] == 1 and res.tokens == [WIN[(2 + i) % 8] for i in range(8)]
    # gap ln(0.3 / (0.7 / 30)) = 2.55: only the last third's threshold (2.5) lets it through, at
    # step 6 of 8 (progress 0.75); a gap of ln(0.2 / (0.8 / 30)) = 2.01 never does
    model = KnownModel(peaked_table(32, WIN, [0.3]))
    assert run(model, [3], DecodeConfig(max_new_tokens=8, early_commit=True)).stats["nfe"] == 6
    model = KnownModel(peaked_table(32, WIN, [0.2]))
    assert run(model, [3], DecodeConfig(max_new_tokens=8, early_commit=True)).stats["nfe"] == 8
    assert prophet_threshold(0.1) == 7.5 and prophet_threshold(0.5) == 5.0 and prophet_threshold(0.9) == 2.5


# ---------------------------------------------------------------- sampling
def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 1.0, 2, None)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, 1.0, None, 0.8)[0])
    assert kept.tolist() == [True, True, False, False]
    kept = ~torch.isinf(filter_logits(logits, 1.0, None, 0.81)[0])
    assert kept.tolist() == [True, True, True, False]


def test_temperature_sampling_follows_the_distribution():
    q = 0.7
    model = KnownModel(peaked_table(8, [5], [q]))
    hits = 0
    for seed in range(200):
        res = run(model, [3], DecodeConfig(max_new_tokens=1, temperature=1.0, seed=seed))
        hits += res.tokens[0] == 5
    assert abs(hits / 200 - q) < 0.1


# ---------------------------------------------------------------- stopping
def test_eos_stops_and_is_not_output():
    win = [5, 6, 7, EOS, 9, 10, 11, 12]
    model = KnownModel(peaked_table(32, win, [0.9]))
    res = run(model, [3], DecodeConfig(max_new_tokens=8, block_length=4))
    # positions 2,3 -> 7, EOS: cut there
    assert res.tokens == [7] and res.finish_reason == "stop"
    assert res.stats["nfe"] == 4  # the second block is never generated


def test_stop_sequences():
    model = KnownModel(peaked_table(32, WIN, [0.9]))
    res = run(model, [3], DecodeConfig(max_new_tokens=8, stop=[[9, 10]]))
    assert res.tokens == [7, 8] and res.finish_reason == "stop"


# ---------------------------------------------------------------- real models
def real_model(objective="mdlm", block=None, seed=0):
    torch.manual_seed(seed)
    extra = {"num_hidden_layers": 1, "num_decoder_layers": 1} if objective == "e2d2" else {}
    cfg = DLMConfig.from_preset("debug", vocab_size=V, mask_token_id=MASK, bos_token_id=BOS, eos_token_id=EOS,
                                pad_token_id=PAD, objective=objective, block_size=block,
                                attention_backend="sdpa", **extra)
    return DLMModel(cfg).eval()


@pytest.mark.parametrize("objective,block", [("mdlm", None), ("radd", None), ("bd3lm", 4), ("e2d2", 4)])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_with_different_prompt_lengths_equals_each_alone(objective, block, temperature):
    model = real_model(objective, block)
    prompts = [[5, 6, 7, 8, 9], [10], [11, 12, 13]]
    cfg = DecodeConfig(max_new_tokens=8, block_length=None if block else 4, temperature=temperature, seed=7)
    dec = Decoder(model)
    together = dec.generate(prompts, cfg, seeds=[3, 4, 5])
    for p, s, t in zip(prompts, [3, 4, 5], together):
        alone = dec.generate([p], cfg, seeds=[s])[0]
        assert alone.tokens == t.tokens, (p, alone.tokens, t.tokens)


def test_bad_input_gets_clear_errors():
    model = real_model()
    dec = Decoder(model)
    with pytest.raises(DLMError, match="empty"):
        dec.generate([[]], DecodeConfig())
    with pytest.raises(DLMError, match="max_new_tokens"):
        dec.generate([[5]], DecodeConfig(max_new_tokens=0))
    with pytest.raises(DLMError, match="does not divide"):
        dec.generate([[5]], DecodeConfig(max_new_tokens=10, block_length=4))
    for tau in (0.0, 1.5, -1):
        with pytest.raises(DLMError, match="threshold"):
            dec.generate([[5]], DecodeConfig(threshold=tau))
    with pytest.raises(DLMError, match="context"):
        dec.generate([[5] * 1000], DecodeConfig(max_new_tokens=64))
    with pytest.raises(DLMError, match="unmask"):
        dec.generate([[5]], DecodeConfig(unmask="best"))
    with pytest.raises(DLMError, match="token ids"):
        dec.generate([[V + 5]], DecodeConfig())
    with pytest.raises(DLMError, match="HF generate"):
        Decoder(real_model("ar"))


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
        for step in range(3):  # the two requests sit in different blocks: batched with padded caches
            for r in reqs:
                r.bi = min(step, len(r.blocks) - 1)
            dec._forward(reqs)
            for i, r in enumerate(reqs):
                lo, hi = r.block
                assert torch.allclose(r.logits, full[i, lo:hi], atol=1e-5), (step, i)


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
    assert r.st.get("kv") is not None
    dec.cancel(r)
    assert r.finished and r.result.finish_reason == "cancelled" and r.st.get("kv") is None
    assert dec.step([r]) == []


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

    calls = []
    real = Decoder._commit_greedy_threshold
    monkeypatch.setattr(Decoder, "_commit_greedy_threshold", lambda self, rs: calls.append(len(rs)) or real(self, rs))
    batched = run()
    assert calls and max(calls) == 4
    assert any(len(set(t)) > 1 for t in batched)  # not a degenerate run
    monkeypatch.setattr(Decoder, "_greedy_threshold", staticmethod(lambda r: False))
    assert run() == batched


def test_stop_sequences_cut_at_the_earliest_occurrence_whatever_their_order():
    from dlm.decode import _cut_output

    toks = [4, 7, 8, 9, 5]
    for stop in ([[7, 8, 9], [8]], [[8], [7, 8, 9]]):
        assert _cut_output(toks, DecodeConfig(stop=stop), EOS) == ([4], "stop")
    assert _cut_output([4, 7, EOS, 8], DecodeConfig(stop=[[EOS, 8]]), EOS) == ([4, 7], "stop")
    assert _cut_output([4, 7], DecodeConfig(stop=[[7, 8]]), EOS) == ([4, 7], "length")


def test_a_request_stops_once_its_decided_prefix_fixes_the_output():
    """EOS in the decided prefix stops it mid-block; a stop sequence only when no longer one could
    still start before it and finish among the undecided slots."""
    dec = Decoder(KnownModel(peaked_table(32, [5] * 32, [0.9])))
    stopped = dec._stopped
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

"""The decoder's policies against a hand-built model whose logits are known, plus batching,
seeds, stopping and bad input on real (tiny, random) models."""

import math

import pytest
import torch

from dlm.decoding import DecodeConfig, Decoder
from dlm.decoding.policies import prophet_threshold, select_factor, select_threshold
from dlm.decoding.sampling import filter_logits
from dlm.errors import DLMError

from decode_helpers import BOS, CONF, EOS, V, WIN, KnownModel, Recorder, commit_order, peaked_table, real_model, run

# ---------------------------------------------------------------- policies


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
    with pytest.raises(DLMError, match="ARDecoder"):
        Decoder(real_model("ar"))
    # answer-scope early commit needs the whole answer's logits: not with the dual / exact caches
    with pytest.raises(DLMError, match="scope 'answer'.*dual"):
        dec.generate([[5]], DecodeConfig(max_new_tokens=8, block_length=4, cache="dual", early_commit=True,
                                         early_commit_scope="answer"))
    with pytest.raises(DLMError, match="early_commit_gaps"):
        dec.generate([[5]], DecodeConfig(early_commit=True, early_commit_gaps=(1.0, 2.0)))
    with pytest.raises(DLMError, match="blocks of 4"):
        Decoder(real_model("bd3lm", 4)).generate([[5]], DecodeConfig(max_new_tokens=8, block_length=8))


def test_a_new_unmask_rule_is_one_class(monkeypatch):
    """The policy registry is the extension point: a class with `select` (here: commit the
    leftmost masked position), registered under a name, decodes through every path unchanged."""
    import dlm.decoding.policies as P

    class Leftmost(P.UnmaskPolicy):
        name = "leftmost"

        def select(self, view):
            sel = torch.zeros(view.conf.numel(), dtype=torch.bool)
            sel[0] = True
            return sel

    monkeypatch.setitem(P.POLICIES, "leftmost", Leftmost)  # registered: every entry point takes it
    from dlm.cli.parser import build_parser

    assert build_parser().parse_args(["generate", "M", "--prompt", "x", "--unmask", "leftmost"]).unmask == "leftmost"
    table = peaked_table(16, WIN, CONF)
    res = run(KnownModel(table), [3], DecodeConfig(max_new_tokens=8, unmask="leftmost"), record=True)
    assert commit_order(Recorder.log) == [[p] for p in range(2, 10)]  # left to right, one per step
    assert res.tokens == [WIN[p % len(WIN)] for p in range(2, 10)]

"""The math of the objectives against slow, loop-based reference computations."""

import math

import pytest
import torch
from helpers import SyncCounter, UniformModel

from dlm.model import DLMConfig, DLMModel
from dlm.noise import (
    LogLinearSchedule,
    bernoulli_mask,
    exact_k_mask,
    low_discrepancy_times,
    scored_positions,
)
from dlm.objectives import MDLM, RADD, make_objective, subs_log_probs

V, MASK = 50, 49


def tiny(objective="mdlm", **kw):
    torch.manual_seed(0)
    cfg = DLMConfig.from_preset("debug", vocab_size=V, mask_token_id=MASK, bos_token_id=0, eos_token_id=1,
                                pad_token_id=2, objective=objective, **kw)
    return DLMModel(cfg).eval()


# ---------------------------------------------------------------- schedule and masking
def test_log_linear_schedule():
    s = LogLinearSchedule(eps=1e-3)
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(s.alpha(t), torch.tensor([1.0, 1 - 0.999 * 0.25, 1e-3]))
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(s.loss_weight(t), 1 / t)  # -alpha'/(1-alpha) = 1/t for this schedule
    assert torch.allclose(s.sigma(t), -torch.log(s.alpha(t)))


def test_low_discrepancy_times_one_per_stratum():
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 64):
        t = low_discrepancy_times(n, g, 0.2, 0.8)
        assert t.min() >= 0.2 and t.max() <= 0.8
        strata = ((t - 0.2) / 0.6 * n).floor().clamp(max=n - 1).long()
        assert sorted(strata.tolist()) == list(range(n))


def test_bernoulli_mask_rate_and_bos_protected():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 40, (64, 200))
    maskable = scored_positions(x, None)
    p = torch.linspace(0.05, 0.95, 64)
    m = bernoulli_mask(torch.rand(64, 200, generator=g), p, maskable)
    assert not m[:, 0].any()
    rates = m[:, 1:].float().mean(1)
    assert (rates - p).abs().max() < 0.12
    assert abs(rates.mean() - p.mean()) < 0.02


def test_given_context_never_noised_or_scored():
    am = torch.tensor([[2, 2, 2, 1, 1, 1], [2, 1, 1, 1, 0, 0]])
    scored = scored_positions(torch.zeros(2, 6, dtype=torch.long), am)
    assert scored.tolist() == [[False] * 3 + [True] * 3, [False, True, True, True, False, False]]
    model = tiny("mdlm")
    obj = MDLM(model.config)
    x0 = torch.randint(3, 45, (2, 6))
    noise = obj.draw_noise(2, 6, torch.Generator().manual_seed(0))
    noise["t"] = torch.ones(2)  # mask everything maskable
    xt, masked, _, _ = obj.corrupt(x0, am, noise)
    assert (masked == scored).all() and (xt[am == 2] == x0[am == 2]).all()
    assert obj.loss(model, x0, am, noise).n_tokens == 6


def test_exact_k_mask():
    g = torch.Generator().manual_seed(0)
    am = torch.ones(5, 20, dtype=torch.long)
    am[2, 12:] = 0
    maskable = scored_positions(torch.zeros(5, 20, dtype=torch.long), am)
    k = torch.tensor([1, 5, 11, 19, 7])
    m = exact_k_mask(torch.rand(5, 20, generator=g), k, maskable)
    assert m.sum(1).tolist() == [1, 5, 11, 19, 7]
    assert not (m & ~maskable).any()


# ---------------------------------------------------------------- SUBS
def test_subs_carry_over_and_zero_mask():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, V)
    xt = torch.tensor([[0, MASK, 5, MASK, 7, MASK], [MASK] * 6])
    lp = subs_log_probs(logits, xt, MASK)
    probs = lp.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(2, 6))
    assert (probs[..., MASK] == 0).all()  # zero masking
    for b, i in [(0, 0), (0, 2), (0, 4)]:  # carry-over: point mass on the observed token
        assert probs[b, i, xt[b, i]] == 1.0
    ref = torch.log_softmax(torch.cat([logits[1, 0, :MASK], logits[1, 0, MASK + 1:]]), -1)
    assert torch.allclose(lp[1, 0, :MASK], ref[:MASK], atol=1e-6)


# ---------------------------------------------------------------- losses vs references
def _ref_masked_loss(model, x0, xt, masked, weight_per_row, sigma=None):
    """Slow reference: full logits, then a Python loop over every position."""
    logits = model(xt, sigma=sigma).logits
    total = 0.0
    for b in range(x0.shape[0]):
        for i in range(x0.shape[1]):
            if masked[b, i]:
                row = logits[b, i].clone().double()
                row[MASK] = -math.inf
                total += -float(weight_per_row[b]) * float(torch.log_softmax(row, -1)[x0[b, i]])
    return total


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_mdlm_loss_matches_reference(time_conditioning):
    model = tiny("mdlm", time_conditioning=time_conditioning)
    obj = MDLM(model.config)
    x0 = torch.randint(3, 45, (4, 16))
    x0[:, 0] = 0
    noise = obj.draw_noise(4, 16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = obj.loss(model, x0, None, noise)
        xt, masked, scored, t = obj.corrupt(x0, None, noise)
        sigma = obj.schedule.sigma(t) if time_conditioning else None
        ref = _ref_masked_loss(model, x0, xt, masked, 1 / t, sigma)
    assert masked.any()
    assert out.n_tokens == 4 * 15
    assert abs(out.nll_sum.item() - ref) < 1e-3 * max(1.0, abs(ref))
    assert abs(out.loss.item() - ref / 60) < 1e-4 * max(1.0, abs(ref))


@pytest.mark.parametrize("loss_type", ["lambda", "k"])
def test_radd_loss_matches_reference(loss_type):
    model = tiny("radd")
    obj = RADD(model.config, loss_type=loss_type)
    x0 = torch.randint(3, 45, (6, 12))
    am = torch.ones_like(x0)
    am[3, 8:] = 0  # one padded row
    noise = obj.draw_noise(6, 12, torch.Generator().manual_seed(2))
    scored = scored_positions(x0, am)
    r, u = noise["r"], noise["u"]
    if loss_type == "lambda":
        masked = (u < r[:, None]) & scored
        weight = 1 / r
    else:
        n = scored.sum(1)
        k = torch.minimum((r * n).ceil().clamp(min=1).long(), n)
        masked = torch.zeros_like(scored)
        for b in range(6):  # the k maskable positions with the smallest u
            cand = [i for i in range(12) if scored[b, i]]
            for i in sorted(cand, key=lambda i: float(u[b, i]))[: int(k[b])]:
                masked[b, i] = True
        weight = n.float() / k.float()
        assert masked.sum(1).tolist() == k.tolist()
    xt = torch.where(masked, torch.full_like(x0, MASK), x0)
    with torch.no_grad():
        out = obj.loss(model, x0, am, noise)
        logits_ref = model(xt, attention_mask=am).logits
        ref = 0.0
        for b in range(6):
            for i in range(12):
                if masked[b, i]:
                    row = logits_ref[b, i].double().clone()
                    row[MASK] = -math.inf
                    ref += -float(weight[b]) * float(torch.log_softmax(row, -1)[x0[b, i]])
    assert out.n_tokens == int(scored.sum())
    assert abs(out.nll_sum.item() - ref) < 1e-3 * max(1.0, abs(ref))


def test_ar_loss_matches_reference():
    model = tiny("ar")
    obj = make_objective(model.config)
    x0 = torch.randint(3, 45, (3, 10))
    am = torch.ones_like(x0)
    am[1, 6:] = 0
    with torch.no_grad():
        out = obj.loss(model, x0, am, {})
        ref = 0.0
        for b in range(3):
            n = int(am[b].sum())
            logits = model(x0[b : b + 1, :n], is_causal=True).logits[0].double()
            for i in range(1, n):  # token i predicted from the prefix < i
                ref += -float(torch.log_softmax(logits[i - 1], -1)[x0[b, i]])
    assert out.n_tokens == 9 + 5 + 9
    assert abs(out.nll_sum.item() - ref) < 1e-3


# ---------------------------------------------------------------- NELBO of a uniform model
def test_uniform_model_nelbo_is_analytic():
    """MDLM: w(t) (1 - alpha(t)) = 1 - eps, so E[NELBO]/token = (1 - eps) log(V - 1) for any t."""
    cfg = DLMConfig.from_preset("debug", vocab_size=V, mask_token_id=MASK)
    model = UniformModel(cfg)
    x0 = torch.randint(3, 45, (256, 64))
    g = torch.Generator().manual_seed(0)
    mdlm = MDLM(cfg)
    out = mdlm.loss(model, x0, None, mdlm.draw_noise(256, 64, g))
    expect = (1 - 1e-3) * math.log(V - 1)
    assert abs(out.loss.item() - expect) / expect < 0.02
    # RADD k-DCE is exact for a uniform model: (n/k) * k * log(V-1) / n, whatever k.
    radd_k = RADD(cfg, loss_type="k")
    out = radd_k.loss(model, x0, None, radd_k.draw_noise(256, 64, g))
    assert abs(out.loss.item() - math.log(V - 1)) < 1e-4
    radd_l = RADD(cfg, loss_type="lambda")
    out = radd_l.loss(model, x0, None, radd_l.draw_noise(256, 64, g))
    assert abs(out.loss.item() - math.log(V - 1)) / math.log(V - 1) < 0.02


def test_noise_is_a_function_of_the_generator():
    cfg = DLMConfig.from_preset("debug", vocab_size=V, mask_token_id=MASK)
    obj = MDLM(cfg)
    a = obj.draw_noise(8, 16, torch.Generator().manual_seed(5))
    b = obj.draw_noise(8, 16, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_radd_rejects_time_conditioning_and_bad_loss():
    from dlm.errors import DLMError

    with pytest.raises(DLMError, match="time"):
        RADD(DLMConfig.from_preset("debug", vocab_size=V, mask_token_id=MASK, time_conditioning=True))
    with pytest.raises(DLMError, match="lambda"):
        RADD(DLMConfig.from_preset("debug", vocab_size=V, mask_token_id=MASK), loss_type="x")


# ---------------------------------------------------------------- no host sync in a training step
@pytest.mark.parametrize("objective", ["mdlm", "radd", "ar", "bd3lm", "e2d2"])
@pytest.mark.parametrize("pack", ["wrap", "sft"])
def test_a_training_loss_reads_nothing_back_once_the_network_runs(objective, pack):
    """The trainer hands the objectives host batches: what depends on the data (noised and scored
    positions, their count, padding) is decided on the host before the network runs, so from the
    network's first layer through the backward pass nothing reads a value back (on a GPU: no
    sync in the step). Counted with the decoder's SyncCounter (host reads, boolean indexing,
    blocking copies), from the embedding's first call to the end of backward. The loss equals
    the one computed from device-side boolean selections (the same positions, in the same order)."""
    from dlm.objectives import masked_nll

    extra = {"block_size": 4} if objective in ("bd3lm", "e2d2") else {}
    if objective == "e2d2":
        extra.update(num_hidden_layers=1, num_decoder_layers=1)
    model = tiny(objective, attention_backend="sdpa", **extra).train()
    obj = make_objective(model.config)
    g = torch.Generator().manual_seed(1)
    B, L = 3, 16
    ids = torch.randint(3, MASK, (B, L), generator=g)
    ids[:, 0] = 0
    am = None
    if pack == "sft":  # prompt (2) then answer and filler (1): no padding, nothing for the network to mask
        am = torch.ones(B, L, dtype=torch.long)
        am[:, :5] = 2
    noise = obj.draw_noise(B, L, g)
    counter, started = SyncCounter(), []

    def start(module, args):
        if not started:
            started.append(counter.__enter__())

    hook = model.embed_tokens.register_forward_pre_hook(start)
    try:
        out = obj.loss(model, ids, am, noise)
        out.loss.backward()
    finally:
        hook.remove()
        if started:
            counter.__exit__(None, None, None)
    assert started and counter.calls == [], counter.calls
    assert out.nll_rows.shape == (B,) and float(out.nll_rows.sum()) == pytest.approx(float(out.nll_sum), rel=1e-5)
    # the same loss through boolean selections (the objectives' earlier form)
    if objective in ("mdlm", "radd"):
        return  # (their values are checked against loop references above)
    with torch.no_grad():
        scored = scored_positions(ids, am)
        if objective == "ar":
            nxt = torch.zeros_like(scored)
            nxt[:, :-1] = scored[:, 1:]
            logits = model(ids, is_causal=True).logits[nxt]
            nll = masked_nll(logits, ids[scored], None)
        else:
            xt, masked, _, t_tok = obj.corrupt(ids, am, noise)
            logits = obj.masked_logits(model, ids, xt, None, masked)
            nll = masked_nll(logits, ids[masked], MASK) * obj.schedule.loss_weight(t_tok)[masked]
        want = nll.sum() / scored.sum()
    assert torch.allclose(out.loss.detach(), want, atol=1e-6, rtol=1e-5), (out.loss, want)


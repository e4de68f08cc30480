"""BD3-LM and E2D2: block masks against slow references, the B' = L (MDLM) and B' = 1 (AR)
limits, no peeking at future blocks, FlexAttention = SDPA, NELBO of a uniform model."""

import math

import pytest
import torch
from helpers import UniformModel

from dlm.blocks import (
    bd3_training_mask,
    bd3_training_mask_reference,
    block_causal_mask,
    check_block_size,
    dense_as_flex_mask,
    e2d2_decoder_mask,
    e2d2_decoder_mask_reference,
    flex_available,
)
from dlm.errors import DLMError
from dlm.model import DLMConfig, DLMModel
from dlm.objectives import BD3LM, E2D2, MDLM

V, MASK = 60, 59
SHAPES = [(8, 1), (8, 2), (8, 4), (8, 8), (12, 3), (12, 4), (16, 4), (6, 6)]


def model_for(objective, block, seed=0, **kw):
    torch.manual_seed(seed)
    extra = dict(num_hidden_layers=2, num_decoder_layers=1) if objective == "e2d2" else {}
    extra = {"attention_backend": "sdpa", **extra, **kw}
    cfg = DLMConfig.from_preset("debug", vocab_size=V, mask_token_id=MASK, objective=objective, block_size=block,
                                **extra)
    return DLMModel(cfg).eval()


def ids(B, L, seed=1):
    x = torch.randint(3, MASK, (B, L), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = 0
    return x


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("L,blk", SHAPES)
def test_bd3_mask_matches_reference(L, blk):
    assert torch.equal(bd3_training_mask(L, blk), bd3_training_mask_reference(L, blk))


@pytest.mark.parametrize("L,blk", SHAPES)
def test_e2d2_masks_match_reference(L, blk):
    assert torch.equal(e2d2_decoder_mask(L, blk), e2d2_decoder_mask_reference(L, blk))
    # The encoder's block-causal mask is the clean-clean quarter of BD3's.
    assert torch.equal(block_causal_mask(L, blk), bd3_training_mask_reference(L, blk)[L:, L:])


def test_masks_are_built_once_per_shape():
    assert bd3_training_mask(16, 4) is bd3_training_mask(16, 4)


@pytest.mark.parametrize("L,blk", [(8, 3), (10, 4), (12, 5)])
def test_block_size_that_does_not_divide_is_rejected(L, blk):
    with pytest.raises(DLMError, match="does not divide"):
        check_block_size(L, blk)
    with pytest.raises(DLMError, match="does not divide"):
        bd3_training_mask(L, blk)
    obj = BD3LM(model_for("bd3lm", blk).config)
    with pytest.raises(DLMError, match="does not divide"):
        obj.draw_noise(2, L, torch.Generator())
    from dlm.training.config import TrainConfig

    with pytest.raises(DLMError, match="does not divide"):
        TrainConfig(objective="bd3lm", block_size=blk, seq_len=L).validate()


def test_config_errors():
    with pytest.raises(DLMError, match="block"):
        DLMConfig(objective="bd3lm", mask_token_id=MASK)
    with pytest.raises(DLMError, match="decoder"):
        DLMConfig(objective="e2d2", block_size=4, mask_token_id=MASK)
    with pytest.raises(DLMError, match="time"):
        DLMConfig(objective="bd3lm", block_size=4, time_conditioning=True, mask_token_id=MASK)


# ---------------------------------------------------------------- limits
def test_bd3_with_one_block_is_mdlm_on_the_same_noise():
    L = 16
    model = model_for("bd3lm", L)
    x0 = ids(4, L)
    mdlm = MDLM(model.config)
    noise = mdlm.draw_noise(4, L, torch.Generator().manual_seed(3))
    a = mdlm.loss(model, x0, None, noise)
    b = BD3LM(model.config).loss(model, x0, None, noise)
    assert a.n_tokens == b.n_tokens
    assert torch.allclose(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    # and with BD3's own per-block noise format (one block): the same draw as MDLM's
    bn = BD3LM(model.config).draw_noise(4, L, torch.Generator().manual_seed(3))
    assert torch.allclose(bn["t"][:, 0], noise["t"]) and torch.equal(bn["u"], noise["u"])


def test_bd3_block_one_is_autoregressive():
    """B' = 1: the logits for a masked token i are the network's output at a [MASK] placed after
    the clean prefix x_<i under a causal mask, i.e. next-token prediction from x_<i."""
    L = 10
    model = model_for("bd3lm", 1)
    x0 = ids(2, L)
    obj = BD3LM(model.config)
    masked = torch.ones_like(x0, dtype=torch.bool)
    masked[:, 0] = False
    xt = torch.where(masked, torch.full_like(x0, MASK), x0)
    with torch.no_grad():
        logits = obj.masked_logits(model, x0, xt, None, masked).view(2, L - 1, V)
        for i in range(1, L):
            seq = torch.cat([x0[:, :i], torch.full((2, 1), MASK)], dim=1)
            ref = model(seq, is_causal=True).logits[:, -1]
            assert torch.allclose(logits[:, i - 1], ref, atol=1e-5), i


@pytest.mark.parametrize("objective", ["bd3lm", "e2d2"])
def test_no_information_from_future_blocks_or_own_clean_tokens(objective):
    L, blk = 16, 4
    model = model_for(objective, blk)
    obj = BD3LM(model.config) if objective == "bd3lm" else E2D2(model.config)
    x0 = ids(2, L)
    masked = torch.rand(2, L, generator=torch.Generator().manual_seed(4)) < 0.5
    masked[:, 0] = False
    masked[:, 1] = True
    xt = torch.where(masked, torch.full_like(x0, MASK), x0)
    with torch.no_grad():
        base = obj.masked_logits(model, x0, xt, None, torch.ones_like(masked))
        base = base.view(2, L, V)
        # 1. change blocks 2.. (clean and noisy): blocks 0 and 1 must not move
        x0b, xtb = x0.clone(), xt.clone()
        x0b[:, 8:] = (x0b[:, 8:] + 7) % (MASK - 3) + 3
        xtb[:, 8:] = torch.where(masked[:, 8:], xtb[:, 8:], x0b[:, 8:])
        out = obj.masked_logits(model, x0b, xtb, None, torch.ones_like(masked)).view(2, L, V)
        assert torch.allclose(out[:, :8], base[:, :8], atol=1e-5)
        assert not torch.allclose(out[:, 8:], base[:, 8:], atol=1e-3)
        # 2. change the clean values hidden behind block 1's masks: block 1 must not see them
        x0c = x0.clone()
        hide = masked.clone()
        hide[:, :4] = False
        hide[:, 8:] = False
        x0c[hide] = (x0c[hide] + 5) % (MASK - 3) + 3
        out = obj.masked_logits(model, x0c, xt, None, torch.ones_like(masked)).view(2, L, V)
        assert torch.allclose(out[:, 4:8], base[:, 4:8], atol=1e-5)


@pytest.mark.skipif(not flex_available(), reason="FlexAttention not in this torch")
@pytest.mark.parametrize("objective", ["bd3lm", "e2d2"])
def test_flex_attention_gives_the_same_logits_as_sdpa(objective):
    L, blk = 32, 8
    sdpa = model_for(objective, blk)
    flex = model_for(objective, blk, attention_backend="flex")
    flex.load_state_dict(sdpa.state_dict())
    x0 = ids(2, L)
    obj_s = BD3LM(sdpa.config) if objective == "bd3lm" else E2D2(sdpa.config)
    obj_f = BD3LM(flex.config) if objective == "bd3lm" else E2D2(flex.config)
    noise = obj_s.draw_noise(2, L, torch.Generator().manual_seed(0))
    xt, masked, _, _ = obj_s.corrupt(x0, None, noise)
    with torch.no_grad():  # (FlexAttention has no backward on CPU)
        a = obj_s.masked_logits(sdpa, x0, xt, None, masked)
        b = obj_f.masked_logits(flex, x0, xt, None, masked)
    assert torch.allclose(a, b, atol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(DLMError, match="backward"):
            obj_f.loss(flex, x0, None, noise)


@pytest.mark.skipif(not flex_available(), reason="FlexAttention not in this torch")
@pytest.mark.parametrize("shape", [(3, 1, 10, 300), (3, 1, 1, 300), (10, 300), (1, 1, 10, 300), (3, 1, 9, 9)])
def test_a_dense_mask_as_a_flex_block_mask_attends_alike(shape):
    """The decoder's step masks (per-row, key-padding, shared, one batch row) through Flex give
    SDPA's outputs under the dense mask, with GQA; a mask read with the wrong broadcast or
    transposed would not."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(0)
    B, Lq, Lk = 3, 10 if shape[-2] != 9 else 9, shape[-1]
    mask = torch.rand(*shape, generator=g) < 0.4
    mask[..., -1] = True  # every query may attend somewhere
    q = torch.randn(B, 4, Lq, 16, generator=g)
    k, v = torch.randn(B, 2, Lk, 16, generator=g), torch.randn(B, 2, Lk, 16, generator=g)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = flex_attention(q, k, v, block_mask=dense_as_flex_mask(mask, Lq), enable_gqa=True)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    wrong = flex_attention(q, k, v, block_mask=dense_as_flex_mask(mask.flip(-1), Lq), enable_gqa=True)
    assert not torch.allclose(wrong, want, atol=1e-3)


# ---------------------------------------------------------------- NELBO sanity


def test_uniform_model_bd3_nelbo_is_analytic():
    """Per block, w(t) (1 - alpha(t)) = 1 - eps: E[NELBO]/token = (1 - eps) log(V - 1), any B'."""
    cfg = model_for("bd3lm", 4).config
    x0 = ids(256, 32)
    obj = BD3LM(cfg)
    out = obj.loss(UniformModel(cfg), x0, None, obj.draw_noise(256, 32, torch.Generator().manual_seed(0)))
    expect = (1 - 1e-3) * math.log(V - 1)
    assert abs(out.loss.item() - expect) / expect < 0.02


def test_clipped_window_draws_times_inside_it():
    cfg = model_for("bd3lm", 4).config
    obj = BD3LM(cfg, t_range=(0.3, 0.8))
    t = obj.draw_noise(64, 32, torch.Generator().manual_seed(0))["t"]
    assert t.shape == (64, 8)
    assert float(t.min()) >= 0.3 and float(t.max()) <= 0.8
    # stratified over all blocks of the batch: one sample per stratum
    strata = ((t.flatten() - 0.3) / 0.5 * t.numel()).floor().long()
    assert sorted(strata.tolist()) == list(range(t.numel()))


def test_trained_block_models_improve_the_bound(tmp_path, small_corpus):
    from dlm.training.config import TrainConfig
    from dlm.training.trainer import train

    for objective in ("bd3lm", "e2d2"):
        out = tmp_path / objective
        train(TrainConfig(data=small_corpus, output_dir=str(out), objective=objective, block_size=4, size="debug",
                          seq_len=32, micro_batch=8, max_steps=60, lr=3e-3, warmup_steps=5, vocab_size=300,
                          eval_every=30, eval_batches=2, save_every=60, tensorboard=False))
        import json

        recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
        vals = [r["val_nll"] for r in recs if "val_nll" in r]
        assert len(vals) == 2 and vals[1] < vals[0] < math.log(300) * 1.2
        windows = [r["noise_window"] for r in recs if "noise_window" in r]
        assert windows and all(0 <= w[0] < w[1] <= 1 for w in windows)
        from dlm.loading import load_model

        m = load_model(str(out / "model"))
        assert m.config.objective == objective and m.config.block_size == 4
        from dlm.cli import main

        assert main(["ppl", str(out / "model"), "--data", small_corpus, "--max-batches", "1", "--mc-samples", "2"]) == 0
        if objective == "e2d2":
            assert m.config.num_decoder_layers == 1 and m.config.num_hidden_layers == 1


@pytest.mark.parametrize("objective", ["bd3lm", "e2d2"])
def test_block_sampler_fills_blocks_left_to_right(objective):
    from dlm.sample import sample

    model = model_for(objective, 4, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    prompt = [5, 6, 7, 8, 9]  # BOS + 5 tokens: the prompt ends inside block 1
    a = sample(model, prompt, n=3, length=11, steps=12, temperature=1.0, seed=3)
    b = sample(model, prompt, n=3, length=11, steps=12, temperature=1.0, seed=3)
    assert torch.equal(a.tokens, b.tokens)  # a seed makes it reproducible
    assert a.tokens.shape == (3, 1 + 5 + 11)
    assert a.tokens[:, :6].tolist() == [[0, *prompt]] * 3
    assert not (a.tokens == MASK).any()
    assert 1 <= a.nfe <= 12


def test_block_model_resumes_exactly_with_its_noise_window(tmp_path, small_corpus):
    """The searched clipped window is part of the state: a resumed run repeats the full run."""
    import json

    from dlm.training.config import TrainConfig
    from dlm.training.trainer import train

    def cfg(out, **kw):
        return TrainConfig(data=small_corpus, output_dir=str(out), objective="bd3lm", block_size=8, size="debug",
                           seq_len=32, micro_batch=8, max_steps=10, lr=3e-3, warmup_steps=2, vocab_size=300,
                           eval_every=3, eval_batches=1, save_every=100, log_every=1, tensorboard=False, **kw)

    def losses(out):
        recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
        return [r["loss"] for r in recs if "loss" in r]

    train(cfg(tmp_path / "full"))
    assert train(cfg(tmp_path / "part", stop_after_steps=4)) is None
    train(cfg(tmp_path / "part", resume=True))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(a) == len(b) == 10
    assert a == pytest.approx(b, abs=1e-6)


def test_e2d2_two_processes_zero3_match_one_process(tmp_path, small_corpus):
    """E2D2 calls the encoder and decoder directly (not through forward): ZeRO-3's parameter
    gathering must still see every weight. 2 ranks x 4 == 1 rank x 4 x 2 accumulation."""
    import json

    from helpers import dlm_cli

    common = ["train", "--data", small_corpus, "--objective", "e2d2", "--block-size", "4", "--size", "debug",
              "--seq-len", "32", "--vocab-size", "300", "--max-steps", "4", "--eval-every", "4", "--eval-batches", "1",
              "--noise-window", "full", "--log-every", "1", "--micro-batch", "4", "--no-tensorboard"]
    one = tmp_path / "one"
    r = dlm_cli(*common, "--grad-accum", "2", "--output-dir", one)
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    r = dlm_cli(*common, "--zero-stage", "3", "--tokenizer", one / "tokenizer", "--output-dir", two,
                launcher="torchrun2")
    assert r.returncode == 0, r.stderr[-3000:]

    def losses(out):
        return [json.loads(x)["loss"] for x in open(out / "metrics.jsonl") if '"loss"' in x]

    assert losses(one) == pytest.approx(losses(two), rel=2e-4)

"""The decoder on the published families' tiny checkpoints: every cache mode decodes, the exact
cache gives the uncached tokens and logits for the block-causal families (SDAR, Fast-dLLM v2:
the latter's logits come one position late, carried across the cached steps), the approximate
caches are exact at their refresh for LLaDA and Dream (Dream: one column more on the left), and
prompts are taken as tokenized (no BOS added)."""

import dataclasses

import pytest
import torch

from dlm.decoding import DecodeConfig, Decoder
from published import WRITERS, write_dit

FAMILIES = ["llada", "dream", "fast_dllm_v2", "sdar", "mdlm_owt", "bd3lm_owt"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from dlm import load_model

    root = tmp_path_factory.mktemp("published_decode")
    out = {}
    for fam in FAMILIES:
        if fam.endswith("_owt"):
            write_dit(str(root / fam), fam[: -len("_owt")], seed=7)
        else:
            WRITERS[fam](str(root / fam), seed=7)
        m = load_model(str(root / fam))
        if fam == "fast_dllm_v2":  # its tiny config has no mask token: use the last id
            m.config.mask_token_id = 93
        out[fam] = m
    return out


def _requests(dec, canvases, prompt_lens, config):
    """Requests whose canvases are set by hand (the canvas' first P tokens: the prompt, after the
    BOS that dlm's own DiT families put in front)."""
    reqs = []
    off = 1 if dec.family.prepend_bos else 0
    for row, P in zip(canvases, prompt_lens):
        r = dec.new_request(row[off:P].tolist(), dataclasses.replace(config, max_new_tokens=len(row) - P))
        r.canvas[:] = row
        r.host = row.tolist()  # the decoder's host copy of the canvas
        reqs.append(r)
    return reqs


def test_the_canvas_starts_with_the_prompt_as_given(models):
    dec = Decoder(models["llada"])
    r = dec.new_request([5, 6, 7], DecodeConfig(max_new_tokens=4))
    assert r.canvas[:3].tolist() == [5, 6, 7] and r.P == 3  # no BOS in front


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2", "bd3lm_owt"])
def test_exact_cache_logits_match_the_full_computation(models, family):
    model = models[family]
    mask = model.config.mask_token_id
    dec = Decoder(model)
    canvas = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    canvas[:, 9:] = mask
    canvas[:, 13] = 7
    canvas[1, 5:] = mask  # a shorter prompt: its blocks start earlier
    canvas[1, 10] = 8
    with torch.no_grad():
        full = model(canvas).logits  # the family's own block-causal attention and logit alignment
        reqs = _requests(dec, canvas, [9, 5], DecodeConfig(max_new_tokens=7, cache="exact"))
        partial = []
        for step in range(3):
            for again in range(2):  # the second call of a block has no new clean column: the carry
                for r in reqs:
                    r.bi = min(step, len(r.blocks) - 1)
                dec._forward(reqs)
                for i, r in enumerate(reqs):
                    lo, hi = r.block
                    # the logits that are read: the block's masked columns (the LM head may be
                    # computed there only)
                    open_ = canvas[i, lo:hi] == mask
                    partial.append(bool(open_.any()) and not bool(open_.all()))
                    torch.testing.assert_close(r.logits[open_], full[i, lo:hi][open_], atol=1e-5, rtol=1e-5)
    assert any(partial)  # some blocks hold committed tokens too


@pytest.mark.parametrize("family", ["llada", "dream", "mdlm_owt"])
def test_approximate_caches_are_exact_at_refresh(models, family):
    model = models[family]
    mask = model.config.mask_token_id
    dec = Decoder(model)
    canvas = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(1))
    canvas[:, 8:] = mask
    with torch.no_grad():
        full = model(canvas).logits
        for mode in ("prefix", "dual"):
            reqs = _requests(dec, canvas, [8, 8], DecodeConfig(max_new_tokens=16, block_length=8, cache=mode))
            dec._forward(reqs)  # the refresh: a full forward that keeps the K/V
            first = torch.stack([r.logits for r in reqs])
            torch.testing.assert_close(first, full[:, 8:], atol=1e-5, rtol=1e-5)
            for r in reqs:
                r.s_in_block = 1  # a cached step with nothing changed reproduces the refresh
            dec._forward(reqs)
            same = torch.stack([r.logits for r in reqs])
            torch.testing.assert_close(same, first[:, : same.shape[1]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_cache_decodes_and_batches_equal_single_prompts(models, family):
    from dlm.families import family_of

    model = models[family]
    fam = family_of(model.config)
    dec = Decoder(model)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    outs = {}
    for cache in fam.caches:
        cfg = DecodeConfig(max_new_tokens=8, cache=cache, unmask="confidence", stop_at_eos=False,
                           block_length=None if fam.block_causal else 4)
        together = dec.generate(prompts, cfg)
        for p, t in zip(prompts, together):
            assert len(t.tokens) == 8 and all(0 <= x < model.config.vocab_size for x in t.tokens)
            assert dec.generate([p], cfg)[0].tokens == t.tokens
        outs[cache] = [t.tokens for t in together]
    if fam.block_causal:  # the exact cache is the model's own factorisation: the same tokens
        assert outs["exact"] == outs["none"]


def test_family_default_decoding(models):
    from dlm.families import family_of

    llada = family_of(models["llada"].config)
    cfg = DecodeConfig.for_family(llada, max_new_tokens=64)
    assert (cfg.unmask, cfg.threshold, cfg.block_length, cfg.cache) == ("threshold", 0.9, 32, "auto")
    # a default block length that does not divide the length: the largest below it that does
    assert [DecodeConfig.for_family(llada, max_new_tokens=n).block_length for n in (8, 100, 96)] == [8, 25, 32]
    assert DecodeConfig.for_family(llada, max_new_tokens=100, block_length=50).block_length == 50
    assert family_of(models["llada"].config).resolve_cache(cfg.cache) == "dual"
    assert family_of(models["sdar"].config).resolve_cache("auto") == "exact"
    res = Decoder(models["sdar"]).generate([[5, 6, 7]])  # no config: the family's
    assert res[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("family", ["fast_dllm_v2", "sdar", "bd3lm_owt"])
def test_sub_blocks_decode_left_to_right_and_the_exact_cache_still_matches(models, family):
    """block_length splits a block-causal model's blocks (Fast-dLLM v2 decodes its 32-token blocks
    in sub-blocks of 8): commits go sub-block by sub-block, and the exact cache still gives the
    uncached tokens."""
    from dlm.errors import DLMError

    model = models[family]
    dec = Decoder(model)
    seen = []
    cfg = DecodeConfig(max_new_tokens=8, block_length=2, unmask="confidence", stop_at_eos=False)
    outs = {}
    for cache in ("none", "exact"):
        outs[cache] = dec.generate([[5, 6, 7]], dataclasses.replace(cfg, cache=cache),
                                   on_step=lambda rows, answers: seen.append(list(answers[0])))[0].tokens
    assert outs["exact"] == outs["none"]
    mask = model.config.mask_token_id
    # a position is committed only once every position of the sub-blocks before it is
    P = dec.new_request([5, 6, 7], cfg).P
    for a in seen:
        decided = [t != mask for t in a]
        for i, d in enumerate(decided):
            if d:
                sub_start = ((P + i) // 2) * 2 - P
                assert all(decided[: max(0, sub_start)]), (a, i)
    with pytest.raises(DLMError, match="block_length 3"):
        dec.new_request([5, 6, 7], dataclasses.replace(cfg, block_length=3))


def test_fast_dllm_v2_defaults_to_sub_blocks_of_8():
    from dlm.families import family

    cfg = DecodeConfig.for_family(family("fast_dllm_v2"), 32, max_new_tokens=64)
    assert (cfg.block_length, cfg.unmask) == (8, "threshold")
    assert DecodeConfig.for_family(family("fast_dllm_v2"), 4).block_length == 4  # a smaller model block: fitted

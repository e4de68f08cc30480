"""The backbone: masks, caches, time conditioning, presets, save / load, Llama export, bad checkpoints."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from dlm.errors import DLMError
from dlm.loading import load_model
from dlm.model import PRESETS, DLMConfig, DLMModel, KVCache

V = 64


def make(objective="mdlm", **kw):
    torch.manual_seed(0)
    cfg = DLMConfig.from_preset("debug", vocab_size=V, mask_token_id=V - 1, bos_token_id=0, eos_token_id=1,
                                pad_token_id=2, objective=objective, **kw)
    return DLMModel(cfg).eval()


def test_bidirectional_causal_and_boolean_masks():
    m = make()
    x = torch.randint(0, V, (2, 12))
    bi = m(x).logits
    causal = m(x, is_causal=True).logits
    tril = torch.ones(12, 12, dtype=torch.bool).tril()
    explicit = m(x, attn_mask=tril).logits
    assert torch.allclose(causal, explicit, atol=1e-5)
    assert not torch.allclose(bi, causal, atol=1e-3)
    # Causal: the prefix does not see the future.
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % V
    assert torch.allclose(m(x2, is_causal=True).logits[:, :8], causal[:, :8], atol=1e-5)
    # Bidirectional: every position sees the change.
    assert not torch.allclose(m(x2).logits[:, :8], bi[:, :8], atol=1e-4)


def test_padding_mask_hides_pad_keys():
    m = make()
    x = torch.randint(3, V - 1, (2, 10))
    am = torch.ones_like(x)
    am[1, 6:] = 0
    out = m(x, attention_mask=am).logits
    alone = m(x[1:, :6]).logits
    assert torch.allclose(out[1, :6], alone[0], atol=1e-5)
    assert not out.isnan().any()


def test_kv_cache_matches_full_forward():
    m = make("ar")
    x = torch.randint(0, V, (2, 16))
    full = m(x, is_causal=True).logits
    cache = KVCache(m.config.num_hidden_layers)
    parts = [m(x[:, :5], is_causal=True, cache=cache).logits]
    for i in range(5, 16):
        parts.append(m(x[:, i : i + 1], is_causal=True, cache=cache).logits)
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    cache.crop(5)
    assert cache.length == 5


def test_preallocated_cache_equals_the_concatenating_one():
    m = make("bd3lm", block_size=4)
    x = torch.randint(3, V - 1, (2, 12))
    full = KVCache(m.config.num_hidden_layers)
    m(x[:, :8], cache=full)
    ref = KVCache(m.config.num_hidden_layers)
    ref.k, ref.v = list(full.k), list(full.v)
    want = m(x[:, 8:], cache=ref).logits
    room = [torch.cat([t, torch.full((2, t.shape[1], 6, t.shape[3]), float("nan"))], 2) for t in full.k + full.v]
    pre = KVCache.preallocated(room[:2], room[2:], used=8)
    assert pre.length == 8
    assert torch.allclose(m(x[:, 8:], cache=pre).logits, want, atol=1e-6)
    for a, b in zip(ref.k + ref.v, pre.k + pre.v):
        assert torch.equal(a, b[:, :, :12])  # the new entries were written in place
    with pytest.raises(ValueError, match="room"):
        m(x, cache=KVCache.preallocated(room[:2], room[2:], used=8))


def test_output_positions_selects_rows():
    m = make()
    x = torch.randint(0, V, (2, 9))
    sel = torch.rand(2, 9) > 0.5
    assert torch.allclose(m(x, output_positions=sel).logits, m(x).logits[sel], atol=1e-6)
    # as row-major indices (the last layer then runs past attention at those rows only)
    idx = sel.reshape(-1).nonzero().squeeze(1)
    assert torch.allclose(m(x, output_positions=idx).logits, m(x).logits[sel], atol=1e-5)


def test_packed_queries_match_the_padded_forward():
    """query_valid leaves padding out of the per-token layers: logits at valid tokens and the
    cache entries they write are those of the padded forward."""
    m = make("bd3lm", block_size=4)
    B, M, L = 3, 5, 7
    x = torch.randint(3, V - 1, (B, L))
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, :3], valid[2, :1] = False, False  # left padding of different lengths
    mask = (valid[:, None, :] & valid[:, :, None]) | torch.eye(L, dtype=torch.bool)
    mask = torch.cat([torch.ones(B, L, M, dtype=torch.bool), mask], -1)[:, None]
    pos = torch.arange(M, M + L)[None].expand(B, -1)
    out = valid.clone()
    out[1, :2] = False
    past = [torch.randn(B, m.config.num_attention_heads, M, m.config.head_dim) for _ in range(4)]

    def run(**kw):
        cache = KVCache(m.config.num_hidden_layers)
        cache.k, cache.v = [past[0], past[1]], [past[2], past[3]]
        kw.setdefault("output_positions", out)
        return m(x, position_ids=pos, attn_mask=mask, cache=cache, **kw).logits, cache

    padded, c_pad = run()
    packed, c_pack = run(query_valid=valid)
    assert packed.shape == padded.shape and torch.allclose(packed, padded, atol=1e-5)
    keep = torch.cat([torch.ones(B, M, dtype=torch.bool), valid], 1)
    for a, b in zip(c_pad.k + c_pad.v, c_pack.k + c_pack.v):
        assert torch.allclose(a.transpose(1, 2)[keep], b.transpose(1, 2)[keep], atol=1e-5)
    # outputs as indices into the packed tokens: the last layer runs past attention there only;
    # the logits and every layer's cache entries are the same
    idx = out[valid].nonzero().squeeze(1)
    rows, c_rows = run(query_valid=valid, output_positions=idx)
    assert torch.allclose(rows, padded, atol=1e-5)
    for a, b in zip(c_pad.k + c_pad.v, c_rows.k + c_rows.v):
        assert torch.allclose(a.transpose(1, 2)[keep], b.transpose(1, 2)[keep], atol=1e-5)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, query_valid=valid, output_positions=out)


def test_time_conditioning_starts_as_identity_and_uses_sigma():
    plain, timed = make(), make(time_conditioning=True)
    timed.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randint(0, V, (2, 8))
    sigma = torch.tensor([0.1, 2.0])
    assert torch.allclose(timed(x, sigma=sigma).logits, plain(x).logits, atol=1e-5)  # zero-init adaLN
    with torch.no_grad():
        for layer in timed.layers:
            layer.adaLN.weight.normal_(0, 0.1)
    a, b = timed(x, sigma=sigma).logits, timed(x, sigma=sigma.flip(0)).logits
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="sigma"):
        timed(x)


def test_presets():
    for name, (d, n_layers, heads) in PRESETS.items():
        cfg = DLMConfig.from_preset(name, vocab_size=50304)
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (d, n_layers, heads)
    big = DLMConfig.from_preset("gpt2-small", vocab_size=50304)
    with torch.device("meta"):
        n = sum(p.numel() for p in DLMModel(big).parameters())
    assert 120e6 < n < 200e6  # GPT-2-small scale, untied embeddings
    with pytest.raises(DLMError, match="unknown model size"):
        DLMConfig.from_preset("huge")
    with pytest.raises(DLMError, match="objective"):
        DLMConfig(objective="gpt")


def test_sequence_longer_than_max_positions():
    cfg = DLMConfig.from_preset("debug", vocab_size=V, mask_token_id=V - 1, max_position_embeddings=16)
    with pytest.raises(DLMError, match="maximum of 16"):
        DLMModel(cfg)(torch.zeros(1, 17, dtype=torch.long))


def test_save_load_roundtrip(tmp_path):
    m = make("radd")
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    x = torch.randint(0, V, (2, 8))
    for loaded in (AutoModel.from_pretrained(tmp_path), load_model(str(tmp_path))):
        assert isinstance(loaded, DLMModel)
        assert loaded.config.objective == "radd" and loaded.config.mask_token_id == V - 1
        assert torch.equal(loaded(x).logits, m(x).logits)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "dlm"


def test_load_model_errors(tmp_path):
    with pytest.raises(DLMError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DLMError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DLMError, match="'bert' model"):
        load_model(str(other))
    m = make()
    m.save_pretrained(tmp_path / "ok")
    with pytest.raises(DLMError, match="is a mdlm model .*expected a .ar. model"):
        load_model(str(tmp_path / "ok"), expect_objective="ar")
    # Truncate the weights: a corrupt checkpoint.
    w = tmp_path / "ok" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(DLMError, match="corrupt"):
        load_model(str(tmp_path / "ok"))
    (tmp_path / "ok" / "config.json").write_text("{not json")
    with pytest.raises(DLMError, match="corrupt"):
        load_model(str(tmp_path / "ok"))


def test_ar_exports_to_llama_with_identical_logits(tmp_path):
    from transformers import LlamaForCausalLM

    from dlm.export import export_llama, to_llama

    m = make("ar")
    with torch.no_grad():  # non-trivial norm weights so the mapping of every tensor matters
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randint(0, V, (2, 14))
    ours = m(x, is_causal=True).logits
    assert torch.allclose(to_llama(m)(x).logits, ours, atol=1e-5)
    m.save_pretrained(tmp_path / "ar")
    export_llama(str(tmp_path / "ar"), str(tmp_path / "llama"))
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    assert torch.allclose(llama(x).logits, ours, atol=1e-5)
    # HF generate with its KV cache runs on the export.
    gen = llama.generate(x[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert gen.shape == (1, 9)
    with pytest.raises(DLMError, match="only autoregressive"):
        to_llama(make("mdlm"))


def test_rms_norm_matches_llamas_formula_in_float32_and_bfloat16():
    """float32 takes the fused kernel; bfloat16 normalises in float32 and applies the weight after
    the cast back (Llama's order)."""
    from dlm.layers import RMSNorm

    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(3, 5, 64)
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(norm(x), ref, atol=1e-6, rtol=1e-6)
    norm16, x16 = norm.to(torch.bfloat16), x.to(torch.bfloat16)
    xf = x16.float()
    ref16 = norm16.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm16(x16), ref16)

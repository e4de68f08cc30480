"""Published model families (LLaDA, Dream, Fast-dLLM v2, SDAR): tiny random checkpoints in each
family's own format load through `dlm.load_model`, and dlm's logits equal an independent
reference (transformers' LlamaModel / Qwen2Model / Qwen3Model with the family's attention
pattern as an explicit mask and its logit shift) to 1e-5 in float32. Bad checkpoints: one clear
error each."""

import json
import os
import shutil

import pytest
import torch

from dlm.errors import DLMError
from published import WRITERS, reference

FAMILIES = ["llada", "dream", "fast_dllm_v2", "sdar"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    out = {}
    for fam in FAMILIES:
        d = root / fam
        WRITERS[fam](str(d))
        out[fam] = str(d)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_reference(checkpoints, family):
    from dlm import load_model

    model = load_model(checkpoints[family])
    assert model.config.family == family
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
        ref = reference(checkpoints[family], family)(ids)
    assert ours.shape == ref.shape == (2, 12, 96)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_positions_and_shift_agree_with_the_full_logits(checkpoints, family):
    """Logits asked for at some positions only (what losses and the decoder do) are the full
    logits there, the family's shift included."""
    from dlm import load_model

    model = load_model(checkpoints[family])
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(2))
    pos = torch.zeros(2, 12, dtype=torch.bool)
    pos[0, [0, 1, 5]] = True
    pos[1, [4, 11]] = True
    with torch.no_grad():
        full = model(ids).logits
        some = model(ids, output_positions=pos).logits
        rows = model(ids, output_positions=pos.reshape(-1).nonzero().squeeze(1)).logits  # as indices
    torch.testing.assert_close(some, full[pos], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rows, full[pos], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [dict(tied=True), dict(qkv_bias=True)])
def test_llada_variants(tmp_path, variant):
    from dlm import load_model

    from published import write_llada

    write_llada(str(tmp_path), **variant)
    model = load_model(str(tmp_path))
    ids = torch.randint(0, 90, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(str(tmp_path), "llada")(ids), atol=1e-5, rtol=1e-5)
    if variant.get("tied"):
        assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_tied_qwen_checkpoint_has_no_lm_head(tmp_path):
    from dlm import load_model

    from published import write_qwen

    write_qwen(str(tmp_path), "fast_dllm_v2", tied=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    model = load_model(str(tmp_path))
    ids = torch.randint(0, 90, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(str(tmp_path), "fast_dllm_v2")(ids),
                                   atol=1e-5, rtol=1e-5)


def test_special_ids_are_the_checkpoints(checkpoints):
    from dlm import load_model

    llada = load_model(checkpoints["llada"]).config
    assert (llada.mask_token_id, llada.eos_token_id, llada.bos_token_id) == (95, 1, 0)  # bos from generation_config
    assert load_model(checkpoints["dream"]).config.mask_token_id == 94
    assert load_model(checkpoints["sdar"]).config.block_size == 4
    # Fast-dLLM v2's config has no mask id: the family's (151665), or the tokenizer's added mask token
    assert load_model(checkpoints["fast_dllm_v2"]).config.mask_token_id == 151665


def test_fast_dllm_mask_id_from_its_tokenizer(tmp_path):
    from dlm import load_model

    from published import write_qwen

    write_qwen(str(tmp_path), "fast_dllm_v2")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"93": {"content": "|<MASK>|", "special": True}}}))
    assert load_model(str(tmp_path)).config.mask_token_id == 93


def test_weights_keep_their_stored_dtype_or_the_one_asked(tmp_path):
    from safetensors.torch import load_file, save_file

    from dlm import load_model
    from published import write_llada

    write_llada(str(tmp_path))
    for f in tmp_path.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f))
    assert load_model(str(tmp_path)).embed_tokens.weight.dtype == torch.bfloat16
    assert load_model(str(tmp_path), dtype="float32").embed_tokens.weight.dtype == torch.float32


# ------------------------------------------------------------------ save back in the same format
@pytest.mark.parametrize("family", FAMILIES)
def test_save_model_writes_the_family_format_back(checkpoints, family, tmp_path):
    from safetensors import safe_open

    from dlm import load_model, save_model

    model = load_model(checkpoints[family])
    out = save_model(model, str(tmp_path / "saved"))
    raw = json.loads(open(os.path.join(out, "config.json")).read())
    orig = json.loads(open(os.path.join(checkpoints[family], "config.json")).read())
    assert raw["model_type"] == orig["model_type"]
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    index = json.loads(open(os.path.join(checkpoints[family], "model.safetensors.index.json")).read())
    assert saved == set(index["weight_map"])  # the same tensor names
    again = load_model(out)
    ids = torch.randint(0, 90, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


# ------------------------------------------------------------------ bad checkpoints
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_get_one_clear_error(checkpoints, tmp_path):
    from dlm import load_model

    d = _copy(checkpoints["llada"], tmp_path / "renamed")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    # a wrong tensor name in a shard
    from safetensors.torch import load_file, save_file

    shard = d / sorted(set(index["weight_map"].values()))[0]
    t = load_file(str(shard))
    name = next(iter(t))
    t["model.transformer.blocks.0.q_proj_typo.weight"] = t.pop(name)
    save_file(t, str(shard))
    with pytest.raises(DLMError, match="q_proj_typo"):
        load_model(str(d))

    d = _copy(checkpoints["llada"], tmp_path / "noshard")
    os.remove(d / sorted(set(index["weight_map"].values()))[1])
    with pytest.raises(DLMError, match="shard .* is missing"):
        load_model(str(d))

    d = _copy(checkpoints["dream"], tmp_path / "unknown")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mystery_lm"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DLMError, match="'mystery_lm' model, which dlm cannot load.*own modeling code"):
        load_model(str(d))

    d = _copy(checkpoints["sdar"], tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DLMError, match="has shape .* the config implies"):
        load_model(str(d))

    d = _copy(checkpoints["sdar"], tmp_path / "incomplete")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DLMError, match="without hidden_size"):
        load_model(str(d))


def test_a_hub_id_offline_is_one_line_naming_it(monkeypatch):
    from dlm import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DLMError, match="could not get GSAI-ML/LLaDA-8B-Instruct-not-cached from the Hugging Face hub"):
        load_model("GSAI-ML/LLaDA-8B-Instruct-not-cached")


# ------------------------------------------------------------------ the DiT (MDLM / BD3-LM on OpenWebText)
GOLDEN_DIT = os.path.join(os.path.dirname(__file__), "golden", "dit")


@pytest.mark.parametrize("kind", ["mdlm", "bd3lm"])
def test_dit_logits_equal_the_reference_implementation(kind):
    """Golden logits of tiny random checkpoints (tests/golden/dit/{mdlm,bd3lm}) computed once by
    the public reference implementation; the file names the reference, its commit and how it ran."""
    from dlm import load_model

    with open(os.path.join(GOLDEN_DIT, f"{kind}_logits.json")) as f:
        golden = json.load(f)
    assert golden["reference"].startswith("kuleshov-group/")
    with open(os.path.join(GOLDEN_DIT, "inputs.json")) as f:
        ids = torch.tensor(json.load(f)["input_ids"])
    model = load_model(os.path.join(GOLDEN_DIT, kind))
    assert model.config.family == f"{kind}_owt"
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(ours, torch.tensor(golden["logits"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mdlm", "bd3lm"])
def test_dit_saves_back_in_its_format(kind, tmp_path):
    from safetensors import safe_open

    from dlm import load_model, save_model

    src = os.path.join(GOLDEN_DIT, kind)
    model = load_model(src)
    out = save_model(model, str(tmp_path / kind))
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as a, \
            safe_open(os.path.join(out, "model.safetensors"), "pt") as b:
        ignored = {"backbone.rotary_emb.inv_freq", "sampling_eps_min", "sampling_eps_max"}
        assert set(a.keys()) - ignored == set(b.keys())
        for k in b.keys():  # the fused q|k|v and the adaLN gates come back as they were
            torch.testing.assert_close(b.get_tensor(k), a.get_tensor(k))


def test_safetensors_reader_equals_the_library_and_refuses_truncation(tmp_path):
    from safetensors.torch import load_file, save_file

    from dlm.loading import read_safetensors

    t = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7), "c": torch.tensor(2.5),
         "d": torch.randn(2, 2, 2, dtype=torch.float16), "e": torch.zeros(0, 4)}
    f = str(tmp_path / "x.safetensors")
    save_file(t, f)
    got = {k: read() for k, read in read_safetensors(f)}
    ref = load_file(f)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    with open(f, "r+b") as fh:
        fh.truncate(len(open(f, "rb").read()) - 4)
    with pytest.raises(DLMError, match="truncated"):
        for _, read in read_safetensors(f):
            read()


def test_real_shapes_have_the_published_parameter_counts():
    """The named real shapes (for --random-init and bench load) give the published models'
    parameter counts: their safetensors index total_size / 2 (bf16)."""
    from dlm.formats import detect, format_of
    from dlm.formats.shapes import shape_config
    from dlm.model import DLMConfig, DLMModel

    published = {"llada-8b": 16_031_162_368 // 2, "dream-7b": 15_231_233_024 // 2, "sdar-4b": 8_822_848_512 // 2}
    for name, want in published.items():
        raw = shape_config(name)
        fam = detect(raw)
        with torch.device("meta"):
            model = DLMModel(DLMConfig(**format_of(fam).config(fam, raw)))
        assert sum(p.numel() for p in model.parameters()) == want, name
    assert shape_config("llada-8b", layers=2)["n_layers"] == 2


def test_random_init_decode_bench_at_a_real_width(tmp_path):
    """bench decode --random-init: a published shape (one layer of MDLM-OWT's width, its real
    50,258-token vocabulary) decodes with every cache at fixed tokens per step."""
    from types import SimpleNamespace

    from dlm.evals.bench_shapes import main

    args = SimpleNamespace(random_init="mdlm-owt", layers=1, dtype="float32", device="cpu", lengths="16",
                           tokens_per_step=4, block_length=8, batch_size=2, prompt_len=8, repeats=1, seed=0,
                           ar_baseline=True, out=str(tmp_path / "r.json"))
    report = main(args)
    rows = {r["cache"]: r for r in report["results"]}
    assert set(rows) == {"none", "prefix", "dual", "ar-static"} and report["parameters"] > 50e6
    assert all(rows[c]["forwards"] == 4 for c in ("none", "prefix", "dual"))  # 16 tokens at 4 per step
    assert rows["ar-static"]["forwards"] == 16 and rows["ar-static"]["tokens_per_s"] * rows["ar-static"]["wall_s"] == \
        pytest.approx(2 * 16)  # the AR baseline: exactly 16 new tokens per prompt, one forward each
    for r in rows.values():  # weight bytes read per second, against the copy bandwidth measured in the run
        assert r["weight_bytes_per_s"] == pytest.approx(report["weight_bytes"] * r["forwards"] / r["wall_s"])
        assert 0 < r["bandwidth_fraction"] < 10
    assert report["weight_bytes"] == 4 * report["parameters"]
    assert "random weights" in report["note"]

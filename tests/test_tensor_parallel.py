"""Tensor parallelism (dlm/parallel.py) over 2 gloo ranks on this CPU: the sharded model gives
the single process's logits, and decoding gives its tokens for every cache mode of every kind
of model: MDLM, BD3-LM and E2D2 (dlm's own), and the published formats LLaDA (Llama-like),
SDAR (GQA + QK-norm, block-causal, exact cache) and the OpenWebText DiT (LayerNorm, biases,
adaLN). `dlm generate --tensor-parallel 2` prints what one process prints and `dlm bench decode
--tensor-parallel 2` measures the same decoding work; a model whose heads
do not split is a clear error.

    python -m pytest tests/test_tensor_parallel.py -q
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from decode_helpers import real_model
from published import write_dit, write_llada, write_qwen, write_tokenizer

from dlm.decoding import DecodeConfig, Decoder
from dlm.errors import DLMError
from dlm.families import family_of

pytestmark = pytest.mark.slow

PROMPTS = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14]]
OWN = {"mdlm": ("mdlm", None), "bd3lm": ("bd3lm", 4), "e2d2": ("e2d2", 4)}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    dirs = {"llada": str(root / "llada"), "sdar": str(root / "sdar"), "mdlm_owt": str(root / "dit")}
    write_llada(dirs["llada"])
    write_qwen(dirs["sdar"], "sdar")
    write_tokenizer(dirs["sdar"], "sdar")
    write_dit(dirs["mdlm_owt"], "mdlm")
    return dirs


def _build(case: str, path):
    from dlm.loading import load_model

    if case in OWN:
        return real_model(*OWN[case], seed=1)
    return load_model(path)


def _run_all(cases: dict, tp: int) -> dict:
    """Each case's logits on one input and its tokens per cache mode (greedy, and one sampled
    run), with the model sharded over `tp` ranks (run inside the ranks) or whole (tp 1)."""
    from dlm.parallel import init_rank, place

    if tp > 1:
        init_rank(tp, "cpu")
    out = {}
    for case, path in cases.items():
        model = place(_build(case, path), "cpu")
        assert getattr(model, "tensor_parallel", 1) == tp
        if tp > 1:  # each rank holds its share of the heads, the MLP width and the vocabulary
            c, attn, mlp = model.config, model.layers[0].self_attn, model.layers[0].mlp
            assert attn.q_proj.weight.to_local().shape[0] == c.num_attention_heads * c.head_dim // tp
            assert attn.k_proj.weight.to_local().shape[0] == c.num_key_value_heads * c.head_dim // tp
            assert mlp.down_proj.weight.to_local().shape[1] == c.intermediate_size // tp
            assert model.lm_head.weight.to_local().shape[0] == c.vocab_size // tp
        fam = family_of(model.config)
        with torch.no_grad():
            logits = model(torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])).logits
        dec, toks = Decoder(model), {}
        for cache in fam.caches:
            for temp in (0.0, 1.0):
                cfg = DecodeConfig.for_family(fam, model.config.block_size, max_new_tokens=16, unmask="threshold",
                                              threshold=0.3, cache=cache, temperature=temp, seed=3,
                                              stop_at_eos=False, block_length=None if fam.block_causal else 8)
                toks[f"{cache} t={temp}"] = [r.tokens for r in dec.generate(PROMPTS, cfg)]
        out[case] = (logits, toks)
    return out


def test_two_ranks_give_the_single_process_logits_and_tokens(published):
    from dlm.parallel import launch

    cases = {**{k: None for k in OWN}, **published}
    single = _run_all(cases, 1)
    sharded = launch(2, _run_all, cases, 2)
    for case in cases:
        (a, ta), (b, tb) = single[case], sharded[case]
        assert torch.allclose(a, b, atol=1e-5), (case, (a - b).abs().max())
        assert ta == tb, case
        assert len(ta) == 2 * len(family_of(_build(case, cases[case]).config).caches)


def test_a_shape_that_does_not_split_is_a_clear_error():
    from dlm.parallel import check_shardable

    model = real_model("mdlm")  # 2 heads
    with pytest.raises(DLMError, match="num_attention_heads .2. divisible by 4"):
        check_shardable(model.config, 4)
    check_shardable(model.config, 2)


def test_generate_on_two_ranks_prints_the_single_process_output(published):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    outs = []
    for tp in ("1", "2"):
        r = subprocess.run([sys.executable, "-m", "dlm.cli", "generate", published["sdar"], "--tensor-parallel", tp,
                            "--max-new-tokens", "8", "--temperature", "0"],
                           input="ab\ncd\n", capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append([json.loads(line) for line in r.stdout.strip().splitlines()])
    strip = [[{k: v for k, v in o.items() if not k.endswith("_s")} for o in out] for out in outs]
    assert len(strip[0]) == 2 and strip[0] == strip[1]
    r = subprocess.run([sys.executable, "-m", "dlm.cli", "generate", published["sdar"], "--tensor-parallel", "3",
                        "--prompt", "ab", "--max-new-tokens", "4"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2 and "divisible by 3" in r.stderr and "Traceback" not in r.stderr


def test_place_shards_the_host_model_before_moving_it(monkeypatch):
    """Under tensor parallelism `place` splits the model while it is still where it was loaded
    (the host) and only then moves it: each rank's device receives its shard, never the whole
    model. Without ranks it only moves the model."""
    import dlm.parallel as P

    events = []
    model = torch.nn.Linear(2, 2)
    real_to = model.to
    monkeypatch.setattr(model, "to", lambda *a, **k: (events.append("to"), real_to(*a, **k))[1])
    monkeypatch.setattr(P, "shard_model", lambda m, mesh: (events.append(("shard", next(m.parameters()).device.type)), m)[1])
    assert P.place(model, "cpu") is model and events == ["to"]
    events.clear()
    monkeypatch.setattr(P, "_MESH", type("Mesh", (), {"size": lambda self: 2})())
    P.place(model, "cpu")
    assert events == [("shard", "cpu"), "to"]


def test_bench_decode_on_two_ranks_measures_what_one_process_does(published, tmp_path):
    """`dlm bench decode --tensor-parallel 2` runs the benchmark on 2 ranks (recorded in its
    JSON) with the single process's decoding work: the same generated tokens, forwards and
    accuracy per configuration (timings aside)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = []
    for tp in ("1", "2"):
        out = tmp_path / f"tp{tp}.json"
        r = subprocess.run([sys.executable, "-m", "dlm.cli", "bench", "decode", published["sdar"], "--tensor-parallel",
                            tp, "--lengths", "8", "--n-prompts", "2", "--batch-size", "2", "--configs",
                            "threshold+exact,vanilla", "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(json.loads(out.read_text()))
    assert [d["tensor_parallel"] for d in runs] == [1, 2]
    work = [[{k: v for k, v in row.items() if k in ("config", "generated_tokens", "nfe", "accuracy")}
             for row in d["results"]] for d in runs]
    assert len(work[0]) == 2 and work[0] == work[1]

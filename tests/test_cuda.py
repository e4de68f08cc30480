"""On a CUDA device (run by `evals/gpu_check.sh`; skipped where there is none): the decoder gives
the CPU's tokens in float32 for every cache mode, runs in bfloat16, and the block-sparse
FlexAttention path gives the dense path's logits.

    python -m pytest -m cuda tests/test_cuda.py -q
"""

import pytest
import torch
from decode_helpers import MASK, real_model

from dlm.decoding import DecodeConfig, Decoder

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (evals/gpu_check.sh)")]

PROMPTS = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14]]


@pytest.mark.parametrize("objective,block,caches", [("mdlm", None, ("none", "prefix", "dual")),
                                                    ("bd3lm", 4, ("none", "exact"))])
def test_cuda_float32_decodes_the_cpu_tokens(objective, block, caches):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = real_model(objective, block=block)
    gpu = real_model(objective, block=block).to("cuda")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, MASK, MASK]])
    a = cpu(ids).logits
    b = gpu(ids.cuda()).logits.cpu()
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    for cache in caches:
        cfg = DecodeConfig(max_new_tokens=16, unmask="threshold", threshold=0.3, cache=cache, temperature=0.0,
                           stop_at_eos=False, **({} if block else {"block_length": 8}))
        want = [r.tokens for r in Decoder(cpu).generate(PROMPTS, cfg)]
        got = [r.tokens for r in Decoder(gpu).generate(PROMPTS, cfg)]
        assert got == want, cache


@pytest.mark.parametrize("objective,block", [("mdlm", None), ("bd3lm", 4)])
def test_cuda_flex_decoding_gives_the_cpu_tokens(objective, block):
    """attention_backend flex on CUDA: the steps' masks go to compiled FlexAttention as block
    masks; float32 tokens equal the CPU's (SDPA, dense masks) for every cache mode."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = real_model(objective, block=block)
    gpu = real_model(objective, block=block).to("cuda")
    gpu.config.attention_backend = "flex"
    assert Decoder(gpu).flex
    for cache in Decoder(cpu).family.caches:
        cfg = DecodeConfig(max_new_tokens=16, unmask="threshold", threshold=0.3, cache=cache, temperature=0.0,
                           stop_at_eos=False, **({} if block else {"block_length": 8}))
        want = [r.tokens for r in Decoder(cpu).generate(PROMPTS, cfg)]
        assert [r.tokens for r in Decoder(gpu).generate(PROMPTS, cfg)] == want, cache


def test_cuda_bfloat16_decodes_with_every_cache():
    for objective, block in (("mdlm", None), ("bd3lm", 4)):
        model = real_model(objective, block=block).to("cuda", torch.bfloat16)
        dec = Decoder(model)
        for cache in dec.family.caches:
            cfg = DecodeConfig(max_new_tokens=16, unmask="threshold", threshold=0.3, cache=cache, temperature=1.0,
                               stop_at_eos=False, **({} if block else {"block_length": 8}))
            res = dec.generate(PROMPTS, cfg)
            assert all(len(r.tokens) == 16 and MASK not in r.tokens for r in res), cache


def test_cuda_flex_attention_matches_dense_block_masks():
    """BD3-LM's training forward over cat(x_t, x0): the FlexAttention block mask (the default on
    CUDA) gives the dense mask's logits, and its backward runs."""
    from dlm.objectives import make_objective

    model = real_model("bd3lm", block=4).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randint(3, 30, (2, 32), device="cuda", generator=g)
    masked = torch.rand(2, 32, device="cuda", generator=g) < 0.5
    xt = torch.where(masked, torch.full_like(x0, MASK), x0)
    outs = []
    for backend in ("sdpa", "flex"):
        model.config.attention_backend = backend
        outs.append(make_objective(model.config).masked_logits(model, x0, xt, None, masked))
    assert torch.allclose(outs[0], outs[1], atol=1e-4), (outs[0] - outs[1]).abs().max()
    outs[1].float().logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("objective,block", [("mdlm", None), ("ar", None), ("bd3lm", 4)])
def test_cuda_training_loss_and_backward_do_not_sync(objective, block):
    """A training micro-batch as the trainer runs it (host batch and noise, model on CUDA): the
    loss and its backward make no synchronizing CUDA call (torch.cuda.set_sync_debug_mode)."""
    import warnings

    from dlm.objectives import make_objective

    model = real_model(objective, block=block).to("cuda").train()
    obj = make_objective(model.config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 30, (2, 32), generator=g)
    noise = obj.draw_noise(2, 32, g)
    obj.loss(model, ids, None, noise).loss.backward()  # warm-up (allocations, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            obj.loss(model, ids, None, noise).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchronizing" in str(w.message)]
    assert syncs == [], syncs


def _steps_with_sync_warnings(dec, prompts, cfg):
    """Each step's count of synchronizing CUDA calls (torch.cuda.set_sync_debug_mode)."""
    import warnings

    reqs = [dec.new_request(p, cfg, seed=i) for i, p in enumerate(prompts)]
    counts = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        while True:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                stepped = dec.step(reqs)
            if not stepped:
                break
            counts.append(sum("synchronizing" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return reqs, counts


@pytest.mark.parametrize("static", [False, True])
def test_cuda_greedy_threshold_step_syncs_once(static):
    """The GPU-grade step: on the greedy threshold path with the exact cache, one synchronizing
    call per step (the canvases to the host), dynamic or bucketed shapes."""
    model = real_model("bd3lm", block=4).to("cuda")
    cfg = DecodeConfig(max_new_tokens=16, unmask="threshold", threshold=0.3, cache="exact", stop_at_eos=False)
    _, counts = _steps_with_sync_warnings(Decoder(model, static_shapes=static), PROMPTS, cfg)
    assert counts and max(counts) <= 1, counts


def test_cuda_graphs_decode_the_eager_tokens():
    """--compile on CUDA: the exact cache's block steps replay CUDA graphs (torch.compile
    "reduce-overhead", bucketed shapes) and give the eager tokens."""
    from dlm.runtime import compile_model

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = DecodeConfig(max_new_tokens=16, unmask="threshold", threshold=0.3, cache="exact", stop_at_eos=False)
    want = [r.tokens for r in Decoder(real_model("bd3lm", block=4).to("cuda")).generate(PROMPTS, cfg)]
    model = compile_model(real_model("bd3lm", block=4).to("cuda"))
    dec = Decoder(model)
    assert dec.static_shapes
    for _ in range(2):  # the first run captures, the second replays
        assert [r.tokens for r in dec.generate(PROMPTS, cfg)] == want

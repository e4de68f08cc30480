"""Train the small models whose outputs tests/test_golden.py pins (run once; the weights are
committed beside this file so the golden values do not depend on training numerics):

    python tests/golden/make_models.py

A random model predicts the same token at every masked position, which would pin very little;
these are trained for a few hundred steps on a synthetic language (arithmetic progressions mod
40, each row ending in EOS), so their predictions depend on position and context, some are
confident and some are not, and decoding meets EOS. One per objective (MDLM, RADD, BD3-LM,
E2D2, AR and a time-conditioned MDLM), 64-token vocabulary, 32 wide, 2 layers. Beside them
`served/`: a byte-level BPE tokenizer (300 tokens) and an MDLM trained on short sentences of a
small word list, which the golden server test serves.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dlm.model import DLMConfig, DLMModel
from dlm.objectives import make_objective

HERE = Path(__file__).parent
V, MASK, BOS, EOS, PAD = 64, 63, 0, 1, 2
NAMES = ("mdlm", "radd", "bd3lm", "e2d2", "ar", "mdlm-tc")


def config(name: str) -> DLMConfig:
    obj = "mdlm" if name == "mdlm-tc" else name
    kw = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=128, mask_token_id=MASK, bos_token_id=BOS, eos_token_id=EOS,
              pad_token_id=PAD, objective=obj, time_conditioning=name == "mdlm-tc", cond_dim=32)
    if obj in ("bd3lm", "e2d2"):
        kw["block_size"] = 4
    if obj == "e2d2":
        kw["num_decoder_layers"] = 1
    return DLMConfig(**kw)


def batch(gen: torch.Generator, n: int = 32, L: int = 32):
    """BOS, then x_i = 3 + (a + b i) mod 40 for a random length, then EOS up to L."""
    a = torch.randint(0, 40, (n, 1), generator=gen)
    b = torch.randint(1, 5, (n, 1), generator=gen)
    body = 3 + (a + b * torch.arange(L - 1)[None]) % 40
    length = torch.randint(8, L - 4, (n, 1), generator=gen)
    body = torch.where(torch.arange(L - 1)[None] < length, body, EOS)
    ids = torch.cat([torch.full((n, 1), BOS), body], dim=1)
    return ids, torch.ones_like(ids)


def train(name: str, steps: int = 400) -> DLMModel:
    torch.manual_seed(NAMES.index(name))
    model = DLMModel(config(name))
    obj = make_objective(model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(100 + NAMES.index(name))
    for _ in range(steps):
        ids, am = batch(gen)
        loss = obj.loss(model, ids, am, obj.draw_noise(ids.shape[0], ids.shape[1], gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"{name}: final loss {loss.item():.3f}")
    return model.eval()


WORDS = 'the cat sat on 12 mats ; {"name": "bob", "age": 42} [1, 2, 3] yes no maybe hello world'.split()


def train_served(steps: int = 400) -> None:
    """An MDLM over sentences of WORDS with its own tokenizer: realistic text for the server."""
    import random

    from transformers import AutoTokenizer

    from dlm.tokenizer import train_tokenizer

    out = HERE / "models" / "served"
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(300)]
    train_tokenizer(texts, out, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(str(out))
    torch.manual_seed(0)
    cfg = DLMConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, mask_token_id=tok.convert_tokens_to_ids("<|mask|>"),
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    max_position_embeddings=128)
    model = DLMModel(cfg)
    obj = make_objective(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(7)
    L = 32
    for _ in range(steps):
        rows = []
        for _ in range(32):
            ids = tok.encode(rng.choice(texts), add_special_tokens=False)[: L - 2]
            rows.append([tok.bos_token_id, *ids, tok.eos_token_id] + [tok.eos_token_id] * (L - 2 - len(ids)))
        ids = torch.tensor(rows)
        loss = obj.loss(model, ids, torch.ones_like(ids), obj.draw_noise(len(rows), L, gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"served: final loss {loss.item():.3f}")
    model.eval().save_pretrained(out)


def main() -> None:
    torch.set_num_threads(1)
    for name in NAMES:
        train(name).save_pretrained(HERE / "models" / name)
    train_served()


if __name__ == "__main__":
    main()

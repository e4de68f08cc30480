"""Shared by the decoder's tests: a model whose logits are known, a recording chooser, and tiny
random real models of every objective."""

import math

import torch

from dlm.decoding import Decoder
from dlm.decoding.sampling import TokenChooser
from dlm.model import DLMConfig, DLMModel

V, BOS, EOS, PAD, MASK = 32, 0, 1, 2, 31
WIN = [5, 6, 7, 8, 9, 10, 11, 12]  # the winning token of each position in peaked tables
CONF = [0.5, 0.97, 0.6, 0.99, 0.7, 0.3, 0.95, 0.8]  # and its probability


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
        out = kw.get("output_positions")
        if out is not None:  # like DLMModel: only there, flattened (a boolean mask or row-major indices)
            logits = logits[out] if out.dtype == torch.bool else logits.reshape(-1, logits.shape[-1])[out]
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


def real_model(objective="mdlm", block=None, seed=0):
    torch.manual_seed(seed)
    extra = {"num_hidden_layers": 1, "num_decoder_layers": 1} if objective == "e2d2" else {}
    cfg = DLMConfig.from_preset("debug", vocab_size=V, mask_token_id=MASK, bos_token_id=BOS, eos_token_id=EOS,
                                pad_token_id=PAD, objective=objective, block_size=block,
                                attention_backend="sdpa", **extra)
    return DLMModel(cfg).eval()

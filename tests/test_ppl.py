"""Perplexity and its Monte Carlo error: per-sequence NLLs add up to the batch total, the
reported standard error matches the spread of the estimate over independent noise seeds, and
the AR model's exact perplexity has none.

    python -m pytest tests/test_ppl.py -q
"""

import math
import statistics
from pathlib import Path

import pytest
import torch

from dlm.model import DLMModel
from dlm.objectives import make_objective
from dlm.likelihood import perplexity

MODELS = Path(__file__).parent / "golden" / "models"


def rows(n=12, L=24):
    ids = torch.full((n, L), 1)
    ids[:, 0] = 0
    for r in range(n):
        k = 6 + r
        ids[r, 1 : 1 + k] = 3 + (2 * r + (r % 3 + 1) * torch.arange(k)) % 40
    return ids, torch.ones_like(ids)


class Rows:
    def __init__(self, ids, am):
        self.ids, self.am = ids, am

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, sl):
        return {"input_ids": self.ids[sl], "attention_mask": self.am[sl]}


@pytest.mark.parametrize("name", ["mdlm", "radd", "bd3lm", "e2d2", "ar"])
def test_per_sequence_nll_adds_up_to_the_total(name):
    model = DLMModel.from_pretrained(MODELS / name).eval()
    obj = make_objective(model.config)
    ids, am = rows()
    with torch.no_grad():
        out = obj.loss(model, ids, am, obj.draw_noise(len(ids), ids.shape[1], torch.Generator().manual_seed(0)))
    assert out.nll_rows.shape == (len(ids),)
    assert float(out.nll_rows.sum()) == pytest.approx(float(out.nll_sum), rel=1e-6)  # (the total sums in float32)


@pytest.mark.parametrize("name", ["mdlm", "bd3lm"])
def test_standard_error_matches_the_spread_over_noise_seeds(name):
    """The reported nll_se against the standard deviation of the estimate itself over 24
    independent seeds: the same order of magnitude (the per-sequence variance over stratified
    draws makes it somewhat conservative), and never zero."""
    model = DLMModel.from_pretrained(MODELS / name).eval()
    data = Rows(*rows())
    runs = [perplexity(model, data, batch_size=6, mc_samples=4, seed=s) for s in range(24)]
    spread = statistics.stdev(r["nll"] for r in runs)
    se = statistics.mean(r["nll_se"] for r in runs)
    assert spread > 0 and 0.5 < se / spread < 3.0, (se, spread)
    r = runs[0]
    assert r["ppl_low"] < r["ppl"] < r["ppl_high"]
    assert r["ppl_high"] == pytest.approx(math.exp(r["nll"] + 1.96 * r["nll_se"]))
    one = perplexity(model, data, batch_size=6, mc_samples=1, seed=0)
    assert one["nll_se"] is None and one["ppl_low"] is None  # no error estimate from one draw


def test_exact_perplexity_has_no_monte_carlo_error():
    model = DLMModel.from_pretrained(MODELS / "ar").eval()
    r = perplexity(model, Rows(*rows()), batch_size=6, mc_samples=4)
    assert r["nll_se"] == 0.0 and r["ppl_low"] == r["ppl"] == r["ppl_high"]

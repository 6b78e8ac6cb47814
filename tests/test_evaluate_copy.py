"""Held-out copy accuracy (trainer/evaluate.py: copy_accuracy): which tokens count, and that a
copier scores 1 where a model that cannot look back scores near chance."""

import random
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from trainer.config import TrainConfig, cp_strategies, validate
from trainer.data.synthetic import COPY_SEP, copy_example
from trainer.data.tokenizer import ByteTokenizer
from trainer.evaluate import copy_accuracy, copy_labels

TOK = ByteTokenizer()
SEP = set(TOK.encode(COPY_SEP))


def _cfg(**trainer):
    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainConfig), {"data": {"seq_len": 64}, "trainer": {"copy_samples": 6, **trainer}}
    )
    return OmegaConf.to_object(cfg)


def test_copy_example_spans_are_the_repeats_only():
    ids, spans = copy_example(TOK, 5, 3, random.Random(0))
    text = TOK.decode(ids[:5])
    assert TOK.decode(ids[:-1]) == COPY_SEP.join([text] * 3) and ids[-1] == TOK.eos_id
    assert spans == [(8, 13), (16, 21)]  # after "xxxxx | " and "xxxxx | xxxxx | "
    assert all(TOK.decode(ids[a:b]) == text for a, b in spans)
    labels = copy_labels(ids, spans)
    assert len(labels) == len(ids) - 1
    scored = [t for t, y in enumerate(labels) if y != -100]
    assert scored == [*range(7, 12), *range(15, 20)]  # the logit before each repeated character
    assert all(labels[t] == ids[t + 1] for t in scored)


class _Copier(torch.nn.Module):
    """Predicts the next token as the one ``period`` tokens before it (a perfect copier of the
    repeats), except a wrong guess where the true next token is a separator, eos or padding,
    and where there is nothing to copy from (the first writing). ``period=None``: always wrong."""

    def __init__(self, period, vocab=TOK.vocab_size):
        super().__init__()
        self.period, self.vocab = period, vocab

    def forward(self, ids, positions, ctx):
        b, n = ids.shape
        guess = torch.full((b, n), ord("#"))  # never a copy string's character
        if self.period is not None:
            for t in range(n - 1):
                src, nxt = t + 1 - self.period, ids[:, t + 1]
                if src >= 0:
                    ok = (nxt != 0) & ~torch.isin(nxt, torch.tensor(sorted(SEP)))
                    guess[:, t] = torch.where(ok, ids[:, src], guess[:, t])
        return torch.nn.functional.one_hot(guess, self.vocab).float()


@pytest.mark.parametrize("repeats", [2, 3])
def test_a_copier_scores_one_and_a_non_copier_zero(repeats):
    cfg = _cfg(copy_repeats=repeats)
    mesh = SimpleNamespace(cp=1, cp_rank=0, cp_group=None, device=torch.device("cpu"), subgroups={})
    strategies = cp_strategies(cfg)
    n = 10
    period = n + len(COPY_SEP)
    # counting any separator, the first writing, eos, or shifting by one token would score < 1
    assert copy_accuracy(_Copier(period), TOK, n, cfg, mesh, strategies) == 1.0
    assert copy_accuracy(_Copier(period + 1), TOK, n, cfg, mesh, strategies) < 0.2  # the wrong offset
    assert copy_accuracy(_Copier(None), TOK, n, cfg, mesh, strategies) == 0.0


def test_copy_lengths_must_fit_the_row():
    with pytest.raises(ValueError, match="trainer.copy_lengths has 40: 2 writings"):
        validate(_cfg(copy_lengths=[8, 40]), 1)
    with pytest.raises(ValueError, match="copy_repeats=1 must be >= 2"):
        validate(_cfg(copy_lengths=[8], copy_repeats=1), 1)
    validate(_cfg(copy_lengths=[8, 30]), 1)

"""Tests of mim3d.engine.optim: learning-rate schedule, parameter groups, set_lr."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from mim3d.engine.optim import param_groups, set_lr, warmup_cosine


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 1e-3 * 1 / 4),  # warm-up starts above 0
        (1, 1e-3 * 2 / 4),
        (3, 1e-3),  # last warm-up step reaches the peak
        (4, 1e-3),  # cosine t = 0
        (9, 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 5 / 10))),  # t = 1/2
        (11, 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 7 / 10))),
        (14, 1e-4),  # total_steps
        (100, 1e-4),  # constant afterwards
    ],
)
def test_warmup_cosine_values(step, expected):
    lr = warmup_cosine(step, base_lr=1e-3, warmup_steps=4, total_steps=14, min_lr=1e-4)
    assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_warmup_cosine_no_warmup_and_monotone():
    assert warmup_cosine(0, base_lr=0.5, warmup_steps=0, total_steps=10) == pytest.approx(0.5)
    assert warmup_cosine(5, base_lr=0.5, warmup_steps=0, total_steps=10) == pytest.approx(0.25)
    lrs = [warmup_cosine(s, base_lr=1.0, warmup_steps=10, total_steps=50) for s in range(60)]
    assert all(a < b for a, b in pairwise(lrs[:10]))
    assert all(a >= b for a, b in pairwise(lrs[9:]))
    assert lrs[-1] == 0.0


def test_warmup_cosine_bad_args():
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, base_lr=1.0, warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError):
        warmup_cosine(-1, base_lr=1.0, warmup_steps=0, total_steps=10)
    with pytest.raises(ValueError):
        warmup_cosine(0, base_lr=1.0, warmup_steps=0, total_steps=0)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.token_proj = nn.Linear(8, 8)  # a weight matrix despite "token" in its path
        self.dec = nn.ModuleDict({"pos_embed": nn.Embedding(4, 8)})
        self.conv = nn.Conv3d(1, 8, 2, stride=2)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm3d(8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2, bias=False)
        self.gain = nn.Parameter(torch.ones(8))  # custom 1-D scale
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)


def test_param_groups_split():
    model = _Tiny()
    groups = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {g["group_name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_name["decay"] == ["conv.weight", "head.weight", "proj.weight",
                                "token_proj.weight"]
    assert by_name["no_decay"] == sorted([
        "mask_token", "pos_embed", "dec.pos_embed.weight", "token_proj.bias", "conv.bias", "norm.weight", "norm.bias", "bn.weight",
        "bn.bias", "proj.bias", "gain",
    ])
    wd = {g["group_name"]: g["weight_decay"] for g in groups}
    assert wd == {"decay": 0.05, "no_decay": 0.0}
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


def test_param_groups_tied_and_empty():
    lin = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # tied: listed once
    groups = param_groups(model, weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["group_name"] == "decay"
    assert len(groups[0]["params"]) == 1
    with pytest.raises(ValueError):
        param_groups(model, weight_decay=-1.0)


def test_set_lr_respects_lr_scale():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 2e-4])

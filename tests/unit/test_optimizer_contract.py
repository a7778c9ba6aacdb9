"""DecoupledOptimizer honours torch.optim.Optimizer's contract: step hooks, LR schedulers,
swa_utils, and a state dict in torch's format that DCP's state-dict functions carry."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.optim import lr_scheduler, swa_utils
from torch.optim.optimizer import register_optimizer_step_post_hook

import deto
from deto.comm import Comm


def make(replicators=None, base=torch.optim.AdamW, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    names = {p: n for n, p in model.named_parameters()}
    reps = replicators if replicators is not None else [deto.DeMo(blocks="2d", topk=4, chunk=8)]
    opt = deto.DecoupledOptimizer(
        base(model.parameters(), lr=0.01), reps, Comm(None, 1), param_names=names, **kw
    )
    return model, opt


def step(model, opt, s, scheduler=None):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(s))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    if scheduler is not None:
        scheduler.step()


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


# -- step hooks -------------------------------------------------------------------------------
def test_step_pre_and_post_hooks_fire_around_every_step():
    model, opt = make()
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.step_count)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.step_count)))
    for s in range(2):
        step(model, opt, s)
    assert calls == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2)]


def test_global_optimizer_hooks_see_the_decoupled_optimizer():
    model, opt = make()
    seen = []
    handle = register_optimizer_step_post_hook(
        lambda o, args, kwargs: seen.append(type(o).__name__)
    )
    try:
        step(model, opt, 0)
    finally:
        handle.remove()
    assert "DecoupledOptimizer" in seen


# -- LR schedulers and SWA ----------------------------------------------------------------------
SCHEDULERS = {
    "lambda": lambda opt: lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)),
    "cosine": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=6),
    "onecycle": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=6),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_lr_scheduler_resumes_through_dcp_state_dicts(kind):
    """6 steps straight == 3 steps, optimizer and scheduler state through DCP's
    get/set_optimizer_state_dict, 3 more (the groups' ``initial_lr`` and betas included)."""
    model, opt = make()
    sched = SCHEDULERS[kind](opt)
    lrs = []
    for s in range(6):
        step(model, opt, s, sched)
        lrs.append(opt.param_groups[0]["lr"])
        if s == 2:
            saved_model = copy.deepcopy(model.state_dict())
            saved_opt = copy.deepcopy(get_optimizer_state_dict(model, opt))
            saved_sched = sched.state_dict()

    model2, opt2 = make()
    sched2 = SCHEDULERS[kind](opt2)
    model2.load_state_dict(saved_model)
    set_optimizer_state_dict(model2, opt2, saved_opt)
    sched2.load_state_dict(saved_sched)
    lrs2 = lrs[:3]
    for s in range(3, 6):
        step(model2, opt2, s, sched2)
        lrs2.append(opt2.param_groups[0]["lr"])
    assert lrs2 == lrs
    assert len(set(lrs)) > 1  # the schedule did change the rate
    assert same_params(model, model2)


def test_swa_and_ema_models_follow_the_steps():
    model, opt = make(sign=True)
    swa = swa_utils.AveragedModel(model)
    ema = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9))
    opt.register_step_post_hook(lambda *_: ema.update_parameters(model))  # EMA on every step
    sched = swa_utils.SWALR(opt, swa_lr=0.002, anneal_epochs=2)
    history = []
    for s in range(4):
        step(model, opt, s, sched)
        swa.update_parameters(model)
        history.append([p.detach().clone() for p in model.parameters()])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)
    assert int(ema.n_averaged) == 4
    for i, p in enumerate(swa.module.parameters()):
        assert torch.allclose(p, sum(h[i] for h in history) / 4, atol=1e-6)
    for i, p in enumerate(ema.module.parameters()):
        expected = history[0][i]
        for h in history[1:]:
            expected = 0.9 * expected + 0.1 * h[i]
        assert torch.allclose(p, expected, atol=1e-6)


# -- state dicts ------------------------------------------------------------------------------
def test_state_dict_is_torch_format_with_the_base_state_first():
    model, opt = make([deto.DeMo(blocks="2d", topk=4, chunk=8), deto.Full(every=2)])
    step(model, opt, 0)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert list(sd["state"]) == [0, 1, 2, 3]
    keys = list(sd["state"][0])
    assert keys[:3] == ["step", "exp_avg", "exp_avg_sq"]  # AdamW's own, first
    assert keys[3:] == ["deto.0.demo.delta", "deto.1.full.pending"]
    group = sd["param_groups"][0]
    assert group["lr"] == 0.01 and group["params"] == [0, 1, 2, 3]
    assert (group["deto.step"], group["deto.0.demo.fired"], group["deto.1.full.fired"]) == (1, 1, 0)
    assert opt.state[model[0].weight].keys() == sd["state"][0].keys()


def test_a_fresh_optimizer_state_dict_already_has_every_key():
    """It is the template a DCP load fills, so it must list what a checkpoint holds."""
    model, opt = make()
    fresh = get_optimizer_state_dict(model, opt)
    trained_model, trained = make()
    step(trained_model, trained, 0)
    later = get_optimizer_state_dict(trained_model, trained)
    assert {k: set(v) for k, v in fresh["state"].items()} == {
        k: set(v) for k, v in later["state"].items()
    }
    assert set(fresh["param_groups"][0]) == set(later["param_groups"][0])
    assert opt.step_count == 0  # taking it ran no replication step


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("replicators", ["demo", "full-every-2", "random+diloco"])
def test_dcp_state_dict_functions_round_trip_bitwise(replicators, flatten):
    factory = {
        "demo": lambda: [deto.DeMo(blocks="2d", topk=4, chunk=8)],
        "full-every-2": lambda: [deto.Full(every=2)],
        "random+diloco": lambda: [deto.RandomSubset(rate=0.3), deto.DiLoCo(every=2)],
    }[replicators]
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, opt = make(factory())
    for s in range(3):
        step(model, opt, s)
    model_sd, optim_sd = copy.deepcopy(get_state_dict(model, opt, options=options))

    model2, opt2 = make(factory())
    get_state_dict(model2, opt2, options=options)  # the template, as a DCP load takes it
    set_state_dict(
        model2, opt2, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options
    )
    assert opt2.step_count == 3
    for s in range(3, 7):
        step(model, opt, s)
        step(model2, opt2, s)
    assert same_params(model, model2)


def test_loading_state_of_another_replicator_list_is_a_clear_error():
    model, opt = make([deto.DeMo(blocks="2d", topk=4, chunk=8)])
    step(model, opt, 0)
    sd = opt.state_dict()
    _, other = make([deto.Full()])
    with pytest.raises(ValueError, match="replicator counters"):
        other.load_state_dict(sd)


def test_state_dict_hooks_fire():
    model, opt = make()
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd)))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("loaded"))
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert seen == [["param_groups", "state"], "loaded"]

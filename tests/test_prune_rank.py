"""PrunedLoRA rank pruning (prune.py section 1): closed-form checks of the Lagrangian score and update,
pruned components neutral, stacked adapters == one at a time, no reactivation, exact final ranks,
slicing == masking, and that the default score is in loss units."""
import math

import numpy as np
import pytest
import torch

import prune
from conftest import tiny_model
from lora import apply_lora, load_adapter, lora_modules, save_adapter
from prune import (RANK_METHODS, accumulate_fisher, activation_stats, adapter_groups, apply_recovery,
                   choose_components, damped, group_scores, lagrangian_scores, obs_updates, prune_components,
                   quadratic_change, rank_prune_state, rank_prune_step, rank_schedule_end, ranking_test,
                   removal_values, slice_adapters, spearman, update_sensitivity)


def one_set(k, Q):
    """The (1, k) mask of the set of components Q (obs_updates' P)."""
    return (torch.arange(k)[None, :, None] == torch.tensor(Q)).any(-1)


def spd(k, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(3 * k, k))
    return X.T @ X / (3 * k) + 0.1 * np.eye(k)


def kkt(H, g, w, Q):
    """min g.d + 1/2 d^T H d  s.t.  d_Q = -w_Q, by solving the KKT linear system; returns (d, value)."""
    k, q = len(g), len(Q)
    E = np.zeros((k, q))
    E[Q, range(q)] = 1.0
    K = np.block([[H, E], [E.T, np.zeros((q, q))]])
    d = np.linalg.solve(K, np.concatenate([-g, -w[Q]]))[:k]
    return d, g @ d + 0.5 * d @ H @ d


def test_lagrangian_score_and_update_match_kkt_solution():
    k, rows = 6, 5
    rng = np.random.default_rng(0)
    H, G, W = spd(k, 1), rng.normal(size=(rows, k)), rng.normal(size=(rows, k))
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    scores = lagrangian_scores(t(W), t(G), t(H))
    D = obs_updates(t(W), t(G), t(H), torch.eye(k, dtype=torch.bool), eta=1.0)  # (rows, k sets {j}, k)
    values = quadratic_change(D, t(G), t(H))
    newton_value = sum(-0.5 * g @ np.linalg.solve(H, g) for g in G)  # the j-independent term
    for j in range(k):
        ds, vals = zip(*(kkt(H, G[i], W[i], [j]) for i in range(rows)))
        np.testing.assert_allclose(D[:, j].numpy(), np.stack(ds), atol=1e-10)
        np.testing.assert_allclose(scores[j].item(), sum(vals) - newton_value, rtol=1e-9)
        np.testing.assert_allclose(values[j].item(), sum(vals), rtol=1e-9)  # the score of record, eta = 1
    # a set of two components at once (the update an event applies)
    D2 = obs_updates(t(W), t(G), t(H), one_set(k, [1, 4]), eta=1.0)[:, 0]
    np.testing.assert_allclose(D2.numpy(), np.stack([kkt(H, G[i], W[i], [1, 4])[0] for i in range(rows)]), atol=1e-10)


def test_gradient_term_off_is_classical_obs():
    k, rows = 5, 4
    H, W = spd(k, 2), np.random.default_rng(3).normal(size=(rows, k))
    Hinv = np.linalg.inv(H)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    scores = lagrangian_scores(t(W), torch.zeros(rows, k, dtype=torch.float64), t(H))
    D = obs_updates(t(W), torch.zeros(rows, k, dtype=torch.float64), t(H), torch.eye(k, dtype=torch.bool), eta=1.0)
    for j in range(k):
        np.testing.assert_allclose(scores[j].item(), (0.5 * W[:, j] ** 2 / Hinv[j, j]).sum(), rtol=1e-9)
        np.testing.assert_allclose(D[:, j].numpy(), -(W[:, j] / Hinv[j, j])[:, None] * Hinv[:, j], atol=1e-10)


def test_trust_region_bounds_survivors_and_zeroes_the_pruned():
    k, rows, tau = 6, 7, 0.05
    rng = np.random.default_rng(4)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    W, G, H = t(rng.normal(size=(rows, k))), t(100 * rng.normal(size=(rows, k))), t(spd(k, 5))
    D = obs_updates(W, G, H, one_set(k, [2]), eta=1.0, tau=tau)[:, 0]
    assert torch.equal(D[:, 2], -W[:, 2])
    survivors = torch.cat([D[:, :2], D[:, 3:]], 1)
    assert (survivors.norm(dim=1) <= tau * W.norm(dim=1) * (1 + 1e-9)).all()
    assert (survivors.norm(dim=1) > 0.5 * tau * W.norm(dim=1)).all()  # the large Newton step was clipped, not dropped


@pytest.mark.parametrize("eta,tau,recovery", [(0.0, 0.0, True), (0.0, 0.1, True), (1.0, 0.0, True), (0.3, 0.05, True),
                                                (1.0, 1.0, True), (0.0, 0.1, False)])
def test_closed_form_score_of_record_equals_the_value_of_the_explicit_update(eta, tau, recovery):
    """removal_values (the score of record, without forming the updates) == quadratic_change of
    obs_updates for each single component, trust region and Newton share included."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        k, rows = 7, 6
        W, G, H = (torch.tensor(a) for a in (rng.normal(size=(rows, k)), 10.0 ** (seed - 2) * rng.normal(size=(rows, k)),
                                             spd(k, seed + 10)))
        explicit = quadratic_change(obs_updates(W, G, H, torch.eye(k, dtype=torch.bool), eta, tau, recovery), G, H)
        torch.testing.assert_close(removal_values(W, G, H, eta, tau, recovery), explicit, rtol=1e-9, atol=1e-12)


def test_pruned_components_are_neutral():
    """Over all k components with some pruned (zero in W and G, zero rows and columns of H, then damped with
    the mask), every score and update of the active ones equals the one computed over the active ones alone."""
    k, rows = 7, 5
    rng = np.random.default_rng(6)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    mask = t([1, 0, 1, 1, 0, 1, 1])
    S = mask.bool()
    W, G = t(rng.normal(size=(rows, k))) * mask, t(rng.normal(size=(rows, k))) * mask
    H0 = t(spd(k, 7)) * mask[:, None] * mask[None, :]
    H, H_S = damped(H0, 0.01, mask), damped(H0[S][:, S], 0.01, torch.ones(int(S.sum()), dtype=torch.float64))
    torch.testing.assert_close(H[S][:, S], H_S, rtol=1e-12, atol=0)
    torch.testing.assert_close(lagrangian_scores(W, G, H)[S], lagrangian_scores(W[:, S], G[:, S], H_S), rtol=1e-9, atol=1e-12)
    for eta, tau, recovery in ((0.0, 0.1, True), (0.5, 0.0, True), (1.0, 0.3, True), (0.0, 0.0, False)):
        torch.testing.assert_close(removal_values(W, G, H, eta, tau, recovery)[S],
                                   removal_values(W[:, S], G[:, S], H_S, eta, tau, recovery), rtol=1e-9, atol=1e-12)
        D = obs_updates(W, G, H, one_set(k, [0, 3]), eta, tau, recovery)[:, 0]
        D_S = obs_updates(W[:, S], G[:, S], H_S, one_set(k, [0, 3])[:, S], eta, tau, recovery)[:, 0]
        torch.testing.assert_close(D[:, S], D_S, rtol=1e-9, atol=1e-12)
        assert D[:, ~S].abs().max() < 1e-12  # the pruned stay where they are


# ----------------------------------------------------------------------------- on a tiny model
def data(seed, n=4, T=16):
    """Sequences of a fixed permutation walk of the vocabulary (learnable), as (idx, targets)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 97, (n, 1), generator=g)
    seq = (start * 5 ** torch.arange(T + 1)) % 97
    return seq[:, :-1], seq[:, 1:]


def lora_tiny(r=8, alpha=8, seed=0):
    model = tiny_model(seed)
    apply_lora(model, r=r, alpha=alpha)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.1)  # as after some training: both factors nonzero
    return model.train()


def train(model, opt, state, steps, cfg=None, heldout=None, first_step=1, grad_accum=2):
    logs = []
    for step in range(first_step, first_step + steps):
        for micro in range(grad_accum):
            _, loss = model(*data(1000 * step + micro))
            (loss / grad_accum).backward()
            accumulate_fisher(model, state, micro, grad_accum, batch_size=4)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg is not None:
            log = rank_prune_step(model, opt, step, cfg, state, heldout)
            logs.append(log) if log else None
    return logs


def test_pruned_component_and_its_adamw_state_stay_zero():
    model = lora_tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    state = rank_prune_state()
    train(model, opt, state, 3)
    m = lora_modules(model)["model.layers.0.self_attn.q_proj"]
    assert opt.state[m.lora_A]["exp_avg"][3].abs().sum() > 0
    prune_components(model, opt, {("model.layers.0.self_attn.q_proj",): one_set(8, [3, 5])})
    train(model, opt, state, 3, first_step=4)
    for p, part in ((m.lora_A, lambda x: x[[3, 5]]), (m.lora_B, lambda x: x[:, [3, 5]])):
        assert part(p).abs().max() == 0
        assert part(opt.state[p]["exp_avg"]).abs().max() == 0 and part(opt.state[p]["exp_avg_sq"]).abs().max() == 0
    assert m.lora_A[[0, 1, 2, 4, 6, 7]].abs().min(dim=1).values.gt(0).all()  # the others still train


@pytest.mark.parametrize("method", [m for m in RANK_METHODS if m != "random"])
def test_an_adapter_group_scores_and_recovers_as_its_adapters_alone(method):
    """An event stacks the adapters of a shape (adapter_groups); stacked, each scores and moves as it does alone,
    also when they have lost different components."""
    model = lora_tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state = rank_prune_state(sides="AB")
    train(model, opt, state, 2)
    mods = lora_modules(model)
    groups = adapter_groups(mods)
    assert max(len(names) for names in groups) == 4  # q_proj and o_proj of both layers (32 x 32) go together
    prune_components(model, opt, {(name,): one_set(8, list(range(i % 3))) for i, name in enumerate(mods)})
    train(model, opt, state, 2, first_step=3)
    update_sensitivity(model, state)
    activation_stats(model, data(7), state)
    alone = {(name,): group_scores(mods, (name,), method, state) for name in mods}
    for names in groups:
        torch.testing.assert_close(group_scores(mods, names, method, state),
                                   torch.cat([alone[(name,)] for name in names]), rtol=1e-5, atol=1e-7)
    chosen = choose_components(alone, k=2)
    idle = next(iter(mods))
    chosen[(idle,)][:] = False  # an adapter that loses nothing this event does not move, Newton share or not
    together = {names: torch.cat([chosen[(name,)] for name in names]) for names in groups}
    before = {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for name, m in mods.items()}
    apply_recovery(model, together, method, state, recovery_lr=0.5, side="AB")
    after = {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for name, m in mods.items()}
    for name, m in mods.items():
        with torch.no_grad():
            m.lora_A.copy_(before[name][0]), m.lora_B.copy_(before[name][1])
    for name in mods:
        apply_recovery(model, {(name,): chosen[(name,)]}, method, state, recovery_lr=0.5, side="AB")
    for name, m in mods.items():
        torch.testing.assert_close(after[name][0], m.lora_A.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(after[name][1], m.lora_B.detach(), rtol=1e-5, atol=1e-7)
        assert torch.equal(after[name][1], before[name][1]) == (name == idle)
    was_active = {name: m.rank_mask.clone() for name, m in mods.items()}
    prune_components(model, opt, together)
    for name, m in mods.items():
        gone = chosen[(name,)][0]
        assert torch.equal(m.rank_mask, was_active[name] * ~gone)
        for p, part in ((m.lora_A, lambda x: x[gone]), (m.lora_B, lambda x: x[:, gone])):
            assert part(p).abs().sum() == 0 and part(opt.state[p]["exp_avg"]).abs().sum() == 0


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_stacked_events_equal_events_one_adapter_at_a_time(allocation, monkeypatch):
    """rank_prune_step stacks each group of adapters on a GPU (forced here) and on a CPU takes them one at a time
    (masking them by groups): the same components go, the same updates land (to float rounding), over a schedule."""
    runs = []
    for stack in (True, False):
        if stack:
            monkeypatch.setattr(prune, "adapter_groups", lambda mods, **_: adapter_groups(mods, stack=True))
        else:
            monkeypatch.undo()
        model = lora_tiny(r=8)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        cfg = dict(rank_target=3, rank_every=2, rank_k=2, rank_start=1, rank_allocation=allocation, rank_floor=2,
                   rank_recovery_side="AB", rank_recovery_lr=0.3)
        logs = train(model, opt, rank_prune_state(sides="AB"), rank_schedule_end(8, cfg), cfg, heldout=data(7))
        runs.append((logs, lora_modules(model)))
    (logs, stacked), (logs_alone, alone) = runs
    assert len(logs) == len(logs_alone) == 3 and [log["ranks"] for log in logs] == [log["ranks"] for log in logs_alone]
    for name, m in stacked.items():
        assert torch.equal(m.rank_mask, alone[name].rank_mask)
        torch.testing.assert_close(m.lora_B, alone[name].lora_B, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.lora_A, alone[name].lora_A, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close([log["predicted"] for log in logs], [log["predicted"] for log in logs_alone], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("sides", ["B", "AB"])
def test_accumulate_fisher_sees_each_micro_batch_gradient(sides):
    """With gradient accumulation (loss / 2 per micro-batch, .grad summed) the sums hold each micro-batch's
    own gradient: compare with gradients computed one micro-batch at a time. A's sums only when asked for."""
    model = lora_tiny()
    name = "model.layers.1.self_attn.v_proj"
    m = lora_modules(model)[name]
    singles = []
    for micro in range(2):
        model.zero_grad()
        model(*data(micro))[1].backward()
        singles.append((m.lora_B.grad.clone(), m.lora_A.grad.clone()))
    model.zero_grad(set_to_none=True)
    state = rank_prune_state(sides=sides)
    for micro in range(2):
        (model(*data(micro))[1] / 2).backward()
        accumulate_fisher(model, state, micro, loss_scale=2)
    torch.testing.assert_close(state["grad_B"][name], singles[0][0] + singles[1][0])
    torch.testing.assert_close(state["fisher_B"][name], sum(gB.T @ gB for gB, _ in singles))
    if sides == "AB":
        torch.testing.assert_close(state["grad_A"][name], singles[0][1] + singles[1][1])
        torch.testing.assert_close(state["fisher_A"][name], sum(gA @ gA.T for _, gA in singles))
    else:
        assert state["grad_A"] == {} and state["fisher_A"] == {}
    assert state["n_micro"] == 2
    torch.testing.assert_close(state["last_grad"][name][0], m.lora_B.grad)  # the step's gradient, this adapter's
    torch.testing.assert_close(state["last_grad"][name][1], m.lora_A.grad)


def test_recovery_on_A_without_its_statistics_says_so_before_any_change():
    model = lora_tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state = rank_prune_state()  # sides "B"
    train(model, opt, state, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"rank_prune_state\(sides='AB'\)"):
        rank_prune_step(model, opt, 2, dict(rank_every=2, rank_recovery_side="AB"), state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_paper_recovery_on_A_takes_the_steps_gradient_not_sums_of_A():
    """prunedlora_paper's curvature is the step's own gradient, which the state keeps for both factors: with
    rank_recovery_side='AB' it prunes the same from a state without the sums of A as from one with them."""
    cfg = dict(rank_every=2, rank_target=4, rank_method="prunedlora_paper", rank_recovery_side="AB")
    runs = []
    for sides in ("B", "AB"):
        model = lora_tiny()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        logs = train(model, opt, rank_prune_state(sides=sides), 2, cfg)
        runs.append((logs, [p.detach().clone() for p in model.parameters()]))
    (logs_b, params_b), (logs_ab, params_ab) = runs
    assert len(logs_b) == 1 and logs_b[0]["pruned"] > 0 and logs_b[0]["ranks"] == logs_ab[0]["ranks"]
    assert all(torch.equal(p, q) for p, q in zip(params_b, params_ab))


def test_accumulate_fisher_before_a_backward_says_so():
    with pytest.raises(ValueError, match="after the micro-batch's backward"):
        accumulate_fisher(lora_tiny(), rank_prune_state())


@pytest.mark.parametrize("method", RANK_METHODS)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_final_ranks_are_exact(method, allocation):
    model = lora_tiny(r=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    cfg = dict(rank_method=method, rank_target=3, rank_every=2, rank_k=2, rank_start=1, rank_allocation=allocation,
               rank_floor=2, rank_recovery=method != "magnitude")
    state = rank_prune_state()
    logs = train(model, opt, state, rank_schedule_end(8, cfg) + 2, cfg, heldout=data(7), grad_accum=1)
    ranks = [int(m.rank_mask.sum()) for m in lora_modules(model).values()]
    assert sum(ranks) == 3 * len(ranks)
    assert all(r == 3 for r in ranks) if allocation == "uniform" else all(r >= 2 for r in ranks)
    assert logs[-1]["step"] <= rank_schedule_end(8, cfg) and all(math.isfinite(log["actual"]) for log in logs)
    for m in lora_modules(model).values():
        off = m.rank_mask == 0
        assert m.lora_A[off].abs().max() == 0 and m.lora_B[:, off].abs().max() == 0


def test_global_allocation_takes_the_lowest_scores_above_the_floor():
    scores = {"a": torch.tensor([0.1, 0.2, 0.3, math.inf]), "b": torch.tensor([5.0, 6.0, 0.05, 7.0])}
    chosen = choose_components(scores, k=2, allocation="global", floor=2)  # 4 wanted; "a" (3 active) may lose 1
    assert chosen["a"].nonzero().flatten().tolist() == [0] and chosen["b"].nonzero().flatten().tolist() == [0, 2]
    assert choose_components(scores, k=3, allocation="uniform", floor=2)["b"].nonzero().flatten().tolist() == [0, 2]
    # stacked adapters (a group) choose as they would alone
    both = choose_components({"ab": torch.stack(list(scores.values()))}, k=2, allocation="global", floor=2)["ab"]
    assert torch.equal(both, torch.stack(list(chosen.values())))


def average_in_process(rank, world, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    state = rank_prune_state()
    for key in prune.STATISTICS:  # process p holds (p + 1) * the same sums
        state[key] = {name: (rank + 1) * torch.arange(n, dtype=torch.float32).view(-1, 2) for name, n in (("a", 4), ("b", 6))}
    prune.average_over_processes(state)
    torch.save({key: state[key] for key in prune.STATISTICS}, f"{out}{rank}.pt")
    torch.distributed.destroy_process_group()


def test_average_over_processes_leaves_every_process_the_mean(tmp_path):
    torch.multiprocessing.spawn(average_in_process, args=(2, tmp_path / "init", tmp_path / "out"), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"out{rank}.pt")
        for key in prune.STATISTICS:
            for name, n in (("a", 4), ("b", 6)):
                assert torch.equal(got[key][name], 1.5 * torch.arange(n, dtype=torch.float32).view(-1, 2))  # (1 + 2) / 2


def test_slicing_gives_the_masked_model_and_saves_exact_ranks(tmp_path):
    model = lora_tiny(r=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    cfg = dict(rank_target=3, rank_every=1, rank_k=3, rank_allocation="global", rank_floor=1)
    train(model, opt, rank_prune_state(), 3, cfg)
    idx = data(99)[0]
    model.eval()
    masked, _ = model(idx)
    ranks = {n: int(m.rank_mask.sum()) for n, m in lora_modules(model).items()}
    slice_adapters(model)
    assert {n: m.r for n, m in lora_modules(model).items()} == ranks
    torch.testing.assert_close(model(idx)[0], masked, atol=1e-6, rtol=0)
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(tiny_model(0), tmp_path / "adapter").eval()
    assert {n: m.r for n, m in lora_modules(fresh).items()} == ranks
    torch.testing.assert_close(fresh(idx)[0], masked, atol=1e-6, rtol=0)


def test_prunedlora_prediction_is_in_loss_units():
    """One event on a trained tiny model: predicted and actual held-out loss change within 5x of each
    other (the paper's formula, by contrast, is off by orders of magnitude: ALGORITHMS.md §1)."""
    model = lora_tiny(r=16, alpha=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    state = rank_prune_state()
    train(model, opt, state, 30)
    cfg = dict(rank_target=8, rank_every=1, rank_k=8, rank_start=20)
    heldout = data(12345, n=16)
    log = rank_prune_step(model, opt, 30, cfg, state, heldout)
    assert log["pruned"] == 8 * 14
    assert log["actual"] > 1e-3, log
    assert 0.2 < log["predicted"] / log["actual"] < 5, log


def test_ranking_test_reports_a_correlation():
    model = lora_tiny(r=16, alpha=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    state = rank_prune_state()
    train(model, opt, state, 10)
    name = "model.layers.1.mlp.down_proj"
    before = lora_modules(model)[name].lora_B.clone()
    out = ranking_test(model, name, data(5, n=16), state, n=8)
    assert len(out["predicted"]) == 8 and -1 <= out["spearman"] <= 1
    assert torch.equal(lora_modules(model)[name].lora_B, before)  # restored
    assert spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)


def test_train_py_prunes_to_the_exact_rank(tmp_path):
    """train.py end to end on a tiny model folder and random token bins: events logged with both loss
    changes, the saved adapter at exactly rank_target."""
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT
    tiny_model(0).save_pretrained(tmp_path / "model", dtype=torch.float32)
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 3000), ("val", 500)):
        rng.integers(0, 97, n).astype(np.uint16).tofile(tmp_path / "data" / f"{split}.bin")
    (tmp_path / "data" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 97}))
    args = dict(model_dir=tmp_path / "model", data_dir=tmp_path / "data", out_dir=tmp_path / "out", block_size=16,
                batch_size=2, gradient_accumulation_steps=2, dtype="float32", device="cpu", eval_iters=1,
                max_iters=12, lora_r=8, lora_alpha=8, rank_prune=True, rank_target=3, rank_every=2, rank_k=2,
                rank_start=2, learning_rate=1e-2)
    r = subprocess.run([sys.executable, "train.py", *(f"--{k}={v}" for k, v in args.items())], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "out" / "rank_pruning.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [4, 6, 8] and events[0]["ranking"]["spearman"] is not None
    assert all(math.isfinite(e["predicted"]) and math.isfinite(e["actual"]) for e in events)
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["rank_pattern"] == {} and config["lora_alpha"] == 3  # s = 1 kept

"""LoRAShear (lorashear.py) against independent answers: the slices of a group written out from (G1)/(G3) here, the ramp
and the half-space step in closed form, compaction == the zeroed model, merging and restarting adapters keeps the
function, the global ranking and the recovery counts worked by hand, the analysis on models built to have a known
answer."""
import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import lorashear
import prune
from conftest import tiny_model
from lora import apply_lora, lora_modules, lora_parameters

T_P = 4


def lora_model(seed=0, nonzero_B=True, **kw):
    """A tiny model with rank-4 adapters; B nonzero unless asked (a fresh B = 0 would hide LoRA's part of a group)."""
    model = apply_lora(tiny_model(seed, **kw), r=4, alpha=8)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1 * nonzero_B)
    return model


def groups(spec, model):
    """{layer: (heads, channels)} index lists -> lorashear.py's group format, every layer listed."""
    out = {}
    for l, block in enumerate(model.model.layers):
        heads, channels = spec.get(l, ([], []))
        out[l, "heads"] = torch.zeros(block.self_attn.n_head, dtype=torch.bool)
        out[l, "channels"] = torch.zeros(block.mlp.down_proj.in_features, dtype=torch.bool)
        out[l, "heads"][heads], out[l, "channels"][channels] = True, True
    return out


def coupled(model, group_set):
    """{parameter: bool mask of its entries in the groups}, from (G1)/(G3): a head's q rows and o columns, a channel's
    gate and up rows and down column, with the same rows of B and columns of A."""
    masks = {}

    def mark(p, rows=None, cols=None):
        m = masks.setdefault(p, torch.zeros(p.shape, dtype=torch.bool))
        m[(rows, slice(None)) if rows is not None else (slice(None), cols)] = True
    for (l, key), g in group_set.items():
        block, idx = model.model.layers[l], g.nonzero()[:, 0].tolist()
        if key == "heads":
            hd, attn = block.self_attn.head_dim, block.self_attn
            slots = [h * hd + j for h in idx for j in range(hd)]
            for p in (attn.q_proj.weight, attn.q_proj.lora_B):
                mark(p, rows=slots)
            for p in (attn.o_proj.weight, attn.o_proj.lora_A):
                mark(p, cols=slots)
        else:
            for p in (block.mlp.gate_proj.weight, block.mlp.gate_proj.lora_B, block.mlp.up_proj.weight,
                      block.mlp.up_proj.lora_B):
                mark(p, rows=idx)
            for p in (block.mlp.down_proj.weight, block.mlp.down_proj.lora_A):
                mark(p, cols=idx)
    return masks


def max_abs(model, group_set):
    """The largest |entry| of W0 + s B A (lora.py's) over the groups' slices."""
    masks = coupled(model, group_set)
    return max((float((m.weight + m.delta_weight()).detach()[masks[m.weight]].abs().max()) for m in lora_modules(model).values()
                if m.weight in masks and masks[m.weight].any()), default=0.0)


def one_group(model, l, key, i):
    return coupled(model, {(l, key): torch.arange(len(groups({}, model)[l, key])) == i})


def vector(model, l, key, i, what="x"):
    """The group's entries of W0 ("x") or of lora.py's s B A ("d") over all its coupled slices, concatenated."""
    mods = {m.weight: m for m in lora_modules(model).values()}
    return torch.cat([(p if what == "x" else mods[p].delta_weight()).detach()[mask]
                      for p, mask in one_group(model, l, key, i).items() if p in mods])


def batches(n=3, seed=0, B=2, T=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (B, T + 1), generator=g) for _ in range(n)]


EARLIER = {1: ([3], [5])}                     # zeroed in an earlier period
SHRINKING = {0: ([1], [3, 7]), 1: ([0], [0, 40])}


def redundant_and_shrinking(model):
    both = {l: (EARLIER.get(l, ([], []))[0] + SHRINKING.get(l, ([], []))[0],
                EARLIER.get(l, ([], []))[1] + SHRINKING.get(l, ([], []))[1]) for l in (0, 1)}
    return groups(both, model), groups(SHRINKING, model)


# ----------------------------------------------------------------------------- LHSPG (S2-S4)
@pytest.mark.parametrize("variant", lorashear.LHSPG_VARIANTS)
def test_lhspg_zeroes_redundant_groups_at_period_end_and_compaction_agrees(variant):
    model = lora_model()
    lorashear.scale_groups(model, groups(EARLIER, model), 0.0)  # the earlier period's groups are zero already
    redundant, shrinking = redundant_and_shrinking(model)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for t, batch in enumerate(batches(T_P)):
        prune.batch_loss(model.train(), batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        lorashear.lhspg_step(model, redundant, shrinking, t, T_P, variant)
        assert max_abs(model, groups(EARLIER, model)) == 0.0
    for p, mask in coupled(model, redundant).items():  # exactly zero: W0's slices and the coupled LoRA slices
        assert (p[mask] == 0).all()
    idx = batches(1, seed=5)[0]
    zeroed = model.eval()(idx)[0]
    prune.add_masks(model)
    for (l, key), g in redundant.items():
        (model.model.layers[l].self_attn.head_mask if key == "heads" else model.model.layers[l].mlp.channel_mask)[g] = 0
    masked = model(idx)[0]
    params_before = prune.count_params(model)
    compacted = prune.compact(model)(idx)[0]
    torch.testing.assert_close(masked, zeroed, rtol=0, atol=1e-6)
    torch.testing.assert_close(compacted, zeroed, rtol=1e-5, atol=1e-5)
    assert prune.count_params(model) < params_before
    assert [b.self_attn.n_head for b in model.model.layers] == [3, 2]
    assert [b.mlp.down_proj.in_features for b in model.model.layers] == [46, 45]


@pytest.mark.parametrize("variant", lorashear.LHSPG_VARIANTS)
def test_lhspg_step_touches_only_the_redundant_groups_slices(variant):
    model = lora_model(1)
    redundant, shrinking = redundant_and_shrinking(model)
    before = {p: p.detach().clone() for p in model.parameters()}
    masks = coupled(model, redundant)
    for t in range(T_P):
        lorashear.lhspg_step(model, redundant, shrinking, t, T_P, variant)
        for p in model.parameters():
            outside = ~masks.get(p, torch.zeros(p.shape, dtype=torch.bool))
            assert torch.equal(p.detach()[outside], before[p][outside])
    assert max_abs(model, redundant) == 0.0


def test_ramp_is_linear_in_closed_form():
    """Without training in between, W0 + s B A on the shrinking groups is x_0 (T_p - t - 1) / T_p after step t."""
    model = lora_model(2)
    redundant, shrinking = redundant_and_shrinking(model)
    mods = list(lora_modules(model).values())
    start = [m.weight + m.delta_weight() for m in mods]
    masks = coupled(model, shrinking)
    for t in range(T_P):
        lorashear.lhspg_step(model, shrinking, shrinking, t, T_P, "ramp")
        for m, w0 in zip(mods, start):
            inside = masks.get(m.weight, torch.zeros(m.weight.shape, dtype=torch.bool))
            expected = torch.where(inside, w0 * (T_P - t - 1) / T_P, w0)
            torch.testing.assert_close(m.weight + m.delta_weight(), expected, rtol=1e-6, atol=1e-6)


def test_halfspace_step_in_closed_form():
    """One step (t = 0 of 10): lambda_g = sqrt(p_g) max_h RMS(x_h) / 10 over the shrinking groups, x~ = x + d -
    lambda_g x / ||x||, zero where x~ . x < eps ||x||^2; the LoRA slices are zeroed. Channel 3's LoRA part points back
    at the origin (d = -0.9 x): it crosses the half-space."""
    model, eps = lora_model(3), 0.05
    with torch.no_grad():
        mods = {m.weight: m for m in lora_modules(model).values()}
        for p, mask in one_group(model, 0, "channels", 3).items():
            if p in mods:
                p[mask] = -mods[p].delta_weight()[mask] / 0.9
    shrinking = groups({0: ([1], [3, 7]), 1: ([2], [10])}, model)
    members = [(l, key, i) for (l, key), g in shrinking.items() for i in g.nonzero()[:, 0].tolist()]
    x = {g: vector(model, *g) for g in members}
    d = {g: vector(model, *g, what="d") for g in members}
    rms = max(v.norm() / len(v) ** 0.5 for v in x.values())
    lorashear.lhspg_step(model, shrinking, shrinking, 0, 10, "halfspace", eps=eps)
    zeroed = []
    for g in members:
        lam = len(x[g]) ** 0.5 * rms / 10
        trial = x[g] + d[g] - lam * x[g] / x[g].norm()
        expected = torch.zeros_like(trial) if trial @ x[g] < eps * x[g] @ x[g] else trial
        zeroed.append(bool((expected == 0).all()))
        torch.testing.assert_close(vector(model, *g), expected, rtol=1e-5, atol=1e-6)
        assert vector(model, *g, what="d").abs().max() == 0  # the LoRA slices are zeroed
    assert zeroed[members.index((0, "channels", 3))] and not all(zeroed)


def test_halfspace_zeroes_a_small_group_before_the_period_ends_and_the_ramp_does_not():
    """Channel 3 is channel 7 scaled by 1/4 (B = 0, no training): lambda = RMS(x_7) / 8 at every step, so channel 3
    (RMS(x_7) / 4) is half gone after step 0 and crosses the half-space at step 1; channel 7 follows the ramp and is
    zeroed at the last step. The ramp keeps channel 3 until the end."""
    for variant in lorashear.LHSPG_VARIANTS:
        model = lora_model(4, nonzero_B=False)
        three, seven = one_group(model, 0, "channels", 3), one_group(model, 0, "channels", 7)
        with torch.no_grad():
            for p in three:
                p[three[p]] = 0.25 * p[seven[p]]
        shrinking, x3, x7 = groups({0: ([], [3, 7])}, model), vector(model, 0, "channels", 3), vector(model, 0, "channels", 7)
        for t in range(8):
            lorashear.lhspg_step(model, shrinking, shrinking, t, 8, variant)
            now3, now7 = vector(model, 0, "channels", 3), vector(model, 0, "channels", 7)
            if variant == "halfspace":
                assert (now3 == 0).all() == (t >= 1)
                torch.testing.assert_close(now3, x3 / 2 if t == 0 else 0 * x3, rtol=1e-5, atol=1e-7)
            else:
                assert (now3 == 0).all() == (t == 7)
            torch.testing.assert_close(now7, x7 * (7 - t) / 8, rtol=1e-5, atol=1e-7)


def test_halfspace_forces_zero_at_the_last_step_where_the_test_does_not():
    """A group whose LoRA part pushes it outwards (d = x) stays in the half-space (x~ . x = ||x||^2 for the group of
    largest RMS at t = T_p - 1): the test keeps it, the period's last step zeroes it anyway."""
    for t, gone in ((T_P - 2, False), (T_P - 1, True)):
        model = lora_model(5)
        mods = {m.weight: m for m in lora_modules(model).values()}
        with torch.no_grad():
            for p, mask in one_group(model, 0, "heads", 2).items():
                if p in mods:
                    p[mask] = mods[p].delta_weight()[mask]
        lorashear.lhspg_step(model, groups({0: ([2], [])}, model), groups({0: ([2], [])}, model), t, T_P, "halfspace")
        assert bool((vector(model, 0, "heads", 2) == 0).all()) == gone


def test_restart_adapters_keeps_the_function():
    model = lora_model(4)
    idx = batches(1, seed=6)[0]
    before, _ = model(idx)
    A_before = {n: m.lora_A.detach().clone() for n, m in lora_modules(model).items()}
    lorashear.restart_adapters(model, torch.Generator().manual_seed(0))
    after, _ = model(idx)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for name, m in lora_modules(model).items():
        assert (m.lora_B == 0).all() and not torch.equal(m.lora_A, A_before[name])


# ----------------------------------------------------------------------------- which groups (S2)
def scores_of(model, heads=1.0, channels=1.0):
    return {l: {"heads": torch.full((b.self_attn.n_head,), heads), "kv": torch.zeros(b.self_attn.n_kv_head),
                "channels": torch.full((b.mlp.down_proj.in_features,), channels)} for l, b in enumerate(model.model.layers)}


def nodes_of(model, fixed=()):
    """Every node group's parameters per group by hand: a head 2 * head_dim * hidden, a channel 3 * hidden."""
    return {(l, key): (2 * 8 * 32 if key == "heads" else 3 * 32) for l in range(len(model.model.layers))
            for key in ("heads", "channels") if (l, key) not in fixed}


def test_global_selection_takes_the_least_salient_layer_whole_where_uniform_spreads():
    """Layer 1's channels are least salient by far: the one ranking takes 47 of its 48 (it keeps one), then the next
    lowest per parameter (layer 0's head 2); the uniform plan thins every layer alike."""
    model = tiny_model(7, n_layer=3)
    scores = scores_of(model, channels=1.0)
    scores[1]["channels"] = torch.linspace(1e-3, 2e-3, 48)
    scores[0]["heads"] = torch.tensor([4.0, 3.0, 0.5, 2.0])
    budget = 47 * 96 + 1
    red, new = lorashear.next_global(scores, None, budget, nodes_of(model))
    assert red[1, "channels"].tolist() == [True] * 47 + [False]
    assert red[0, "heads"].tolist() == [False, False, True, False]
    assert sum(int(g.sum()) for g in red.values()) == 48 and all(torch.equal(red[k], new[k]) for k in red)
    plan, _ = prune.prune_plan(model, budget / prune.count_params(model), kept_layers=())
    assert all(c > 0 for _, c in plan.values()) and plan[1][1] < 47


def test_global_selection_ranks_per_parameter_and_meets_the_budget_in_parameters():
    """A head scores 3 (3 / 512 per parameter), channels 1 (1 / 96): the head goes first though its score is higher.
    The set only grows, and each period's budget is met with less than one group to spare."""
    model = tiny_model(8)
    scores = scores_of(model, heads=3.0, channels=1.0)
    scores[0]["heads"][1] = 2.9  # the lowest per parameter of all
    red, new = lorashear.next_global(scores, None, 512, nodes_of(model))
    assert [k for k, g in red.items() if g.any()] == [(0, "heads")] and red[0, "heads"].tolist() == [0, 1, 0, 0]
    red2, new2 = lorashear.next_global(scores, red, 2000, nodes_of(model))
    assert (red2[0, "heads"] >= red[0, "heads"]).all() and not (new2[0, "heads"] & red[0, "heads"]).any()
    removed = sum(int(g.sum()) * (512 if key == "heads" else 96) for (l, key), g in red2.items())
    assert 2000 <= removed < 2000 + 512


def test_global_selection_keeps_a_group_per_node_and_refuses_what_it_cannot_reach():
    model = tiny_model(9)
    nodes = nodes_of(model, fixed={(0, "heads")})
    most = sum((4 - 1) * 512 if key == "heads" else (48 - 1) * 96 for _, key in nodes)
    red, _ = lorashear.next_global(scores_of(model), None, most, nodes)
    assert [int(red[k].sum()) for k in sorted(red)] == [47, 0, 47, 3]  # (0, channels), (0, heads), (1, ...)
    with pytest.raises(ValueError, match=f"sparsity out of reach: {most + 1:,} parameters must go"):
        lorashear.next_global(scores_of(model), None, most + 1, nodes)


def test_next_uniform_grows_by_periods_from_the_lowest_scores():
    scores = {l: {"heads": torch.tensor([4.0, 1.0, 3.0, 2.0]), "kv": torch.zeros(2),
                  "channels": torch.arange(48, 0, -1).float()} for l in range(2)}
    plan = {0: (2, 6), 1: (0, 3)}
    red, new = lorashear.next_uniform(scores, None, plan, 0, 3)
    assert red[0, "heads"].nonzero().flatten().tolist() == [1] and torch.equal(red[0, "heads"], new[0, "heads"])
    assert red[0, "channels"].nonzero().flatten().tolist() == [46, 47]
    scores[0]["heads"][1] = 100.0  # a redundant group stays redundant, whatever its score becomes
    red, new = lorashear.next_uniform(scores, red, plan, 2, 3)
    assert red[0, "heads"].nonzero().flatten().tolist() == [1, 3]
    assert new[0, "heads"].nonzero().flatten().tolist() == [3]
    assert int(red[0, "channels"].sum()) == 6 and int(red[1, "channels"].sum()) == 3 and not red[1, "heads"].any()


def test_lhspg_loop_with_global_selection_zeroes_and_meets_the_budget():
    """The loop of lorashear.py on a tiny model: two periods, each adding half the parameter budget; at the end every
    redundant group is zero and the set holds at least the budget."""
    model = lora_model(10, nonzero_B=False, n_layer=3)
    total = prune.count_params(model)
    cfg = SimpleNamespace(lr=1e-2, warmup=2, periods=2, period_steps=3, batch_size=2, device="cpu", seed=0,
                          variant="halfspace", eps=0.05)
    g = torch.Generator().manual_seed(0)

    def batch(n, device):
        w = torch.randint(0, 97, (n, 17), generator=g)
        return w[:, :-1], w[:, 1:]
    nodes = nodes_of(model, fixed={(0, "heads")})
    choose = lambda s, red, p: lorashear.next_global(s, red, 0.2 * total * (p + 1) / 2, nodes)
    red, chosen = lorashear.lhspg(model, cfg, choose, {"a": batch}, {}, nullcontext(), lambda msg: None)
    assert max_abs(model, red) == 0.0
    removed = sum(int(g.sum()) * nodes.get(k, 0) for k, g in red.items())
    assert 0.2 * total <= removed < 0.2 * total + 512 and chosen[0]["0"][0] == 0
    assert sum(h + c for p in chosen for h, c in p.values()) == sum(int(g.sum()) for g in red.values())


# ----------------------------------------------------------------------------- (S1) and (S5)
def test_recovery_counts_closed_form():
    assert lorashear.recovery_counts({"a": 1.0, "b": 3.0}, 10, floor=0.1) == {"a": 3, "b": 7}  # 0.1 + 0.8 (1/4, 3/4)
    assert lorashear.recovery_counts({"a": 0.0, "b": 2.0, "c": -1.0}, 10, floor=0.1) == {"a": 1, "b": 8, "c": 1}
    assert lorashear.recovery_counts({"a": 0.0, "b": -1.0}, 10, floor=0.2) == {"a": 5, "b": 5}  # none degraded
    assert lorashear.recovery_counts({"a": 1.0, "b": 1.0, "c": 1.0}, 10, floor=0.0) == {"a": 4, "b": 3, "c": 3}
    # 1000 (0.05 + 0.85 d_i / 2.51) = 219.32, 53.39, 727.29: the one batch left goes to the largest remainder, y
    assert lorashear.recovery_counts({"x": 0.5, "y": 0.01, "z": 2.0}, 1000, floor=0.05) == {"x": 219, "y": 54, "z": 727}
    with pytest.raises(ValueError, match="floor"):
        lorashear.recovery_counts({"a": 1.0, "b": 1.0}, 10, floor=0.6)


def test_knowledge_distribution_is_deterministic_and_restores_masks():
    model = lora_model(5)
    data = batches(2, seed=7)
    first = json.dumps(lorashear.knowledge_distribution(model, data, ratios=(0.25, 0.5), gamma=0.25))
    assert all(b.self_attn.head_mask is None and b.mlp.channel_mask is None for b in model.model.layers)
    assert json.dumps(lorashear.knowledge_distribution(model, data, ratios=(0.25, 0.5), gamma=0.25)) == first
    result = json.loads(first)
    assert len(result["nodes"]) == 4 and len(result["unprunable"]) == 1


def test_knowledge_distribution_marks_the_nodes_that_compute_something():
    """Only layer 0's attention and layer 2's MLP write anything (the others' output projections are zero): thinning
    any other node changes nothing, so those two are the most sensitive; the plan then leaves them whole."""
    model = tiny_model(6, n_layer=3)
    with torch.no_grad():
        for l, block in enumerate(model.model.layers):
            if l != 0:
                block.self_attn.o_proj.weight.zero_()
            if l != 2:
                block.mlp.down_proj.weight.zero_()
    apply_lora(model, r=4, alpha=8)  # B = 0: the same function
    result = lorashear.knowledge_distribution(model, batches(2, seed=8), ratios=(0.25, 0.5), gamma=2 / 6)
    assert result["unprunable"] == [[0, "attn"], [2, "mlp"]]
    for node in result["nodes"]:
        if [node["layer"], node["kind"]] not in result["unprunable"]:
            assert node["sensitivity"] == 0.0
    plan, planned = prune.prune_plan(model, 0.2, kept_layers=(), kept_nodes=result["unprunable"])
    assert plan[0][0] == 0 and plan[2][1] == 0 and plan[1][0] > 0 and plan[0][1] > 0


def test_knowledge_distribution_removes_the_least_salient_not_the_smallest():
    """Layer 0's head 2 writes nothing (its o_proj columns are zero) but has the largest q rows: the pruning saliency
    ranks it last, magnitude does not. Thinning layer 0's attention by a quarter removes it: no loss change."""
    model = tiny_model(11)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 16:24] = 0.0
        model.model.layers[0].self_attn.q_proj.weight[16:24] *= 10
    assert prune.magnitude_scores(model)[0]["heads"].argmin() != 2
    apply_lora(model, r=4, alpha=8)
    result = lorashear.knowledge_distribution(model, batches(2, seed=9), ratios=(0.25,), gamma=0.25)
    attn0 = next(n for n in result["nodes"] if (n["layer"], n["kind"]) == (0, "attn"))
    assert abs(attn0["change"][0]) < 1e-6 and max(abs(n["change"][0]) for n in result["nodes"]) > 1e-4


def test_held_out_batches_of_a_source_are_successive_draws(monkeypatch):
    """Each source's val_batches held-out batches are successive draws (a sampler's k-th draw is seed * 100 + k), not
    the first draw of fresh samplers of the same seed."""
    def fake_sampler(name, split, masked, seq_len, seed):
        drawn = []

        def batch(batch_size, device):
            drawn.append(1)
            return torch.full((batch_size, seq_len), seed * 100 + len(drawn)), None
        return batch
    monkeypatch.setattr(lorashear, "sampler", fake_sampler)
    val = lorashear.held_out(SimpleNamespace(val_batches=3, batch_size=2, seq_len=4, device="cpu"))
    for stage, sources in lorashear.STAGES.items():
        for i, name in enumerate(sources):
            assert [int(x[0, 0]) for x, _ in val[stage][name]] == [(1000 + i) * 100 + k for k in (1, 2, 3)]


def test_command_line_refuses_old_option_names_and_bad_settings(capsys, tmp_path):
    out = ["--out_dir", str(tmp_path / "m")]
    for argv, message in ((["--out", "x"], "--out is now --out_dir"), (["--results", "x"], "--results is now --output"),
                          (["--out_d", "x"], "unrecognized arguments: --out_d"),  # no abbreviations
                          (["--warmup", "0", *out], "--warmup must be at least 1, got 0"),
                          (["--selection", "layer", *out], "invalid choice: 'layer'"),
                          (["--kda_ratios", "a,b", *out], "--kda_ratios 'a,b': expected numbers separated by commas")):
        with pytest.raises(SystemExit):
            lorashear.main(argv)
        assert message in capsys.readouterr().err

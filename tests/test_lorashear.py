"""LoRAShear (lorashear.py): LHSPG zeroes exactly the redundant groups, merging and restarting adapters keeps the
function, the recovery sampler follows its closed form, the knowledge distribution analysis is deterministic and finds
the node groups that matter."""
import json

import pytest
import torch

import lorashear
import prune
from conftest import tiny_model
from lora import apply_lora, lora_parameters, lora_modules

T_P = 4


def lora_model(seed=0, **kw):
    """A tiny model with rank-4 adapters whose B are nonzero (a fresh B = 0 would hide LoRA's part of a group)."""
    model = apply_lora(tiny_model(seed, **kw), r=4, alpha=8)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


def groups(spec, model):
    """{layer: (heads, channels)} index lists -> lorashear.py's bool group format."""
    out = {}
    for l, block in enumerate(model.model.layers):
        heads, channels = spec.get(l, ([], []))
        out[l] = {"heads": torch.zeros(block.self_attn.n_head, dtype=torch.bool),
                  "channels": torch.zeros(block.mlp.down_proj.in_features, dtype=torch.bool)}
        out[l]["heads"][heads], out[l]["channels"][channels] = True, True
    return out


EARLIER = {1: ([3], [5])}                     # zeroed in an earlier period
SHRINKING = {0: ([1], [3, 7]), 1: ([0], [0, 40])}


def redundant_and_shrinking(model):
    both = {l: (EARLIER.get(l, ([], []))[0] + SHRINKING.get(l, ([], []))[0],
                EARLIER.get(l, ([], []))[1] + SHRINKING.get(l, ([], []))[1]) for l in (0, 1)}
    return groups(both, model), groups(SHRINKING, model), groups(EARLIER, model)


def touched(model, group_set):
    """{tensor id: bool mask of the entries that belong to the groups' slices (W0 and coupled LoRA factor)}."""
    masks = {}
    for _, module, axis, slots, _, _ in lorashear.group_items(model, group_set):
        for t in (module.weight, lorashear.lora_factor(module, axis)):
            mask = masks.setdefault(id(t), torch.zeros(t.shape, dtype=torch.bool))
            (mask.__setitem__(slots, True) if axis == 0 else mask.__setitem__((slice(None), slots), True))
    return masks


def batches(n=3, seed=0, B=2, T=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (B, T + 1), generator=g) for _ in range(n)]


@pytest.mark.parametrize("variant", lorashear.LHSPG_VARIANTS)
def test_lhspg_zeroes_redundant_groups_at_period_end_and_compaction_agrees(variant):
    model = lora_model()
    with torch.no_grad():  # the earlier period's groups are zero already
        lorashear.scale_groups(model, groups(EARLIER, model), 0.0)
    redundant, shrinking, _ = redundant_and_shrinking(model)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    for t, batch in enumerate(batches(T_P)):
        prune.batch_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        lorashear.lhspg_step(model, redundant, shrinking, t, T_P, variant)
        if t < T_P - 1 and variant == "ramp":
            assert lorashear.groups_max_abs(model, shrinking) > 0  # a ramp, not a cut
        assert lorashear.groups_max_abs(model, groups(EARLIER, model)) == 0.0
    assert lorashear.groups_max_abs(model, redundant) == 0.0  # exactly zero: W0 slices and the coupled LoRA slices
    for _, module, axis, slots, _, _ in lorashear.group_items(model, redundant):
        assert (lorashear.take(module.weight, axis, slots) == 0).all()
        assert (lorashear.take(lorashear.lora_factor(module, axis), axis, slots) == 0).all()
    model.eval()
    idx = batches(1, seed=5)[0]
    zeroed, _ = model(idx)
    lorashear.redundant_masks(model, redundant)
    masked, _ = model(idx)
    params_before = prune.count_params(model)
    prune.compact(model)
    compacted, _ = model(idx)
    torch.testing.assert_close(masked, zeroed, rtol=0, atol=1e-6)
    torch.testing.assert_close(compacted, zeroed, rtol=1e-5, atol=1e-5)
    assert prune.count_params(model) < params_before
    assert [b.self_attn.n_head for b in model.model.layers] == [3, 2]
    assert [b.mlp.down_proj.in_features for b in model.model.layers] == [46, 45]


@pytest.mark.parametrize("variant", lorashear.LHSPG_VARIANTS)
def test_lhspg_step_leaves_kept_groups_untouched(variant):
    model = lora_model(1)
    redundant, shrinking, _ = redundant_and_shrinking(model)
    before = {id(t): t.detach().clone() for t in model.parameters()}
    masks = touched(model, redundant)
    for t in range(T_P):
        lorashear.lhspg_step(model, redundant, shrinking, t, T_P, variant)
        for p in model.parameters():
            outside = ~masks.get(id(p), torch.zeros(p.shape, dtype=torch.bool))
            assert torch.equal(p.detach()[outside], before[id(p)][outside])
    assert lorashear.groups_max_abs(model, redundant) == 0.0


def test_ramp_is_linear_in_closed_form():
    model = lora_model(2)
    redundant, shrinking, _ = redundant_and_shrinking(model)
    start = [lorashear.take(prune.effective_weight(m), a, s) for _, m, a, s, _, _ in lorashear.group_items(model, shrinking)]
    for t in range(T_P):
        lorashear.lhspg_step(model, redundant, shrinking, t, T_P, "ramp")
        now = [lorashear.take(prune.effective_weight(m), a, s) for _, m, a, s, _, _ in lorashear.group_items(model, shrinking)]
        for x0, x in zip(start, now):  # with no training in between: x_t = x_0 (T_p - t - 1) / T_p
            torch.testing.assert_close(x, x0 * (T_P - t - 1) / T_P, rtol=1e-6, atol=1e-7)


def test_halfspace_step_folds_lora_shrinks_and_projects():
    """One step (t = 0) in closed form: a group gets x + sBA - x / T_p (lambda_g = ||x_g|| / T_p) and loses its LoRA
    slices; a group whose LoRA part points back at the origin (sBA = -0.9 x) crosses the half-space and is zeroed."""
    model = lora_model(3)
    block = model.model.layers[0]
    with torch.no_grad():  # channel 3: base slices = -sBA / 0.9 on every coupled projection
        for module, axis in ((block.mlp.gate_proj, 0), (block.mlp.up_proj, 0), (block.mlp.down_proj, 1)):
            lorashear.put(module.weight, axis, torch.tensor([3]), -lorashear.lora_part(module, axis, torch.tensor([3])) / 0.9)
    shrinking = groups({0: ([1], [3, 7])}, model)
    start = {(id(m), k): (lorashear.take(m.weight, a, s), lorashear.lora_part(m, a, s))
             for _, m, a, s, k, _ in lorashear.group_items(model, shrinking)}
    lorashear.lhspg_step(model, shrinking, shrinking, 0, 10, "halfspace", eps=0.05)
    for _, m, a, s, key, _ in lorashear.group_items(model, shrinking):
        x, d = start[id(m), key]
        new = lorashear.take(m.weight, a, s)
        assert (lorashear.take(lorashear.lora_factor(m, a), a, s) == 0).all()
        if key == "heads":  # head 1 of layer 0: x + d - x / 10
            torch.testing.assert_close(new, x + d - x / 10, rtol=1e-5, atol=1e-6)
        else:  # channels 3 and 7, in that order: 3 is projected to zero, 7 moves to its trial point
            assert (new[0] == 0).all()
            torch.testing.assert_close(new[1], x[1] + d[1] - x[1] / 10, rtol=1e-5, atol=1e-6)


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


def test_next_redundant_grows_by_periods_from_the_lowest_scores():
    scores = {l: {"heads": torch.tensor([4.0, 1.0, 3.0, 2.0]), "kv": torch.zeros(2),
                  "channels": torch.arange(48, 0, -1).float()} for l in range(2)}
    plan = {0: (2, 6), 1: (0, 3)}
    red, new = lorashear.next_redundant(scores, None, plan, 0, 3)
    assert red[0]["heads"].nonzero().flatten().tolist() == [1] and torch.equal(red[0]["heads"], new[0]["heads"])
    assert red[0]["channels"].nonzero().flatten().tolist() == [46, 47]
    scores[0]["heads"][1] = 100.0  # a redundant group stays redundant, whatever its score becomes
    red, new = lorashear.next_redundant(scores, red, plan, 2, 3)
    assert red[0]["heads"].nonzero().flatten().tolist() == [1, 3]
    assert new[0]["heads"].nonzero().flatten().tolist() == [3]
    assert int(red[0]["channels"].sum()) == 6 and int(red[1]["channels"].sum()) == 3 and not red[1]["heads"].any()


def test_recovery_sampler_closed_form():
    shares = lorashear.recovery_shares({"a": 1.0, "b": 3.0}, floor=0.1)  # 0.1 + 0.8 * (1/4, 3/4)
    assert shares == pytest.approx({"a": 0.3, "b": 0.7})
    assert lorashear.recovery_counts({"a": 1.0, "b": 3.0}, 10, floor=0.1) == {"a": 3, "b": 7}
    shares = lorashear.recovery_shares({"a": 0.0, "b": 2.0, "c": -1.0}, floor=0.1)  # no degradation: the floor only
    assert shares == pytest.approx({"a": 0.1, "b": 0.8, "c": 0.1})
    assert lorashear.recovery_shares({"a": 0.0, "b": -1.0}, floor=0.2) == pytest.approx({"a": 0.5, "b": 0.5})
    counts = lorashear.recovery_counts({"a": 1.0, "b": 1.0, "c": 1.0}, 10, floor=0.0)  # largest remainder: first wins
    assert counts == {"a": 4, "b": 3, "c": 3}
    degr = {"x": 0.5, "y": 0.01, "z": 2.0}
    counts = lorashear.recovery_counts(degr, 1000, floor=0.05)
    assert sum(counts.values()) == 1000 and min(counts.values()) >= 50
    assert counts["z"] > counts["x"] > counts["y"]
    with pytest.raises(ValueError, match="floor"):
        lorashear.recovery_shares({"a": 1.0, "b": 1.0}, floor=0.6)


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
    result = lorashear.knowledge_distribution(model, batches(2, seed=8), ratios=(0.25, 0.5), gamma=2 / 6)
    assert result["unprunable"] == [[0, "attn"], [2, "mlp"]]
    for node in result["nodes"]:
        if [node["layer"], node["kind"]] not in result["unprunable"]:
            assert node["sensitivity"] == 0.0
    plan, planned = prune.prune_plan(model, 0.2, kept_layers=(), kept_nodes=result["unprunable"])
    assert plan[0][0] == 0 and plan[2][1] == 0 and plan[1][0] > 0 and plan[0][1] > 0
    assert abs(planned - 0.2) < 0.02


def test_command_line_refuses_old_option_names_and_bad_settings(capsys, tmp_path):
    out = ["--out_dir", str(tmp_path / "m")]
    for argv, message in ((["--out", "x"], "--out is now --out_dir"), (["--results", "x"], "--results is now --output"),
                          (["--out_d", "x"], "unrecognized arguments: --out_d"),  # no abbreviations
                          (["--warmup", "0", *out], "--warmup must be at least 1, got 0"),
                          (["--kda_ratios", "a,b", *out], "--kda_ratios 'a,b': expected numbers separated by commas")):
        with pytest.raises(SystemExit):
            lorashear.main(argv)
        assert message in capsys.readouterr().err

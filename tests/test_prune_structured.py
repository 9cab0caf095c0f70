"""Structured pruning of the base (prune.py) against independent answers: the masked model (compacted ==
masked), parameter counts by hand from the widths, autograd (Taylor), the exact change of B A after one SGD
step (LoRAPrune's estimate), and transformers loading a uniformly pruned folder."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from lora import LoRALinear, apply_lora, lora_modules
from model import Transformer
import prune


def with_lora(model, seed=0):
    """LoRA on every projection with a nonzero B, so the adapters change the outputs."""
    apply_lora(model, r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return model


def set_masks(model, heads, channels):
    """heads: {layer: list of 0/1 per query head}; channels: {layer: indices of channels to mask}."""
    prune.add_masks(model)
    for l, mask in heads.items():
        model.model.layers[l].self_attn.head_mask.copy_(torch.tensor(mask, dtype=torch.float32))
    for l, idx in channels.items():
        model.model.layers[l].mlp.channel_mask[idx] = 0


def by_hand(model):
    """Parameters from the widths alone: embeddings (+ untied head), per layer q/k/v/o, MLP and two norms."""
    c = model.config
    n = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size
    for l in range(c.n_layer):
        kv_map = c.kv_map(l)
        n += c.hidden_size * c.head_dim * 2 * (len(kv_map) + max(kv_map) + 1)
        n += 3 * c.hidden_size * c.intermediate(l) + 2 * c.hidden_size
    return n


IDX = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
CASES = {  # 4 query heads reading 2 kv heads as [0, 0, 1, 1]
    "kv-head-without-readers": ({0: [0, 0, 1, 1], 1: [1, 1, 1, 1]}, {0: [1, 5, 7], 1: []}),
    "uneven-groups-left": ({0: [1, 0, 1, 1], 1: [0, 1, 1, 1]}, {0: list(range(0, 48, 2)), 1: [0]}),
    "one-head-left": ({0: [0, 0, 0, 1], 1: [1, 0, 0, 0]}, {0: list(range(47)), 1: list(range(10, 40))}),
    "whole-group": ({0: [1, 1, 0, 0], 1: [0, 0, 1, 1]}, {0: [3], 1: [4]}),
}


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("case", CASES)
def test_compacted_equals_masked(case, lora):
    model = tiny_model(seed=2)
    if lora:
        with_lora(model)
    set_masks(model, *CASES[case])
    with torch.no_grad():
        masked = model(IDX)[0]
        removed, before = prune.masked_params(model), prune.count_params(model)
        prune.compact(model)
        compacted = model(IDX)[0]
    torch.testing.assert_close(compacted, masked, atol=1e-5, rtol=1e-5)
    assert prune.count_params(model) == by_hand(model) == before - removed
    if case == "kv-head-without-readers":
        assert model.config.layer_kv_map[0] == [0, 0]  # kv head 0 went with its two query heads
    for m in lora_modules(model).values():  # LoRA matrices were sliced with their base weights
        assert m.lora_B.shape[0] == m.weight.shape[0] and m.lora_A.shape[1] == m.weight.shape[1]


def test_random_masks_compacted_equals_masked_with_lora():
    g = torch.Generator().manual_seed(7)
    for trial in range(5):
        model = with_lora(tiny_model(seed=trial, n_head=6, n_kv_head=2), seed=trial)
        heads = {l: (torch.rand(6, generator=g) > 0.5).float().tolist() for l in range(2)}
        for mask in heads.values():
            mask[int(torch.randint(6, (1,), generator=g))] = 1.0  # at least one head per layer
        channels = {l: torch.randperm(48, generator=g)[:int(torch.randint(47, (1,), generator=g))] for l in range(2)}
        set_masks(model, heads, channels)
        with torch.no_grad():
            masked = model(IDX)[0]
            prune.compact(model)
            torch.testing.assert_close(model(IDX)[0], masked, atol=1e-5, rtol=1e-5)
        assert prune.count_params(model) == by_hand(model)


def test_sparsity_zero_is_the_identity():
    model = with_lora(tiny_model(seed=3))
    with torch.no_grad():
        dense = model(IDX)[0]
    plan, planned = prune.prune_plan(model, 0.0, kept_layers=())
    assert planned == 0 and all(v == (0, 0) for v in plan.values())
    before = prune.count_params(model)
    prune.choose_masks(model, prune.magnitude_scores(model), plan)
    prune.compact(model)
    with torch.no_grad():
        assert torch.equal(model(IDX)[0], dense)
    assert prune.count_params(model) == before
    assert model.config.layer_kv_map is None and model.config.layer_intermediate is None


@pytest.mark.parametrize("whole_groups", [False, True])
@pytest.mark.parametrize("method", ["magnitude", "random", "wanda", "llm_pruner", "loraprune"])
def test_every_method_reaches_the_planned_sparsity(method, whole_groups):
    model = tiny_model(seed=4, n_layer=4, n_head=6, n_kv_head=3, intermediate_size=64)
    if method == "loraprune":
        with_lora(model)
    batches = [torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    total = prune.count_params(model)
    plan, planned = prune.prune_plan(model, 0.25, kept_layers=[0], whole_groups=whole_groups)
    assert abs(planned - 0.25) < 0.02 and 0 not in plan
    heads = {l: h for l, (h, _) in plan.items()}
    assert len(set(heads.values())) == 1  # the same ratio in every prunable layer
    prune.choose_masks(model, prune.structured_scores(model, method, batches), plan, whole_groups)
    removed = prune.masked_params(model)
    prune.compact(model)
    assert prune.count_params(model) == total - removed == by_hand(model)
    if whole_groups:  # kv heads are in the plan's count, so it is exact
        assert total - prune.count_params(model) == round(planned * total)
    else:  # kv heads whose query heads all went come on top
        assert total - prune.count_params(model) >= round(planned * total)


def test_plan_refuses_what_it_cannot_do():
    model = tiny_model()
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
            prune.prune_plan(model, bad)
    with pytest.raises(ValueError, match="out of reach"):  # 97*32 embedding + layer 1 kept: 0.6 is impossible
        prune.prune_plan(model, 0.6)
    set_masks(model, {0: [1, 0, 1, 1]}, {})
    prune.compact(model)  # layer 0 now has uneven groups [0, 1, 1]
    with pytest.raises(ValueError, match="whole_groups needs even GQA groups"):
        prune.prune_plan(model, 0.1, kept_layers=(), whole_groups=True)


def test_compaction_refuses_a_layer_without_heads():
    model = tiny_model()
    set_masks(model, {1: [0, 0, 0, 0]}, {})
    with pytest.raises(ValueError, match="layer 1: every attention head is masked"):
        prune.compact(model)


def test_masks_only_grow():
    model = tiny_model(seed=5)
    plan, _ = prune.prune_plan(model, 0.1, kept_layers=())
    prune.choose_masks(model, prune.random_scores(model, seed=0), plan)
    first = [b.self_attn.head_mask.clone() for b in model.model.layers]
    plan, _ = prune.prune_plan(model, 0.2, kept_layers=())
    prune.choose_masks(model, prune.random_scores(model, seed=1), plan)
    for b, before in zip(model.model.layers, first):
        assert bool((b.self_attn.head_mask <= before).all())  # a pruned head never comes back


def group_totals(block, imp, hd=8):
    """Sums of per-projection element scores over each group, from (G1)-(G3) written out here (head size 8)."""
    attn = block.self_attn
    return {"heads": torch.stack([imp["q_proj"][h * hd:(h + 1) * hd].sum() + imp["o_proj"][:, h * hd:(h + 1) * hd].sum()
                                  for h in range(attn.n_head)]),
            "kv": torch.stack([imp["k_proj"][g * hd:(g + 1) * hd].sum() + imp["v_proj"][g * hd:(g + 1) * hd].sum()
                               for g in range(attn.n_kv_head)]),
            "channels": imp["gate_proj"].sum(1) + imp["up_proj"].sum(1) + imp["down_proj"].sum(0)}


def assert_scores(scores, expected, **tol):
    for l in expected:
        for k in ("heads", "kv", "channels"):
            torch.testing.assert_close(scores[l][k], expected[l][k], **tol)


def test_taylor_scores_equal_autograd_and_the_fisher():
    """(B4) |W * G| with G autograd's gradient of the mean loss; (B5) |W * F * W| / 2 with F the mean over batches of
    each batch's squared gradient (the empirical Fisher it claims), and the mixed |W G - W F W / 2|."""
    model = tiny_model(seed=6)
    batches = [torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    scores = {order: prune.taylor_scores(model, batches, order) for order in ("first", "second", "mixed")}
    for p in model.parameters():
        p.requires_grad_(True)
    per_batch = []  # each batch's gradient of every weight, by autograd
    for b in batches:
        model.zero_grad()
        prune.batch_loss(model, b).backward()
        per_batch.append({p: p.grad.clone() for p in model.parameters()})
    mean = lambda f: {p: sum(f(g[p]) for g in per_batch) / len(batches) for p in per_batch[0]}
    grad, fisher = mean(lambda g: g), mean(lambda g: g ** 2)
    for order, element in (("first", lambda w: (w * grad[w]).abs()), ("second", lambda w: (w * fisher[w] * w / 2).abs()),
                           ("mixed", lambda w: (w * grad[w] - w * fisher[w] * w / 2).abs())):
        expected = {l: group_totals(b, {n: element(m.weight).detach() for n, m in prune.projections(b)})
                    for l, b in enumerate(model.model.layers)}
        assert_scores(scores[order], expected, rtol=1e-4, atol=1e-10)
    w = model.model.layers[0].mlp.down_proj.weight
    assert not torch.allclose(fisher[w], grad[w] ** 2)  # the mean of squares, not the square of the mean


def test_wanda_scores_equal_the_formula():
    model = tiny_model(seed=8)
    batch = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    scores = prune.wanda_scores(model, [batch])
    inputs = {}
    mlp = model.model.layers[1].mlp
    hook = mlp.down_proj.register_forward_hook(lambda mod, args, out: inputs.update(x=args[0]))
    gate = mlp.gate_proj.register_forward_hook(lambda mod, args, out: inputs.update(h=args[0]))
    with torch.no_grad():
        prune.batch_loss(model, batch)
    hook.remove(), gate.remove()
    norm_in = inputs["h"].reshape(-1, 32).norm(dim=0)  # ||X_j|| over the 30 tokens, for gate and up
    norm_mid = inputs["x"].reshape(-1, 48).norm(dim=0)  # for down_proj
    expected = ((mlp.gate_proj.weight.abs() + mlp.up_proj.weight.abs()) * norm_in).sum(1) \
        + (mlp.down_proj.weight.abs() * norm_mid).sum(0)
    torch.testing.assert_close(scores[1]["channels"], expected, rtol=1e-5, atol=1e-6)
    attn, inputs = model.model.layers[0].self_attn, {}  # heads: q rows and o columns; kv: k and v rows
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.update({n: args[0].reshape(-1, args[0].shape[-1])}))
             for n, m in (("q", attn.q_proj), ("o", attn.o_proj))]
    with torch.no_grad():
        prune.batch_loss(model, batch)
    for h in hooks:
        h.remove()
    imp = {name: m.weight.abs() * inputs["o" if name == "o_proj" else "q"].norm(dim=0)
           for name, m in prune.projections(model.model.layers[0]) if name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    expected = group_totals(model.model.layers[0], {**imp, "gate_proj": 0 * norm_in[None], "up_proj": 0 * norm_in[None],
                                                   "down_proj": 0 * norm_mid[None]})
    torch.testing.assert_close(scores[0]["heads"], expected["heads"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores[0]["kv"], expected["kv"], rtol=1e-5, atol=1e-6)


def test_loraprune_estimate_is_the_change_of_BA_after_one_sgd_step():
    model = with_lora(tiny_model(seed=9))
    batch = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(2))
    prune.batch_loss(model, batch).backward()
    mods = lora_modules(model)
    estimates = {n: prune.loraprune_grad_estimate(m) for n, m in mods.items()}
    # the group score: (G_W * (W0 + s B A))^2 summed over a channel's gate row, up row and down column
    mlp = {n: mods[f"model.layers.0.mlp.{n}"] for n in ("gate_proj", "up_proj", "down_proj")}
    mlp["up_proj"].rank_mask[1] = 0.0  # a pruned rank component does not count in the weight
    for m in mlp.values():  # the weight the layer applies, as lora.py computes it
        torch.testing.assert_close(prune.effective_weight(m), m.weight + m.delta_weight(), rtol=1e-6, atol=1e-7)
    imp = {n: (estimates[f"model.layers.0.mlp.{n}"] * prune.effective_weight(m)) ** 2 for n, m in mlp.items()}
    expected = imp["gate_proj"].sum(1) + imp["up_proj"].sum(1) + imp["down_proj"].sum(0)
    torch.testing.assert_close(prune.loraprune_update(model)[0]["channels"], expected, rtol=1e-5, atol=0)
    before = {n: (m.lora_B @ m.lora_A).detach().clone() for n, m in mods.items()}
    torch.optim.SGD([p for m in mods.values() for p in (m.lora_A, m.lora_B)], lr=1.0).step()
    for n, m in mods.items():
        change = (m.lora_B @ m.lora_A).detach() - before[n]  # B'A' - BA
        torch.testing.assert_close(estimates[n], -m.scale * change, atol=1e-6, rtol=1e-6)
        assert estimates[n].abs().max() > 1e-4  # not trivially zero


def single_lora_layer(B_scale, r, seed=0):
    """A 6 x 6 LoRALinear (s = 2 / r) whose W0 requires grad, under a loss that is not quadratic."""
    torch.manual_seed(seed)
    module = LoRALinear(torch.nn.Linear(6, 6, bias=False), r=r, alpha=2)
    module.weight.requires_grad_(True)
    with torch.no_grad():
        module.lora_B.normal_(0, B_scale)
    x, target = torch.randn(7, 6), torch.randn(7, 6)
    return module, lambda: (module(x).tanh() * target).sum()


def test_loraprune_estimate_against_the_true_gradient_of_W0():
    """(L1) is what one unit SGD step on A and B does to s B A. With G = dL/dW0 (autograd) it is
    s^2 (G A^T A + B B^T G) - s^3 G A^T B^T G: the gradient seen through the adapter. It equals G when the adapter
    moves W in every direction at unit rate (B = 0, s^2 A^T A = I, full rank); otherwise it is an approximation."""
    module, loss = single_lora_layer(0.0, r=6)
    with torch.no_grad():  # A = Q / s, Q orthogonal: s^2 A^T A = I
        module.lora_A.copy_(torch.linalg.qr(torch.randn(6, 6))[0] / module.scale)
    loss().backward()
    torch.testing.assert_close(prune.loraprune_grad_estimate(module), module.weight.grad, rtol=1e-5, atol=1e-6)
    module, loss = single_lora_layer(0.5, r=3)
    loss().backward()
    G, A, B, s = module.weight.grad, module.lora_A.detach(), module.lora_B.detach(), module.scale
    seen = s ** 2 * (G @ A.T @ A + B @ B.T @ G) - s ** 3 * G @ A.T @ B.T @ G
    estimate = prune.loraprune_grad_estimate(module)
    torch.testing.assert_close(estimate, seen, rtol=1e-5, atol=1e-6)
    assert (estimate - G).norm() > 0.1 * G.norm()  # an approximation here


def test_loraprune_importance_is_a_moving_average():
    """(L3) I_bar = 0.9 I_bar + 0.1 I_step, the first step setting I_bar."""
    model = with_lora(tiny_model(seed=15))
    steps = []
    for seed in (3, 4):
        model.zero_grad()
        prune.batch_loss(model, torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))).backward()
        steps.append(prune.loraprune_update(model))
    average = prune.loraprune_update(model, steps[0])  # the second step's gradients are still there
    assert_scores(average, {l: {k: 0.9 * steps[0][l][k] + 0.1 * steps[1][l][k] for k in steps[0][l]} for l in steps[0]},
                  rtol=1e-6, atol=0)


def test_loraprune_schedule_and_training_loop_calls():
    assert prune.cubic_sparsity(0, 100, 0.5) == 0 and prune.cubic_sparsity(10, 100, 0.5) == 0
    assert prune.cubic_sparsity(90, 100, 0.5) == 0.5 and prune.cubic_sparsity(99, 100, 0.5) == 0.5
    assert prune.cubic_sparsity(50, 100, 0.5) == pytest.approx(0.5 - 0.5 * 0.5 ** 3)
    model = with_lora(tiny_model(seed=10, n_layer=3, intermediate_size=64))
    opt = torch.optim.SGD([p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)], lr=0.01)
    average, total, fractions = None, 20, []
    for step in range(total):
        batch = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(step))
        prune.batch_loss(model, batch).backward()
        average = prune.loraprune_step(model, average, step, total, 0.2, every=5, kept_layers=[0])
        opt.step()
        opt.zero_grad()
        fractions.append(prune.masked_params(model) / prune.count_params(model))
    assert fractions == sorted(fractions) and fractions[0] == 0
    plan, _ = prune.prune_plan(model, 0.2, kept_layers=[0])  # the last step masks the final plan exactly
    assert {l: (int((b.self_attn.head_mask == 0).sum()), int((b.mlp.channel_mask == 0).sum()))
            for l, b in enumerate(model.model.layers) if l in plan} == plan
    assert model.model.layers[0].self_attn.head_mask.all()  # the kept layer stays whole
    with torch.no_grad():
        masked = model(IDX)[0]
        prune.compact(model)
        torch.testing.assert_close(model(IDX)[0], masked, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_of_non_uniform_widths(tmp_path):
    model = tiny_model(seed=11)
    set_masks(model, {0: [1, 0, 1, 1], 1: [0, 0, 1, 1]}, {0: [0, 1, 2], 1: list(range(20))})
    prune.compact(model)
    assert model.config.layer_kv_map == [[0, 1, 1], [0, 0]] and model.config.layer_intermediate == [45, 28]
    model.save_pretrained(tmp_path, dtype=torch.float32)
    loaded = Transformer.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config.layer_kv_map == [[0, 1, 1], [0, 0]] and loaded.config.layer_intermediate == [45, 28]
    with torch.no_grad():
        assert torch.equal(loaded(IDX)[0], model(IDX)[0])


def test_uniform_compaction_loads_in_transformers(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM
    model = tiny_model(seed=12, n_head=6, n_kv_head=3)
    plan, _ = prune.prune_plan(model, 0.15, kept_layers=(), whole_groups=True)
    prune.choose_masks(model, prune.magnitude_scores(model), plan, whole_groups=True)
    prune.compact(model)
    cfg = model.config
    assert cfg.layer_kv_map is None and cfg.layer_intermediate is None and cfg.n_kv_head < 3
    model.save_pretrained(tmp_path, dtype=torch.float32)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert (hf["num_attention_heads"], hf["num_key_value_heads"]) == (cfg.n_head, cfg.n_kv_head)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDX)[0], theirs(IDX).logits, atol=1e-5, rtol=1e-5)


def test_command_line_writes_a_pruned_folder(tmp_path, capsys):
    src = tmp_path / "dense"
    tiny_model(seed=13, n_layer=3).save_pretrained(src, dtype=torch.float32)
    (src / "tokenizer.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    np.random.default_rng(0).integers(0, 97, 5000).astype(np.uint16).tofile(data / "train.bin")
    (data / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    out = tmp_path / "pruned"
    prune.main(["--model", str(src), "--method", "wanda", "--sparsity", "0.2", "--calib", str(data / "train.bin"),
                "--calib_tokens", "256", "--seq_len", "32", "--keep_layers", "0", "--dtype", "float32",
                "--out_dir", str(out)])
    info = json.loads((out / "pruning.json").read_text())
    assert (out / "tokenizer.json").exists() and not list(tmp_path.glob("*.tmp-*"))
    loaded = Transformer.from_pretrained(out)
    assert prune.count_params(loaded) == info["params_after"] == by_hand(loaded)
    assert abs(info["achieved_sparsity"] - 0.2) < 0.03
    printed = capsys.readouterr().out
    assert f"{info['achieved_sparsity']:.4%}" in printed
    per_layer = "layer_intermediate" in json.loads((out / "config.json").read_text())  # layer 0 kept whole
    assert per_layer and f"note: {out} has per-layer widths; it loads with this project's model.py" in printed
    with pytest.raises(SystemExit):
        prune.main(["--model", str(src), "--method", "magnitude", "--sparsity", "0.2", "--out", str(out)])
    assert "--out is now --out_dir" in capsys.readouterr().err


def test_train_py_loraprune_resumes_exactly_and_exports_the_compacted_model(tmp_path):
    """train.py with struct_prune: a run stopped at a checkpoint and resumed ends with the same compacted model
    as a run that never stopped (masks and the importance average are in the checkpoint)."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    src, data = tmp_path / "tiny", tmp_path / "data"
    tiny_model(seed=14, n_layer=3).save_pretrained(src, dtype=torch.float32)
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 3000), ("val", 500)):
        rng.integers(0, 97, n).astype(np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 97, "masked": False}))

    def train_args(out, **kw):
        args = dict(model=src, data_dir=data, out_dir=out, block_size=16, batch_size=2, lora_r=4, lora_alpha=16,
                    rank_prune=False, dtype="float32", device="cpu", eval_iters=1, eval_interval=4, warmup_iters=1,
                    learning_rate=1e-2, max_iters=12, lr_decay_iters=12, struct_prune=True, struct_sparsity=0.25,
                    struct_every=3)
        return [sys.executable, "-u", "train.py", *[f"--{k}={v}" for k, v in {**args, **kw}.items()]]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = subprocess.run(train_args(tmp_path / "whole"), cwd=ROOT, capture_output=True, text=True, env=env)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]
    assert "of all parameters masked" in whole.stdout and "compacted:" in whole.stdout
    proc = subprocess.Popen(train_args(tmp_path / "stopped"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    saves = 0
    for line in proc.stdout:  # stop it at its second checkpoint (iter 8), after masks were chosen
        saves += line.startswith("saved checkpoint")
        if saves == 2:
            proc.kill()
            break
    proc.wait()
    assert torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)["iter_num"] == 8
    resumed = subprocess.run(train_args(tmp_path / "stopped", init_from="resume"), cwd=ROOT, capture_output=True,
                             text=True, env=env)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stdout[-2000:] + resumed.stderr
    whole = Transformer.from_pretrained(tmp_path / "whole" / "merged")
    resumed = Transformer.from_pretrained(tmp_path / "stopped" / "merged")
    assert whole.config.to_hf() == resumed.config.to_hf()
    assert 1 - prune.count_params(whole) / prune.count_params(tiny_model(n_layer=3)) >= 0.2
    with torch.no_grad():
        torch.testing.assert_close(resumed(IDX)[0], whole(IDX)[0], atol=1e-5, rtol=1e-5)
    # the adapter names the compacted base it was trained on: adapter on base == merged (eval.py --model RUN)
    from runs import load_model
    on_base, folder = load_model(tmp_path / "whole")
    assert folder == tmp_path / "whole" / "base" and on_base.config.to_hf() == whole.config.to_hf()
    merged_fp32 = Transformer.from_pretrained(tmp_path / "whole" / "merged", dtype=torch.float32)
    with torch.no_grad():  # merged/ is stored in bf16: equal to its rounding
        torch.testing.assert_close(on_base(IDX)[0], merged_fp32(IDX)[0], atol=0.05, rtol=0.05)
    assert any(m.lora_B.abs().max() > 0 for m in lora_modules(on_base).values())  # a trained adapter

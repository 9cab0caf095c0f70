"""lora.py: equivalences (merged == unmerged, B = 0 changes nothing), peft's initialization, adapter files in
peft's format (round trips with ourselves and with peft + transformers where installed)."""
import json
import math

import pytest
import torch
import torch.nn as nn

from conftest import tiny_model
from lora import (ALL_TARGETS, LoRALinear, apply_lora, load_adapter, lora_modules, lora_parameters, merge_lora,
                  save_adapter, save_model, unmerge_lora)
from model import Transformer

IDX = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, idx=IDX):
    with torch.no_grad():
        return model(idx)[0]


def randomize_B(model, seed=1, std=0.3):
    """Trained-looking adapters: B = 0 at initialization would hide every bug below."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)
    return model


def lora_model(seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_B(apply_lora(tiny_model(), **{"r": 4, "alpha": 8, **kw}))


def test_zero_B_leaves_the_model_unchanged_and_only_adapters_train():
    model = tiny_model()
    before = logits(model)
    apply_lora(model, r=4, alpha=8)
    assert len(lora_modules(model)) == 7 * 2
    assert torch.equal(logits(model), before)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}


def test_merged_equals_unmerged_and_merge_is_idempotent():
    model = lora_model()
    unmerged = logits(model)
    base = {n: m.weight.clone() for n, m in lora_modules(model).items()}
    merge_lora(model)
    once = {n: m.weight.clone() for n, m in lora_modules(model).items()}
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    merge_lora(model)  # a second merge does nothing
    assert all(torch.equal(m.weight, once[n]) for n, m in lora_modules(model).items())
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(tiny_model()), unmerged, atol=1e-3)  # the adapters matter
    unmerge_lora(model)
    unmerge_lora(model)
    for n, m in lora_modules(model).items():
        torch.testing.assert_close(m.weight, base[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-6, rtol=0)


def test_A_is_kaiming_uniform_like_nn_linear():
    """peft initializes A like nn.Linear: kaiming_uniform(a=sqrt 5), i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 64, bias=False), r=16, alpha=32)
    bound = 1 / math.sqrt(256)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.99 * bound
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # std of U(-b, b)
    assert torch.equal(layer.lora_B, torch.zeros(64, 16)) and layer.lora_A.dtype == torch.float32


def test_A_init_equals_peft_given_the_same_random_stream():
    peft = pytest.importorskip("peft")
    base = nn.Linear(40, 24, bias=False)
    torch.manual_seed(7)
    theirs = peft.tuners.lora.Linear(base, "default", peft.LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    torch.manual_seed(7)
    nn.Linear(40, 4, bias=False), nn.Linear(4, 24, bias=False)  # peft draws these first, then re-draws A
    ours = LoRALinear(base, r=4, alpha=8)
    assert torch.equal(ours.lora_A, theirs.lora_A["default"].weight)
    assert torch.equal(ours.lora_B, theirs.lora_B["default"].weight)
    assert ours.scale == theirs.scaling["default"] == 2.0


def test_rank_larger_than_the_layer_is_a_clear_error():
    with pytest.raises(ValueError, match=r"rank 9 must lie in \[1, 8\] for a 8 x 12 layer"):
        LoRALinear(nn.Linear(12, 8, bias=False), r=9, alpha=16)
    with pytest.raises(ValueError, match="rank 0"):
        LoRALinear(nn.Linear(12, 8, bias=False), r=0, alpha=16)
    with pytest.raises(ValueError, match="rank 64"):
        apply_lora(tiny_model(), r=64)  # hidden size 32


def test_a_rank_too_large_names_every_target_it_does_not_fit():
    """One message for all: k/v are 16 x 32 in the tiny model (2 kv heads of 8), q/o 32 x 32, the MLP 48 x 32."""
    with pytest.raises(ValueError) as e:
        apply_lora(tiny_model(), r=20)
    assert "k_proj: rank 20 must lie in [1, 16] for a 16 x 32 layer" in str(e.value)
    assert "v_proj: rank 20 must lie in [1, 16]" in str(e.value) and "q_proj" not in str(e.value)
    with pytest.raises(ValueError) as e:
        apply_lora(tiny_model(), r=40)
    assert all(f"{t}: rank 40" in str(e.value) for t in ALL_TARGETS)


def test_rslora_scale():
    torch.manual_seed(0)
    base = nn.Linear(16, 16, bias=False)
    plain, rs = LoRALinear(base, r=4, alpha=8), LoRALinear(base, r=4, alpha=8, rslora=True)
    assert plain.scale == 8 / 4 and rs.scale == 8 / math.sqrt(4)
    with torch.no_grad():
        rs.lora_B.normal_()
    x = torch.randn(3, 16)
    expected = x @ base.weight.T + (8 / 2) * x @ rs.lora_A.T @ rs.lora_B.T  # y = x W0^T + s x A^T B^T
    torch.testing.assert_close(rs(x), expected, atol=1e-5, rtol=1e-5)


def test_adapter_save_load_round_trip(tmp_path):
    model = lora_model(targets=("q_proj", "v_proj", "down_proj"))
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == \
        ("LORA", 4, 8, ["down_proj", "q_proj", "v_proj"])
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    loaded = load_adapter(tiny_model(), tmp_path / "a")
    for (n, a), (n2, b) in zip(lora_modules(model).items(), lora_modules(loaded).items()):
        assert n == n2 and torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B) and a.scale == b.scale
    assert torch.equal(logits(loaded), logits(model))


def test_rank_and_alpha_patterns_round_trip(tmp_path):
    """Different ranks per module (and a rank-pruned module) save as rank_pattern / alpha_pattern and load back."""
    model = lora_model(rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 3}, alpha_pattern={"v_proj": 4})
    mods = lora_modules(model)
    assert mods["model.layers.0.self_attn.q_proj"].r == 2 and mods["model.layers.1.self_attn.q_proj"].r == 4
    assert mods["model.layers.1.mlp.down_proj"].r == 3 and mods["model.layers.0.self_attn.v_proj"].scale == 1.0
    mods["model.layers.1.mlp.up_proj"].rank_mask[torch.tensor([0, 2])] = 0  # rank pruning switched off 2 components
    expected = logits(model)
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.mlp.down_proj": 3,
                                                     "model.layers.1.mlp.down_proj": 3, "model.layers.1.mlp.up_proj": 2}
    assert cfg["alpha_pattern"]["model.layers.0.self_attn.v_proj"] == 4
    loaded = load_adapter(tiny_model(), tmp_path / "a")
    for n, m in lora_modules(loaded).items():
        assert m.r == int(mods[n].rank_mask.sum()) and m.scale == pytest.approx(mods[n].scale), n
    torch.testing.assert_close(logits(loaded), expected, atol=1e-6, rtol=0)


def test_save_merged_is_an_ordinary_model(tmp_path):
    model = lora_model()
    save_model(model, tmp_path / "m", dtype=torch.float32)
    merged = Transformer.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert not any(m.merged for m in lora_modules(model).values())  # the model itself is left unmerged
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- against peft + transformers
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp("tiny_hf")
    tiny_model().save_pretrained(folder, dtype=torch.float32)
    return folder


def hf_model(folder):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_our_adapter_loads_in_peft(hf_dir, tmp_path):
    from peft import PeftModel
    for kw in (dict(), dict(rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"layers.1.mlp.gate_proj": 3})):
        model = lora_model(**kw)
        save_adapter(model, tmp_path / "ours")
        theirs = PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "ours").eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(IDX).logits, logits(model), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits(tiny_model()), logits(model), atol=1e-3)


def test_peft_adapter_loads_here(hf_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_TARGETS), init_lora_weights=False,
                        rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 16}, task_type="CAUSAL_LM")
    theirs = get_peft_model(hf_model(hf_dir), config).eval()  # init_lora_weights=False: B is random too
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tiny_model(), tmp_path / "peft")
    assert lora_modules(ours)["model.layers.0.self_attn.o_proj"].r == 2
    assert lora_modules(ours)["model.layers.0.mlp.up_proj"].scale == 4.0
    with torch.no_grad():
        torch.testing.assert_close(logits(ours), theirs(IDX).logits, atol=1e-5, rtol=1e-5)

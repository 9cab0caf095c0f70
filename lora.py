"""
LoRA (Hu et al., 2021): a frozen linear weight W0 (out x in) plus a trainable low-rank update,
    y = x W0^T + s * (dropout(x) A^T * m) B^T,     s = alpha / r   (rsLoRA: alpha / sqrt(r))
with A (r x in), B (out x r) and m a 0/1 mask over the r components that rank pruning switches off.
Adapters save and load in peft's format (adapter_model.safetensors + adapter_config.json).
"""
import json
import math
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_safetensors, save_json, save_safetensors

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """Wraps an nn.Linear. The base weight keeps its name (`...q_proj.weight`), so the model's state
    dict still maps one to one onto Hugging Face's."""

    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear expects a linear layer without bias (llama projections)")
        if not 0 < r <= min(base.in_features, base.out_features):
            raise ValueError(f"LoRA rank {r} must lie in [1, {min(base.in_features, base.out_features)}] for a "
                             f"{base.out_features} x {base.in_features} layer")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.alpha, self.rslora = alpha, rslora
        self.scale = alpha / (math.sqrt(r) if rslora else r)
        kw = dict(device=self.weight.device, dtype=torch.float32 if self.weight.dtype != torch.float64 else torch.float64)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft (and nn.Linear) do
        self.register_buffer("rank_mask", torch.ones(r, **kw))  # 1 = active component, 0 = pruned
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def r(self):
        return self.lora_A.shape[0]

    def delta_weight(self):
        """s * B diag(m) A: the (out x in) update the adapter adds to W0."""
        return self.scale * (self.lora_B * self.rank_mask) @ self.lora_A

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.merged:
            return y
        # the low-rank path in x's dtype (fp32 A and B, bf16 matmuls in a bf16 model, as autocast would);
        # s and m scale B's r columns, and the sum is one addmm
        A = self.lora_A.to(x.dtype)
        B = (self.lora_B * (self.rank_mask * self.scale)).to(x.dtype)  # (out, r) = s B diag(m)
        h = F.linear(self.dropout(x), A)  # (..., r)
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.t()).view(y.shape)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


def lora_modules(model):
    """{module name: LoRALinear}, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, targets=ALL_TARGETS, r=8, alpha=16, dropout=0.0, rslora=False, rank_pattern=None,
               alpha_pattern=None):
    """Freeze the model and wrap every linear layer whose name ends in one of `targets` with LoRA.
    rank_pattern / alpha_pattern: {module-name regex suffix: value}, as peft's adapter_config uses."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters")
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {ALL_TARGETS}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] in targets}
    too_large = {}  # every target the rank does not fit, in one message
    for name, m in layers.items():
        if not 0 < pattern_value(rank_pattern, name, r) <= min(m.in_features, m.out_features):
            too_large.setdefault(name.split(".")[-1], (pattern_value(rank_pattern, name, r), m))
    if too_large:
        raise ValueError("LoRA rank too large for " + "; ".join(
            f"{t}: rank {rm} must lie in [1, {min(m.in_features, m.out_features)}] for a {m.out_features} x "
            f"{m.in_features} layer" for t, (rm, m) in too_large.items()))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in layers.items():
        parent, attr = name.rsplit(".", 1)
        lora = LoRALinear(module, pattern_value(rank_pattern, name, r), pattern_value(alpha_pattern, name, alpha),
                          dropout, rslora)
        setattr(model.get_submodule(parent), attr, lora)
    return model


def pattern_value(pattern, name, default):
    """peft's rule: a key matches a module whose name is the key or ends in '.' + key (keys may be regexes)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def merge_lora(model):
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model):
    for m in lora_modules(model).values():
        m.unmerge()
    return model


def lora_parameters(model):
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


# ----------------------------------------------------------------------------- peft format
PEFT_PREFIX = "base_model.model."


def save_adapter(model, folder, base_model_name_or_path=None):
    """peft's format. Only active components are saved, so a rank-pruned adapter has its exact rank;
    modules whose rank or alpha differ from the most common get rank_pattern / alpha_pattern entries."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    tensors, ranks, alphas = {}, {}, {}
    for name, m in mods.items():
        keep = m.rank_mask.bool()
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()[keep].clone()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()[:, keep].clone()
        ranks[name] = int(keep.sum())
        # peft computes the scale from (alpha, r) of the saved rank: keep s unchanged
        alphas[name] = m.scale * (math.sqrt(ranks[name]) if m.rslora else ranks[name])
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    first = next(iter(mods.values()))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "target_modules": sorted({n.split(".")[-1] for n in mods}), "lora_dropout": getattr(first.dropout, "p", 0.0),
              "bias": "none", "use_rslora": first.rslora, "fan_in_fan_out": False, "init_lora_weights": True,
              "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path,
              "rank_pattern": {n: v for n, v in ranks.items() if v != r},
              "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha}}
    folder = Path(folder)
    save_safetensors(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    save_json(config, folder / "adapter_config.json")


def load_adapter(model, folder):
    """Add the adapter saved in `folder` (ours or peft's) to a model without LoRA."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (is this an adapter folder?)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    apply_lora(model, tuple(t for t in ALL_TARGETS if t in targets), cfg["r"], cfg["lora_alpha"], 0.0,
               cfg.get("use_rslora", False), cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
    state = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v
             for k, v in load_safetensors(folder / "adapter_model.safetensors").items()}
    for name, m in lora_modules(model).items():
        for part, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            key = f"{name}.{part}.weight"
            if key not in state:
                raise ValueError(f"{folder}: adapter has no tensor {key}")
            if state[key].shape != param.shape:
                raise ValueError(f"{folder}: {key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)} "
                                 f"(adapter made for another model?)")
            with torch.no_grad():
                param.copy_(state[key])
    return model


def save_model(model, folder, dtype=torch.bfloat16, tokenizer_from=None, merged=True):
    """An ordinary Hugging Face model folder: the base weights with s B A merged in (merged=False: without),
    and the tokenizer files of `tokenizer_from`."""
    was_merged = {name: m.merged for name, m in lora_modules(model).items()}
    merge_lora(model) if merged else unmerge_lora(model)
    model.save_pretrained(folder, dtype)
    for name, m in lora_modules(model).items():
        m.merge() if was_merged[name] else m.unmerge()
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if tokenizer_from and (Path(tokenizer_from) / f).exists():
            shutil.copy(Path(tokenizer_from) / f, Path(folder) / f)

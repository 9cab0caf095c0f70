"""
Structured pruning of the base model (docs/ALGORITHMS.md §2, §4, §5): whole attention heads and MLP channels of a
LLaMA block are masked while training, then removed for real (compact) to leave an ordinary, smaller model.
  (G1) query head h     rows h*hd:(h+1)*hd of q_proj (+ its LoRA B), the same columns of o_proj (+ its LoRA A)
  (G2) key/value head   the same rows of k_proj and v_proj (+ B); it goes when no query head reads it
  (G3) MLP channel c    row c of gate_proj and up_proj (+ B), column c of down_proj (+ A)
  (G4) sparsity         the fraction of ALL parameters removed (embeddings included, LoRA excluded)
LoRAPrune (§2) scores W0's groups from the adapter's gradients alone, during fine-tuning:
  (L1) G_W ~ s (G_B A + B G_A - G_B G_A)       what one unit SGD step on A, B does to s B A
  (L2) I = (G_W * (W0 + s B A))^2               element importance
  (L3) I_g = sum of I over the group's coupled elements; I_bar <- lam I_bar + (1 - lam) I_g, lam = 0.9
  (L4) s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3, the lowest groups masked every `every` steps
One-shot baselines (§5): (B1) magnitude ||W_g||_2; (B2) random; (B3) Wanda-sp sum |W_ij| ||X_j||_2;
  (B4) LLM-Pruner first order sum |W * G_W|; (B5) second order sum |W * F * W| / 2, F = mean g^2.
train.py: add_masks, prune_plan (fails early); loraprune_step after each backward; compact at the end. One shot:
    python prune.py --model DIR --method wanda --sparsity 0.2 --out_dir OUT
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from configurator import renamed
from lora import LoRALinear
from model import Transformer, check_config

# Scores: {layer: {"heads": (n_head,), "kv": (n_kv_head,), "channels": (width,)}}, higher = more important.
COUPLED = {  # projection -> (its group kind (G1-G3), the axis its slices lie on: 0 rows, 1 columns)
    "q_proj": ("heads", 0), "k_proj": ("kv", 0), "v_proj": ("kv", 0), "o_proj": ("heads", 1),
    "gate_proj": ("channels", 0), "up_proj": ("channels", 0), "down_proj": ("channels", 1)}
METHODS = ("magnitude", "random", "wanda", "llm_pruner", "loraprune")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------- the groups and their masks
def projections(block):
    """(name, module) of a block's seven linear layers (plain or LoRALinear), in COUPLED's order."""
    return [(name, getattr(block.mlp if kind == "channels" else block.self_attn, name))
            for name, (kind, _) in COUPLED.items()]


def add_masks(model):
    """All-ones head and channel masks in every layer (existing ones kept); buffers, so add them before loading a
    training checkpoint that holds them."""
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if attn.head_mask is None:
            attn.head_mask = torch.ones(attn.n_head, device=attn.q_proj.weight.device)
        if mlp.channel_mask is None:
            mlp.channel_mask = torch.ones(mlp.down_proj.in_features, device=mlp.down_proj.weight.device)
    return model


def count_params(model):
    """(G4) The base model's parameters, a tied embedding once, LoRA excluded."""
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name)


def group_params(block):
    """(G4) The parameters of one query head (q rows, o columns) and of one MLP channel (gate, up rows, down column)."""
    return {"heads": 2 * block.self_attn.head_dim * block.self_attn.q_proj.in_features,
            "channels": 3 * block.mlp.down_proj.out_features}


def masked_params(model):
    """The number of parameters compact() would remove under the current masks (G1-G3)."""
    removed = 0
    for block in model.model.layers:
        attn, mlp, one = block.self_attn, block.mlp, group_params(block)
        if attn.head_mask is not None:
            live = attn.head_mask > 0
            kv_gone = attn.n_kv_head - attn.kv_index[live].unique().numel()  # a key/value head: its k and v rows
            removed += one["heads"] * (int((~live).sum()) + kv_gone)
        if mlp.channel_mask is not None:
            removed += one["channels"] * int((mlp.channel_mask == 0).sum())
    return removed


# ----------------------------------------------------------------------------- how many groups go where
def default_kept_layers(n_layer):
    """LoRAPrune's rule (§2), for every method so that they compare: the first 10% and the last layer stay whole."""
    return sorted(set(range(n_layer // 10)) | {n_layer - 1})


def prune_plan(model, sparsity, kept_layers=None, whole_groups=False, kept_nodes=()):
    """(G4) {layer: (heads, channels) to remove} and the planned fraction: one ratio of the query heads (GQA groups
    with whole_groups) and channels everywhere (a grid of 4 steps per channel of the widest layer), the closest to
    `sparsity` with one head and channel left; kept_layers (default: default_kept_layers) and kept_nodes ([layer,
    "attn" | "mlp"]) stay whole. Key/value heads count as kept (compaction also removes the unread ones)."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1) (the fraction of all parameters to remove), got {sparsity}")
    kept = set(default_kept_layers(len(model.model.layers)) if kept_layers is None else kept_layers)
    fixed = {(int(l), kind) for l, kind in kept_nodes} | {(l, kind) for l in kept for kind in ("attn", "mlp")}
    hidden, total, sizes = model.config.hidden_size, count_params(model), {}
    for l, block in enumerate(model.model.layers):  # layer -> (heads or groups, parameters of one, channels)
        attn, head = block.self_attn, group_params(block)["heads"]
        if whole_groups and (l, "attn") not in fixed and not attn.uniform_gqa:
            raise ValueError(f"whole_groups needs even GQA groups; layer {l} maps its query heads to key/value "
                             f"heads {attn.kv_index.tolist()}")
        n, one = (attn.n_kv_head, (attn.n_head // attn.n_kv_head + 1) * head) if whole_groups else (attn.n_head, head)
        n, width = 0 if (l, "attn") in fixed else n, 0 if (l, "mlp") in fixed else block.mlp.down_proj.in_features
        if n or width:
            sizes[l] = (n, one, width)
    plan_at = lambda rho: {l: (int(rho * n + 0.5), int(rho * width + 0.5)) for l, (n, _, width) in sizes.items()}
    removed = lambda plan: sum(h * sizes[l][1] + c * 3 * hidden for l, (h, c) in plan.items())  # channel: gate, up, down
    steps, target = 4 * max([width for *_, width in sizes.values()] + [1]), sparsity * total
    best = most = plan_at(0.0)
    for k in range(1, steps):  # removed() grows with rho: stop where a layer would lose everything
        plan = plan_at(k / steps)
        if any((n and h >= n) or (w and c >= w) for (h, c), (n, _, w) in zip(plan.values(), sizes.values())):
            break
        most = plan
        if abs(removed(plan) - target) < abs(removed(best) - target):
            best = plan
    if target - removed(most) > 0.001 * total:
        nodes = sorted((int(l), kind) for l, kind in kept_nodes)
        whole = f"layers {sorted(kept)}" + (f" and node groups {nodes}" if nodes else "")
        raise ValueError(f"sparsity {sparsity} is out of reach: with {whole} kept whole and one head and one channel "
                         f"left in every other layer, at most {removed(most) / total:.4f} of the parameters can go")
    return best, removed(best) / total


def lowest(scores, already, k):
    """A bool mask of the k lowest scores, the `already` ones first (a pruned group never comes back)."""
    order = torch.where(already, float("-inf"), scores.float()).argsort(stable=True)
    drop = torch.zeros_like(already)
    drop[order[:max(k, int(already.sum()))]] = True
    return drop


@torch.no_grad()
def choose_masks(model, scores, plan, whole_groups=False):
    """Mask, in every layer of the plan, its lowest-scoring heads (or GQA groups) and channels."""
    add_masks(model)
    for l, (n_heads, n_channels) in plan.items():
        attn, mlp, s = model.model.layers[l].self_attn, model.model.layers[l].mlp, scores[l]
        if whole_groups:  # a group's score: its key/value head's plus its query heads'
            group = s["kv"].float().index_add(0, attn.kv_index, s["heads"].float())
            live = torch.zeros(attn.n_kv_head, device=attn.head_mask.device).index_add(0, attn.kv_index, attn.head_mask)
            drop = lowest(group, live == 0, n_heads)[attn.kv_index]
        else:
            drop = lowest(s["heads"], attn.head_mask == 0, n_heads)
        attn.head_mask.copy_(~drop)
        mlp.channel_mask.copy_(~lowest(s["channels"], mlp.channel_mask == 0, n_channels))
    return model


# ----------------------------------------------------------------------------- compaction
def slice_linear(module, rows=None, cols=None):
    """Keep only `rows` (outputs) and/or `cols` (inputs) of a linear layer and of its LoRA (B's rows, A's columns)."""
    def cut(p, rows, cols):
        p = p if rows is None else p[rows]
        return nn.Parameter((p if cols is None else p[:, cols]).clone(), requires_grad=p.requires_grad)
    module.weight = cut(module.weight, rows, cols)
    module.out_features, module.in_features = module.weight.shape
    if isinstance(module, LoRALinear):
        module.lora_B, module.lora_A = cut(module.lora_B, rows, None), cut(module.lora_A, None, cols)


@torch.no_grad()
def compact(model):
    """Remove the masked groups (G1-G3) from the base weights and the LoRA matrices alike and drop the masks: an
    ordinary model whose config records the per-layer widths. Rebuild any optimizer: the parameters are new."""
    add_masks(model)
    for l, block in enumerate(model.model.layers):
        attn, mlp = block.self_attn, block.mlp
        heads, channels = attn.head_mask.nonzero()[:, 0], mlp.channel_mask.nonzero()[:, 0]
        for what, kept in (("attention head", heads), ("MLP channel", channels)):
            if len(kept) == 0:
                raise ValueError(f"layer {l}: every {what} is masked; a layer needs at least one")
        kv_old = attn.kv_index[heads]
        kv_kept = kv_old.unique()  # sorted: a key/value head stays if a kept query head reads it (G2)
        kv_map = torch.searchsorted(kv_kept, kv_old)
        slots = lambda idx: (idx[:, None] * attn.head_dim + torch.arange(attn.head_dim, device=idx.device)).flatten()
        slice_linear(attn.q_proj, rows=slots(heads))
        slice_linear(attn.o_proj, cols=slots(heads))
        for proj in (attn.k_proj, attn.v_proj):
            slice_linear(proj, rows=slots(kv_kept))
        for proj in (mlp.gate_proj, mlp.up_proj):
            slice_linear(proj, rows=channels)
        slice_linear(mlp.down_proj, cols=channels)
        attn.n_head, attn.n_kv_head, attn.kv_index = len(heads), len(kv_kept), kv_map
        attn.uniform_gqa = kv_map.tolist() == even_kv_map(len(heads), len(kv_kept))
        attn.head_mask = mlp.channel_mask = None
    layers = model.model.layers
    set_widths(model.config, [b.self_attn.kv_index.tolist() for b in layers], [b.mlp.down_proj.in_features for b in layers])
    return model


def even_kv_map(n_head, n_kv_head):
    """An unpruned GQA layer's map (query head h reads key/value head h // group); None if groups are uneven."""
    return [h // (n_head // n_kv_head) for h in range(n_head)] if n_head % n_kv_head == 0 else None


def set_widths(cfg, kv_maps, widths):
    """Record per-layer widths in the config; shared widths become the plain HF ones (the folder loads in transformers)."""
    n_head, n_kv_head = len(kv_maps[0]), max(kv_maps[0]) + 1
    if all(m == kv_maps[0] for m in kv_maps) and kv_maps[0] == even_kv_map(n_head, n_kv_head):
        cfg.n_head, cfg.n_kv_head, kv_maps = n_head, n_kv_head, None
    cfg.layer_kv_map = kv_maps
    cfg.intermediate_size, cfg.layer_intermediate = (widths[0], None) if len(set(widths)) == 1 else \
        (cfg.intermediate_size, widths)
    check_config(cfg, "pruned config")


# ----------------------------------------------------------------------------- group importance, shared
def effective_weight(module):
    """W0 + s B A: the weight a plain or (unmerged) LoRA linear layer applies, in float32."""
    w = module.weight.float()
    if isinstance(module, LoRALinear) and not module.merged:  # one pass over W: W0 + s (B diag(mask)) A
        w = torch.addmm(w, (module.lora_B * module.rank_mask).float(), module.lora_A.float(), alpha=module.scale)
    return w


def group_sums(model, element_importance):
    """Sum element_importance(module) (shaped like its weight; None: nothing) over each group's coupled slices (G1-G3)."""
    scores = {}
    for l, block in enumerate(model.model.layers):
        attn, width, dev = block.self_attn, block.mlp.down_proj.in_features, block.self_attn.q_proj.weight.device
        s = {"heads": torch.zeros(attn.n_head, device=dev), "kv": torch.zeros(attn.n_kv_head, device=dev),
             "channels": torch.zeros(width, device=dev)}
        for (name, module), (kind, axis) in zip(projections(block), COUPLED.values()):
            e = element_importance(module)
            if e is not None:  # per row (axis 0) or column (axis 1), then per group of them
                s[kind] += e.float().sum(1 - axis).view(-1, 1 if kind == "channels" else attn.head_dim).sum(1)
        scores[l] = s
    return scores


def batch_loss(model, batch):
    """Mean next-token loss of a (B, T + 1) tensor of token ids, or of an (x, y) pair (y = -1: not counted)."""
    x, y = batch if isinstance(batch, (tuple, list)) else (batch[:, :-1], batch[:, 1:])
    return model(x, targets=y)[1]


# ----------------------------------------------------------------------------- the method: LoRAPrune (§2)
@torch.no_grad()
def loraprune_grad_estimate(module):
    """(L1) W0's gradient estimated from its adapter's; None without an adapter or gradients."""
    if not isinstance(module, LoRALinear) or module.lora_A.grad is None or module.lora_B.grad is None:
        return None
    A, B, gA, gB = module.lora_A.float(), module.lora_B.float(), module.lora_A.grad.float(), module.lora_B.grad.float()
    return (module.scale * torch.cat([gB, B - gB], 1)) @ torch.cat([A, gA], 0)  # (L1) as one product of inner size 2r


@torch.no_grad()
def loraprune_update(model, average=None, beta=0.9):
    """(L2-L3) After each backward: this step's group importance folded into the moving average (beta = lambda).
    The paper squares; its public code takes the absolute value."""
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("LoRAPrune scores base weights through their LoRA adapters: apply_lora first")

    def element(module):
        grad_w = loraprune_grad_estimate(module)
        return None if grad_w is None else grad_w.mul_(effective_weight(module)).square_()  # (L2)
    now = group_sums(model, element)
    return now if average is None else \
        {l: {k: beta * average[l][k].to(v.device) + (1 - beta) * v for k, v in now[l].items()} for l in now}


def cubic_sparsity(step, total_steps, final, initial=0.0, warmup=0.1, cooldown=0.1):
    """(L4) with t0 = warmup * T, t1 = (1 - cooldown) * T: s_i before t0, s_f from t1 on."""
    t0, t1 = warmup * total_steps, (1 - cooldown) * total_steps
    if step <= t0 or step >= t1 or t1 <= t0:
        return initial if step <= t0 else final
    return final + (initial - final) * (1 - (step - t0) / (t1 - t0)) ** 3


def loraprune_step(model, average, step, total_steps, sparsity, every=10, kept_layers=None, whole_groups=False):
    """Once per optimizer step (from 0), after backward and before optimizer.step(): update the importance (L2-L3)
    and, every `every` steps and at the last, mask up to the scheduled sparsity (L4). Returns the new average."""
    average = loraprune_update(model, average)
    if step % every == 0 or step == total_steps - 1:
        plan, _ = prune_plan(model, cubic_sparsity(step, total_steps, sparsity), kept_layers, whole_groups)
        choose_masks(model, average, plan, whole_groups)
    return average


# ----------------------------------------------------------------------------- the baselines (§5), one shot
@torch.no_grad()
def magnitude_scores(model):
    """(B1) The squared L2 norm of each group's weights (it ranks as the norm does)."""
    return group_sums(model, lambda m: effective_weight(m) ** 2)


def random_scores(model, seed=0):
    """(B2) Uniform random scores: the floor every criterion must beat."""
    g = torch.Generator().manual_seed(seed)
    return {l: {"heads": torch.rand(b.self_attn.n_head, generator=g), "kv": torch.rand(b.self_attn.n_kv_head, generator=g),
                "channels": torch.rand(b.mlp.down_proj.in_features, generator=g)} for l, b in enumerate(model.model.layers)}


@torch.no_grad()
def wanda_scores(model, batches):
    """(B3) |W_ij| ||X_j||_2, X_j the layer's j-th input feature over all calibration tokens, summed per group."""
    sq_norms = {}

    def record(module, args, output):
        x = args[0].float().flatten(0, -2)  # (tokens, in)
        sq_norms[module] = sq_norms.get(module, 0) + x.pow(2).sum(0)
    hooks = [m.register_forward_hook(record) for block in model.model.layers for _, m in projections(block)]
    try:
        for batch in batches:
            batch_loss(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return group_sums(model, lambda m: effective_weight(m).abs() * sq_norms[m].sqrt())  # (B3)


def taylor_scores(model, batches, order="first"):
    """LLM-Pruner with G the true gradient of W0 (mean over the batches): "first" (B4), "second" (B5) with F the
    mean over batches of G_b^2, "mixed" |W G - W F W / 2| (LLM-Pruner's element-wise estimate)."""
    if order not in ("first", "second", "mixed"):
        raise ValueError(f"taylor order must be 'first', 'second' or 'mixed', got {order!r}")
    modules = [m for block in model.model.layers for _, m in projections(block)]
    was_trainable = [m.weight.requires_grad for m in modules]
    grad = {m: torch.zeros_like(m.weight, dtype=torch.float32) for m in modules}
    fisher = {m: torch.zeros_like(m.weight, dtype=torch.float32) for m in modules} if order != "first" else None
    try:
        for m in modules:
            m.weight.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(batch_loss(model, batch), [m.weight for m in modules])
            for m, g in zip(modules, grads):
                grad[m] += g.float() / len(batches)
                if fisher is not None:
                    fisher[m] += g.float() ** 2 / len(batches)
    finally:
        for m, flag in zip(modules, was_trainable):
            m.weight.requires_grad_(flag)

    def element(m):
        w = m.weight.float()
        first = w * grad[m]  # (B4)
        second = w * fisher[m] * w / 2 if fisher is not None else None  # (B5)
        return (first if order == "first" else second if order == "second" else first - second).abs()
    with torch.no_grad():
        return group_sums(model, element)


def structured_scores(model, method, batches=None, seed=0, taylor="first"):
    """One method's group scores, one shot; loraprune needs adapters (apply_lora) and averages over `batches`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose magnitude, random, wanda, llm_pruner or loraprune")
    if method in ("magnitude", "random"):
        return magnitude_scores(model) if method == "magnitude" else random_scores(model, seed)
    if not batches:
        raise ValueError(f"method {method!r} needs calibration batches")
    if method in ("wanda", "llm_pruner"):
        return wanda_scores(model, batches) if method == "wanda" else taylor_scores(model, batches, taylor)
    average = None  # loraprune: (L2-L3) averaged over the batches
    for batch in batches:
        model.zero_grad(set_to_none=True)
        batch_loss(model, batch).backward()
        average = loraprune_update(model, average)
    model.zero_grad(set_to_none=True)
    return average


# ----------------------------------------------------------------------------- plumbing: data, saving, the command
def token_file(source, split="train"):
    """The tokens of a data/<name>/prepare.py output: a data set name (data/<source>/<split>.bin) or a .bin path."""
    data = Path(__file__).resolve().parent / "data"
    path = Path(source) if Path(source).suffix == ".bin" else data / str(source) / f"{split}.bin"
    meta = path.parent / "meta.json"
    if not path.exists() or not meta.exists():
        known = ", ".join(sorted(p.parent.name for p in data.glob("*/prepare.py")))
        raise FileNotFoundError(f"{path}: no prepared tokens; " + (
            f"run `python data/{path.parent.name}/prepare.py` first" if (path.parent / "prepare.py").exists() else
            f"expected a data set name (one of {known}) or the path of a .bin file a prepare.py wrote"))
    return np.memmap(path, dtype=json.loads(meta.read_text())["dtype"], mode="r")


def token_batches(source, n_tokens, seq_len=256, batch_size=8, seed=0, split="train"):
    """Random windows of seq_len + 1 tokens of token_file(source, split), in (batch, seq_len + 1) batches."""
    data = token_file(source, split)
    if len(data) <= seq_len + 1:
        raise ValueError(f"{data.filename}: {len(data)} tokens, too few for windows of {seq_len + 1}")
    starts = np.random.default_rng(seed).integers(0, len(data) - seq_len - 1, max(1, n_tokens // seq_len))
    windows = torch.from_numpy(np.stack([data[s:s + seq_len + 1].astype(np.int64) for s in starts]))
    return list(windows.split(batch_size))


def check_out(out, source_dir):
    """Refuse an output folder whose replacement would lose something: all but a new, empty or save_pruned one."""
    out, source = Path(out), Path(source_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out_dir {out}: a file is there, not a folder")
    if out.resolve() in (source.resolve(), *source.resolve().parents, Path.cwd(), *Path.cwd().parents):
        raise ValueError(f"--out_dir {out}: it is (or holds) the source model {source} or the current folder; "
                         f"choose a new folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "pruning.json").exists():
        raise ValueError(f"--out_dir {out}: the folder exists and is not an earlier pruned model (no pruning.json); "
                         f"choose a new folder or empty it")


def save_pruned(model, out, source_dir, info, dtype=torch.bfloat16):
    """Write a model folder atomically (a temporary one renamed) with the source's tokenizer files and pruning.json."""
    check_out(out, source_dir)
    out, source = Path(out), Path(source_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, dtype)
    for f in (f for f in TOKENIZER_FILES if (source / f).exists()):
        shutil.copy(source / f, tmp / f)
    (tmp / "pruning.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if model.config.layer_kv_map is not None or model.config.layer_intermediate is not None:
        print(f"note: {out} has per-layer widths; it loads with this project's model.py, not with transformers")


def layer_list(text, n_layer):
    """--keep_layers "0,1,29" -> [0, 1, 29], each a layer of the model."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--keep_layers {text!r}: expected layer numbers separated by commas") from None
    if any(not 0 <= k < n_layer for k in layers):
        raise ValueError(f"--keep_layers {text!r}: the model's layers are 0 to {n_layer - 1}")
    return layers


def main(argv=None):
    p = argparse.ArgumentParser(description="One-shot structured pruning (attention heads and MLP channels) of a "
                                "model folder, written as a smaller ordinary model folder.", allow_abbrev=False)
    p.add_argument("--model", required=True, help="model folder (config.json + model.safetensors)")
    p.add_argument("--method", required=True, choices=("magnitude", "random", "wanda", "llm_pruner"))
    p.add_argument("--sparsity", type=float, required=True, help="fraction of all parameters to remove, in [0, 1)")
    p.add_argument("--calib", default="pydocs", help="data set name (data/<name>/train.bin) or a .bin token file")
    p.add_argument("--calib_tokens", type=int, default=8192)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--taylor", default="first", choices=("first", "second", "mixed"), help="llm_pruner's order")
    p.add_argument("--whole_groups", action="store_true", help="prune whole GQA groups (a kv head and its query heads)")
    p.add_argument("--keep_layers", default=None, help="comma-separated layers kept whole (default: first 10%% + last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--out_dir", required=True, help="output model folder: new, empty or an earlier pruned model")
    renamed(p, {"--out": "--out_dir"})
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    try:  # everything that can be wrong with the arguments fails here, before the slow work, without a traceback
        if min(args.seq_len, args.calib_tokens) < 1:
            raise ValueError(f"--seq_len and --calib_tokens must be at least 1, got {args.seq_len}, {args.calib_tokens}")
        model = Transformer.from_pretrained(args.model, dtype=torch.float32).eval()
        kept = None if args.keep_layers is None else layer_list(args.keep_layers, model.config.n_layer)
        plan, planned = prune_plan(model, args.sparsity, kept, args.whole_groups)
        batches = token_batches(args.calib, args.calib_tokens, args.seq_len, seed=args.seed) \
            if args.method in ("wanda", "llm_pruner") else None
        check_out(args.out_dir, args.model)
    except (ValueError, OSError) as e:
        p.error(str(e))
    t0 = time.time()
    choose_masks(model, structured_scores(model, args.method, batches, args.seed, args.taylor), plan, args.whole_groups)
    before, after = count_params(model), count_params(compact(model))
    info = dict(method=args.method, target_sparsity=args.sparsity, planned_sparsity=planned,
                achieved_sparsity=1 - after / before, params_before=before, params_after=after,
                kept_layers=default_kept_layers(model.config.n_layer) if kept is None else kept,
                whole_groups=args.whole_groups, taylor=args.taylor if args.method == "llm_pruner" else None,
                calib=args.calib if batches else None, calib_tokens=args.calib_tokens if batches else None,
                seq_len=args.seq_len, seed=args.seed, source=str(args.model))
    print(f"{args.method}: removed {before - after:,} of {before:,} parameters = {1 - after / before:.4%} of all "
          f"(target {args.sparsity:.2%}, planned {planned:.4%}); {after:,} left; scoring took {time.time() - t0:.1f}s")
    print("heads per layer:", [b.self_attn.n_head for b in model.model.layers])
    print("MLP width per layer:", [b.mlp.down_proj.in_features for b in model.model.layers])
    save_pruned(model, args.out_dir, args.model, info, getattr(torch, args.dtype))
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()

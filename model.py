"""
The LLaMA-family transformer, matching Hugging Face's LlamaForCausalLM number for number: RMSNorm -> rotary
embeddings -> grouped-query attention -> SwiGLU MLP -> blocks -> the model -> generation; then the fused output-layer
loss and the reading of a Hugging Face config.json. Names follow Hugging Face (model.layers.3.self_attn.q_proj.weight),
so a config.json + model.safetensors folder loads one to one. Per-layer widths (query heads kept, the key/value head
each reads, MLP width) are part of the config: a structurally pruned model is an ordinary model here.
"""
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoint import assign_weights, load_weights, read_json, save_json, save_safetensors


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    head_dim: int = 64
    max_seq_len: int = 8192
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    # per-layer widths after structured pruning; None means every layer has the widths above
    layer_kv_map: list | None = None        # [layer][query head] -> index of the key/value head it reads
    layer_intermediate: list | None = None  # [layer] -> MLP width

    def kv_map(self, layer):  # for each query head of `layer`, the index of the key/value head it reads
        if self.layer_kv_map is not None:
            return list(self.layer_kv_map[layer])
        return [h // (self.n_head // self.n_kv_head) for h in range(self.n_head)]

    def intermediate(self, layer):
        return self.layer_intermediate[layer] if self.layer_intermediate is not None else self.intermediate_size

    @classmethod
    def from_hf(cls, hf: dict, where="config.json"):
        return config_from_hf(hf, where)

    def to_hf(self):
        return config_to_hf(self)


class RMSNorm(nn.Module):  # x / sqrt(mean(x^2) + eps) * weight, in float32 as Hugging Face computes it
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(cfg: ModelConfig):
    """Inverse frequencies of rotary embeddings, with Llama-3's long-context rescaling if configured."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_len = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq, positions):
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)                 # HF layout: two halves, not interleaved
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # x: (B, n_head, T, head_dim)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        kv_map = cfg.kv_map(layer)
        self.n_head, self.n_kv_head, self.head_dim = len(kv_map), max(kv_map) + 1, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        group = self.n_head // self.n_kv_head
        self.uniform_gqa = self.n_head % self.n_kv_head == 0 and kv_map == [h // group for h in range(self.n_head)]
        self.register_buffer("kv_index", torch.tensor(kv_map), persistent=False)
        self.register_buffer("head_mask", None)  # (n_head,) 0/1 while structured pruning masks heads (prune.py)

    def forward(self, x, cos, sin, cache=None, layer=0, start=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # all keys/values up to start + T
        if not self.uniform_gqa:  # uneven groups after pruning: gather each query head's k/v
            k, v = k.index_select(1, self.kv_index), v.index_select(1, self.kv_index)
        S = k.shape[2]
        pad = cache.key_mask if cache is not None else None
        if pad is None and (T == 1 or start == 0):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.uniform_gqa)
        else:  # a chunk after cached tokens: query i sees keys up to start + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            if pad is not None:  # left-padded rows: no query sees a pad key (a pad query sees itself, not NaN)
                itself = torch.arange(S, device=x.device) == torch.arange(S - T, S, device=x.device)[:, None]
                mask = (mask & pad[:, None, None, :S]) | itself
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.uniform_gqa)
        if self.head_mask is not None:  # a masked head outputs zero (into o_proj and its LoRA alike)
            y = y * self.head_mask.view(1, -1, 1, 1).to(y.dtype)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        width = cfg.intermediate(layer)
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)
        self.register_buffer("channel_mask", None)  # (width,) 0/1 while structured pruning masks channels

    def forward(self, x):  # SwiGLU
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.channel_mask is not None:
            h = h * self.channel_mask.to(h.dtype)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, x, cos, sin, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, self.layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Preallocated keys and values of every layer, (B, n_kv_head, max_len, head_dim). key_mask (B, max_len),
    False at left padding, lets rows of different lengths share a batch (RoPE scores depend on distance only)."""

    def __init__(self, model, batch_size, max_len, dtype, device, key_mask=None):
        self.k = [torch.zeros(batch_size, b.self_attn.n_kv_head, max_len, b.self_attn.head_dim, dtype=dtype, device=device)
                  for b in model.model.layers]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.key_mask = key_mask

    def keep_rows(self, rows):
        """Keep only these batch rows (the others' sequences have finished)."""
        rows = torch.tensor(rows, device=self.k[0].device)
        self.k, self.v = [k.index_select(0, rows) for k in self.k], [v.index_select(0, rows) for v in self.v]
        self.key_mask = None if self.key_mask is None else self.key_mask.index_select(0, rows)

    def update(self, layer, start, k, v):
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, l) for l in range(cfg.n_layer)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.gradient_checkpointing = False

    def hidden_states(self, idx, cache=None, start=0):
        B, T = idx.shape
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's context "
                             f"({self.config.max_seq_len})")
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(start, start + T, device=idx.device))
        x = self.model.embed_tokens(idx)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, start)
        return self.model.norm(x)

    def forward(self, idx, targets=None, cache=None, start=0, last_only=False):
        """idx (B, T) int64 -> (logits, loss). With targets (B, T; -1 = not counted) the loss is the mean
        cross-entropy over counted positions and logits is None: logits are computed only at those
        positions, in chunks, never as a (B, T, vocab) tensor. last_only: logits of the last position."""
        if not torch.compiler.is_compiling():
            self.check_ids(idx)
        h = self.hidden_states(idx, cache, start)
        if targets is None:
            return self.lm_head(h[:, -1:] if last_only else h), None
        return None, chunked_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1))

    def check_ids(self, idx):
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{idx.min()}, {idx.max()}]")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_ids=None, generator=None):
        """Continue idx (B, T) by up to max_new_tokens with a KV cache; returns (B, T + new).
        temperature 0 is greedy. A row that emits a stop id is padded with that id until all rows stop."""
        B, T = idx.shape
        total = min(T + max_new_tokens, self.config.max_seq_len)
        if T >= self.config.max_seq_len:
            raise ValueError(f"prompt of {T} tokens leaves no room in the model's context ({self.config.max_seq_len})")
        cache = KVCache(self, B, total, self.lm_head.weight.dtype, idx.device)
        stops = torch.tensor(sorted(set(stop_ids or [])), device=idx.device, dtype=idx.dtype)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        self.check_ids(idx)  # once: sampled ids are valid, and on a GPU each check waits for the step before it
        out, start, step_in = idx, 0, idx
        while out.shape[1] < total:
            logits = self.lm_head(self.hidden_states(step_in, cache, start)[:, -1:])
            if start == 0 and not torch.isfinite(logits).all():  # checked once: a clear error, not a sampling one
                raise ValueError("the model's logits are NaN or Inf (are its weights finite?)")
            nxt = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)
            if len(stops):
                nxt = torch.where(done, out[:, -1], nxt)
                done |= torch.isin(nxt, stops)
            start += step_in.shape[1]
            out, step_in = torch.cat([out, nxt[:, None]], dim=1), nxt[:, None]
            if len(stops) and done.all():
                break
        return out

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device="cpu"):
        """Load a Hugging Face llama folder: built on the meta device, the weights assigned (never two copies)."""
        cfg = ModelConfig.from_hf(read_json(Path(folder) / "config.json", "is this a model folder?"),
                                  str(Path(folder) / "config.json"))
        with torch.device("meta"):
            model = cls(cfg)
        return model.load_weights(load_weights(folder), dtype, device, str(folder))

    def load_weights(self, state, dtype, device, where):
        tied = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        assign_weights(self, state, dtype, device, where, skip=tied)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = rope_frequencies(self.config).to(device)
        for b in self.model.layers:
            b.self_attn.kv_index = torch.tensor(self.config.kv_map(b.layer), device=device)
        return self

    def save_pretrained(self, folder, dtype=torch.bfloat16):
        # only `*.weight` tensors are the model's own (adapters add lora_A / lora_B / rank_mask)
        state = {k: v.to(dtype) for k, v in self.state_dict().items()
                 if k.endswith("weight") and not (k == "lm_head.weight" and self.config.tie_word_embeddings)}
        save_safetensors(state, Path(folder) / "model.safetensors", metadata={"format": "pt"})
        save_json({**self.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}, Path(folder) / "config.json")


@torch.compiler.disable  # how many positions count depends on the data: under torch.compile the loss runs eagerly
def chunked_cross_entropy(h, weight, targets, chunk=2048):
    """Mean cross-entropy of hidden states h (N, C) through the output layer against targets (N,), -1 = not
    counted: logits only at the counted positions, chunk by chunk, never all (N, vocab) at once."""
    keep = targets != -1
    h, targets = h[keep], targets[keep]
    if targets.numel() == 0:
        return h.sum() * 0.0  # no counted tokens: a zero loss that still has a graph
    return LinearCrossEntropy.apply(h, weight, targets, chunk, torch.is_grad_enabled())


def plain_cross_entropy(h, weight, targets):  # what chunked_cross_entropy computes, in one line
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-1)


class LinearCrossEntropy(torch.autograd.Function):
    """Gradients are computed in the forward pass while a chunk's logits exist, d loss / d logits =
    (softmax - onehot) / N, so backward only scales them and the logits are computed once."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, with_grad):
        n = targets.numel()
        grad_h = torch.empty_like(h) if with_grad and ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if with_grad and ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, n, chunk):
            hh, t = h[i:i + chunk], targets[i:i + chunk]
            logprobs = F.linear(hh, weight).log_softmax(-1, dtype=torch.float32)  # (chunk, vocab)
            total -= logprobs.gather(1, t[:, None]).sum()
            if grad_h is not None or grad_w is not None:
                d = logprobs.exp_()  # softmax - onehot
                d[torch.arange(len(t), device=t.device), t] -= 1.0
                d = d.to(h.dtype)
                if grad_h is not None:
                    grad_h[i:i + chunk] = (d @ weight) / n
                if grad_w is not None:
                    grad_w += (d.t() @ hh) / n
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        grad_w = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab) float32 -> next ids (B,)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------- Hugging Face config.json
HF_NAMES = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads",
            "max_seq_len": "max_position_embeddings"}  # the other fields have Hugging Face's names
# a folder whose layers have their own widths is marked with a model type transformers does not know: it fails
# there at once, by name, instead of on mismatched tensor shapes
PER_LAYER_TYPE = "llama_per_layer_widths"


def config_from_hf(hf, where="config.json"):
    """A Hugging Face llama config as a ModelConfig, refusing what this model does not implement."""
    for key, unsupported in (("model_type", hf.get("model_type", "llama") not in ("llama", "mistral", "smollm", PER_LAYER_TYPE)),
                             ("attention_bias", hf.get("attention_bias")), ("mlp_bias", hf.get("mlp_bias")),
                             ("hidden_act", hf.get("hidden_act", "silu") != "silu"),
                             ("sliding_window", hf.get("model_type") == "mistral" and hf.get("sliding_window"))):
        if unsupported:
            raise ValueError(f"{where}: {key} = {hf.get(key)!r} is not supported by this llama model")
    if missing := [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                               "intermediate_size") if k not in hf]:
        raise ValueError(f"{where}: missing required keys {missing}")
    rope = hf.get("rope_parameters")  # transformers >= 5 writes rope_theta and the scaling in one dict
    if isinstance(rope, dict):
        hf = {**hf, "rope_theta": rope.get("rope_theta", hf.get("rope_theta")),
              "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope}
    kw = {f.name: hf[HF_NAMES.get(f.name, f.name)] for f in fields(ModelConfig)
          if hf.get(HF_NAMES.get(f.name, f.name)) is not None}
    kw.setdefault("n_kv_head", kw["n_head"])
    if "head_dim" not in kw:
        if kw["hidden_size"] % kw["n_head"]:
            raise ValueError(f"{where}: num_attention_heads {kw['n_head']} does not divide hidden_size "
                             f"{kw['hidden_size']} (and no head_dim is given)")
        kw["head_dim"] = kw["hidden_size"] // kw["n_head"]
    cfg = ModelConfig(**kw)
    check_config(cfg, where)
    return cfg


def check_config(cfg, where="config"):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layer", "n_head", "n_kv_head", "head_dim"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) <= 0:
            raise ValueError(f"{where}: {name} must be a positive integer, got {getattr(cfg, name)!r}")
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type"))
    problems = [(cfg.n_head % cfg.n_kv_head, f"num_key_value_heads {cfg.n_kv_head} does not divide "
                                             f"num_attention_heads {cfg.n_head}"),
                (cfg.head_dim % 2, f"head_dim {cfg.head_dim} must be even for rotary embeddings"),
                (kind not in (None, "default", "llama3"), f"rope_scaling type {kind!r} is not supported (only 'llama3')")]
    problems += [(v is not None and len(v) != cfg.n_layer, f"{name} has {len(v or [])} entries for {cfg.n_layer} layers")
                 for name, v in (("layer_kv_map", cfg.layer_kv_map), ("layer_intermediate", cfg.layer_intermediate))]
    problems += [(not m, f"layer {l} has no attention heads left") for l, m in enumerate(cfg.layer_kv_map or [])]
    for bad, message in problems:
        if bad:
            raise ValueError(f"{where}: {message}")


def config_to_hf(cfg):
    per_layer = cfg.layer_kv_map is not None or cfg.layer_intermediate is not None
    hf = {HF_NAMES.get(f.name, f.name): getattr(cfg, f.name) for f in fields(cfg)
          if getattr(cfg, f.name) is not None or not f.name.startswith("layer_")}
    note = "per-layer widths (layer_kv_map, layer_intermediate): loads with lora-prune's model.py only"
    return {"architectures": ["LlamaForCausalLM"], "model_type": PER_LAYER_TYPE if per_layer else "llama",
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, **hf, **({"note": note} if per_layer else {})}

"""The transformer against independent references: Hugging Face's own float32 outputs (golden file),
transformers' LlamaForCausalLM where installed, Meta's closed-form llama3 rope scaling, and itself
without the KV cache (cached == recomputed)."""
import math

import pytest
import torch

from conftest import tiny_config, tiny_model
from model import PER_LAYER_TYPE, ModelConfig, Transformer, chunked_cross_entropy, plain_cross_entropy, rope_frequencies

# The golden log-probs are rounded to 5 decimals, so 5e-6 is the floor; measured max diff 5.0e-6.
FP32_TOL = 1e-4
# bf16 weights and activations: measured per-text max |diff| 0.12..1.03, mean |diff| 0.033..0.055,
# |mean NLL diff| 0.003..0.016 and top-1 agreement 95..98%. The bounds leave about 2x headroom while a
# real bug (wrong rope, wrong norm, a dropped layer) moves all three by far more.
BF16_MEAN_ABS_TOL, BF16_NLL_TOL, BF16_MIN_TOP1 = 0.1, 0.05, 0.9


@pytest.fixture(scope="module")
def model_bf16(model_dir):
    return Transformer.from_pretrained(model_dir, dtype=torch.bfloat16).eval()


def next_token_logprobs(model, ids):
    """log p(ids[i+1] | ids[:i+1]) for every position, and the log-probs of all tokens (T, vocab)."""
    idx = torch.tensor([ids])
    with torch.no_grad():
        logits, _ = model(idx)
    logprobs = logits[0].float().log_softmax(-1)
    return logprobs[:-1].gather(-1, idx[0, 1:, None])[:, 0], logprobs


# ----------------------------------------------------------------------------- against the golden file
def test_token_ids_match_golden(tokenizer, golden):
    for n, entry in enumerate(golden["texts"]):
        assert tokenizer.encode(entry["text"]) == entry["ids"], f"golden text {n}"
    for entry in golden["greedy"]:
        assert tokenizer.encode(entry["prompt"]) == entry["prompt_ids"], entry["prompt"]


def test_fp32_logprobs_match_golden(model_fp32, golden):
    for n, entry in enumerate(golden["texts"]):
        got, logprobs = next_token_logprobs(model_fp32, entry["ids"])
        diff = (got - torch.tensor(entry["next_logprob"])).abs().max().item()
        assert diff < FP32_TOL, f"golden text {n}: max |log-prob diff| {diff:.2e}"
        top5 = logprobs.topk(5)
        assert top5.indices.tolist() == entry["top5_ids"], f"golden text {n}: top-5 ids differ"
        top5_diff = (top5.values - torch.tensor(entry["top5_logprob"])).abs().max().item()
        assert top5_diff < FP32_TOL, f"golden text {n}: top-5 log-probs differ by {top5_diff:.2e}"
        assert abs(-got.mean().item() - entry["mean_nll"]) < FP32_TOL


def test_bf16_close_to_golden(model_bf16, golden):
    for n, entry in enumerate(golden["texts"]):
        got, logprobs = next_token_logprobs(model_bf16, entry["ids"])
        mean_abs = (got - torch.tensor(entry["next_logprob"])).abs().mean().item()
        nll_diff = abs(-got.mean().item() - entry["mean_nll"])
        top1 = (logprobs.argmax(-1) == torch.tensor([t[0] for t in entry["top5_ids"]])).float().mean().item()
        assert mean_abs < BF16_MEAN_ABS_TOL, f"golden text {n}: mean |log-prob diff| {mean_abs:.3f}"
        assert nll_diff < BF16_NLL_TOL, f"golden text {n}: mean NLL off by {nll_diff:.3f}"
        assert top1 > BF16_MIN_TOP1, f"golden text {n}: top-1 agrees on only {top1:.0%} of positions"


def test_greedy_matches_golden(model_fp32, tokenizer, golden):
    for entry in golden["greedy"]:
        idx = torch.tensor([entry["prompt_ids"]])
        out = model_fp32.generate(idx, max_new_tokens=len(entry["new_ids"]), temperature=0.0, stop_ids=[2])
        new_ids = out[0, idx.shape[1]:].tolist()
        assert new_ids == entry["new_ids"], entry["prompt"]
        assert tokenizer.decode(new_ids) == entry["new_text"]


# ----------------------------------------------------------------------------- KV cache == recompute
def greedy_without_cache(model, idx, max_new_tokens, stop_ids=()):
    """Greedy decoding by re-running the whole sequence each step; rows that emitted a stop id repeat
    it, and decoding ends when every row has stopped (the contract of Transformer.generate)."""
    out = idx
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits, _ = model(out)
        nxt = logits[:, -1].argmax(-1)
        stopped = torch.tensor([any(t in stop_ids for t in row[idx.shape[1]:]) for row in out.tolist()])
        nxt = torch.where(stopped, out[:, -1], nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if stop_ids and all(any(t in stop_ids for t in row[idx.shape[1]:]) for row in out.tolist()):
            break
    return out


UNEVEN = dict(layer_kv_map=[[0, 0, 1], [1, 0, 1, 1, 0]], layer_intermediate=[40, 24])  # pruned-model shapes


@pytest.mark.parametrize("widths", [{}, UNEVEN], ids=["uniform", "pruned-widths"])
def test_cached_generation_equals_recompute_tiny(widths):
    model = tiny_model(seed=1, **widths)
    idx = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    expected = greedy_without_cache(model, idx, 12)
    assert torch.equal(model.generate(idx, max_new_tokens=12), expected)


def test_cached_generation_with_stop_ids_pads_finished_rows():
    model = tiny_model(seed=2)
    idx = torch.randint(0, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    free = greedy_without_cache(model, idx, 10)
    stop = free[0, idx.shape[1] + 2].item()  # row 0 stops at its third new token
    expected = greedy_without_cache(model, idx, 10, stop_ids=(stop,))
    got = model.generate(idx, max_new_tokens=10, stop_ids=[stop])
    assert torch.equal(got, expected)
    assert (got[0, idx.shape[1] + 2:] == stop).all()


def test_cached_generation_equals_recompute_real_model(model_fp32, golden):
    ids = golden["texts"][2]["ids"]
    idx = torch.tensor([ids[:6], ids[10:16]])  # batch of 2
    assert torch.equal(model_fp32.generate(idx, max_new_tokens=4), greedy_without_cache(model_fp32, idx, 4))


def chunked_logits(model, idx, cuts):
    """Logits of idx computed in chunks [0, c0), [c0, c1), ... through one KV cache."""
    from model import KVCache
    cache = KVCache(model, idx.shape[0], idx.shape[1], torch.float32, "cpu")
    bounds = [0, *cuts, idx.shape[1]]
    with torch.no_grad():
        parts = [model(idx[:, a:b], cache=cache, start=a)[0] for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("widths", [{}, UNEVEN], ids=["uniform", "pruned-widths"])
def test_chunked_prefill_equals_full_forward_tiny(widths):
    model = tiny_model(seed=3, **widths)
    idx = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(idx)
    torch.testing.assert_close(chunked_logits(model, idx, [5, 6, 13]), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_full_forward_real_model(model_fp32, golden):
    ids = golden["texts"][2]["ids"]
    idx = torch.tensor([ids[:24], ids[12:36]])
    with torch.no_grad():
        full, _ = model_fp32(idx)
    torch.testing.assert_close(chunked_logits(model_fp32, idx, [9, 17]), full, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- errors a user can act on
LLAMA_HF = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "intermediate_size": 128}


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_attention_heads": 5}, "num_attention_heads 5 does not divide hidden_size 64"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear'"),
    ({"hidden_size": None}, r"missing required keys \['hidden_size'\]"),
    ({"vocab_size": None, "intermediate_size": None}, r"missing required keys \['vocab_size', 'intermediate_size'\]"),
])
def test_config_from_hf_refuses(change, message):
    hf = {**LLAMA_HF, **change}
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(hf, "some/config.json")


def test_config_from_hf_reads_a_valid_config():
    cfg = ModelConfig.from_hf(LLAMA_HF)
    assert (cfg.hidden_size, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_layer) == (64, 4, 2, 16, 2)


def test_config_from_hf_reads_transformers_v5_rope_parameters():
    v5 = {**LLAMA_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    assert (ModelConfig.from_hf(v5).rope_theta, ModelConfig.from_hf(v5).rope_scaling) == (500.0, None)
    v5_llama3 = {**LLAMA_HF, "rope_parameters": {**LLAMA31_ROPE, "rope_theta": 500000.0}}
    cfg = ModelConfig.from_hf(v5_llama3)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 8.0


def test_token_ids_outside_vocab_are_refused():
    model = tiny_model()
    for bad in (-1, model.config.vocab_size):
        with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {model.config.vocab_size}\)"):
            model(torch.tensor([[1, 2, bad]]))
        with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {model.config.vocab_size}\)"):
            model.generate(torch.tensor([[1, 2, bad]]), max_new_tokens=2)  # checked once, before decoding


def test_sequences_longer_than_context_are_refused():
    model = tiny_model()  # max_seq_len 64
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="leaves no room"):
        model.generate(torch.zeros(1, 64, dtype=torch.long), max_new_tokens=1)
    out = model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)
    assert out.shape == (1, 64)  # generation stops at the context length


# ----------------------------------------------------------------------------- llama3 rope scaling
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def meta_llama3_scaling(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Meta's reference (llama-models, apply_scaling), one frequency at a time in Python floats."""
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    out, regimes = [], set()
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            regime, new = "kept", freq
        elif wavelen > low_freq_wavelen:
            regime, new = "divided", freq / factor
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            regime, new = "smoothed", (1 - smooth) * freq / factor + smooth * freq
        out.append(new)
        regimes.add(regime)
    return out, regimes


def test_llama3_rope_frequencies_closed_form():
    cfg = tiny_config(head_dim=128, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE)
    plain = [1.0 / 500000.0 ** (i / 128) for i in range(0, 128, 2)]
    expected, regimes = meta_llama3_scaling(plain, 8.0, 1.0, 4.0, 8192)
    assert regimes == {"kept", "divided", "smoothed"}  # the test covers all three branches
    torch.testing.assert_close(rope_frequencies(cfg), torch.tensor(expected, dtype=torch.float32),
                               rtol=1e-6, atol=0)


def test_llama3_rope_frequencies_match_transformers():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_theta=500000.0,
                     rope_scaling=dict(LLAMA31_ROPE), max_position_embeddings=131072)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = rope_frequencies(tiny_config(head_dim=128, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- against transformers
SMALL_LLAMA3_ROPE = {**LLAMA31_ROPE, "factor": 4.0, "original_max_position_embeddings": 100}


@pytest.mark.parametrize("kw", [
    dict(tie_word_embeddings=True),
    dict(tie_word_embeddings=False, rope_scaling=SMALL_LLAMA3_ROPE),  # head_dim 8: kept, smoothed, divided
], ids=["tied", "untied-llama3-rope"])
def test_logits_match_transformers_on_our_saved_folder(tmp_path, kw):
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM
    # uneven sizes: head_dim 8 while hidden/heads = 10; 3 query heads per key/value head
    ours = tiny_model(seed=4, vocab_size=101, hidden_size=60, n_head=6, n_kv_head=2, head_dim=8,
                      intermediate_size=72, rope_theta=1000.0, **kw)
    ours.save_pretrained(tmp_path, dtype=torch.float32)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-5, rtol=1e-5)


def test_we_load_what_transformers_saves(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=90, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=False, rope_theta=500.0)
    theirs = LlamaForCausalLM(cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = torch.randint(0, 90, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-5, rtol=1e-5)


def test_torch_compile_sees_the_whole_training_forward_as_one_graph():
    """Embedding to final norm, LoRA included, is one graph (no breaks: the token check is left out while
    compiling); only the loss, whose counted positions are data, runs eagerly (torch.compiler.disable)."""
    from lora import ALL_TARGETS, apply_lora
    model = apply_lora(tiny_model(seed=4), ALL_TARGETS, r=4, alpha=8).train()
    x = torch.randint(97, (2, 16), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, 1)
    y[:, :8] = -1  # a prompt that does not count
    explanation = torch._dynamo.explain(model)(x, y)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert all("chunked_cross_entropy" in str(b.reason) for b in explanation.break_reasons)


# ----------------------------------------------------------------------------- the fused loss
def test_chunked_cross_entropy_equals_the_plain_one():
    """Loss and both gradients of the chunked, fused output-layer loss against autograd through F.cross_entropy."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 16, generator=g, requires_grad=True), torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(50, (37,), generator=g)
    targets[::3] = -1  # positions that do not count
    ours = chunked_cross_entropy(h, w, targets, chunk=8)  # 25 counted rows: 4 chunks, the last one short
    ours_grads = torch.autograd.grad(3 * ours, (h, w))
    plain = plain_cross_entropy(h, w, targets)
    plain_grads = torch.autograd.grad(3 * plain, (h, w))
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- per-layer widths
def test_a_folder_with_per_layer_widths_is_marked_as_ours_only(tmp_path):
    """Our loader reads it; transformers refuses it by its model type instead of failing on tensor shapes."""
    model = tiny_model(seed=2, layer_intermediate=[48, 24], layer_kv_map=[[0, 0, 1, 1], [0, 1]])
    model.save_pretrained(tmp_path, dtype=torch.float32)
    assert ModelConfig.from_hf(__import__("json").loads((tmp_path / "config.json").read_text())) == model.config
    assert model.config.to_hf()["model_type"] == PER_LAYER_TYPE
    idx = torch.randint(97, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_pretrained(tmp_path)(idx)[0], model(idx)[0])
    assert tiny_model().config.to_hf()["model_type"] == "llama"  # uniform widths stay a plain llama
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match=PER_LAYER_TYPE):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)

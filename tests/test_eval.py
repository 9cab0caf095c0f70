"""eval.py against closed-form answers: a bigram "model" whose logits are a chosen table (a real Transformer
whose blocks add nothing), a character tokenizer, lm-eval's definitions (checked against lm_eval itself
where it is installed), and direct computations on a tiny random model."""
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import eval as E
from conftest import tiny_config, tiny_model
from model import Transformer
from tokenizer import Tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz .\n"  # ids 0..28; 30 = BOS, 31 = EOS; vocab 32


class CharTokenizer:
    bos_id, eos_id, stop_ids = 30, 31, [31]

    def encode(self, text, bos=False):
        return ([self.bos_id] if bos else []) + [ALPHABET.index(c) for c in text]

    def decode(self, ids):
        return "".join(ALPHABET[i] for i in ids if i < len(ALPHABET))


def bigram_model(table):
    """A Transformer whose logits at position t are table[idx[t]]: one-hot embeddings, blocks whose output
    projections are zero (so they add nothing), a final norm that leaves one-hot vectors as they are."""
    V = table.shape[0]
    model = Transformer(tiny_config(vocab_size=V, hidden_size=V, n_layer=1, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        model.model.norm.weight.fill_(math.sqrt(1 / V + model.config.rms_norm_eps))
        model.lm_head.weight.copy_(table.T)
    return model.eval()


def c(ch):
    return ALPHABET.index(ch)


def test_bigram_model_gives_the_table():
    table = torch.randn(32, 32)
    idx = torch.tensor([[0, 5, 7, 7, 30]])
    logits, _ = bigram_model(table)(idx)
    assert torch.allclose(logits[0], table[idx[0]], atol=1e-5)


def test_multiple_choice_acc_and_acc_norm_differ_on_purpose():
    table = torch.zeros(32, 32)
    table[c("c"), c("c")] = 10.0  # "c" after "c" is almost certain; everything else is uniform
    model, tok = bigram_model(table), CharTokenizer()
    logp = F.log_softmax(table, dim=-1)
    u, cc = logp[0, 0].item(), logp[c("c"), c("c")].item()  # uniform step; "c" after "c"
    items = [
        # " c" scores 2u; " cccc" 2u + 3cc (a hair lower) but per character it is far better -> acc 0, acc_norm 1
        E.mc_item("ab", ["c", "cccc"], gold=1),
        # both metrics pick "cccc" over "dd" (2u + 3cc > 3u and per character too) -> acc 1, acc_norm 1
        E.mc_item("ab", ["dd", "cccc"], gold=1),
        # acc picks "c" (gold) and acc_norm "cccc" -> acc 1, acc_norm 0
        E.mc_item("x", ["c", "cccc"], gold=0),
    ]
    lls = E.loglikelihoods(model, [E.encode_pair(tok, a, b) for it in items for a, b in it["requests"]])
    expected = [2 * u, 2 * u + 3 * cc, 3 * u, 2 * u + 3 * cc, 2 * u, 2 * u + 3 * cc]
    assert lls == pytest.approx(expected, abs=1e-4)
    res = E.score_mc(model, tok, items)
    assert res["acc"] == pytest.approx(2 / 3) and res["acc_norm"] == pytest.approx(2 / 3)
    assert res["rows"] == 3
    assert res["acc_stderr"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    one = E.score_mc(model, tok, items[:1])
    assert (one["acc"], one["acc_norm"]) == (0.0, 1.0)


def test_ties_go_to_the_first_choice_and_winogrande_has_no_acc_norm():
    model, tok = bigram_model(torch.zeros(32, 32)), CharTokenizer()  # every continuation of equal length ties
    res = E.score_mc(model, tok, [E.mc_item("ab", ["cd", "ef"], gold=0),
                                  {"requests": [("a", " xy"), ("b", " xy")], "choices": None, "gold": 0}])
    assert res["acc"] == 1.0 and "acc_norm" in res
    res = E.score_mc(model, tok, [{"requests": [("a", " xy"), ("b", " xy")], "choices": None, "gold": 1}])
    assert res["acc"] == 0.0 and "acc_norm" not in res


def test_encode_pair_moves_trailing_spaces_and_splits_the_joint_encoding():
    tok = CharTokenizer()
    assert E.encode_pair(tok, "ab  ", "cd") == ([c("a"), c("b")], [c(" "), c(" "), c("c"), c("d")])
    assert E.encode_pair(tok, "", "cd") == ([tok.bos_id], [c("c"), c("d")])


def test_loglikelihoods_equal_a_direct_computation_on_a_tiny_model():
    model = tiny_model(seed=1)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 97, (n,), generator=g).tolist()
    ctx_a, ctx_b = rand(7), rand(1)
    requests = [(ctx_a, rand(3)), (ctx_a, rand(1)), (ctx_b, rand(5)), (ctx_a, rand(6)), (ctx_b, rand(2))]
    for batch_size in (1, 2, 8):
        ours = E.loglikelihoods(model, requests, batch_size=batch_size)
        for (ctx, cont), ll in zip(requests, ours):
            with torch.no_grad():
                logits, _ = model(torch.tensor([ctx + cont]))
            logp = F.log_softmax(logits[0, len(ctx) - 1:-1].float(), dim=-1)
            assert ll == pytest.approx(logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item(), abs=1e-4)


def test_rolling_windows_partition_the_document():
    tokens = list(range(100, 123))  # 23 tokens
    for L in (1, 4, 5, 23, 30):
        windows = list(E.rolling_windows(tokens, 0, L))
        assert sum(n for _, n in windows) == len(tokens)
        assert all(len(inp) <= L and n <= len(inp) for inp, n in windows)
        assert windows[0][0][0] == 0  # the BOS prefix
    assert list(E.rolling_windows([], 0, 4)) == []


def test_rolling_windows_match_lm_eval():
    lm_utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(100, 137))
    for L in (1, 5, 8, 36, 37, 50):
        theirs = [lm_utils.make_disjoint_window(w) for w in
                  lm_utils.get_rolling_token_windows(tokens, prefix_token=0, max_seq_len=L, context_len=1)]
        ours = [(inp, n) for inp, n in E.rolling_windows(tokens, 0, L)]
        # theirs: (context, continuation) fed as (context + continuation)[:-1], scoring the continuation
        assert [((a + b)[:-1], len(b)) for a, b in theirs] == ours


def test_rolling_loglikelihood_equals_a_direct_computation():
    model = tiny_model(seed=2)
    tokens = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    for L in (8, 13, 64):
        stream, direct, done = [1] + tokens, 0.0, 0  # window inputs are slices of the BOS-prefixed stream
        for inp, n in E.rolling_windows(tokens, 1, L):
            s = 0 if done == 0 else done + n - L
            assert stream[s:s + len(inp)] == inp
            with torch.no_grad():
                logits, _ = model(torch.tensor([inp]))
            logp = F.log_softmax(logits[0].float(), dim=-1)[-n:]  # the last n positions are scored
            direct += logp[torch.arange(n), torch.tensor(stream[s + 1:s + 1 + len(inp)][-n:])].sum().item()
            done += n
        assert E.rolling_loglikelihood(model, tokens, 1, L) == pytest.approx(direct, abs=1e-3)
    with torch.no_grad():  # one window: log p(tokens | BOS) from a single forward
        logits, _ = model(torch.tensor([[1] + tokens[:-1]]))
    full = F.log_softmax(logits[0], -1)[torch.arange(40), torch.tensor(tokens)].sum().item()
    assert E.rolling_loglikelihood(model, tokens, 1, 64) == pytest.approx(full, abs=1e-3)


def test_word_perplexity_arithmetic_on_a_uniform_model():
    model, tok = bigram_model(torch.zeros(32, 32)), CharTokenizer()  # every token costs log 32
    docs = [("ab cd", "ab cd"), ("efg", "e f g")]  # scored text vs the text whose words and bytes count
    args = SimpleNamespace(max_length=4, ppl_ctx=3, batch_size=2, limit=None, ppl_windows=None)
    res = E.perplexity(model, tok, docs, "abcdefghij", args)
    ll = -(5 + 3) * math.log(32)
    assert res["word_perplexity"] == pytest.approx(math.exp(-ll / (2 + 3)), rel=1e-4)
    assert res["byte_perplexity"] == pytest.approx(math.exp(-ll / (5 + 5)), rel=1e-4)
    assert res["bits_per_byte"] == pytest.approx(-ll / 10 / math.log(2), rel=1e-4)
    assert res["token_perplexity"] == pytest.approx(32.0, rel=1e-4)
    assert (res["windows"], res["tokens"]) == (3, 6)  # 10 tokens -> 3 windows of 3, 2 predicted each
    args.limit, args.ppl_windows = 1, 2  # --ppl_windows counts the token perplexity's windows apart from --limit
    assert E.perplexity(model, tok, docs, "abcdefghij", args)["windows"] == 2
    args.ppl_windows = 0  # 0: every window, whatever --limit says
    assert E.perplexity(model, tok, docs, "abcdefghij", args)["windows"] == 3
    args.ppl_windows = None  # without it, --limit counts them too
    assert E.perplexity(model, tok, docs, "abcdefghij", args)["windows"] == 1


def test_word_count_keeps_empty_ends_as_lm_eval():
    assert len(re.split(r"\s+", " a b \n")) == 4


def test_wikitext_pages_and_detokenizer():
    raw = (" \n = Page one = \n \n Some text @-@ here , and 3 @,@ 000 . \n \n = = Section = = \n More ( x ) . \n"
           " \n = Page two = \n Text 's end \n")
    pages = E.wikitext_pages(raw)
    assert pages == [" = Page one = \n \n Some text @-@ here , and 3 @,@ 000 . \n \n = = Section = = \n More ( x ) . \n ",
                     " = Page two = \n Text 's end \n"]
    assert E.wikitext_detokenizer(pages[0]) == " = Page one =\n\nSome text-here, and 3,000.\n\n== Section ==\nMore (x).\n"
    assert E.wikitext_detokenizer(pages[1]) == " = Page two =\nText's end\n"
    assert E.wikitext_pages(" = A = \n = = not a page = = \n = B = \n") == [" = A = \n = = not a page = = ", " = B = \n"]


def test_wikitext_matches_lm_eval_detokenizer():
    pre = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    raw = (E.DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    pages = E.wikitext_pages(raw)
    assert len(pages) == 62
    for page in pages[:10]:
        assert E.wikitext_detokenizer(page) == pre.wikitext_detokenizer({"page": page})


@pytest.mark.parametrize("text, strict, flexible", [
    ("so 3 + 4 = 7.\n#### 1,234", "1234", "1234"),
    ("The answer is $1,000.50.", "[invalid]", "1000.50"),
    ("#### -5\nQuestion: then 12", "-5", "12"),
    ("costs $18.", "[invalid]", "18"),
    ("nothing here", "[invalid]", "[invalid]"),
    ("#### 42.", "42", "42"),
    ("it is 7", "[invalid]", "7"),
])
def test_gsm8k_answer_extraction(text, strict, flexible):
    s, f = E.extract_answers(text)
    assert (E.normalize_number(s), E.normalize_number(f)) == (strict, flexible)


def test_gsm8k_reference_normalisation():
    assert E.normalize_number("She pays 2 * 3 = <<2*3=6>>6\n#### 1,006") == "1006"


def test_greedy_until_cuts_at_stop_strings():
    table = torch.full((32, 32), -10.0)
    for a, b in zip("abcde", "bcdea"):  # a -> b -> c -> d -> e -> a ...
        table[c(a), c(b)] = 10.0
    model, tok = bigram_model(table), CharTokenizer()
    assert E.greedy_until(model, tok, ["xa"], 8) == ["bcdeabcd"]
    assert E.greedy_until(model, tok, ["xa"], 8, stop_strings=["ea"]) == ["bcd"]
    table[c("c"), :] = -10.0
    table[c("c"), tok.eos_id] = 10.0
    assert E.greedy_until(bigram_model(table), tok, ["a"], 8) == ["bc"]
    # a batch: each row stops on its own (EOS after c, a stop string, or max_new_tokens)
    assert E.greedy_until(bigram_model(table), tok, ["a", "xxxd", "b"], 8, stop_strings=["ea"]) == ["bc", "", "c"]


def test_contexts_batched_together_score_as_one_at_a_time():
    """Contexts of different lengths in one batch (left-padded, pad keys masked, cache rows repeated per
    continuation) give the log-likelihoods each context gets alone."""
    model = tiny_model(seed=9, vocab_size=32)
    rng = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 29, (n,), generator=rng).tolist()
    requests = [(ctx, ids(k)) for ctx in (ids(1), ids(3), ids(9), ids(17)) for k in (1, 4, 2)]
    requests += [(ids(6), ids(3))]
    alone = E.loglikelihoods(model, requests, batch_size=1)
    together = E.loglikelihoods(model, requests, batch_size=64)
    assert together == pytest.approx(alone, abs=1e-5)
    direct = F.log_softmax(model(torch.tensor([requests[7][0] + requests[7][1]]))[0][0], -1)  # no cache at all
    n = len(requests[7][0])
    assert alone[7] == pytest.approx(sum(direct[n - 1 + t, c].item() for t, c in enumerate(requests[7][1])), abs=1e-5)


def test_use_cache_continues_a_killed_run_with_the_same_numbers(tmp_path):
    """--use_cache: a run killed midway (its last line cut off) is continued: only the missing requests run,
    and the result equals an uncached run; the file of another model is refused, not mixed in."""
    model = tiny_model(seed=3, vocab_size=32)
    tok = CharTokenizer()
    items = [E.mc_item(ctx, ["ab", "c", "dde"], gold=i % 3) for i, ctx in enumerate(["xy", "q", "abc", "pq", "z"])]
    plain = E.score_mc(model, tok, items, batch_size=2)
    path, header = tmp_path / "cache" / "task.jsonl", dict(model="tiny", task="t")
    assert E.score_mc(model, tok, items, 2, E.open_store(path, header)) == plain
    lines = path.read_text().splitlines()  # the header, then one line per batch (5 contexts x 2 batches)
    assert len(lines) == 11 and json.loads(lines[0]) == header
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:9])  # killed while writing the fourth batch
    lm_head_calls = []
    model.lm_head.register_forward_hook(lambda *_: lm_head_calls.append(1))
    known, append = E.open_store(path, header)
    assert len(known) == sum(len(json.loads(line)) for line in lines[1:4]) == 5  # batches of 2, 1, 2
    assert E.score_mc(model, tok, items, 2, (known, append)) == plain
    assert len(lm_head_calls) == 10 - 3  # the batches that were not in the file
    assert len(E.open_store(path, header)[0]) == 15  # every request is in the file now
    lm_head_calls.clear()
    assert E.score_mc(model, tok, items, 2, E.open_store(path, header)) == plain and not lm_head_calls
    with pytest.raises(SystemExit, match="not of .*other"):
        E.open_store(path, dict(model="other", task="t"))


def test_greedy_until_refuses_an_empty_prompt():
    with pytest.raises(ValueError, match="prompt 1 of the batch encodes to no tokens"):
        E.greedy_until(tiny_model(seed=7, vocab_size=32), CharTokenizer(), ["abc", ""], 4)


def test_batched_greedy_equals_one_prompt_at_a_time():
    """Left padding with masked pad keys: every row's text equals its text decoded alone."""
    model, tok = tiny_model(seed=7, vocab_size=32), CharTokenizer()
    prompts = ["the cat sat", "a", "on the mat. and then", "dog dog dog dog dog dog dog."]
    alone = [E.greedy_until(model, tok, [p], 12)[0] for p in prompts]
    assert E.greedy_until(model, tok, prompts, 12) == alone
    assert E.greedy_until(model, tok, prompts[::-1], 12) == alone[::-1]
    assert len(set(alone)) > 1  # the prompts do lead to different texts
    shared = ["a cat and a dog. " + p for p in prompts]  # a common prefix runs once, moved into each row
    assert E.greedy_until(model, tok, shared, 12) == [E.greedy_until(model, tok, [p], 12)[0] for p in shared]


def test_batched_greedy_reproduces_golden(model_fp32, tokenizer, golden):
    """Hugging Face's greedy continuations, each decoded in one batch with the other golden prompts."""
    entries = golden["greedy"]
    n = max(len(e["new_ids"]) for e in entries)
    texts = E.greedy_until(model_fp32, tokenizer, [e["prompt"] for e in entries], n)
    for e, text in zip(entries, texts):
        assert text == tokenizer.decode([i for i in e["new_ids"] if i not in tokenizer.stop_ids]), e["prompt"]


def test_deterministic():
    model, tok = tiny_model(seed=4), CharTokenizer()
    items = [E.mc_item("the cat", ["sat", "ran off", "is"], gold=i % 3) for i in range(5)]
    assert E.score_mc(model, tok, items) == E.score_mc(model, tok, items)


def test_real_tokenizer_pairs_and_data_rows(tokenizer):
    ctx, cont = E.encode_pair(tokenizer, "Question: Is it?\nAnswer: ", "yes")
    assert ctx == tokenizer.encode("Question: Is it?\nAnswer:") and tokenizer.decode(cont) == " yes"
    counts = {name: len(load(E.DATA)) for name, load in E.LOADERS.items()}
    assert counts == {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                      "arc_challenge": 1172, "openbookqa": 500}


def test_parity_with_lm_eval_on_a_few_rows(model_dir, model_fp32, tokenizer):
    """lm_eval's own HF engine on the same (context, continuation) pairs: 3 ARC-Easy rows, 12 requests."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)
    items = E.LOADERS["arc_easy"](E.DATA)[:3]
    pairs = [r for it in items for r in it["requests"]]
    theirs = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])]
    ours = E.loglikelihoods(model_fp32, [E.encode_pair(tokenizer, *p) for p in pairs])
    assert ours == pytest.approx(theirs, abs=1e-3)


def test_load_model_with_a_lora_adapter(tmp_path, model_dir):
    lora = pytest.importorskip("lora")
    import shutil
    base = tiny_model(seed=5)
    base.save_pretrained(tmp_path / "base", dtype=torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / "base" / name)
    lora.apply_lora(base, r=4, alpha=8)
    with torch.no_grad():
        for m in lora.lora_modules(base).values():
            m.lora_B.normal_(0, 0.1)  # B starts at zero: make the adapter change something
    lora.save_adapter(base, tmp_path / "adapter")
    lora.save_adapter(base, tmp_path / "out" / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    plain, _ = E.load_model(tmp_path / "base")
    adapted, tok = E.load_model(tmp_path / "base", tmp_path / "adapter")
    from_out_dir, _ = E.load_model(tmp_path / "out")  # a train.py out_dir: adapter/ on the base it names
    with torch.no_grad():
        expected, with_adapter, without = base(idx)[0], adapted(idx)[0], plain(idx)[0]
        assert torch.allclose(from_out_dir(idx)[0], expected, atol=1e-5)
    assert torch.allclose(with_adapter, expected, atol=1e-5) and not torch.allclose(without, expected, atol=1e-3)
    shutil.copytree(tmp_path / "base", tmp_path / "out" / "merged")  # ... and its merged/ model when there is one
    merged, _ = E.load_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(merged(idx)[0], without)
    assert tok.encode("Answer:") == Tokenizer.from_pretrained(model_dir).encode("Answer:")


def test_shared_prefix_is_placed_as_a_full_run_would_place_it():
    """place_prefix: the prefix run once, moved behind each row's padding (keys rotated by the shift),
    holds the keys and values that running each whole row from position 0 of its padding holds."""
    from model import KVCache
    model, prefix = tiny_model(seed=3), [1, 2, 3, 4, 5, 6]
    rows = [prefix + [7, 8], prefix + [9, 10, 11, 12, 13]]
    L = max(len(r) for r in rows)
    pads = [L - len(r) for r in rows]
    cache = KVCache(model, 2, L, torch.float32, "cpu")
    E.place_prefix(model, cache, prefix, pads)
    for r, (row, d) in enumerate(zip(rows, pads)):
        alone = KVCache(model, 1, L, torch.float32, "cpu", key_mask=torch.arange(L)[None] >= d)  # pads masked
        model.hidden_states(torch.tensor([[0] * d + row]), cache=alone)
        for layer in range(len(cache.k)):
            torch.testing.assert_close(cache.k[layer][r, :, d:d + 6], alone.k[layer][0, :, d:d + 6], atol=1e-5, rtol=0)
            torch.testing.assert_close(cache.v[layer][r, :, d:d + 6], alone.v[layer][0, :, d:d + 6], atol=1e-5, rtol=0)


def test_gsm8k_batches_by_length_and_keeps_the_row_order(tmp_path):
    """eval_gsm8k decodes questions sorted by length in batches; each sample is still its own row's text."""
    import json
    class ByteTokenizer:  # a token per byte; 256 = EOS
        bos_id, eos_id, stop_ids = None, 256, [256]
        encode = staticmethod(lambda text, bos=False: list(text.encode()))
        decode = staticmethod(lambda ids: bytes(i for i in ids if i < 256).decode("latin-1"))
    model, tok = tiny_model(seed=5, vocab_size=257), ByteTokenizer()
    with torch.no_grad():  # larger weights than tiny_model's: texts that depend on the question
        for p in model.parameters():
            p.normal_(0, 0.5)
    (tmp_path / "gsm8k").mkdir()
    rows = lambda qs: "".join(json.dumps({"question": q, "answer": "so\n#### 4"}) + "\n" for q in qs)
    (tmp_path / "gsm8k" / "train.jsonl").write_text(rows(["a b", "c", "d e f", "g", "h i"]))
    questions = ["how many", "a much longer question than the others", "x", "what is it", "b c d"]
    (tmp_path / "gsm8k" / "test.jsonl").write_text(rows(questions))
    args = SimpleNamespace(data=tmp_path, limit=None, gsm8k_mode="fewshot", max_new_tokens=6, batch_size=2)
    res = E.eval_gsm8k(model, tok, args)
    shots = "".join(f"Question: {q}\nAnswer: so\n#### 4\n\n" for q in ["a b", "c", "d e f", "g", "h i"])
    alone = [E.greedy_until(model, tok, [shots + f"Question: {q}\nAnswer:"], 6, ["Question:"])[0] for q in questions]
    assert [s["text"] for s in res["samples"]] == alone and res["rows"] == 5 and len(set(alone)) > 1
    assert [s["doc_id"] for s in res["samples"]] == list(range(5))


def test_cli_writes_what_a_plain_forward_gives(tmp_path, model_dir, model_fp32, tokenizer):
    """`python eval.py ... --output`: its accuracies equal those of each choice's log-likelihood summed from
    one plain forward over context + continuation, without eval.py's batching."""
    import subprocess
    import sys
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "eval.py", "--model", str(model_dir), "--tasks", "arc_easy", "--limit", "8",
                          "--batch_size", "3", "--output", str(out)], cwd=E.Path(E.__file__).parent,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    res = json.loads(out.read_text())["tasks"]["arc_easy"]
    acc, acc_norm = [], []
    for it in E.LOADERS["arc_easy"](E.DATA)[:8]:
        lls = []
        for context, continuation in it["requests"]:
            ctx, cont = E.encode_pair(tokenizer, context, continuation)
            with torch.no_grad():
                logits, _ = model_fp32(torch.tensor([ctx + cont]))
            logp = logits[0, len(ctx) - 1:-1].log_softmax(-1)
            lls.append(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item())
        acc.append(max(range(len(lls)), key=lambda i: lls[i]) == it["gold"])
        acc_norm.append(max(range(len(lls)), key=lambda i: lls[i] / len(it["choices"][i])) == it["gold"])
    assert res["rows"] == 8
    assert res["acc"] == pytest.approx(sum(acc) / 8) and res["acc_norm"] == pytest.approx(sum(acc_norm) / 8)
    assert re.search(rf"arc_easy +acc +{res['acc']:.4f} ", run.stdout), run.stdout

"""eval.py against closed-form answers: a bigram "model" whose logits are a chosen table (a real Transformer
whose blocks add nothing), a character tokenizer, lm-eval's definitions (checked against lm_eval itself
where it is installed), and direct computations on a tiny random model."""
import json
import math
import re
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import eval as E
import runs
from conftest import raw_file, tiny_config, tiny_model
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
    assert res["acc,none"] == pytest.approx(2 / 3) and res["acc_norm,none"] == pytest.approx(2 / 3)
    assert res["rows"] == 3
    assert res["acc_stderr,none"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    one = E.score_mc(model, tok, items[:1])
    assert (one["acc,none"], one["acc_norm,none"], one["acc_stderr,none"]) == (0.0, 1.0, "N/A")  # as lm-eval writes it


def test_ties_go_to_the_first_choice_and_winogrande_has_no_acc_norm():
    model, tok = bigram_model(torch.zeros(32, 32)), CharTokenizer()  # every continuation of equal length ties
    res = E.score_mc(model, tok, [E.mc_item("ab", ["cd", "ef"], gold=0),
                                  {"requests": [("a", " xy"), ("b", " xy")], "choices": None, "gold": 0}])
    assert res["acc,none"] == 1.0 and "acc_norm,none" in res
    res = E.score_mc(model, tok, [{"requests": [("a", " xy"), ("b", " xy")], "choices": None, "gold": 1}])
    assert res["acc,none"] == 0.0 and "acc_norm,none" not in res


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
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-ll / (2 + 3)), rel=1e-4)
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(-ll / (5 + 5)), rel=1e-4)
    assert res["bits_per_byte,none"] == pytest.approx(-ll / 10 / math.log(2), rel=1e-4)
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
    raw = raw_file("wikitext2", "wiki.test.raw").read_text(encoding="utf-8")
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


def test_real_tokenizer_pairs(tokenizer):
    ctx, cont = E.encode_pair(tokenizer, "Question: Is it?\nAnswer: ", "yes")
    assert ctx == tokenizer.encode("Question: Is it?\nAnswer:") and tokenizer.decode(cont) == " yes"


# each task's raw files (data/manifest.json), and its rows: docs/EVAL.md's table, WikiText-2's pages, PTB's lines
RAW = {"boolq": [("boolq", "dev.jsonl")], "piqa": [("piqa", "valid.jsonl"), ("piqa", "valid-labels.lst")],
       "hellaswag": [("hellaswag", "hellaswag_val.jsonl", "hellaswag_val_full.txt.bz2")],
       "winogrande": [("winogrande", "dev.jsonl"), ("winogrande", "dev-labels.lst")],
       "arc_easy": [("arc", "arc_easy.jsonl")], "arc_challenge": [("arc", "arc_challenge.jsonl")],
       "openbookqa": [("openbookqa", "test.jsonl")], "wikitext2": [("wikitext2", "wiki.test.raw")],
       "ptb": [("ptb", "ptb.test.txt")], "gsm8k": [("gsm8k", "test.jsonl"), ("gsm8k", "train.jsonl")]}
ROWS = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
        "openbookqa": 500, "wikitext2": 62, "ptb": 3761, "gsm8k": 1319}


def need(task):
    """Skip the test, naming the data set, unless the task's raw files can be had."""
    for dataset_and_names in RAW[task]:
        raw_file(*dataset_and_names)


@pytest.mark.parametrize("task", E.TASKS)
def test_every_task_reads_its_rows(task):
    need(task)
    data = E.read_data(task)
    assert len(data["rows"]) == ROWS[task]
    if task in E.MC_TASKS:
        assert all(0 <= it["gold"] < len(it["requests"]) for it in data["rows"])


def hellaswag_by_hand(text):
    """lm-eval's hellaswag preprocess, written out: strip, " [title]" -> ". ", drop [anything], "  " -> " "."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def test_hellaswag_original_jsonl_is_read_as_lm_eval_reads_it(tmp_path):
    rows = [dict(ind=4, activity_label="Removing ice from car", ctx_a="Then, the man writes over the snow covering "
                 "the window of a car, and a woman wearing winter clothes smiles.", ctx_b="then, the man continues "
                 "removing the snow on his car.", endings=[", the man adds wax to the windshield and cuts it.", " a "
                 "person board a ski lift, while two men supporting the head of the person wearing winter clothes "
                 "snow as the we girls sled.", ", the man puts on a christmas coat, knitted with netting.", ", the man "
                 "continues removing the snow on his car."], label=3),
            dict(ind=9, activity_label="Personal Care and Style", ctx_a="[header] How to increase breast size with a "
                 "bra [title] Check your bra size.", ctx_b="[step] Wearing a bra that is too big will not make your "
                 "breasts look larger.", endings=["That is why it is important [substeps] to know  your size.",
                                                 " [title] Choose a  bra. [step] It helps.", "x", " y [z] "],
                 label="0")]
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = E.read_hellaswag(path)
    assert items[0]["requests"][0][0] == ("Removing ice from car: Then, the man writes over the snow covering the "
                                          "window of a car, and a woman wearing winter clothes smiles. Then, the man "
                                          "continues removing the snow on his car.")
    assert items[1]["requests"][1] == ("Personal Care and Style: How to increase breast size with a bra. Check your "
                                       "bra size. wearing a bra that is too big will not make your breasts look "
                                       "larger.", "  Choose a bra. It helps.")  # capitalize() lowers all of ctx_b
    for item, r in zip(items, rows):
        ctx = hellaswag_by_hand(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        assert item == E.mc_item(ctx, [hellaswag_by_hand(e) for e in r["endings"]], int(r["label"]))


def test_hellaswag_text_form_is_read_as_it_is(tmp_path):
    import bz2
    lines = ["Ctx one. he", "2", "a", "b", "c", "d", "Ctx [two]", "0", "e", "f", "g", "h"]
    path = tmp_path / "hellaswag_val_full.txt.bz2"
    path.write_bytes(bz2.compress("\n".join(lines).encode()))
    assert E.read_hellaswag(path) == [E.mc_item("Ctx one. he", list("abcd"), 2),
                                      E.mc_item("Ctx [two]", list("efgh"), 0)]


def test_parity_with_lm_eval_on_a_few_rows(model_dir, model_fp32, tokenizer):
    """lm_eval's own HF engine on the same (context, continuation) pairs: 3 ARC-Easy rows, 12 requests."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)
    need("arc_easy")
    items = E.load_mc("arc_easy")[:3]
    pairs = [r for it in items for r in it["requests"]]
    theirs = [ll for ll, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])]
    ours = E.loglikelihoods(model_fp32, [E.encode_pair(tokenizer, *p) for p in pairs])
    assert ours == pytest.approx(theirs, abs=1e-3)


def hf_folder(model_dir, folder):
    """The model folder as transformers should load it: its tokenizer as PreTrainedTokenizerFast (transformers 5
    otherwise builds a GPT2Tokenizer from tokenizer_config.json's class, without the digit split), weights linked."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    (folder / "model.safetensors").symlink_to((model_dir / "model.safetensors").resolve())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


BOOLQ_YAML = """task: boolq_local
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {data}}}, cache_dir: {cache}}}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["no", "yes"]
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""  # lm-eval's super_glue/boolq/default.yaml on a local file, with acc_norm too


def test_boolq_equals_lm_evals_own_run(tmp_path, model_dir, model_fp32, tokenizer):
    """lm_eval end to end (a task YAML on a local json, HFLM, simple_evaluate) on BoolQ's first 10 rows in
    SuperGLUE's form: its per-choice log-likelihoods, acc and acc_norm are eval.py's."""
    pytest.importorskip("transformers")
    lm_eval = pytest.importorskip("lm_eval")
    need("boolq")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    rows = [{"passage": f"{r['title']} -- {r['passage']}", "question": r["question"], "label": int(r["answer"])}
            for r in E.read_jsonl(raw_file("boolq", "dev.jsonl"))[:10]]
    (tmp_path / "boolq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "boolq_local.yaml").write_text(BOOLQ_YAML.format(data=tmp_path / "boolq.jsonl", cache=tmp_path / "hf"))
    lm = HFLM(pretrained=str(hf_folder(model_dir, tmp_path / "model")), dtype="float32", device="cpu", batch_size=8)
    run = lm_eval.simple_evaluate(model=lm, tasks=["boolq_local"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  log_samples=True)
    samples = sorted(run["samples"]["boolq_local"], key=lambda s: s["doc_id"])
    theirs = [resp[0][0] for s in samples for resp in s["resps"]]  # per choice: [(log-likelihood, is greedy)]
    items = E.load_mc("boolq")[:10]
    ours = E.loglikelihoods(model_fp32, [E.encode_pair(tokenizer, *r) for it in items for r in it["requests"]])
    assert ours == pytest.approx(theirs, abs=1e-4)
    res = E.score_mc(model_fp32, tokenizer, items)
    for key in ("acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"):
        assert res[key] == pytest.approx(run["results"]["boolq_local"][key], abs=1e-12), key


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
    from_adapter, _ = E.load_model(tmp_path / "out" / "adapter")  # an adapter folder: on the base it names
    with torch.no_grad():
        expected, with_adapter, without = base(idx)[0], adapted(idx)[0], plain(idx)[0]
        assert torch.allclose(from_out_dir(idx)[0], expected, atol=1e-5)
        assert torch.allclose(from_adapter(idx)[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="holds an adapter .* and --adapter .* names another: give one"):
        runs.resolve(tmp_path / "out", tmp_path / "adapter")
    assert torch.allclose(with_adapter, expected, atol=1e-5) and not torch.allclose(without, expected, atol=1e-3)
    shutil.copytree(tmp_path / "base", tmp_path / "out" / "merged")  # a merged/ beside the adapter: the adapter wins
    with torch.no_grad():
        assert torch.allclose(E.load_model(tmp_path / "out")[0](idx)[0], expected, atol=1e-5)
        shutil.rmtree(tmp_path / "out" / "adapter")  # ... its merged/ model when there is no adapter
        assert torch.equal(E.load_model(tmp_path / "out")[0](idx)[0], without)
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
    """score_gsm8k decodes questions sorted by length in batches; each sample is still its own row's text."""
    class ByteTokenizer:  # a token per byte; 256 = EOS
        bos_id, eos_id, stop_ids = None, 256, [256]
        encode = staticmethod(lambda text, bos=False: list(text.encode()))
        decode = staticmethod(lambda ids: bytes(i for i in ids if i < 256).decode("latin-1"))
    model, tok = tiny_model(seed=5, vocab_size=257), ByteTokenizer()
    with torch.no_grad():  # larger weights than tiny_model's: texts that depend on the question
        for p in model.parameters():
            p.normal_(0, 0.5)
    rows = lambda qs: [{"question": q, "answer": "so\n#### 4"} for q in qs]
    questions = ["how many", "a much longer question than the others", "x", "what is it", "b c d"]
    args = SimpleNamespace(gsm8k_mode="fewshot", max_new_tokens=6, batch_size=2)
    res = E.score_gsm8k(model, tok, rows(questions), rows(["a b", "c", "d e f", "g", "h i"]), args)
    shots = "".join(f"Question: {q}\nAnswer: so\n#### 4\n\n" for q in ["a b", "c", "d e f", "g", "h i"])
    alone = [E.greedy_until(model, tok, [shots + f"Question: {q}\nAnswer:"], 6, ["Question:"])[0] for q in questions]
    assert [s["text"] for s in res["samples"]] == alone and res["rows"] == 5 and len(set(alone)) > 1
    assert [s["doc_id"] for s in res["samples"]] == list(range(5))


def test_cli_writes_what_a_plain_forward_gives(tmp_path, model_dir, model_fp32, tokenizer):
    """`python eval.py ... --output`: its accuracies equal those of each choice's log-likelihood summed from
    one plain forward over context + continuation, without eval.py's batching."""
    import subprocess
    import sys
    need("arc_easy")
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "eval.py", "--model", str(model_dir), "--tasks", "arc_easy", "--limit", "8",
                          "--batch_size", "3", "--output", str(out)], cwd=E.Path(E.__file__).parent,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    res = E.read_results(out)["arc_easy"]
    acc, acc_norm = [], []
    for it in E.load_mc("arc_easy")[:8]:
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
    assert res["acc,none"] == pytest.approx(sum(acc) / 8) and res["acc_norm,none"] == pytest.approx(sum(acc_norm) / 8)
    assert re.search(rf"arc_easy +acc +{res['acc,none']:.4f} ", run.stdout), run.stdout
    assert json.loads(out.read_text())["n-samples"]["arc_easy"] == {"original": 2376, "effective": 8}


def test_progress_meter_rewrites_a_line_on_a_terminal_and_logs_every_10_s_elsewhere(monkeypatch):
    import io
    clock = [1000.0]
    monkeypatch.setattr(E.time, "time", lambda: clock[0])
    for tty in (False, True):
        stream = io.StringIO()
        stream.isatty = lambda: tty
        tick = E.progress("boolq", 10, "requests", stream)
        for at, n in [(1001, 2), (1005, 2), (1012, 2), (1013, 4)]:  # done: 2, 4, 6, 10
            clock[0] = at
            tick(n)
        first, second = "boolq: 2/10 requests, 2.00/s, 0:00:04 left", "boolq: 6/10 requests, 0.50/s, 0:00:08 left"
        if tty:  # every tick at least 0.5 s after the last shown line rewrites it; the end erases it
            third = "boolq: 4/10 requests, 0.80/s, 0:00:07 left"
            assert stream.getvalue() == "".join(f"\r{x}\033[K" for x in (first, third, second)) + "\r\033[K"
        else:  # a line at the first tick, then one 10 s or more later; none at the end (the results row follows)
            assert stream.getvalue() == f"{first}\n{second}\n"
        clock[0] = 1000.0


# A results file as lm-evaluation-harness 0.4 writes it (lm_eval/evaluator.py, evaluator_utils.py), by hand.
LM_EVAL_FILE = {
    "results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.65, "acc_stderr,none": 0.10942433098048311,
                             "acc_norm,none": 0.35, "acc_norm_stderr,none": 0.10942433098048311},
                "wikitext": {"alias": "wikitext", "word_perplexity,none": 32.5, "word_perplexity_stderr,none": "N/A",
                             "byte_perplexity,none": 1.96, "byte_perplexity_stderr,none": "N/A",
                             "bits_per_byte,none": 0.97, "bits_per_byte_stderr,none": "N/A"},
                "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.25,
                          "exact_match,flexible-extract": 0.5,
                          "exact_match_stderr,flexible-extract": 0.28867513459481287}},
    "group_subtasks": {"arc_easy": [], "wikitext": [], "gsm8k": []}, "configs": {},
    "versions": {"arc_easy": 1.0, "wikitext": 2.0, "gsm8k": 3.0}, "n-shot": {"arc_easy": 0, "wikitext": 0, "gsm8k": 5},
    "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}},
    "n-samples": {"arc_easy": {"original": 2376, "effective": 20}, "wikitext": {"original": 62, "effective": 2},
                  "gsm8k": {"original": 1319, "effective": 4}},
    "config": {"model": "hf", "model_args": "pretrained=models/smollm2-135m-instruct,dtype=float32", "batch_size": 8,
               "batch_sizes": [], "device": "cpu", "use_cache": None, "limit": 20.0, "bootstrap_iters": 100000},
    "git_hash": "e6bebcb", "date": 1764000000.0, "lm_eval_version": "0.4.9", "total_evaluation_time_seconds": "97.5"}


def ours_file(path):
    """A results file made as eval.py makes it, from the numbers eval.py's scorers give for the same outcomes."""
    out = {"results": {}, "n-samples": {}, "n-shot": {}, "versions": {}, "details": {}, "date": time.time()}
    arc = E.mean_stderr("acc", [1.0] * 13 + [0.0] * 7) | E.mean_stderr("acc_norm", [1.0] * 7 + [0.0] * 13)
    wikitext2 = {"word_perplexity,none": 32.5, "byte_perplexity,none": 1.96, "bits_per_byte,none": 0.97,
                 "token_perplexity": 46.3, "rows": 2}
    wikitext2 |= {"word_perplexity_stderr,none": "N/A", "byte_perplexity_stderr,none": "N/A",
                  "bits_per_byte_stderr,none": "N/A"}
    gsm8k = (E.mean_stderr("exact_match", [1.0, 0, 0, 0], "strict-match")
             | E.mean_stderr("exact_match", [1.0, 1.0, 0, 0], "flexible-extract") | {"shots": 5})
    for name, res, rows in [("arc_easy", arc, 2376), ("wikitext2", wikitext2, 62), ("gsm8k", gsm8k, 1319)]:
        E.record(out, name, res | {"seconds": 1.0}, list(range(rows)), {"arc_easy": 20, "wikitext2": 2}.get(name, 4))
    E.save_json(out, path)
    return out


def test_read_results_gives_the_same_numbers_from_lm_evals_file_and_ours(tmp_path):
    (tmp_path / "lm_eval.json").write_text(json.dumps(LM_EVAL_FILE))
    written = ours_file(tmp_path / "ours.json")
    theirs, ours = E.read_results(tmp_path / "lm_eval.json"), E.read_results(tmp_path / "ours.json")
    for task, our_task in [("arc_easy", "arc_easy"), ("wikitext", "wikitext2"), ("gsm8k", "gsm8k")]:
        for key, value in theirs[task].items():
            if key != "alias":
                assert ours[our_task][key] == (value if value == "N/A" else pytest.approx(value, rel=1e-12)), key
    assert ours["wikitext2"]["token_perplexity"] == 46.3 and ours["gsm8k"]["seconds"] == 1.0  # our details beside
    assert {k: written[k]["gsm8k"] for k in ("n-samples", "n-shot", "versions")} == {
        k: LM_EVAL_FILE[k]["gsm8k"] for k in ("n-samples", "n-shot", "versions")}
    old = {"tasks": {"arc_easy": {"acc": 0.65, "acc_stderr": 0.10942433098048311, "acc_norm": 0.35,  # eval.py's
                                  "acc_norm_stderr": 0.10942433098048311, "rows": 20, "seconds": 1.0},  # earlier
                     "gsm8k": {"strict_match": 0.25, "strict_match_stderr": 0.25, "flexible_extract": 0.5,  # layout
                               "flexible_extract_stderr": 0.28867513459481287, "shots": 5, "seconds": 1.0},
                     "wikitext2": {"word_perplexity": 32.5, "byte_perplexity": 1.96, "bits_per_byte": 0.97,
                                   "token_perplexity": 46.3, "rows": 2, "seconds": 1.0}}, "zeroshot_average": None}
    (tmp_path / "old.json").write_text(json.dumps(old))
    for task, res in E.read_results(tmp_path / "old.json").items():
        metrics = {k: v for k, v in res.items() if "," in k}
        assert metrics == pytest.approx({k: v for k, v in ours[task].items() if "," in k and v != "N/A"}, rel=1e-12)
    assert E.read_results(tmp_path / "old.json")["wikitext2"]["token_perplexity"] == 46.3
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="other.json: no \"results\"; expected lm-evaluation-harness's results layout"):
        E.read_results(tmp_path / "other.json")


def test_lm_evals_own_table_reads_our_results_file(tmp_path):
    """lm_eval.utils.make_table (what `lm_eval` prints) on eval.py's file: every task, metric and value."""
    make_table = pytest.importorskip("lm_eval.utils").make_table
    table, rows, task = make_table(ours_file(tmp_path / "ours.json")), set(), None
    for line in table.splitlines()[2:]:
        name, version, filt, shots, metric, _, value, _, stderr = [c.strip() for c in line.strip("|").split("|")]
        task = name or task
        rows.add((task, version or None, filt, shots, metric, float(value), stderr))
    assert rows == {("arc_easy", "1", "none", "0", "acc", 0.65, "0.1094"),
                    ("arc_easy", None, "none", "0", "acc_norm", 0.35, "0.1094"),
                    ("wikitext2", "2", "none", "0", "bits_per_byte", 0.97, "N/A"),
                    ("wikitext2", None, "none", "0", "byte_perplexity", 1.96, "N/A"),
                    ("wikitext2", None, "none", "0", "word_perplexity", 32.5, "N/A"),
                    ("gsm8k", "3", "flexible-extract", "5", "exact_match", 0.5, "0.2887"),
                    ("gsm8k", None, "strict-match", "5", "exact_match", 0.25, "0.2500")}

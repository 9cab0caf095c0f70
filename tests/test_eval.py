"""eval.py against independent facts: hand-computed values on a bigram "model" whose logits are a chosen table (a
real Transformer whose blocks add nothing) or on log-likelihoods given by hand, small tokenizers whose token
boundaries are known, lm-eval's definitions written out (and lm-eval's own code where it is installed), and direct
computations on a tiny random model. Each formula has a case where a wrong definition gives another number
(scripts/mutants_eval.py plants those wrong definitions)."""
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import eval as E
import lora
import runs
import results
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


class ByteTokenizer:  # a token per UTF-8 byte; 256 = EOS, no BOS
    bos_id, eos_id, stop_ids = None, 256, [256]
    encode = staticmethod(lambda text, bos=False: list(text.encode()))
    decode = staticmethod(lambda ids: bytes(i for i in ids if i < 256).decode("latin-1"))


class MergingTokenizer:
    """Greedy longest match over a vocabulary with merges ("ab", "bc", " b"), so the tokens of a continuation
    depend on the text before it, as BPE's do."""
    vocab, bos_id, eos_id = ["a", "b", "c", " ", "ab", "bc", " b"], None, 99

    def encode(self, text, bos=False):
        ids = []
        while text:
            piece = max((v for v in self.vocab if text.startswith(v)), key=len)
            ids, text = ids + [self.vocab.index(piece)], text[len(piece):]
        return ids


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


def given_loglikelihoods(monkeypatch, lls):
    """score_mc scores with these log-likelihoods, one per request in order, instead of a model's."""
    monkeypatch.setattr(E, "loglikelihoods", lambda model, requests, *a, **k: lls[:len(requests)])


def raw_files(monkeypatch, tmp_path, files):
    """read_data reads {(data set, file name): text} written under tmp_path instead of the real data sets."""
    for (dataset, name), text in files.items():
        (tmp_path / dataset).mkdir(exist_ok=True)
        (tmp_path / dataset / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(E, "fetch", lambda dataset, *names: tmp_path / dataset / names[0])


def jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


# ----------------------------------------------------------------------------- log-likelihoods, multiple choice
def test_bigram_model_gives_the_table():
    table = torch.randn(32, 32)
    idx = torch.tensor([[0, 5, 7, 7, 30]])
    logits, _ = bigram_model(table)(idx)
    assert torch.allclose(logits[0], table[idx[0]], atol=1e-5)


def test_acc_and_acc_norm_on_a_bigram_model():
    """Summed log-likelihoods equal the table's by hand, and acc and acc_norm pick different choices: the means,
    2/4 and 3/4, and their standard errors, sqrt(p (1 - p) / (n - 1)), differ too."""
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
        E.mc_item("q", ["c", "cccc"], gold=1),  # as the first -> acc 0, acc_norm 1
    ]
    lls = E.loglikelihoods(model, [E.encode_pair(tok, a, b) for it in items for a, b in it["requests"]])
    assert lls == pytest.approx([2 * u, 2 * u + 3 * cc, 3 * u, 2 * u + 3 * cc] + [2 * u, 2 * u + 3 * cc] * 2, abs=1e-4)
    res = E.score_mc(model, tok, items)
    assert (res["acc,none"], res["acc_norm,none"], res["rows"]) == (0.5, 0.75, 4)
    assert res["acc_stderr,none"] == pytest.approx(math.sqrt(0.5 * 0.5 / 3))
    assert res["acc_norm_stderr,none"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    one = E.score_mc(model, tok, items[:1])
    assert (one["acc,none"], one["acc_norm,none"], one["acc_stderr,none"]) == (0.0, 1.0, "N/A")  # as lm-eval writes it


@pytest.mark.parametrize("choices, lls, acc, acc_norm", [
    # per character: -3/2 = -1.5 < -7.5/6 = -1.25 -> "cdefgh"; per (character + 1): -1.0 > -7.5/7 -> "ab"
    (["ab", "cdefgh"], [-3.0, -7.5], 0.0, 1.0),
    # "é" is one character but two bytes: -1.2/1 < -2.0/2 -> "ab"; per byte -1.2/2 = -0.6 > -1.0 -> "é"
    (["é", "ab"], [-1.2, -2.0], 0.0, 1.0),
])
def test_acc_norm_divides_by_the_choices_length_in_characters(monkeypatch, choices, lls, acc, acc_norm):
    """lm-eval's acc_norm: argmax of ll / len(choice), the choice string's length in characters, without the
    space the target delimiter adds (lm_eval/api/task.py, completion_len); acc is the plain argmax."""
    given_loglikelihoods(monkeypatch, lls)
    res = E.score_mc(None, ByteTokenizer(), [E.mc_item("Question: q\nAnswer:", choices, gold=1)])
    assert (res["acc,none"], res["acc_norm,none"]) == (acc, acc_norm)


def test_mean_stderr_is_the_sample_standard_deviation_over_root_n():
    """[1, 0, 0, 1, 1]: mean 0.6, sample variance (3 * 0.16 + 2 * 0.36) / 4 = 0.3, stderr sqrt(0.3 / 5);
    lm-eval's mean_stderr (lm_eval/api/metrics.py) where it is installed."""
    res = E.mean_stderr("acc", [1.0, 0.0, 0.0, 1.0, 1.0])
    assert res == {"acc,none": pytest.approx(0.6), "acc_stderr,none": pytest.approx(math.sqrt(0.06))}
    assert E.mean_stderr("exact_match", [1.0], "strict-match") == {"exact_match,strict-match": 1.0,
                                                                   "exact_match_stderr,strict-match": "N/A"}
    try:
        from lm_eval.api.metrics import mean_stderr
    except ImportError:
        return
    xs = [0.25, 1.0, -2.0, 3.5, 0.0, 1.0]
    assert E.mean_stderr("x", xs)["x_stderr,none"] == pytest.approx(mean_stderr(xs), rel=1e-12)


def test_mc_item_puts_lm_evals_target_delimiter_before_each_choice():
    """lm-eval's multiple_choice requests are (doc_to_text, target_delimiter + choice), the delimiter a space."""
    assert E.mc_item("Question: Is it?\nAnswer:", ["no", "yes"], 1) == {
        "requests": [("Question: Is it?\nAnswer:", " no"), ("Question: Is it?\nAnswer:", " yes")],
        "choices": ["no", "yes"], "gold": 1}


def test_ties_go_to_the_first_choice_and_winogrande_has_no_acc_norm():
    model, tok = bigram_model(torch.zeros(32, 32)), CharTokenizer()  # every continuation of equal length ties
    res = E.score_mc(model, tok, [E.mc_item("ab", ["cd", "ef"], gold=0),
                                  {"requests": [("a", " xy"), ("b", " xy")], "choices": None, "gold": 0}])
    assert res["acc,none"] == 1.0 and "acc_norm,none" in res
    res = E.score_mc(model, tok, [{"requests": [("a", " xy"), ("b", " xy")], "choices": None, "gold": 1}])
    assert res["acc,none"] == 0.0 and "acc_norm,none" not in res


def test_encode_pair_splits_the_joint_encoding_where_the_context_ends():
    """lm-eval's _encode_pair on a tokenizer with merges: the continuation is encode(context + continuation) after
    len(encode(context)) tokens, so its first token depends on the context (encoding "bc" alone gives "bc", but
    after "a" the joint encoding is "ab", "c"); the context's trailing space moves to the continuation (" b" is one
    token, "a " would leave it none); an empty context is conditioned on the prefix token (EOS without a BOS)."""
    tok = MergingTokenizer()
    a, cc, ab, space_b = (tok.vocab.index(t) for t in ("a", "c", "ab", " b"))
    cases = [(("a", "bc"), ([a], [cc])), (("a ", "b"), ([a], [space_b])), (("ab", "c"), ([ab], [cc]))]
    for (context, continuation), expected in cases:
        assert E.encode_pair(tok, context, continuation) == expected
    assert E.encode_pair(tok, "", "ab") == ([tok.eos_id], [ab])
    assert E.encode_pair(CharTokenizer(), "ab  ", "cd") == ([c("a"), c("b")], [c(" "), c(" "), c("c"), c("d")])
    try:
        from lm_eval.api.model import TemplateLM
    except ImportError:
        return
    lm = SimpleNamespace(backend="causal", tok_encode=tok.encode)
    for (context, continuation), expected in cases:
        assert TemplateLM._encode_pair(lm, context, continuation) == expected


def test_real_tokenizer_pairs(tokenizer):
    """SmolLM2's BPE: " yes" is one token, but only if the context's trailing space joins it."""
    ctx, cont = E.encode_pair(tokenizer, "Question: Is it?\nAnswer: ", "yes")
    assert ctx == tokenizer.encode("Question: Is it?\nAnswer:") and tokenizer.decode(cont) == " yes" and len(cont) == 1


def test_loglikelihoods_cut_long_contexts_from_the_left_as_lm_eval():
    """lm-eval's _loglikelihood_tokens feeds (context + continuation)[-(max_length + 1):][:-1]: a context longer than
    the window keeps its last tokens, and the continuation is scored by the last len(continuation) logits."""
    model = tiny_model(seed=4)  # max_seq_len 64
    g = torch.Generator().manual_seed(1)
    ctx, cont = torch.randint(0, 97, (70,), generator=g).tolist(), torch.randint(0, 97, (3,), generator=g).tolist()
    with torch.no_grad():
        logits, _ = model(torch.tensor([(ctx + cont)[-65:][:-1]]))
    logp = F.log_softmax(logits[0, -3:].float(), dim=-1)
    direct = logp[torch.arange(3), torch.tensor(cont)].sum().item()
    assert E.loglikelihoods(model, [(ctx, cont)])[0] == pytest.approx(direct, abs=1e-4)


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
    assert E.score_mc(model, tok, items, 2, results.open_store(path, header)) == plain
    lines = path.read_text().splitlines()  # the header, then one line per batch (5 contexts x 2 batches)
    assert len(lines) == 11 and json.loads(lines[0]) == header
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:9])  # killed while writing the fourth batch
    lm_head_calls = []
    model.lm_head.register_forward_hook(lambda *_: lm_head_calls.append(1))
    known, append = results.open_store(path, header)
    assert len(known) == sum(len(json.loads(line)) for line in lines[1:4]) == 5  # batches of 2, 1, 2
    assert E.score_mc(model, tok, items, 2, (known, append)) == plain
    assert len(lm_head_calls) == 10 - 3  # the batches that were not in the file
    assert len(results.open_store(path, header)[0]) == 15  # every request is in the file now
    lm_head_calls.clear()
    assert E.score_mc(model, tok, items, 2, results.open_store(path, header)) == plain and not lm_head_calls
    with pytest.raises(SystemExit, match="not of .*other"):
        results.open_store(path, dict(model="other", task="t"))


# ----------------------------------------------------------------------------- perplexity
def test_rolling_windows_by_hand():
    """lm-eval's rolling windows (utils.get_rolling_token_windows, context_len 1, then make_disjoint_window) on 10
    tokens with L = 4, written out: [BOS, t0, t1, t2] scores t0..t3; [t3..t6] scores t4..t7 (a full L-token
    context); [t5..t8] scores t8, t9 (the last window is still L long, only its last 2 count)."""
    tokens = list(range(10, 20))
    assert list(E.rolling_windows(tokens, 0, 4)) == [([0, 10, 11, 12], 4), ([13, 14, 15, 16], 4), ([15, 16, 17, 18], 2)]
    assert list(E.rolling_windows(tokens[:3], 0, 4)) == [([0, 10, 11], 3)]  # a short document: one window


def test_word_and_byte_counts_of_a_page_with_blank_lines_and_spaces_at_its_ends():
    """lm-eval's wikitext counts words as len(re.split(r"\\s+", page)) and bytes as len(page.encode("utf-8")) on the
    page as read: " = Café = \\n \\n A b @-@ c . \\n \\n" has 10 words ("", "=", "Café", "=", "A", "b", "@-@", "c",
    ".", "": the space before the heading and the blank end each count one) and 30 bytes (29 characters, é two
    bytes); the text scored is the detokenized page, 20 bytes, each costing log 257 under a uniform model."""
    page = " = Café = \n \n A b @-@ c . \n \n"
    assert E.wikitext_pages(page) == [page]
    scored = E.wikitext_detokenizer(page)
    assert scored == " = Café =\n\nA b-c.\n\n"
    model, tok = bigram_model(torch.zeros(257, 257)), ByteTokenizer()
    args = SimpleNamespace(max_length=8, ppl_ctx=4, batch_size=2, limit=None, ppl_windows=None)
    res = E.perplexity(model, tok, [(scored, page)], "abcdefghij", args)
    nll = 20 * math.log(257)
    assert (res["words"], res["rows"], res["max_length"]) == (10, 1, 8)
    assert res["word_perplexity,none"] == pytest.approx(math.exp(nll / 10), rel=1e-5)
    assert res["byte_perplexity,none"] == pytest.approx(math.exp(nll / 30), rel=1e-5)
    assert res["bits_per_byte,none"] == pytest.approx(nll / 30 / math.log(2), rel=1e-5)
    try:
        from lm_eval.api.task import ConfigurableTask
    except ImportError:
        return
    assert (ConfigurableTask.count_words(page), ConfigurableTask.count_bytes(page)) == (10, 30)


def test_token_perplexity_by_hand():
    """LLM-Pruner's windows: 11 tokens, ctx 3 -> [a b c] [d e f] [g h i] (j k dropped), each predicting its last 2
    tokens: exp of the mean of -log p(b|a), -log p(c|b), -log p(e|d), ... over those 6 pairs of a random bigram table;
    --ppl_windows takes the first windows (0: all; unset: --limit)."""
    table = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    model, tok, logp = bigram_model(table), CharTokenizer(), F.log_softmax(table, dim=-1)
    pairs = ["ab", "bc", "de", "ef", "gh", "hi"]
    nll = -sum(logp[c(x), c(y)].item() for x, y in pairs) / 6
    res = E.token_perplexity(model, tok.encode("abcdefghijk"), 3, batch_size=2)
    assert res == {"token_perplexity": pytest.approx(math.exp(nll), rel=1e-4), "token_ppl_ctx": 3, "tokens": 6,
                   "windows": 3}
    args = SimpleNamespace(max_length=4, ppl_ctx=3, batch_size=2, limit=1, ppl_windows=2)
    assert E.perplexity(model, tok, [("ab", "ab")], "abcdefghijk", args)["windows"] == 2
    args.ppl_windows = 0  # 0: every window, whatever --limit says
    assert E.perplexity(model, tok, [("ab", "ab")], "abcdefghijk", args)["windows"] == 3
    args.ppl_windows = None  # without it, --limit counts them too
    assert E.perplexity(model, tok, [("ab", "ab")], "abcdefghijk", args)["windows"] == 1


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
    """Given the windows (checked by hand above), the sum equals each window's last n logits scoring the next n
    tokens of the BOS-prefixed stream, by plain forwards; one window is log p(tokens | BOS) in one forward."""
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


# ----------------------------------------------------------------------------- the data readers, on files written here
def test_boolq_in_superglues_form(monkeypatch, tmp_path):
    """Google's BoolQ row turned into SuperGLUE's (passage "{title} -- {passage}", label int(answer)) in lm-eval's
    super_glue/boolq prompt "{{passage}}\\nQuestion: {{question}}?\\nAnswer:" with the choices no, yes."""
    row = {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky is blue."}
    raw_files(monkeypatch, tmp_path, {("boolq", "dev.jsonl"): jsonl(row, row | {"answer": False})})
    context = "Sky -- The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert E.read_data("boolq")["rows"] == [
        {"requests": [(context, " no"), (context, " yes")], "choices": ["no", "yes"], "gold": g} for g in (1, 0)]
    try:
        import yaml
        from lm_eval.utils import apply_template
        import lm_eval.tasks
    except ImportError:
        return
    config = yaml.safe_load(open(Path(lm_eval.tasks.__file__).parent / "super_glue" / "boolq" / "default.yaml"))
    doc = {"passage": "Sky -- The sky is blue.", "question": row["question"], "label": 1}
    assert apply_template(config["doc_to_text"], doc) == context and config["doc_to_choice"] == ["no", "yes"]


def test_winogrande_partial_scoring(monkeypatch, tmp_path):
    """lm-eval's winogrande: a context per option (the sentence up to "_" with the option filled in) and one shared
    continuation, " " + the rest of the sentence stripped; label "1" is option1 (gold 0); no acc_norm."""
    row = {"sentence": "Sarah was a better surgeon than Maria so _  always got the harder cases.",
           "option1": "Sarah", "option2": "Maria"}
    raw_files(monkeypatch, tmp_path, {("winogrande", "dev.jsonl"): jsonl(row, row),
                                      ("winogrande", "dev-labels.lst"): "1\n2\n"})
    first, second = E.read_data("winogrande")["rows"]
    rest = " always got the harder cases."
    assert first == {"requests": [("Sarah was a better surgeon than Maria so Sarah", rest),
                                  ("Sarah was a better surgeon than Maria so Maria", rest)], "choices": None, "gold": 0}
    assert second["gold"] == 1
    try:
        from lm_eval.tasks.winogrande import preprocess_winogrande as wg
    except ImportError:
        return
    assert first["requests"] == [(ctx, " " + wg.doc_to_target(row)) for ctx in wg.doc_to_choice(row)]


def test_piqa_arc_and_openbookqa_prompts(monkeypatch, tmp_path):
    """docs/EVAL.md's task table: PIQA "Question: {goal}\\nAnswer:"; ARC (llm-foundry's query "Question: {question}")
    + "\\nAnswer:", gold the given index; OpenBookQA the stem alone, gold the position of answerKey among the labels."""
    raw_files(monkeypatch, tmp_path, {
        ("piqa", "valid.jsonl"): jsonl({"goal": "Open a jar", "sol1": "twist", "sol2": "hit"}),
        ("piqa", "valid-labels.lst"): "1\n",
        ("arc", "arc_easy.jsonl"): jsonl({"query": "Question: Why?", "choices": ["a", "b", "c"], "gold": 2}),
        ("openbookqa", "test.jsonl"): jsonl({"question": {"stem": "Sun is", "choices": [
            {"label": "A", "text": "hot"}, {"label": "B", "text": "cold"}]}, "answerKey": "B"})})
    assert E.read_data("piqa")["rows"] == [E.mc_item("Question: Open a jar\nAnswer:", ["twist", "hit"], 1)]
    assert E.read_data("arc_easy")["rows"] == [E.mc_item("Question: Why?\nAnswer:", ["a", "b", "c"], 2)]
    assert E.read_data("openbookqa")["rows"] == [E.mc_item("Sun is", ["hot", "cold"], 1)]


def test_hellaswag_preprocess_as_lm_evals():
    """lm-eval's hellaswag preprocess: strip, " [title]" -> ". ", every [tag] deleted (the shortest match: text
    between two tags stays), double spaces made single."""
    assert E.hellaswag_preprocess("  How to sit [title] Sit down. [step] Relax [substeps] now.  ") == \
        "How to sit. Sit down. Relax now."
    try:
        from lm_eval.tasks.hellaswag.utils import preprocess
    except ImportError:
        return
    for text in ["  How to sit [title] Sit down. [step] Relax [substeps] now.  ", "a [b] c [d]  e", "x [title] y"]:
        assert E.hellaswag_preprocess(text) == preprocess(text)


HELLASWAG_ROWS = [
    dict(ind=4, activity_label="Removing ice from car", ctx_a="Then, the man writes over the snow covering the window "
         "of a car, and a woman wearing winter clothes smiles.", ctx_b="then, the man continues removing the snow on "
         "his car.", endings=[", the man adds wax to the windshield and cuts it.", " a person board a ski lift, while "
                              "two men supporting the head of the person wearing winter clothes snow as the we girls "
                              "sled.", ", the man puts on a christmas coat, knitted with netting.", ", the man "
                              "continues removing the snow on his car."], label=3),
    dict(ind=9, activity_label="Personal Care and Style", ctx_a="[header] How to increase breast size with a bra "
         "[title] Check your bra size.", ctx_b="[step] Wearing a bra that is too big will not make your breasts look "
         "larger.", endings=["That is why it is important [substeps] to know  your size.",
                             " [title] Choose a  bra. [step] It helps.", "x", " y [z] "], label="0")]


def test_hellaswag_original_jsonl_is_read_as_lm_eval_reads_it(tmp_path):
    """lm-eval's hellaswag process_docs, written out: "{activity_label}: {ctx_a} {ctx_b.capitalize()}" and each
    ending preprocessed (capitalize() lowers the rest of ctx_b; " [title]" -> ". " only with a space before it);
    lm-eval's own process_docs where it is installed."""
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(jsonl(*HELLASWAG_ROWS))
    items = E.read_hellaswag(path)
    assert items[0] == E.mc_item(
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman wearing "
        "winter clothes smiles. Then, the man continues removing the snow on his car.",
        [", the man adds wax to the windshield and cuts it.", "a person board a ski lift, while two men supporting the "
         "head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a christmas coat, "
         "knitted with netting.", ", the man continues removing the snow on his car."], 3)
    assert items[1] == E.mc_item(
        "Personal Care and Style: How to increase breast size with a bra. Check your bra size. wearing a bra that is "
        "too big will not make your breasts look larger.",
        ["That is why it is important to know your size.", " Choose a bra. It helps.", "x", "y "], 0)
    try:
        import datasets
        from lm_eval.tasks.hellaswag.utils import process_docs
    except ImportError:
        return
    docs = process_docs(datasets.Dataset.from_list([r | {"label": str(r["label"])} for r in HELLASWAG_ROWS]))
    for item, doc in zip(items, docs):
        assert item == E.mc_item(doc["query"], doc["choices"], doc["gold"])


def test_hellaswag_text_form_is_read_as_it_is(tmp_path):
    import bz2
    lines = ["Ctx one. he", "2", "a", "b", "c", "d", "Ctx [two]", "0", "e", "f", "g", "h"]
    path = tmp_path / "hellaswag_val_full.txt.bz2"
    path.write_bytes(bz2.compress("\n".join(lines).encode()))
    assert E.read_hellaswag(path) == [E.mc_item("Ctx one. he", list("abcd"), 2),
                                      E.mc_item("Ctx [two]", list("efgh"), 0)]


# ----------------------------------------------------------------------------- GSM8K
@pytest.mark.parametrize("text, strict, flexible", [
    ("so 3 + 4 = 7.\n#### 1,234", "1234", "1234"),
    ("The answer is $1,000.50.", "[invalid]", "1000.50"),
    ("#### -5\nQuestion: then 12", "-5", "12"),
    ("costs $18.", "[invalid]", "18"),
    ("nothing here", "[invalid]", "[invalid]"),
    ("#### 42.", "42", "42"),
    ("it is 7", "[invalid]", "7"),
    ("The total is 42 dollars.", "[invalid]", "42"),  # a lone "." is no number: {2,}
    ("#### 3 then #### 7", "3", "7"),  # strict takes the first match, flexible the last
])
def test_gsm8k_answer_extraction(text, strict, flexible):
    """lm-eval's gsm8k filters (strict-match: the first "#### (-?[0-9.,]+)"; flexible-extract: the last
    "(-?[$0-9.,]{2,})|(-?[0-9]+)") and exact_match's regexes_to_ignore, by hand; lm-eval's RegexFilter too."""
    s, f = E.extract_answers(text)
    assert (E.normalize_number(s), E.normalize_number(f)) == (strict, flexible)
    try:
        from lm_eval.filters.extraction import RegexFilter
    except ImportError:
        return
    theirs = [RegexFilter(r"#### (\-?[0-9\.\,]+)", 0).apply([[text]], [{}])[0][0],
              RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1).apply([[text]], [{}])[0][0]]
    assert [s, f] == theirs


def test_gsm8k_reference_normalisation():
    assert E.normalize_number("She pays 2 * 3 = <<2*3=6>>6\n#### 1,006") == "1006"


def test_gsm8k_scores_of_given_generations(monkeypatch):
    """score_gsm8k on generations given by hand: the 5-shot prompt as lm-eval's gsm8k builds it ("Question: ...
    \\nAnswer: {answer}" exemplars, each followed by a blank line), its stop strings, and exact match of each
    normalised answer: strict [1, 0, 0, 0], flexible [1, 1, 1, 1]."""
    answers = ["so\n#### 1,234", "#### 42", "#### 7", "#### 18"]
    generated = ["it is 1234.\n#### 1,234", "The total is 42 dollars.", "#### 3 then #### 7", "costs $18."]
    test = [{"question": f"q{i}", "answer": a} for i, a in enumerate(answers)]
    texts = {f"q{i}": t for i, t in enumerate(generated)}
    shots = [{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"},
             {"question": "And 2 + 2?", "answer": "#### 4"}]
    seen = []

    def generate(model, tok, prompts, max_new_tokens, stops):
        seen.append((prompts, stops))
        return [texts[p.split("Question: ")[-1].split("\n")[0]] for p in prompts]
    monkeypatch.setattr(E, "greedy_until", generate)
    args = SimpleNamespace(gsm8k_mode="fewshot", max_new_tokens=8, batch_size=3)
    res = E.score_gsm8k(None, None, test, shots, args)
    exemplars = "Question: What is 1 + 1?\nAnswer: 1 + 1 = 2\n#### 2\n\nQuestion: And 2 + 2?\nAnswer: #### 4\n\n"
    prompts = sorted(p for prompts, _ in seen for p in prompts)
    assert prompts == [exemplars + f"Question: q{i}\nAnswer:" for i in range(4)]
    assert all(stops == ["Question:", "</s>", "<|im_end|>"] for _, stops in seen)
    assert res["exact_match,strict-match"] == 0.25 and res["exact_match,flexible-extract"] == 1.0
    assert res["exact_match_stderr,strict-match"] == pytest.approx(math.sqrt(0.25 * 0.75 / 3))
    assert res["exact_match_stderr,flexible-extract"] == 0.0 and (res["rows"], res["shots"]) == (4, 2)
    assert [s["strict_match"] for s in res["samples"]] == [1.0, 0.0, 0.0, 0.0]


def test_greedy_until_cuts_at_stop_strings():
    table = torch.full((32, 32), -10.0)
    for a, b in zip("abcde", "bcdea"):  # a -> b -> c -> d -> e -> a ...
        table[c(a), c(b)] = 10.0
    model, tok = bigram_model(table), CharTokenizer()
    assert E.greedy_until(model, tok, ["xa"], 8) == ["bcdeabcd"]
    assert E.greedy_until(model, tok, ["xa"], 8, stop_strings=["ea"]) == ["bcd"]
    assert E.greedy_until(model, tok, ["xa"], 8, stop_strings=["ea", "cd"]) == ["b"]  # cut at the first one
    table[c("c"), :] = -10.0
    table[c("c"), tok.eos_id] = 10.0
    assert E.greedy_until(bigram_model(table), tok, ["a"], 8) == ["bc"]
    # a batch: each row stops on its own (EOS after c, a stop string, or max_new_tokens)
    assert E.greedy_until(bigram_model(table), tok, ["a", "xxxd", "b"], 8, stop_strings=["ea"]) == ["bc", "", "c"]


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


# ----------------------------------------------------------------------------- the real data and model
RAW = {"boolq": [("boolq", "dev.jsonl")], "piqa": [("piqa", "valid.jsonl"), ("piqa", "valid-labels.lst")],
       "hellaswag": [("hellaswag", "hellaswag_val.jsonl", "hellaswag_val_full.txt.bz2")],
       "winogrande": [("winogrande", "dev.jsonl"), ("winogrande", "dev-labels.lst")],
       "arc_easy": [("arc", "arc_easy.jsonl")], "arc_challenge": [("arc", "arc_challenge.jsonl")],
       "openbookqa": [("openbookqa", "test.jsonl")], "wikitext2": [("wikitext2", "wiki.test.raw")],
       "ptb": [("ptb", "ptb.test.txt")], "gsm8k": [("gsm8k", "test.jsonl"), ("gsm8k", "train.jsonl")]}
ROWS = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
        "openbookqa": 500, "wikitext2": 62, "ptb": 3761, "gsm8k": 1319}
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
    if task in results.MC_TASKS:
        assert all(0 <= it["gold"] < len(it["requests"]) for it in data["rows"])


def test_parity_with_lm_eval_on_a_few_rows(model_dir, model_fp32, tokenizer):
    """lm_eval's own HF engine on the same (context, continuation) pairs: 3 ARC-Easy rows, 12 requests."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)
    need("arc_easy")
    items = E.read_data("arc_easy")["rows"][:3]
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
    items = E.read_data("boolq")["rows"][:10]
    ours = E.loglikelihoods(model_fp32, [E.encode_pair(tokenizer, *r) for it in items for r in it["requests"]])
    assert ours == pytest.approx(theirs, abs=1e-4)
    res = E.score_mc(model_fp32, tokenizer, items)
    for key in ("acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"):
        assert res[key] == pytest.approx(run["results"]["boolq_local"][key], abs=1e-12), key


def load(path, adapter=None):
    """What eval.py loads for --model path [--adapter adapter]: the model and its tokenizer."""
    model, folder = runs.load_model(path, adapter)
    return model, Tokenizer.from_pretrained(folder)


def test_load_model_with_a_lora_adapter(tmp_path, model_dir):
    """--model takes a model folder (+ --adapter), a train.py out_dir or an adapter folder: each gives the logits
    of the model the adapter was trained on, with the adapter (its merged/ only when there is no adapter)."""
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
    plain, _ = load(tmp_path / "base")
    adapted, tok = load(tmp_path / "base", tmp_path / "adapter")
    from_out_dir, _ = load(tmp_path / "out")  # a train.py out_dir: adapter/ on the base it names
    from_adapter, _ = load(tmp_path / "out" / "adapter")  # an adapter folder: on the base it names
    with torch.no_grad():
        expected, with_adapter, without = base(idx)[0], adapted(idx)[0], plain(idx)[0]
        assert torch.allclose(from_out_dir(idx)[0], expected, atol=1e-5)
        assert torch.allclose(from_adapter(idx)[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="holds an adapter .* and --adapter .* names another: give one"):
        runs.resolve(tmp_path / "out", tmp_path / "adapter")
    assert torch.allclose(with_adapter, expected, atol=1e-5) and not torch.allclose(without, expected, atol=1e-3)
    shutil.copytree(tmp_path / "base", tmp_path / "out" / "merged")  # a merged/ beside the adapter: the adapter wins
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "out")[0](idx)[0], expected, atol=1e-5)
        shutil.rmtree(tmp_path / "out" / "adapter")  # ... its merged/ model when there is no adapter
        assert torch.equal(load(tmp_path / "out")[0](idx)[0], without)
    assert tok.encode("Answer:") == Tokenizer.from_pretrained(model_dir).encode("Answer:")


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
    res = results.read_results(out)["arc_easy"]
    acc, acc_norm = [], []
    for it in E.read_data("arc_easy")["rows"][:8]:
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

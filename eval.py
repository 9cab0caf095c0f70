"""
Evaluation with the numbers EleutherAI's lm-evaluation-harness computes (docs/EVAL.md), without depending on it:
zero-shot multiple choice (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA: the summed log-likelihood
of each continuation, acc and acc_norm); perplexity (WikiText-2 word/byte perplexity as lm-eval's `wikitext` task,
and token perplexity as LLM-Pruner reports it; PTB the same); GSM8K (greedy generation, 5-shot or chat).
Raw data files come from data/fetch.py (data/cache/, else $DATA_MIRROR or --data, else their URL in
data/manifest.json); --output writes lm-eval's results layout, which read_results reads back.

    python eval.py --model models/smollm2-135m-instruct --tasks zeroshot,wikitext2 --output results/x.json
"""
import argparse
import bz2
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import atomic_open, save_json
from configurator import renamed
import runs
from data.fetch import fetch
from model import KVCache, apply_rope, rope_cos_sin
from tokenizer import Tokenizer

MC_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
TASKS = [*MC_TASKS, "wikitext2", "ptb", "gsm8k"]
REPORTED = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",  # what the seeds'
            "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}  # tables report


def quiet(total, unit):
    """A progress meter that shows nothing: meter(total, unit) gives tick(n), called as n more are done."""
    return lambda n: None


# ----------------------------------------------------------------------------- log-likelihoods
# docs/EVAL.md "Multiple choice" and "Details that change numbers"

def encode_pair(tok, context, continuation):
    """lm-eval's _encode_pair: trailing spaces of the context move onto the continuation; the continuation
    is the tokens of encode(context + continuation) after the len(encode(context)) first ones."""
    if not context:  # lm-eval conditions an empty context on the prefix token
        return [tok.bos_id if tok.bos_id is not None else tok.eos_id], tok.encode(continuation, bos=False)
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole, ctx = tok.encode(context + continuation, bos=False), tok.encode(context, bos=False)
    return ctx, whole[len(ctx):]


def prefix_cache(model, prefix, batch, length):
    """A KV cache with room for `length` positions, holding `prefix` (a list of ids), copied `batch` times."""
    w = model.lm_head.weight
    cache = KVCache(model, 1, length, w.dtype, w.device)
    if prefix:
        model.hidden_states(torch.tensor([prefix], device=w.device), cache=cache)
    cache.k = [k.repeat(batch, 1, 1, 1) for k in cache.k]
    cache.v = [v.repeat(batch, 1, 1, 1) for v in cache.v]
    return cache


@torch.inference_mode()
def loglikelihoods(model, requests, batch_size=8, store=None, meter=quiet):
    """Summed log-probability of each continuation given its context, for [(context_ids, continuation_ids)].
    Requests with the same context run it once: context[:-1] fills a KV cache, copied across a batch of
    rows [context[-1]] + continuation[:-1] (right-padded), whose logits score the continuation tokens.
    store: open_store's (known, append): known requests are not run again, new ones are appended per batch."""
    known, append = store or ({}, None)
    keys = [hashlib.sha1(json.dumps(r).encode()).hexdigest() if store else None for r in requests]
    groups, out, device = {}, [known.get(k) for k in keys], model.lm_head.weight.device
    for i, (ctx, cont) in enumerate(requests):
        if out[i] is None:
            groups.setdefault(tuple(ctx), []).append(i)
    tick = meter(len(requests), "requests")
    tick(len(requests) - sum(map(len, groups.values())))
    for ctx, members in groups.items():
        for b in range(0, len(members), batch_size):
            idxs = members[b:b + batch_size]
            conts = [requests[i][1] for i in idxs]
            longest = max(len(c) for c in conts)
            c = list(ctx[-(model.config.max_seq_len + 1 - longest):])  # lm-eval's left truncation
            cache = prefix_cache(model, c[:-1], len(idxs), len(c) - 1 + longest)
            rows = torch.tensor([[c[-1]] + k[:-1] + [0] * (longest - len(k)) for k in conts], device=device)
            logits, _ = model(rows, cache=cache, start=len(c) - 1)
            logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, vocab)
            for r, (i, cont) in enumerate(zip(idxs, conts)):
                out[i] = logp[r, torch.arange(len(cont)), torch.tensor(cont)].sum().item()
            if append:
                append({keys[i]: out[i] for i in idxs})
            tick(len(idxs))
    return out


# ----------------------------------------------------------------------------- multiple choice
# An item is {"requests": [(context, continuation), ...], "choices": [str] or None, "gold": int}.
# "choices" are the strings whose length normalises acc_norm (lm-eval's doc_to_choice).

def mean_stderr(metric, xs, filt="none"):
    """The mean of xs and its standard error, sample standard deviation (ddof 1) / sqrt(n), under lm-eval's keys
    "metric,filter" and "metric_stderr,filter" ("N/A" for one item, as lm-eval writes it)."""
    n, m = len(xs), sum(xs) / len(xs)
    return {f"{metric},{filt}": m, f"{metric}_stderr,{filt}": math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
            if n > 1 else "N/A"}


def argmax(xs):  # the first index of the largest value, as np.argmax
    return max(range(len(xs)), key=lambda i: xs[i])


def score_mc(model, tok, items, batch_size=8, store=None, meter=quiet):
    """acc = argmax of the summed log-likelihoods; acc_norm = argmax of them divided by len(choice), the
    choice's length in characters as lm-eval counts it (Python len of the string, no leading space)."""
    requests = [encode_pair(tok, c, k) for it in items for c, k in it["requests"]]
    lls, at = loglikelihoods(model, requests, batch_size, store, meter), 0
    acc, acc_norm = [], []
    for it in items:
        ll, at = lls[at:at + len(it["requests"])], at + len(it["requests"])
        acc.append(float(argmax(ll) == it["gold"]))
        if it["choices"] is not None:
            acc_norm.append(float(argmax([l / len(c) for l, c in zip(ll, it["choices"])]) == it["gold"]))
    return mean_stderr("acc", acc) | (mean_stderr("acc_norm", acc_norm) if acc_norm else {}) | {"rows": len(items)}


# ----------------------------------------------------------------------------- perplexity (docs/EVAL.md "Perplexity")

def rolling_windows(tokens, prefix, L):
    """lm-eval's get_rolling_token_windows (context_len 1) + make_disjoint_window, as (input, n scored): first
    [prefix] + tokens[:L-1], then the next up to L tokens each with a full L-token input (the last n count)."""
    done = min(L, len(tokens))  # the first window
    if tokens:
        yield [prefix] + tokens[:done - 1], done
    while done < len(tokens):
        n = min(len(tokens) - done, L)
        yield tokens[done + n - L - 1:done + n - 1], n
        done += n


@torch.inference_mode()
def rolling_loglikelihood(model, tokens, prefix, L, tick=lambda n: None):
    """Sum of log p(token | previous tokens) over a document, with lm-eval's rolling windows."""
    device, total, done = model.lm_head.weight.device, 0.0, 0
    for inp, n in rolling_windows(tokens, prefix, L):  # only the last n positions count
        targets = torch.tensor([[-1] * (len(inp) - n) + tokens[done:done + n]], device=device)
        _, loss = model(torch.tensor([inp], device=device), targets)
        total -= loss.item() * n
        done += n
        tick(1)
    return total


@torch.inference_mode()
def token_perplexity(model, tokens, ctx, batch_size=8, limit=None, meter=quiet):
    """LLM-Pruner's perplexity: non-overlapping windows of ctx tokens (the tail shorter than ctx dropped),
    each predicting its ctx - 1 last tokens; exp(mean NLL over all predicted tokens)."""
    windows, nll = torch.tensor(tokens[:len(tokens) // ctx * ctx]).view(-1, ctx)[:limit], 0.0
    tick = meter(len(windows), f"windows of {ctx} tokens")
    for b in range(0, len(windows), batch_size):
        w = windows[b:b + batch_size].to(model.lm_head.weight.device)
        _, loss = model(w[:, :-1], w[:, 1:])
        nll += loss.item() * w[:, 1:].numel()
        tick(len(w))
    n = len(windows) * (ctx - 1)
    return {"token_perplexity": math.exp(nll / n), "token_ppl_ctx": ctx, "tokens": n, "windows": len(windows)}


def perplexity(model, tok, docs, token_text, args, meter=quiet):
    """docs: [(text to score, text whose words and bytes are counted)]."""
    L = args.max_length or model.config.max_seq_len
    prefix, encoded = tok.bos_id if tok.bos_id is not None else tok.eos_id, [tok.encode(t, bos=False) for t, _ in docs]
    tick = meter(sum(-(-len(t) // L) for t in encoded), f"windows of up to {L} tokens")
    ll = sum(rolling_loglikelihood(model, t, prefix, L, tick) for t in encoded)
    words = sum(len(re.split(r"\s+", counted)) for _, counted in docs)
    nbytes = sum(len(counted.encode("utf-8")) for _, counted in docs)
    res = {"word_perplexity,none": math.exp(-ll / words), "byte_perplexity,none": math.exp(-ll / nbytes),
           "bits_per_byte,none": -ll / nbytes / math.log(2), "rows": len(docs), "words": words, "max_length": L}
    res |= {f"{m}_stderr,none": "N/A" for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}  # as lm-eval
    # the token perplexity's text gets the tokenizer's own BOS (if it adds one), as LLM-Pruner's does
    windows = args.limit if args.ppl_windows is None else args.ppl_windows or None  # --ppl_windows 0: all
    res |= token_perplexity(model, tok.encode(token_text), args.ppl_ctx, args.batch_size, windows, meter)
    return res | {"definition": f"word/byte: lm-eval rolling loglikelihood, max length {L}, BOS prefix; token: "
                                f"LLM-Pruner, '\\n\\n'-joined text, non-overlapping {args.ppl_ctx}-token windows"}


# ----------------------------------------------------------------------------- GSM8K (docs/EVAL.md "GSM8K")

def extract_answers(text):
    """lm-eval gsm8k filters: strict = first `#### number`; flexible = the last number-like string."""
    strict = re.findall(r"#### (\-?[0-9\.\,]+)", text)
    flexible = [a or b for a, b in re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)]
    return (strict[0].strip() if strict else "[invalid]"), (flexible[-1].strip() if flexible else "[invalid]")


def normalize_number(s):
    """lm-eval's exact_match regexes_to_ignore, in order: ',', '$', everything up to '#### ', a trailing '.'."""
    for pattern in [",", r"\$", r"(?s).*#### ", r"\.$"]:
        s = re.sub(pattern, "", s)
    return s.lower()


def place_prefix(model, cache, prefix, pads):
    """Run `prefix` once and copy its keys and values into each row of `cache` after the row's `pads` left
    padding positions: a key moved by d positions is rotated by d more (RoPE: R(p + d) = R(d) R(p))."""
    once, n = prefix_cache(model, prefix, 1, len(prefix)), len(prefix)
    for r, d in enumerate(pads):
        cos, sin = rope_cos_sin(model.inv_freq, torch.full((n,), d, device=model.inv_freq.device))
        for layer, (k, v) in enumerate(zip(once.k, once.v)):
            cache.k[layer][r, :, d:d + n] = apply_rope(k[0].float(), cos, sin).to(k.dtype)  # rotated in fp32
            cache.v[layer][r, :, d:d + n] = v[0]


@torch.inference_mode()
def greedy_until(model, tok, prompts, max_new_tokens, stop_strings=()):
    """Greedy decoding of a batch of prompts with a KV cache, each until a stop id, a stop string or
    max_new_tokens; a text is cut at the first stop string, as lm-eval's generate_until does. Prompts are
    left-padded and the pad keys masked (KVCache.key_mask), so a row's text does not depend on its batch."""
    ids = [tok.encode(p, bos=False)[-(model.config.max_seq_len - max_new_tokens):] for p in prompts]
    if not all(ids):
        raise ValueError(f"prompt {[len(i) for i in ids].index(0)} of the batch encodes to no tokens")
    B, L, device = len(ids), max(len(i) for i in ids), model.lm_head.weight.device
    key_mask = torch.ones(B, L + max_new_tokens, dtype=torch.bool, device=device)
    for r, row in enumerate(ids):
        key_mask[r, :L - len(row)] = False
    cache = KVCache(model, B, L + max_new_tokens, model.lm_head.weight.dtype, device,
                    key_mask if not key_mask.all() else None)
    n = min(len(os.path.commonprefix(ids)), min(len(row) for row in ids) - 1) if B > 1 else 0
    if n:  # a shared prefix (the few-shot examples) runs once
        place_prefix(model, cache, ids[0][:n], [L - len(row) for row in ids])
    x, start = torch.tensor([[0] * (L - len(row)) + row for row in ids], device=device)[:, n:], n
    new, done, live = [[] for _ in ids], [False] * B, list(range(B))
    for _ in range(max_new_tokens):
        logits, _ = model(x, cache=cache, start=start, last_only=True)
        start, nxt = start + x.shape[1], logits[:, -1].argmax(-1).tolist()
        for r, t in zip(live, nxt):
            done[r] = t in tok.stop_ids
            new[r] += [] if done[r] else [t]
            done[r] = done[r] or any(s in tok.decode(new[r][-16:]) for s in stop_strings)
        keep = [j for j, r in enumerate(live) if not done[r]]
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch
            cache.keep_rows(keep)
            live = [live[j] for j in keep]
        x = torch.tensor([[nxt[j]] for j in keep], device=device)
    texts = [tok.decode(n) for n in new]
    for s in stop_strings:
        texts = [t.split(s)[0] for t in texts]  # lm-eval cuts at every stop string
    return texts


def score_gsm8k(model, tok, test, shots, args, meter=quiet):
    """fewshot: lm-eval's gsm8k (the `shots` as exemplars, "Question: …\\nAnswer:", stop at "Question:");
    chat: zero-shot, the question as the user turn of the chat format (fine-tuned models)."""
    if args.gsm8k_mode == "fewshot":
        exemplars = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in shots)
        prompts = [exemplars + f"Question: {r['question']}\nAnswer:" for r in test]
        stops = ["Question:", "</s>", "<|im_end|>"]
    else:
        prompts, stops = [tok.apply_chat([{"role": "user", "content": r["question"]}], add_generation_prompt=True)
                          for r in test], []
    order = sorted(range(len(test)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    texts, tick = [None] * len(test), meter(len(test), "questions")
    for b in range(0, len(order), args.batch_size):
        chunk = order[b:b + args.batch_size]
        for i, text in zip(chunk, greedy_until(model, tok, [prompts[i] for i in chunk], args.max_new_tokens, stops)):
            texts[i] = text
        tick(len(chunk))
    strict, flexible = zip(*[[float(normalize_number(a) == normalize_number(r["answer"])) for a in extract_answers(t)]
                             for r, t in zip(test, texts)])
    return (mean_stderr("exact_match", strict, "strict-match")
            | mean_stderr("exact_match", flexible, "flexible-extract")
            | {"rows": len(test), "mode": args.gsm8k_mode, "shots": len(shots) if args.gsm8k_mode == "fewshot" else 0,
               "samples": [dict(doc_id=i, text=t, strict_match=a, flexible_extract=b)
                           for i, (t, a, b) in enumerate(zip(texts, strict, flexible))]})


# ----------------------------------------------------------------------------- data (docs/EVAL.md, the task table)

def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def mc_item(context, choices, gold, delimiter=" "):
    return {"requests": [(context, delimiter + c) for c in choices], "choices": choices, "gold": gold}


def load_mc(name):
    """Every item of a multiple-choice task other than HellaSwag (read_hellaswag), in file order."""
    if name == "boolq":  # Google's file turned into SuperGLUE's: passage = "{title} -- {passage}"
        return [mc_item(f"{r['title']} -- {r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"],
                        int(r["answer"])) for r in read_jsonl(fetch("boolq", "dev.jsonl"))]
    if name == "piqa":
        labels = fetch("piqa", "valid-labels.lst").read_text().split()
        return [mc_item(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(y))
                for r, y in zip(read_jsonl(fetch("piqa", "valid.jsonl")), labels, strict=True)]
    if name == "winogrande":  # lm-eval's partial evaluation: a context per option (the sentence up to `_`, the
        items = []            # option filled in), the same continuation (the rest of the sentence) after each
        for r, y in zip(read_jsonl(fetch("winogrande", "dev.jsonl")),
                        fetch("winogrande", "dev-labels.lst").read_text().split(), strict=True):
            i = r["sentence"].index("_")
            rest = " " + r["sentence"][i + 1:].strip()
            items.append({"requests": [(r["sentence"][:i] + o, rest) for o in (r["option1"], r["option2"])],
                          "choices": None, "gold": int(y) - 1})
        return items
    if name == "openbookqa":
        return [mc_item(r["question"]["stem"], [c["text"] for c in r["question"]["choices"]],
                        [c["label"] for c in r["question"]["choices"]].index(r["answerKey"].strip()))
                for r in read_jsonl(fetch("openbookqa", "test.jsonl"))]
    rows = read_jsonl(fetch("arc", f"{name}.jsonl"))  # llm-foundry's ARC: query = "Question: {question}"; 11 rows
    return [mc_item(r["query"] + "\nAnswer:", r["choices"], r["gold"]) for r in rows]  # padded to 4 choices


def hellaswag_preprocess(text):  # lm-eval's lm_eval/tasks/hellaswag/utils.py
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def read_hellaswag(path):
    """The original jsonl as lm-eval reads it; llama.cpp's text form (6 lines: context, gold, 4 endings) as is:
    no ctx_b.capitalize(), some [tags] left (docs/EVAL.md "Details that change numbers")."""
    if path.suffix == ".jsonl":
        return [mc_item(hellaswag_preprocess(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
                        [hellaswag_preprocess(e) for e in r["endings"]], int(r["label"])) for r in read_jsonl(path)]
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    return [mc_item(lines[i], lines[i + 2:i + 6], int(lines[i + 1])) for i in range(0, len(lines) - 5, 6)]


def wikitext_pages(raw):
    """EleutherAI/wikitext_document_level's pages: a line that is a top-level heading starts a new page."""
    pages, page = [], []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            if "\n".join(page).strip():
                pages.append("\n".join(page))
            page = []
        page.append(line)
    return pages + ["\n".join(page)] if page else pages


def wikitext_detokenizer(string):
    """lm-eval's lm_eval/tasks/wikitext/preprocess_wikitext.py, step for step."""
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string.replace("s '", "s'"))
    for a, b in [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]:
        string = string.replace(a, b)
    for pattern, repl in [(r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
                          (r"{\s*([^}]*?)\s*}", r"{\1}"), (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
                          (r"'\s*([^']*?)\s*'", r"'\1'")]:
        string = re.sub(pattern, repl, string)
    for a, b in [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]:
        string = string.replace(a, b)
    return string


def read_data(name):
    """A task's data: {"rows": all its rows in file order (--limit takes the first N), and what else it needs}."""
    if name == "hellaswag":  # the results name the form read (docs/EVAL.md "Details that change numbers")
        path = fetch("hellaswag", "hellaswag_val.jsonl", "hellaswag_val_full.txt.bz2")
        return {"rows": read_hellaswag(path), "file": path.name}
    if name in MC_TASKS:
        return {"rows": load_mc(name)}
    if name == "gsm8k":  # the first 5 train examples are the exemplars
        return {"rows": read_jsonl(fetch("gsm8k", "test.jsonl")),
                "shots": read_jsonl(fetch("gsm8k", "train.jsonl"))[:5]}
    if name == "wikitext2":  # rows: (page detokenized, page as read); the token perplexity's text: Hugging Face's rows
        raw = fetch("wikitext2", "wiki.test.raw").read_text(encoding="utf-8")
        return {"rows": [(wikitext_detokenizer(p), p) for p in wikitext_pages(raw)],
                "token_text": "\n\n".join(line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1])}
    lines = fetch("ptb", "ptb.test.txt").read_text(encoding="utf-8").split("\n")[:-1]  # PTB: rows are lines
    return {"rows": lines, "token_text": "\n\n".join(line.strip() for line in lines)}


# ----------------------------------------------------------------------------- plumbing: a task, a cache, progress

def run_task(name, data, model, tok, args, meter=quiet):
    """A task's numbers on the first --limit rows of read_data's `data`."""
    rows = data["rows"][:args.limit]
    if name == "gsm8k":
        return score_gsm8k(model, tok, rows, data["shots"], args, meter)
    if name in ("wikitext2", "ptb"):  # PTB's lines are one document for the rolling numbers
        docs = rows if name == "wikitext2" else [("\n".join(rows) + "\n",) * 2]
        return perplexity(model, tok, docs, data["token_text"], args, meter)
    store = None
    if args.use_cache:  # lm-eval's --use_cache: a stopped evaluation continues where it stopped
        header = dict(model=str(Path(args.model).resolve()), adapter=args.adapter and str(Path(args.adapter).resolve()),
                      dtype=args.dtype, task=name)
        store = open_store(Path(args.use_cache) / f"{name}.jsonl", header)
    file = {"file": data["file"]} if "file" in data else {}  # HellaSwag's: the form read
    return score_mc(model, tok, rows, args.batch_size, store, meter) | file


def open_store(path, header):
    """--use_cache: {request key: log-likelihood} computed by earlier runs into the JSON-lines file `path` (its
    first line `header` names the model; a line cut off by a kill is dropped), and a function that appends more."""
    path = Path(path)
    if not path.exists() or not path.read_text():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(header) + "\n")
    text, known = path.read_text(), {}
    first, *lines = text.splitlines()
    if json.loads(first) != header:
        raise SystemExit(f"{path} holds log-likelihoods of {first}, not of {json.dumps(header)}: "
                         "give this evaluation its own --use_cache folder")
    for line in lines:
        try:
            known.update(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run
            pass

    def append(new):
        with open(path, "a") as f:
            f.write(json.dumps(new) + "\n")
    if not text.endswith("\n"):  # appends start on a line of their own
        with open(path, "a") as f:
            f.write("\n")
    return known, append


def progress(name, total, unit, stream=sys.stderr):
    """A meter's tick(n): done / total, rate and time left on `stream`, one line rewritten in place on a
    terminal (erased at the end), else a line every 10 s."""
    tty, start, done, shown = stream.isatty(), time.time(), 0, 0.0

    def tick(n):
        nonlocal done, shown
        done, now = done + n, time.time()
        if not n or done < total and now - shown < (0.5 if tty else 10):
            return
        rate, shown = done / max(now - start, 1e-9), now
        s = int((total - done) / rate)
        line = f"{name}: {done}/{total} {unit}, {rate:.2f}/s, {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d} left"
        if tty:  # rewrite the line; erase it at the end
            stream.write("\r\033[K" if done >= total else f"\r{line}\033[K")
        elif done < total:
            stream.write(line + "\n")
        stream.flush()
    return tick


# ----------------------------------------------------------------------------- results, in lm-eval's layout
# {"results": {task: {"alias": task, "metric,filter": value, "metric_stderr,filter": value or "N/A"}}, "n-samples",
# "n-shot", "versions", "config", "git_hash", "date"}, as lm_eval/evaluator.py writes it, and ours, which lm-eval's
# tools pass over: "details" (per task: token perplexity, words, seconds, ...) and "zeroshot_average".
VERSIONS = {"boolq": 2.0, "wikitext2": 2.0, "gsm8k": 3.0, "ptb": None}  # lm-eval's task versions; the others 1.0


def read_results(path):
    """{task: {"acc,none": …, "acc_stderr,none": …, …, and our details (token_perplexity, …)}} from a results
    file of lm-eval's layout (eval.py's, or lm-eval's own: no details) or of eval.py's earlier {"tasks": {task:
    {"acc": …, "strict_match": …}}} one, its metrics named as lm-eval names them."""
    data = json.loads(Path(path).read_text())
    if "results" in data:
        return {task: data.get("details", {}).get(task, {}) | entry for task, entry in data["results"].items()}
    if "tasks" not in data:
        raise ValueError(f"{path}: no \"results\"; expected lm-evaluation-harness's results layout")
    return {task: {lm_eval_key(k): "N/A" if v is None and k.endswith("_stderr") else v for k, v in res.items()}
            for task, res in data["tasks"].items()}


def lm_eval_key(key):
    """lm-eval's name of one of eval.py's earlier metric names ("strict_match_stderr" ->
    "exact_match_stderr,strict-match"); any other key as it is."""
    old = {"acc": "acc,none", "acc_norm": "acc_norm,none", "word_perplexity": "word_perplexity,none",
           "byte_perplexity": "byte_perplexity,none", "bits_per_byte": "bits_per_byte,none",
           "strict_match": "exact_match,strict-match", "flexible_extract": "exact_match,flexible-extract"}
    base = key.removesuffix("_stderr")
    return key if base not in old else old[base] if key == base else old[base].replace(",", "_stderr,")


def record(out, name, res, rows, limit):
    """Put a task's numbers into the results `out`: lm-eval's entries (keys "metric,filter"), our details."""
    out["results"][name] = {"alias": name} | {k: v for k, v in res.items() if "," in k}
    out["details"][name] = {k: v for k, v in res.items() if "," not in k}
    out["n-samples"][name] = {"original": len(rows), "effective": len(rows[:limit])}
    out["n-shot"][name], out["versions"][name] = res.get("shots", 0), VERSIONS.get(name, 1.0)
    if all(t in out["results"] for t in MC_TASKS):
        out["zeroshot_average"] = sum(out["results"][t][f"{REPORTED[t]},none"] for t in MC_TASKS) / len(MC_TASKS)
    out["total_evaluation_time_seconds"] = str(round(time.time() - out["date"], 1))


def git_commit():
    """`git describe --always --dirty` of this code (lm-eval's git_hash), or None outside a git clone."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                              capture_output=True, text=True).stdout.strip() or None
    except OSError:  # no git
        return None


def print_row(name, res):
    for key, value in res.items():
        if isinstance(value, float) and "_stderr" not in key and key != "seconds":
            err = res.get(key.replace(",", "_stderr,")) if "," in key else None
            err = f"{err:.4f}" if isinstance(err, float) else ""  # lm-eval's "N/A": none
            print(f"{name:<14} {key.removesuffix(',none'):<28} {value:>10.4f} {err:>8} {res.get('rows', ''):>6} "
                  f"{res['seconds']:>8}", flush=True)
    if "definition" in res:
        print(f"{'':<14} ({res['definition']})", flush=True)


# ----------------------------------------------------------------------------- CLI

def load_model(path, adapter=None, dtype=torch.float32, device="cpu"):
    """The model of --model (a model folder, a train.py run folder or an adapter folder: runs.resolve) with its
    adapter, and its tokenizer."""
    model, folder = runs.load_model(path, adapter, dtype, device)
    return model, Tokenizer.from_pretrained(folder)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", default="models/smollm2-135m-instruct", help="a model folder, a train.py out_dir "
                   "(its merged/ model, else its adapter/ on its base model) or an adapter folder (on its base model)")
    p.add_argument("--adapter", help="LoRA adapter folder (peft format) loaded onto the model")
    p.add_argument("--tasks", default="zeroshot", help=f"comma list of {', '.join(TASKS)}; "
                                                       "'zeroshot' = the seven multiple-choice tasks")
    p.add_argument("--limit", type=int, help="first N rows (wikitext2: pages; ptb: lines; token perplexity: windows)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max_length", type=int, help="rolling-window length (default: the model's max_seq_len)")
    p.add_argument("--ppl_ctx", type=int, default=128, help="window of the token perplexity (LLM-Pruner: 128)")
    p.add_argument("--ppl_windows", type=int, help="token perplexity: its first N windows (default: --limit; 0: all)")
    p.add_argument("--gsm8k_mode", default="fewshot", choices=["fewshot", "chat"],
                   help="fewshot: lm-eval's 5-shot gsm8k (parity); chat: zero-shot in the fine-tuning chat format")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--data", type=Path, help="a folder laid out as <data set>/<file> (data/manifest.json's names), "
                                             "used as DATA_MIRROR for this run (data/cache/ is still looked in first)")
    p.add_argument("--output", help="the results file to write (JSON, in lm-evaluation-harness's layout)")
    p.add_argument("--samples", help="write GSM8K's generations here (JSON lines: doc_id, text, scores)")
    p.add_argument("--use_cache", help="folder: keep each multiple-choice request's log-likelihood there as it is "
                                       "computed; a rerun with the same folder computes only the missing ones")
    renamed(p, {"--out": "--output", "--output_path": "--output", "--task": "--tasks"})
    args = p.parse_args()
    args.names = [t for name in args.tasks.split(",") for t in (MC_TASKS if name == "zeroshot" else [name])]
    if [n for n in args.names if n not in TASKS]:
        p.error(f"unknown task(s) {[n for n in args.names if n not in TASKS]}; known: {', '.join(TASKS)}, zeroshot")
    for flag, value, least in (("limit", args.limit, 1), ("batch_size", args.batch_size, 1),
                               ("ppl_ctx", args.ppl_ctx, 2), ("max_length", args.max_length, 2),
                               ("ppl_windows", args.ppl_windows, 0), ("max_new_tokens", args.max_new_tokens, 1)):
        if value is not None and value < least:
            p.error(f"--{flag} must be at least {least}, got {value}")
    for flag, path in (("output", args.output), ("samples", args.samples)):
        if path and Path(path).is_dir():
            p.error(f"--{flag} {path}: a folder is there; give a file name")
    if args.use_cache and Path(args.use_cache).exists() and not Path(args.use_cache).is_dir():
        p.error(f"--use_cache {args.use_cache}: a file is there; give a folder")
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        p.error(f"--device {args.device}: expected cpu or cuda[:N] with a CUDA device (this torch sees none)")
    try:
        base, adapter = runs.resolve(args.model, args.adapter)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    args.model_args = f"pretrained={base}" + (f",peft={adapter}" if adapter else "") + f",dtype={args.dtype}"
    return p, args


def main():
    p, args = parse_args()
    if args.data:
        os.environ["DATA_MIRROR"] = str(args.data)
    data = {name: read_data(name) for name in args.names}  # a missing file stops here, before the slow work
    try:
        model, tok = load_model(args.model, args.adapter, getattr(torch, args.dtype), args.device)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    config = {k: getattr(args, k) for k in ("model", "model_args", "batch_size", "device", "limit", "use_cache",
                                            "max_length", "ppl_ctx", "ppl_windows", "gsm8k_mode", "max_new_tokens")}
    out = {"results": {}, "n-samples": {}, "n-shot": {}, "versions": {}, "details": {}, "git_hash": git_commit(),
           "date": time.time(), "config": config | {"data_mirror": os.environ.get("DATA_MIRROR")}}
    print(f"{'task':<14} {'metric':<28} {'value':>10} {'stderr':>8} {'rows':>6} {'seconds':>8}")
    for name in args.names:
        t0 = time.time()
        res = run_task(name, data[name], model, tok, args, lambda total, unit: progress(name, total, unit))
        res["seconds"] = round(time.time() - t0, 1)
        samples = res.pop("samples", None)
        if args.samples and samples:
            with atomic_open(args.samples, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in samples)
        print_row(name, res)
        record(out, name, res, data[name]["rows"], args.limit)
        if args.output:
            save_json(out, args.output)  # after every task, so a long run keeps what it has
    if "zeroshot_average" in out:
        print(f"{'average (7)':<14} {'reported metrics':<28} {out['zeroshot_average']:>10.4f}")


if __name__ == "__main__":
    main()

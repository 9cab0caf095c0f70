"""
Evaluation with the numbers of EleutherAI's lm-evaluation-harness (docs/EVAL.md), without depending on it: multiple
choice (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e/c, OpenBookQA), perplexity (WikiText-2, PTB: lm-eval's word/byte,
LLM-Pruner's token), GSM8K (5-shot or chat). Raw data: data/fetch.py; --output: lm-eval's results layout (results.py).

    python eval.py --model models/smollm2-135m-instruct --tasks zeroshot,wikitext2 --output results/x.json
"""
import argparse
import bz2
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from configurator import renamed
import runs
from data.fetch import fetch
from model import KVCache, apply_rope, rope_cos_sin
import results
from tokenizer import Tokenizer

TASKS = [*results.MC_TASKS, "wikitext2", "ptb", "gsm8k"]


# ----------------------------------------------------------------------------- log-likelihoods
def encode_pair(tok, context, continuation):
    """lm-eval's _encode_pair: the context's trailing spaces move to the continuation, whose tokens are those of
    encode(context + continuation) after the first len(encode(context))."""
    if not context:  # lm-eval conditions an empty context on the prefix token
        return [tok.bos_id if tok.bos_id is not None else tok.eos_id], tok.encode(continuation, bos=False)
    context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
    whole, ctx = tok.encode(context + continuation, bos=False), tok.encode(context, bos=False)
    return ctx, whole[len(ctx):]


def prefix_cache(model, prefix, batch, length):
    """A KV cache with room for `length` positions, holding `prefix` (a list of ids), copied `batch` times."""
    w = model.lm_head.weight
    cache = KVCache(model, 1, length, w.dtype, w.device)
    if prefix:
        model.hidden_states(torch.tensor([prefix], device=w.device), cache=cache)
    cache.k, cache.v = [k.repeat(batch, 1, 1, 1) for k in cache.k], [v.repeat(batch, 1, 1, 1) for v in cache.v]
    return cache


@torch.inference_mode()
def loglikelihoods(model, requests, batch_size=8, store=None, meter=results.quiet):
    """Summed log-probability of each continuation given its context, for [(context_ids, continuation_ids)]; a
    shared context runs once. store: results.open_store's (known, append): only unknown requests run, then saved."""
    known, append = store or ({}, lambda new: None)
    keys = [hashlib.sha1(json.dumps(r).encode()).hexdigest() if store else None for r in requests]
    groups, out, device = {}, [known.get(k) for k in keys], model.lm_head.weight.device
    for i in [i for i, ll in enumerate(out) if ll is None]:  # requests with the same context, together
        groups.setdefault(tuple(requests[i][0]), []).append(i)
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
            append({keys[i]: out[i] for i in idxs})
            tick(len(idxs))
    return out


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
        total, done = total - loss.item() * n, done + n
        tick(1)
    return total


@torch.inference_mode()
def token_perplexity(model, tokens, ctx, batch_size=8, limit=None, meter=results.quiet):
    """LLM-Pruner's perplexity: non-overlapping windows of ctx tokens (the tail shorter than ctx dropped), each
    predicting its ctx - 1 last tokens; exp(mean NLL). Its text has the tokenizer's own BOS, if it adds one."""
    windows, nll = torch.tensor(tokens[:len(tokens) // ctx * ctx]).view(-1, ctx)[:limit], 0.0
    tick = meter(len(windows), f"windows of {ctx} tokens")
    for b in range(0, len(windows), batch_size):
        w = windows[b:b + batch_size].to(model.lm_head.weight.device)
        _, loss = model(w[:, :-1], w[:, 1:])
        nll += loss.item() * w[:, 1:].numel()
        tick(len(w))
    n = len(windows) * (ctx - 1)
    return {"token_perplexity": math.exp(nll / n), "token_ppl_ctx": ctx, "tokens": n, "windows": len(windows)}


def perplexity(model, tok, docs, token_text, args, meter=results.quiet):
    """docs: [(text to score, text whose words and bytes are counted)]."""
    L = args.max_length or model.config.max_seq_len
    prefix, encoded = tok.bos_id if tok.bos_id is not None else tok.eos_id, [tok.encode(t, bos=False) for t, _ in docs]
    tick = meter(sum(-(-len(t) // L) for t in encoded), f"windows of up to {L} tokens")
    ll = sum(rolling_loglikelihood(model, t, prefix, L, tick) for t in encoded)
    words = sum(len(re.split(r"\s+", counted)) for _, counted in docs)  # an empty end counts, as in lm-eval
    nbytes = sum(len(counted.encode("utf-8")) for _, counted in docs)
    res = {"word_perplexity,none": math.exp(-ll / words), "byte_perplexity,none": math.exp(-ll / nbytes),
           "bits_per_byte,none": -ll / nbytes / math.log(2), "rows": len(docs), "words": words, "max_length": L}
    res |= {f"{m}_stderr,none": "N/A" for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}  # as lm-eval
    windows = args.limit if args.ppl_windows is None else args.ppl_windows or None  # --ppl_windows 0: all
    res |= token_perplexity(model, tok.encode(token_text), args.ppl_ctx, args.batch_size, windows, meter)  # own BOS
    return res | {"definition": f"word/byte: lm-eval rolling loglikelihood, max length {L}, BOS prefix; token: "
                                f"LLM-Pruner, '\\n\\n'-joined text, non-overlapping {args.ppl_ctx}-token windows"}


# ----------------------------------------------------------------------------- multiple choice
# An item: {"requests": [(context, continuation), ...], "choices": acc_norm's strings or None, "gold": int}.
def mean_stderr(metric, xs, filt="none"):
    """Mean and standard error (sample std with ddof 1 / sqrt n; "N/A" for one item) under lm-eval's keys."""
    n, m = len(xs), sum(xs) / len(xs)
    err = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else "N/A"
    return {f"{metric},{filt}": m, f"{metric}_stderr,{filt}": err}


def score_mc(model, tok, items, batch_size=8, store=None, meter=results.quiet):
    """acc: argmax of the summed log-likelihoods; acc_norm: of them divided by len(choice) in characters, as lm-eval."""
    requests = [encode_pair(tok, c, k) for it in items for c, k in it["requests"]]
    lls, at = loglikelihoods(model, requests, batch_size, store, meter), 0
    acc, acc_norm = [], []
    for it in items:
        ll, at = lls[at:at + len(it["requests"])], at + len(it["requests"])
        acc.append(float(ll.index(max(ll)) == it["gold"]))  # ties: the first, as np.argmax
        if it["choices"] is not None:
            norm = [l / len(c) for l, c in zip(ll, it["choices"])]
            acc_norm.append(float(norm.index(max(norm)) == it["gold"]))
    return mean_stderr("acc", acc) | (mean_stderr("acc_norm", acc_norm) if acc_norm else {}) | {"rows": len(items)}


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
    """lm-eval's generate_until: greedy decoding, each prompt until a stop id, a stop string (the text is cut there)
    or max_new_tokens. Left padding with the pad keys masked: a row's text does not depend on its batch."""
    ids = [tok.encode(p, bos=False)[-(model.config.max_seq_len - max_new_tokens):] for p in prompts]
    if not all(ids):
        raise ValueError(f"prompt {[len(i) for i in ids].index(0)} of the batch encodes to no tokens")
    B, L, device = len(ids), max(len(i) for i in ids), model.lm_head.weight.device
    pads = [L - len(row) for row in ids]
    key_mask = torch.arange(L + max_new_tokens, device=device) >= torch.tensor(pads, device=device)[:, None]
    cache = KVCache(model, B, L + max_new_tokens, model.lm_head.weight.dtype, device, key_mask if any(pads) else None)
    n = min(len(os.path.commonprefix(ids)), min(len(row) for row in ids) - 1) if B > 1 else 0
    if n:  # a shared prefix (the few-shot examples) runs once
        place_prefix(model, cache, ids[0][:n], pads)
    x, start = torch.tensor([[0] * d + row for d, row in zip(pads, ids)], device=device)[:, n:], n
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
    cut = lambda text: min([text.split(s)[0] for s in stop_strings], key=len, default=text)  # at the first stop
    return [cut(tok.decode(n)) for n in new]


def score_gsm8k(model, tok, test, shots, args, meter=results.quiet):
    """fewshot: lm-eval's gsm8k (the `shots` as exemplars, "Question: …\\nAnswer:", stop at "Question:");
    chat: zero-shot, the question as the user turn of the chat format (fine-tuned models)."""
    fewshot = args.gsm8k_mode == "fewshot"
    exemplars = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in shots)
    prompts = [exemplars + f"Question: {r['question']}\nAnswer:" if fewshot else
               tok.apply_chat([{"role": "user", "content": r["question"]}], add_generation_prompt=True) for r in test]
    stops = ["Question:", "</s>", "<|im_end|>"] if fewshot else []
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
            | {"rows": len(test), "mode": args.gsm8k_mode, "shots": len(shots) if fewshot else 0,
               "samples": [dict(doc_id=i, text=t, strict_match=a, flexible_extract=b)
                           for i, (t, a, b) in enumerate(zip(texts, strict, flexible))]})


# ----------------------------------------------------------------------------- data (docs/EVAL.md, the task table)
def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def mc_item(context, choices, gold, delimiter=" "):  # lm-eval's target_delimiter
    return {"requests": [(context, delimiter + c) for c in choices], "choices": choices, "gold": gold}


def hellaswag_preprocess(text):  # lm-eval's lm_eval/tasks/hellaswag/utils.py
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def read_hellaswag(path):
    """The original jsonl as lm-eval reads it; llama.cpp's text form (6 lines: context, gold, 4 endings) as it is."""
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
    if name == "boolq":  # Google's file turned into SuperGLUE's: passage = "{title} -- {passage}"
        return {"rows": [mc_item(f"{r['title']} -- {r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"],
                                 int(r["answer"])) for r in read_jsonl(fetch("boolq", "dev.jsonl"))]}
    if name == "piqa":
        labels = fetch("piqa", "valid-labels.lst").read_text().split()
        return {"rows": [mc_item(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(y))
                         for r, y in zip(read_jsonl(fetch("piqa", "valid.jsonl")), labels, strict=True)]}
    if name == "hellaswag":  # the results name the form read (docs/EVAL.md "Data caveats")
        path = fetch("hellaswag", "hellaswag_val.jsonl", "hellaswag_val_full.txt.bz2")
        return {"rows": read_hellaswag(path), "details": {"file": path.name}}
    if name == "winogrande":  # lm-eval's partial evaluation: a context per option (the sentence up to `_`, the
        rows = []             # option filled in), the same continuation (the rest of the sentence) after each
        for r, y in zip(read_jsonl(fetch("winogrande", "dev.jsonl")),
                        fetch("winogrande", "dev-labels.lst").read_text().split(), strict=True):
            i = r["sentence"].index("_")
            rest = " " + r["sentence"][i + 1:].strip()
            rows.append({"requests": [(r["sentence"][:i] + o, rest) for o in (r["option1"], r["option2"])],
                         "choices": None, "gold": int(y) - 1})
        return {"rows": rows}
    if name == "openbookqa":
        return {"rows": [mc_item(r["question"]["stem"], [c["text"] for c in r["question"]["choices"]],
                                 [c["label"] for c in r["question"]["choices"]].index(r["answerKey"].strip()))
                         for r in read_jsonl(fetch("openbookqa", "test.jsonl"))]}
    if name in ("arc_easy", "arc_challenge"):  # llm-foundry's ARC: query = "Question: {question}"; 11 rows padded
        return {"rows": [mc_item(r["query"] + "\nAnswer:", r["choices"], r["gold"])  # to 4 choices (docs/EVAL.md)
                         for r in read_jsonl(fetch("arc", f"{name}.jsonl"))]}
    if name == "gsm8k":  # the first 5 train examples are the exemplars
        return {"rows": read_jsonl(fetch("gsm8k", "test.jsonl")),
                "shots": read_jsonl(fetch("gsm8k", "train.jsonl"))[:5]}
    if name == "wikitext2":  # rows: (page detokenized, page as read); the token perplexity's text: Hugging Face's rows
        raw = fetch("wikitext2", "wiki.test.raw").read_text(encoding="utf-8")
        return {"rows": [(wikitext_detokenizer(p), p) for p in wikitext_pages(raw)],
                "token_text": "\n\n".join(line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1])}
    lines = fetch("ptb", "ptb.test.txt").read_text(encoding="utf-8").split("\n")[:-1]  # PTB: rows are lines
    return {"rows": lines, "token_text": "\n\n".join(line.strip() for line in lines)}


# ----------------------------------------------------------------------------- CLI
def run_task(name, data, model, tok, args, meter=results.quiet):
    """A task's numbers on the first --limit rows of read_data's `data`."""
    rows = data["rows"][:args.limit]
    if name == "gsm8k":
        return score_gsm8k(model, tok, rows, data["shots"], args, meter)
    if name in ("wikitext2", "ptb"):  # PTB's lines are one document for the rolling numbers
        docs = rows if name == "wikitext2" else [("\n".join(rows) + "\n",) * 2]
        return perplexity(model, tok, docs, data["token_text"], args, meter)
    header = dict(model=str(Path(args.model).resolve()), adapter=args.adapter and str(Path(args.adapter).resolve()),
                  dtype=args.dtype, task=name)  # lm-eval's --use_cache: a stopped evaluation continues where it stopped
    store = args.use_cache and results.open_store(Path(args.use_cache) / f"{name}.jsonl", header)
    return score_mc(model, tok, rows, args.batch_size, store, meter) | data.get("details", {})


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", default="models/smollm2-135m-instruct",
                   help="a model folder, a train.py out_dir (its adapter on its base, else merged/), an adapter folder")
    p.add_argument("--adapter", help="LoRA adapter folder (peft format) loaded onto the model")
    p.add_argument("--tasks", default="zeroshot", help=f"comma list of {', '.join(TASKS)}; zeroshot: the first seven")
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
    args.names = [t for name in args.tasks.split(",") for t in (results.MC_TASKS if name == "zeroshot" else [name])]
    if [n for n in args.names if n not in TASKS]:
        p.error(f"unknown task(s) {[n for n in args.names if n not in TASKS]}; known: {', '.join(TASKS)}, zeroshot")
    for flag, least in dict(limit=1, batch_size=1, ppl_ctx=2, max_length=2, ppl_windows=0, max_new_tokens=1).items():
        if (value := getattr(args, flag)) is not None and value < least:
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
    try:  # a model folder, a run folder or an adapter folder (runs.resolve)
        model, folder = runs.load_model(args.model, args.adapter, getattr(torch, args.dtype), args.device)
        tok = Tokenizer.from_pretrained(folder)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    out = results.new_results(vars(args) | {"data_mirror": os.environ.get("DATA_MIRROR")})
    results.print_header()
    for name in args.names:
        t0 = time.time()
        res = run_task(name, data[name], model, tok, args, lambda total, unit: results.progress(name, total, unit))
        res["seconds"] = round(time.time() - t0, 1)
        samples = res.pop("samples", None)
        if args.samples and samples:
            results.write_jsonl(args.samples, samples)
        results.print_row(name, res)
        results.record(out, name, res, data[name]["rows"], args.limit, args.output)  # saved after every task
    results.print_average(out)


if __name__ == "__main__":
    main()

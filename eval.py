"""
Evaluation, with the numbers computed as EleutherAI's lm-evaluation-harness computes them
(shared/docs/EVAL.md), without depending on it:

- perplexity: WikiText-2 word/byte perplexity as lm-eval's `wikitext` task (pages, detokenizer,
  rolling windows of the model's max length with a BOS prefix), and token perplexity as LLM-Pruner
  reports it (the text joined with "\\n\\n", non-overlapping windows of --ppl_ctx tokens); PTB the same;
- zero-shot multiple choice (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA): summed
  log-likelihood of each continuation, acc and acc_norm;
- GSM8K: greedy generation, strict and flexible answer extraction, 5-shot (lm-eval) or chat (zero-shot).

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

from checkpoint import atomic_open, save_json
from model import KVCache, Transformer, apply_rope, rope_cos_sin
from tokenizer import Tokenizer

MC_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
REPORTED = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",  # what the seeds'
            "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}  # tables report
DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


def load_model(path, adapter=None, dtype=torch.float32, device="cpu"):
    """A model folder (config.json, model.safetensors, tokenizer.json) + an optional LoRA adapter folder, or
    a train.py out_dir: its merged/ model if it has one, else its adapter/ on the base model it names."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "merged" / "config.json").exists():
        path = path / "merged"  # a train.py out_dir with a merged model
    elif not (path / "config.json").exists() and (path / "adapter" / "adapter_config.json").exists():
        adapter = path / "adapter"  # a train.py out_dir: its adapter on the base model it names
        path = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    model = Transformer.from_pretrained(path, dtype=dtype, device=device)
    if adapter:
        from lora import load_adapter  # only needed here
        load_adapter(model, adapter)
    return model.eval(), Tokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------- multiple-choice data
# An item is {"requests": [(context, continuation), ...], "choices": [str] or None, "gold": int}.
# "choices" are the strings whose length normalises acc_norm (lm-eval's doc_to_choice).

def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def mc_item(context, choices, gold, delimiter=" "):
    return {"requests": [(context, delimiter + c) for c in choices], "choices": choices, "gold": gold}


def load_boolq(data):  # Google's file turned into SuperGLUE's: passage = "{title} -- {passage}"
    return [mc_item(f"{r['title']} -- {r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"],
                    int(r["answer"])) for r in read_jsonl(data / "boolq" / "dev.jsonl")]


def load_piqa(data):
    labels = (data / "piqa" / "valid-labels.lst").read_text().split()
    return [mc_item(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(y))
            for r, y in zip(read_jsonl(data / "piqa" / "valid.jsonl"), labels, strict=True)]


def load_hellaswag(data):
    """llama.cpp's text form (6 lines: context, gold, 4 endings), as is: no ctx_b.capitalize(), some [tags] left."""
    lines = bz2.open(data / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8").read().split("\n")
    return [mc_item(lines[i], lines[i + 2:i + 6], int(lines[i + 1])) for i in range(0, len(lines) - 5, 6)]


def load_winogrande(data):
    """lm-eval's partial evaluation: one context per option (the sentence up to `_`, option filled in),
    the same continuation (the rest of the sentence) scored after each."""
    labels = (data / "winogrande" / "dev-labels.lst").read_text().split()
    items = []
    for r, y in zip(read_jsonl(data / "winogrande" / "dev.jsonl"), labels, strict=True):
        i = r["sentence"].index("_")
        rest = " " + r["sentence"][i + 1:].strip()
        items.append({"requests": [(r["sentence"][:i] + o, rest) for o in (r["option1"], r["option2"])],
                      "choices": None, "gold": int(y) - 1})
    return items


def load_arc(name):  # llm-foundry's conversion: query = "Question: {question}"; 11 rows padded to 4 choices
    return lambda data: [mc_item(r["query"] + "\nAnswer:", r["choices"], r["gold"])
                         for r in read_jsonl(data / "arc" / f"{name}.jsonl")]


def load_openbookqa(data):
    return [mc_item(r["question"]["stem"], [c["text"] for c in r["question"]["choices"]],
                    [c["label"] for c in r["question"]["choices"]].index(r["answerKey"].strip()))
            for r in read_jsonl(data / "openbookqa" / "test.jsonl")]


LOADERS = {"boolq": load_boolq, "piqa": load_piqa, "hellaswag": load_hellaswag, "winogrande": load_winogrande,
           "arc_easy": load_arc("arc_easy"), "arc_challenge": load_arc("arc_challenge"), "openbookqa": load_openbookqa}


# ----------------------------------------------------------------------------- the log-likelihood engine

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


def request_key(ctx, cont):
    return hashlib.sha1(json.dumps([ctx, cont]).encode()).hexdigest()


def open_store(path, header):
    """--use_cache: {request key: log-likelihood} computed by earlier runs into the JSON-lines file `path` (its
    first line `header` names the model; a line cut off by a kill is dropped), and a function that appends more."""
    known, path = {}, Path(path)
    text = path.read_text() if path.exists() else ""
    if text:
        first, *lines = text.splitlines()
        if json.loads(first) != header:
            raise SystemExit(f"{path} holds log-likelihoods of {first}, not of {json.dumps(header)}: "
                             "give this evaluation its own --use_cache folder")
        for line in lines:
            try:
                known.update(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed run
                pass
        if not text.endswith("\n"):  # appends start on a line of their own
            with open(path, "a") as f:
                f.write("\n")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(header) + "\n")

    def append(new):
        with open(path, "a") as f:
            f.write(json.dumps(new) + "\n")
    return known, append


@torch.inference_mode()
def loglikelihoods(model, requests, batch_size=8, store=None):
    """Summed log-probability of each continuation given its context, for [(context_ids, continuation_ids)].
    Requests with the same context run it once: context[:-1] fills a KV cache, copied across a batch of
    rows [context[-1]] + continuation[:-1] (right-padded), whose logits score the continuation tokens.
    store: open_store's (known, append): known requests are not run again, new ones are appended per batch."""
    known, append = store or ({}, None)
    keys = [request_key(*r) for r in requests] if store else [None] * len(requests)
    groups, out, device = {}, [known.get(k) for k in keys], model.lm_head.weight.device
    for i, (ctx, cont) in enumerate(requests):
        if out[i] is None:
            groups.setdefault(tuple(ctx), []).append(i)
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
    return out


def mean_stderr(xs):
    """Mean and its standard error: sample standard deviation (ddof 1) / sqrt(n)."""
    n, m = len(xs), sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None


def argmax(xs):  # the first index of the largest value, as np.argmax
    return max(range(len(xs)), key=lambda i: xs[i])


def score_mc(model, tok, items, batch_size=8, store=None):
    """acc = argmax of the summed log-likelihoods; acc_norm = argmax of them divided by len(choice), the
    choice's length in characters as lm-eval counts it (Python len of the string, no leading space)."""
    requests = [encode_pair(tok, c, k) for it in items for c, k in it["requests"]]
    lls, at = loglikelihoods(model, requests, batch_size, store), 0
    acc, acc_norm = [], []
    for it in items:
        ll, at = lls[at:at + len(it["requests"])], at + len(it["requests"])
        acc.append(float(argmax(ll) == it["gold"]))
        if it["choices"] is not None:
            acc_norm.append(float(argmax([l / len(c) for l, c in zip(ll, it["choices"])]) == it["gold"]))
    res = dict(zip(["acc", "acc_stderr"], mean_stderr(acc)))
    if acc_norm:
        res.update(zip(["acc_norm", "acc_norm_stderr"], mean_stderr(acc_norm)))
    return res | {"rows": len(items)}


# ----------------------------------------------------------------------------- perplexity

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
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
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
def rolling_loglikelihood(model, tokens, prefix, L):
    """Sum of log p(token | previous tokens) over a document, with lm-eval's rolling windows."""
    device, total, done = model.lm_head.weight.device, 0.0, 0
    for inp, n in rolling_windows(tokens, prefix, L):  # only the last n positions count
        targets = torch.tensor([[-1] * (len(inp) - n) + tokens[done:done + n]], device=device)
        _, loss = model(torch.tensor([inp], device=device), targets)
        total -= loss.item() * n
        done += n
    return total


@torch.inference_mode()
def token_perplexity(model, tokens, ctx, batch_size=8, limit=None):
    """LLM-Pruner's perplexity: non-overlapping windows of ctx tokens (the tail shorter than ctx dropped),
    each predicting its ctx - 1 last tokens; exp(mean NLL over all predicted tokens)."""
    windows, nll = torch.tensor(tokens[:len(tokens) // ctx * ctx]).view(-1, ctx)[:limit], 0.0
    for b in range(0, len(windows), batch_size):
        w = windows[b:b + batch_size].to(model.lm_head.weight.device)
        _, loss = model(w[:, :-1], w[:, 1:])
        nll += loss.item() * w[:, 1:].numel()
    n = len(windows) * (ctx - 1)
    return {"token_perplexity": math.exp(nll / n), "token_ppl_ctx": ctx, "tokens": n, "windows": len(windows)}


def perplexity(model, tok, docs, token_text, args):
    """docs: [(text to score, text whose words and bytes are counted)]."""
    L = args.max_length or model.config.max_seq_len
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    ll = sum(rolling_loglikelihood(model, tok.encode(text, bos=False), prefix, L) for text, _ in docs)
    words = sum(len(re.split(r"\s+", counted)) for _, counted in docs)
    nbytes = sum(len(counted.encode("utf-8")) for _, counted in docs)
    res = {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
           "bits_per_byte": -ll / nbytes / math.log(2), "rows": len(docs), "words": words, "max_length": L}
    # the token perplexity's text gets the tokenizer's own BOS (if it adds one), as LLM-Pruner's does
    windows = args.limit if args.ppl_windows is None else args.ppl_windows or None  # --ppl_windows 0: all
    res |= token_perplexity(model, tok.encode(token_text), args.ppl_ctx, args.batch_size, windows)
    return res | {"definition": f"word/byte: lm-eval rolling loglikelihood, max length {L}, BOS prefix; token: "
                                f"LLM-Pruner, '\\n\\n'-joined text, non-overlapping {args.ppl_ctx}-token windows"}


TEST_FILES = {"wikitext2": "wikitext2/wiki.test.raw", "ptb": "ptb/ptb.test.txt", "gsm8k": "gsm8k/test.jsonl"}


def eval_wikitext2(model, tok, args):
    raw = (args.data / TEST_FILES["wikitext2"]).read_text(encoding="utf-8")
    pages = wikitext_pages(raw)[:args.limit]
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]  # Hugging Face's rows
    return perplexity(model, tok, [(wikitext_detokenizer(p), p) for p in pages], "\n\n".join(rows), args)


def eval_ptb(model, tok, args):
    """PTB: the whole test file is one document for the rolling numbers (--limit: its first N lines)."""
    lines = (args.data / TEST_FILES["ptb"]).read_text(encoding="utf-8").split("\n")[:-1]
    doc = "\n".join(lines[:args.limit]) + "\n"
    return perplexity(model, tok, [(doc, doc)], "\n\n".join(line.strip() for line in lines), args)


# ----------------------------------------------------------------------------- GSM8K

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


def eval_gsm8k(model, tok, args):
    """fewshot: lm-eval's gsm8k (first 5 train examples as exemplars, "Question: …\\nAnswer:", stop at
    "Question:"); chat: zero-shot, the question as the user turn of the chat format (fine-tuned models)."""
    test = read_jsonl(args.data / TEST_FILES["gsm8k"])[:args.limit]
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n"
                    for r in read_jsonl(args.data / "gsm8k" / "train.jsonl")[:5])
    if args.gsm8k_mode == "fewshot":
        prompts = [shots + f"Question: {r['question']}\nAnswer:" for r in test]
        stops = ["Question:", "</s>", "<|im_end|>"]
    else:
        prompts, stops = [tok.apply_chat([{"role": "user", "content": r["question"]}], add_generation_prompt=True)
                          for r in test], []
    order = sorted(range(len(test)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    texts = [None] * len(test)
    for b in range(0, len(order), args.batch_size):
        chunk = order[b:b + args.batch_size]
        for i, text in zip(chunk, greedy_until(model, tok, [prompts[i] for i in chunk], args.max_new_tokens, stops)):
            texts[i] = text
    strict, flexible = [], []
    for r, text in zip(test, texts):
        gold = normalize_number(r["answer"])
        s, f = extract_answers(text)
        strict.append(float(normalize_number(s) == gold))
        flexible.append(float(normalize_number(f) == gold))
    return (dict(zip(["strict_match", "strict_match_stderr"], mean_stderr(strict)))
            | dict(zip(["flexible_extract", "flexible_extract_stderr"], mean_stderr(flexible)))
            | {"rows": len(test), "mode": args.gsm8k_mode, "shots": 5 if args.gsm8k_mode == "fewshot" else 0,
               "samples": [dict(doc_id=i, text=t, strict_match=a, flexible_extract=b)
                           for i, (t, a, b) in enumerate(zip(texts, strict, flexible))]})


# ----------------------------------------------------------------------------- CLI

def run_task(name, model, tok, args, items=None):
    """One task's numbers; items: a multiple-choice task's data, when already loaded."""
    special = {"wikitext2": eval_wikitext2, "ptb": eval_ptb, "gsm8k": eval_gsm8k}
    if name in special:
        return special[name](model, tok, args)
    store = None
    if args.use_cache:  # lm-eval's --use_cache: a stopped evaluation continues where it stopped
        header = dict(model=str(Path(args.model).resolve()), adapter=args.adapter and str(Path(args.adapter).resolve()),
                      dtype=args.dtype, task=name)
        store = open_store(Path(args.use_cache) / f"{name}.jsonl", header)
    items = LOADERS[name](args.data) if items is None else items
    return score_mc(model, tok, items[:args.limit], args.batch_size, store)


def print_row(name, res):
    for metric, value in res.items():
        if isinstance(value, float) and not metric.endswith("_stderr") and metric != "seconds":
            err = res.get(metric + "_stderr")
            print(f"{name:<14} {metric:<18} {value:>10.4f} {'' if err is None else f'{err:.4f}':>8} "
                  f"{res.get('rows', ''):>6} {res['seconds']:>8}", flush=True)
    if "definition" in res:
        print(f"{'':<14} ({res['definition']})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct", help="model folder")
    p.add_argument("--adapter", help="LoRA adapter folder (peft format) loaded onto the model")
    p.add_argument("--tasks", default="zeroshot", help=f"comma list of wikitext2, ptb, {', '.join(MC_TASKS)}, "
                                                       "gsm8k; 'zeroshot' = the seven multiple-choice tasks")
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
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--samples", help="write GSM8K's generations here (JSON lines: doc_id, text, scores)")
    p.add_argument("--use_cache", help="folder: keep each multiple-choice request's log-likelihood there as it is "
                                       "computed; a rerun with the same folder computes only the missing ones")
    args = p.parse_args()
    names = [t for name in args.tasks.split(",") for t in (MC_TASKS if name == "zeroshot" else [name])]
    unknown = [n for n in names if n not in ["wikitext2", "ptb", "gsm8k", *MC_TASKS]]
    if unknown:
        p.error(f"unknown task(s) {unknown}; known: wikitext2, ptb, gsm8k, {', '.join(MC_TASKS)}, zeroshot")
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
        model, tok = load_model(args.model, args.adapter, getattr(torch, args.dtype), args.device)
        mc_items = {name: LOADERS[name](args.data) for name in names if name in LOADERS}  # before the slow work
        for name in set(names) - set(mc_items):
            if not (args.data / TEST_FILES[name]).exists():
                raise FileNotFoundError(f"{name}: no {args.data / TEST_FILES[name]} (--data {args.data})")
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    out = {"model": args.model, "adapter": args.adapter, "dtype": args.dtype, "limit": args.limit,
           "ppl_windows": args.ppl_windows, "tasks": {}}
    print(f"{'task':<14} {'metric':<18} {'value':>10} {'stderr':>8} {'rows':>6} {'seconds':>8}")
    for name in names:
        t0 = time.time()
        res = run_task(name, model, tok, args, mc_items.get(name)) | {"seconds": round(time.time() - t0, 1)}
        samples = res.pop("samples", None)
        if args.samples and samples:
            with atomic_open(args.samples, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in samples)
        out["tasks"][name] = res
        print_row(name, res)
        if all(t in out["tasks"] for t in MC_TASKS):
            out["zeroshot_average"] = sum(out["tasks"][t][REPORTED[t]] for t in MC_TASKS) / len(MC_TASKS)
        if args.output:
            save_json(out, args.output)  # after every task, so a long run keeps what it has
    if "zeroshot_average" in out:
        print(f"{'average (7)':<14} {'reported metrics':<18} {out['zeroshot_average']:>10.4f}")


if __name__ == "__main__":
    main()

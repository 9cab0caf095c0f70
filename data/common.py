"""
Shared by data/<name>/prepare.py: arguments, source checks, chat-formatted examples, and writing
<split>.bin (+ <split>_mask.bin) and meta.json.

Output contract (train.py reads it):
  <split>.bin        flat token stream, uint16 if the vocabulary fits (n_vocab <= 65536), else uint32
  <split>_mask.bin   instruction data only: uint8, same length, 1 where the token counts in the loss
  meta.json          {dtype, vocab_size, masked, tokenizer, splits: {split: n_tokens},
                      examples: {split: n}, source}; written last, so its presence means the bins are whole
"""
import argparse
import gzip
import json
import os
import random
import sys
import time
from itertools import chain
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "smollm2-135m-instruct"
SEED = 1337
sys.path.insert(0, str(ROOT))

from configurator import renamed  # noqa: E402
from data.fetch import fetch, progress  # noqa: E402,F401 (progress: for the prepare scripts)
from tokenizer import Tokenizer  # noqa: E402


def parse_args(doc, script, argv=None):
    """--src (default: the raw files data/manifest.json lists), --model, --out_dir (default: the script's folder)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--src", type=Path, help="a folder (or file) of your own with the raw data, instead of "
                                            "the files data/manifest.json lists (data/fetch.py gets those)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder whose tokenizer.json to use")
    p.add_argument("--out_dir", type=Path, default=Path(script).resolve().parent, help="where the outputs go")
    renamed(p, {"--out": "--out_dir"})
    args = p.parse_args(argv)
    args.t0, args.dataset = time.time(), Path(script).resolve().parent.name  # data/<dataset>/prepare.py
    if args.out_dir.exists() and not args.out_dir.is_dir():
        p.error(f"--out_dir {args.out_dir}: a file is there, not a folder")
    try:
        check_out(args)
    except SystemExit as e:
        p.error(str(e))
    return args


def check_out(args):
    """The outputs replace an earlier preparation of the same data set only, never another data set's."""
    meta = Path(args.out_dir) / "meta.json"
    other = json.loads(meta.read_text()).get("dataset", args.dataset) if meta.exists() else args.dataset
    if other != args.dataset:
        raise SystemExit(f"--out_dir {args.out_dir}: it holds the data set {other!r}; "
                         f"choose another folder for {args.dataset!r}")


def shown(path):
    """A path for meta.json: relative to the repo root when inside it or its parent folder, else absolute."""
    path = Path(path).resolve()
    rel = os.path.relpath(path, ROOT)
    return str(path) if rel.startswith(os.path.join(os.pardir, os.pardir)) else Path(rel).as_posix()


_tokenizers = {}


def load_tokenizer(model):
    model = Path(model).resolve()
    if model not in _tokenizers:
        try:
            _tokenizers[model] = Tokenizer.from_pretrained(model)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"--model {model}: cannot load its tokenizer ({e}). Expected a model folder with "
                             f"tokenizer.json (the default comes from `python download.py`).")
    return _tokenizers[model]


def raw_file(args, dataset, *names, what):
    """The first of --src/<names> (or --src itself if it is a file), else the first of `names` that
    data/fetch.py finds or downloads (data/manifest.json's `dataset`); exits with a message if it is not
    there or empty."""
    if args.src:
        path = next((p for p in ([args.src] if args.src.is_file() else [args.src / n for n in names])
                     if p.is_file()), None)
        if path is None:
            raise SystemExit(f"{args.src / names[-1]}: not found. Expected {what} in {args.src}, or no --src for "
                             f"the files data/manifest.json lists.")
    else:
        path = fetch(dataset, *names)
    if path.stat().st_size == 0:
        raise SystemExit(f"{path}: empty file. Expected {what}.")
    print(f"raw data: {path}")
    return path


def read_records(path, fields):
    """Records of a JSON array (.json) or JSON lines (.jsonl, optionally .gz), each with string `fields`."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        try:
            if ".jsonl" in path.name:
                rows = [json.loads(line) for line in f if line.strip()]
            else:
                rows = json.load(f)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e})")
    if not isinstance(rows, list) or not rows:
        raise SystemExit(f"{path}: expected a non-empty list of records with fields {list(fields)}")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in fields):
            raise SystemExit(f"{path}: record {i} lacks string fields {list(fields)}: {str(r)[:200]}")
    return rows


def split_off(items, n_val, seed=SEED):
    """Seeded shuffle, then (train, val) with the last n_val items as val; val is at most half of the items."""
    items = list(items)
    if len(items) < 2:
        raise SystemExit(f"need at least 2 examples to make train and val splits, got {len(items)}")
    random.Random(seed).shuffle(items)
    n_val = max(1, min(n_val, len(items) // 2))
    return items[:-n_val], items[-n_val:]


def chat_example(tok, prompt, response):
    """(ids, mask) of one chat turn: the user prompt in the model's chat format with the generation prompt
    (as eval.py prompts), then response + end-of-turn. mask is 1 on the response and the end-of-turn token,
    0 on the prompt and on the newline after end-of-turn."""
    end, tail = ("<|eot_id|>", "") if tok.chat == "llama3" else ("<|im_end|>", "\n")
    p_text = tok.apply_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    r_text = response + end + tail
    ids = tok.encode(p_text + r_text)
    p, r = tok.encode(p_text), tok.encode(r_text, bos=False)
    n_tail = len(tok.encode(tail, bos=False))
    if p + r == ids:  # the usual case: the prompt ends with "\n", a pre-token boundary
        return ids, [0] * len(p) + [1] * (len(r) - n_tail) + [0] * n_tail
    # A pre-token merged across the boundary (e.g. a response starting with "\n"): mask the tokens of the
    # joint encoding that lie wholly inside the response, by byte positions counted from the end.
    ends = np.cumsum([len(tok.enc.decode_single_token_bytes(i)) for i in ids])
    starts = ends - [len(tok.enc.decode_single_token_bytes(i)) for i in ids]
    total = int(ends[-1])
    lo, hi = total - len(r_text.encode()), total - len(tail.encode())
    return ids, [int(s >= lo and e <= hi) for s, e in zip(starts, ends)]


def encode_text(tok, text, piece=1 << 16):
    """Plain text -> ids, special-token strings kept as text. Long text goes in pieces of about `piece`
    characters, cut after a newline with a non-space character on either side: no pre-token crosses such
    a cut (nor would one end differently there), so the result equals encoding the whole text."""
    ids, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + piece)
        while cut != -1 and cut + 1 < len(text) and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.find("\n", cut + 1)
        end = len(text) if cut == -1 else cut + 1
        ids += tok.encode(text[start:end], allow_special=False, bos=False)
        start = end
    return ids


def write_outputs(args, tok, splits, source):
    """splits: {split: [example, ...]}, an example being a token list, or (tokens, mask) for instruction data.
    Writes <split>.bin (+ <split>_mask.bin) and then meta.json, each atomically; prints a line per split."""
    from checkpoint import atomic_open, save_json  # imported here: it loads torch (seconds), not needed before
    out = Path(args.out_dir)
    masked = isinstance(next(iter(splits.values()))[0], tuple)
    dtype = np.uint16 if tok.n_vocab <= 1 << 16 else np.uint32
    for split, examples in splits.items():
        if not examples:
            raise SystemExit(f"{source}: no examples for the {split} split")
    check_out(args)  # again: another preparation may have written there meanwhile
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # until rewritten, the folder is not a finished dataset
    meta = dict(dtype=np.dtype(dtype).name, vocab_size=tok.n_vocab, masked=masked, tokenizer=shown(args.model),
                splits={}, examples={}, source=shown(source), dataset=args.dataset)
    for split, examples in splits.items():
        ids = np.fromiter(chain.from_iterable(e[0] if masked else e for e in examples), dtype=dtype)
        with atomic_open(out / f"{split}.bin", "wb") as f:
            f.write(ids.tobytes())
        line = f"{split:>5}: {len(examples):,} examples, {len(ids):,} tokens"
        if masked:
            mask = np.fromiter(chain.from_iterable(e[1] for e in examples), dtype=np.uint8)
            assert len(mask) == len(ids), (split, len(mask), len(ids))
            with atomic_open(out / f"{split}_mask.bin", "wb") as f:
                f.write(mask.tobytes())
            line += f", {mask.mean():.1%} in the loss (masked in)"
        meta["splits"][split], meta["examples"][split] = len(ids), len(examples)
        print(line)
    save_json(meta, out / "meta.json")
    print(f"wrote {out} ({meta['dtype']}, vocab {tok.n_vocab:,}) in {time.time() - args.t0:.1f}s")
    return meta

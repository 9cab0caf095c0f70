"""
Prepared token data (what data/<dataset>/prepare.py writes): <split>.bin, a flat token stream; <split>_mask.bin for
instruction data, 1 where a token belongs to a response; meta.json, written last. Read as random windows.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent


def prepared(dataset, data_dir="", vocab_size=None, model=None, block_size=None):
    """(folder, meta) of a prepared data set, checked against the model's vocabulary and the window length;
    data/<dataset> is prepared first if it is missing. Every problem stops with one line saying what to run."""
    folder = Path(data_dir or DATA / dataset)
    if not (folder / "train.bin").exists():
        prepare = DATA / dataset / "prepare.py"
        if data_dir or not prepare.exists():
            there = ", ".join(sorted(p.parent.name for p in DATA.glob("*/prepare.py")))
            raise SystemExit(f"{data_dir or folder}: no train.bin; " + (
                f"make it with `python data/{dataset}/prepare.py --out_dir {data_dir}`" if prepare.exists() else
                f"dataset={dataset!r} has no data/{dataset}/prepare.py; the data sets are {there}"))
        print(f"{folder}/train.bin is missing: running data/{dataset}/prepare.py")
        if subprocess.run([sys.executable, str(prepare)] + (["--model", str(model)] if model else [])).returncode:
            raise SystemExit(1)  # prepare.py has said why
    for f in (folder / name for name in ("meta.json", "train.bin", "val.bin")):
        if not f.exists() or f.stat().st_size == 0:
            raise SystemExit(f"{f} is {'empty' if f.exists() else 'missing'}: run data/<dataset>/prepare.py to "
                             f"(re)make {folder}")
    meta = json.loads((folder / "meta.json").read_text())
    if vocab_size is not None:
        check_vocab(folder, meta, vocab_size, model)
    for split in ("train", "val") if block_size else ():
        if len(tokens(folder, split, meta)) <= block_size:
            raise SystemExit(f"{folder}/{split}.bin has {len(tokens(folder, split, meta))} tokens, "
                             f"block_size={block_size} needs more than that")
    return folder, meta


def check_vocab(folder, meta, vocab_size, model):
    """Token ids past the embedding table would fail deep inside the model: refuse them here."""
    if meta["vocab_size"] > vocab_size:
        raise SystemExit(f"{folder}: tokens up to vocab_size {meta['vocab_size']}, but the model has {vocab_size}")
    for split in ("train", "val"):
        top = int(tokens(folder, split, meta).max())
        if top >= vocab_size:
            raise SystemExit(f"{folder}/{split}.bin: token id {top}, but the model's vocabulary has {vocab_size} ids "
                             f"(prepared with another tokenizer? run the prepare script with --model {model})")


def tokens(folder, split, meta, mask=False):
    """A split's tokens (or its loss mask) as a memmap, opened anew each time (memmaps leak if kept)."""
    if mask:
        return np.memmap(Path(folder) / f"{split}_mask.bin", dtype=np.uint8, mode="r")
    return np.memmap(Path(folder) / f"{split}.bin", dtype=meta["dtype"], mode="r")


def windows(folder, meta, split, n, block_size, generator):
    """n windows of block_size tokens at random offsets (drawn with the torch `generator`): inputs x (n, T) and
    next tokens y (n, T), y = -1 where the loss mask says the token is not a response token."""
    data = tokens(folder, split, meta)
    if len(data) <= block_size:
        raise SystemExit(f"{folder}/{split}.bin has {len(data)} tokens, block_size={block_size} needs more than that")
    ix = torch.randint(len(data) - block_size, (n,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if meta.get("masked", False):
        mask = tokens(folder, split, meta, mask=True)
        y[~torch.stack([torch.from_numpy(mask[i + 1:i + 1 + block_size] != 0) for i in ix])] = -1
    return x, y

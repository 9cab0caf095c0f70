"""data/<name>/prepare.py on small inputs written to tmp_path (never into data/), with the real tokenizer;
the raw files through data/fetch.py (a manifest of our own, or the real one where the data set can be had)."""
import gzip
import importlib.util
import io
import json
import sys
import tarfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from conftest import raw_file
from data import fetch as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))
import common  # noqa: E402

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well.\n2. Sleep.\n3. Move."},
    {"instruction": "Translate to French.", "input": "Good morning, 42 friends!", "output": "Bonjour, 42 amis !"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    {"instruction": "Summarise:", "input": "  The cat sat.\n\tThe dog ran.", "output": " A cat sat; a dog ran. "},
    {"instruction": "Write code.", "input": "", "output": "```python\nprint('hi')\n```"},
    {"instruction": "Count to 3", "input": "", "output": "123"},
]
GSM8K_TRAIN = [{"question": f"Tom has {n} apples and buys {n + 1} more. How many?",
                "answer": f"He has {n}+{n + 1} = <<{n}+{n + 1}={2 * n + 1}>>{2 * n + 1} apples.\n#### {2 * n + 1}"}
               for n in range(5)]
GSM8K_TEST = [{"question": f"What is {n} times 2?", "answer": f"{n}*2 = <<{n}*2={2 * n}>>{2 * n}\n#### {2 * n}"}
              for n in range(3)]
SHAKESPEARE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 12
PAGES = [
    {"path": "library/os.rst", "text": ":mod:`os` --- Misc\n==================\n\n.. function:: getcwd()\n\n   Return 1 path.\n"},
    {"path": "tutorial/intro.rst", "text": "Intro\n*****\n\n   >>> 2 + 2\n   4\n\nA literal <|endoftext|> stays text.\n"},
    {"path": "faq/general.rst", "text": "General\n\n\tTabbed   line   \n\n\n" + "Long line of prose. " * 400 + "\n"},
    {"path": "howto/sorting.rst", "text": "Sorting\n=======\n\n::\n\n    sorted([5, 2, 3])\n"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_alpaca(src):
    (src / "alpaca_data.json").write_text(json.dumps(ALPACA), encoding="utf-8")


def make_gsm8k(src):
    write_jsonl(src / "train.jsonl", GSM8K_TRAIN)
    write_jsonl(src / "test.jsonl", GSM8K_TEST)


def make_shakespeare(src):
    (src / "input.txt").write_text(SHAKESPEARE, encoding="utf-8")


def make_pydocs(src):
    with gzip.open(src / "python311_docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(p) + "\n" for p in PAGES))


MAKERS = {"alpaca": make_alpaca, "gsm8k": make_gsm8k, "shakespeare": make_shakespeare, "pydocs": make_pydocs}
FILES = {"alpaca": "alpaca_data_1k.json", "gsm8k": "train.jsonl", "shakespeare": "input.txt",
         "pydocs": "python311_docs.jsonl.gz"}  # the file named when none is found


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", ROOT / "data" / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(name, tmp_path, model_dir, out="out"):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    MAKERS[name](src)
    out = tmp_path / out
    meta = load_script(name).main(["--src", str(src), "--out_dir", str(out), "--model", str(model_dir)])
    assert meta == json.loads((out / "meta.json").read_text())
    return meta, out


def read_split(out, meta, split):
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    assert len(ids) == meta["splits"][split]
    mask = np.fromfile(out / f"{split}_mask.bin", dtype=np.uint8) if meta["masked"] else None
    assert mask is None or (len(mask) == len(ids) and set(np.unique(mask)) <= {0, 1})
    return ids, mask


def chat_examples(tok, ids, mask):
    """Cuts an instruction stream into examples (each starts with <|im_start|>system) and checks each one:
    prompt part = the chat-formatted prompt, masked-in tokens = response + <|im_end|>, last token "\\n" (mask 0),
    tokens = the joint encoding. Returns [(prompt, response)]."""
    im_start, system = tok.specials["<|im_start|>"], tok.encode("system")[0]
    starts = [i for i in range(len(ids) - 1) if ids[i] == im_start and ids[i + 1] == system] + [len(ids)]
    assert starts[0] == 0
    found = []
    for a, b in zip(starts, starts[1:]):
        e, m = ids[a:b].tolist(), mask[a:b]
        k = int(np.argmax(m))  # first response token
        assert m[k] == 1 and m[k:-1].all() and m[-1] == 0 and e[-1] == tok.encode("\n")[0]
        prompt_text, response = tok.decode(e[:k]), tok.decode(e[k:-1])
        assert response.endswith("<|im_end|>")
        user = prompt_text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert prompt_text == tok.apply_chat([{"role": "user", "content": user}], add_generation_prompt=True)
        assert e[:k] == tok.encode(prompt_text)
        assert e == tok.encode(prompt_text + response + "\n")
        found.append((user, response.removesuffix("<|im_end|>")))
    return found


def test_alpaca(tmp_path, model_dir, tokenizer):
    meta, out = prepare("alpaca", tmp_path, model_dir)
    assert meta["dtype"] == "uint16" and meta["masked"] is True and meta["vocab_size"] == tokenizer.n_vocab
    assert meta["examples"] == {"train": 3, "val": 3}  # 5% / at least 50, but never more than half
    found = []
    for split in ("train", "val"):
        ids, mask = read_split(out, meta, split)
        found += chat_examples(tokenizer, ids, mask)
    want = [(r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""), r["output"]) for r in ALPACA]
    assert sorted(found) == sorted(want)


def test_gsm8k(tmp_path, model_dir, tokenizer):
    meta, out = prepare("gsm8k", tmp_path, model_dir)
    assert meta["examples"] == {"train": 3, "val": 2, "test": 3} and meta["masked"] is True
    found = {split: chat_examples(tokenizer, *read_split(out, meta, split)) for split in ("train", "val", "test")}
    assert sorted(found["train"] + found["val"]) == sorted((r["question"], r["answer"]) for r in GSM8K_TRAIN)
    assert found["test"] == [(r["question"], r["answer"]) for r in GSM8K_TEST]  # file order, "#### N" kept


def test_shakespeare(tmp_path, model_dir, tokenizer):
    meta, out = prepare("shakespeare", tmp_path, model_dir)
    assert meta["masked"] is False and meta["dtype"] == "uint16"
    assert not list(out.glob("*_mask.bin"))
    n = int(0.9 * len(SHAKESPEARE))
    assert tokenizer.decode(read_split(out, meta, "train")[0].tolist()) == SHAKESPEARE[:n]
    assert tokenizer.decode(read_split(out, meta, "val")[0].tolist()) == SHAKESPEARE[n:]


def test_pydocs(tmp_path, model_dir, tokenizer):
    meta, out = prepare("pydocs", tmp_path, model_dir)
    assert meta["masked"] is False and meta["examples"] == {"train": 3, "val": 1}
    eot = tokenizer.specials["<|endoftext|>"]
    pages = []
    for split in ("train", "val"):
        ids = read_split(out, meta, split)[0].tolist()
        assert ids[-1] == eot and ids.count(eot) == meta["examples"][split]  # a literal "<|endoftext|>" stays text
        cuts = [-1] + [i for i, t in enumerate(ids) if t == eot]
        pages += [tokenizer.decode(ids[a + 1:b]) for a, b in zip(cuts, cuts[1:])]
    assert sorted(pages) == sorted(p["text"] for p in PAGES)


def test_encode_text_in_pieces_equals_whole(tokenizer):
    text = "".join(PAGES[i]["text"] for i in (0, 1, 3)) + "x\n \n1\n\n\n  y\t\n.z\n2\n" * 5 + "tail"
    whole = tokenizer.encode(text, allow_special=False)
    for piece in range(1, 60):
        assert common.encode_text(tokenizer, text, piece=piece) == whole


def test_chat_example_boundary_fallback(tokenizer):
    """A response starting with "\\n" merges with the prompt's last "\\n": tokens follow the joint encoding,
    and the mask covers the tokens wholly inside the response."""
    prompt = tokenizer.apply_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids, mask = common.chat_example(tokenizer, "Hi", "\n\nHello")
    assert tokenizer.encode(prompt) + tokenizer.encode("\n\nHello<|im_end|>\n") != ids  # the case exercised
    assert ids == tokenizer.encode(prompt + "\n\nHello<|im_end|>\n")
    assert mask[-1] == 0 and mask[-2] == 1
    masked_in = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert masked_in.endswith("Hello<|im_end|>") and "\n\nHello<|im_end|>".endswith(masked_in)


@pytest.mark.parametrize("name", MAKERS)
def test_deterministic(tmp_path, model_dir, name):
    _, out1 = prepare(name, tmp_path, model_dir, "out1")
    _, out2 = prepare(name, tmp_path, model_dir, "out2")
    files = sorted(p.name for p in out1.iterdir())
    assert files == sorted(p.name for p in out2.iterdir()) and "meta.json" in files
    assert all((out1 / f).read_bytes() == (out2 / f).read_bytes() for f in files)


@pytest.mark.parametrize("name", MAKERS)
def test_missing_or_empty_source(tmp_path, model_dir, name):
    script, src, out = load_script(name), tmp_path / "src", tmp_path / "out"
    src.mkdir()
    argv = ["--src", str(src), "--out_dir", str(out), "--model", str(model_dir)]
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    assert "not found" in str(e.value.code) and str(src / FILES[name]) in str(e.value.code)
    empty = src / ("alpaca_data.json" if name == "alpaca" else FILES[name])
    empty.write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    assert "empty file" in str(e.value.code) and str(empty) in str(e.value.code)
    assert not out.exists()


def test_bad_model(tmp_path):
    make_shakespeare(tmp_path)
    with pytest.raises(SystemExit) as e:
        load_script("shakespeare").main(["--src", str(tmp_path), "--out_dir", str(tmp_path / "out"),
                                         "--model", str(tmp_path / "no-such-model")])
    assert "no-such-model" in str(e.value.code) and "tokenizer.json" in str(e.value.code)


def test_large_vocab_uses_uint32(tmp_path):
    tok = Namespace(n_vocab=70_000)
    args = Namespace(out_dir=tmp_path, model=tmp_path, t0=0.0, dataset="big")
    meta = common.write_outputs(args, tok, {"train": [[69_999, 1]], "val": [[2]]}, tmp_path)
    assert meta["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "train.bin", dtype=np.uint32).tolist() == [69_999, 1]


def test_old_option_spellings_are_refused(tmp_path, capsys):
    for argv, message in ((["--out", str(tmp_path)], "--out is now --out_dir"),
                          (["--out_d", str(tmp_path)], "unrecognized arguments: --out_d")):  # no abbreviations
        with pytest.raises(SystemExit) as e:
            load_script("gsm8k").main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.fixture
def own_manifest(tmp_path, monkeypatch):
    """data/fetch.py with a manifest of our own (no SHA-256s, downloads from a closed port), a fresh cache and
    DATA_MIRROR = tmp_path/mirror."""
    def use(dataset, *names):
        files = {n: {"url": "http://127.0.0.1:9/" + n, "sha256": None, "size": None} for n in names}
        (tmp_path / "manifest.json").write_text(json.dumps({dataset: {"files": files}}))
        (tmp_path / "mirror" / dataset).mkdir(parents=True, exist_ok=True)
        return tmp_path / "cache" / dataset, tmp_path / "mirror" / dataset
    monkeypatch.setattr(F, "MANIFEST", tmp_path / "manifest.json")
    monkeypatch.setattr(F, "CACHE", tmp_path / "cache")
    monkeypatch.setenv("DATA_MIRROR", str(tmp_path / "mirror"))
    return use


def test_alpaca_takes_the_full_file_else_the_sample(tmp_path, model_dir, own_manifest, capsys):
    cache, mirror = own_manifest("alpaca", "alpaca_data.json", "alpaca_data_1k.json")
    (mirror / "alpaca_data_1k.json").write_text(json.dumps(ALPACA[:4]), encoding="utf-8")
    script, argv = load_script("alpaca"), ["--out_dir", str(tmp_path / "out"), "--model", str(model_dir)]
    meta = script.main(argv)
    assert f"raw data: {mirror / 'alpaca_data_1k.json'}\n" in capsys.readouterr().out
    assert meta["source"].endswith("mirror/alpaca/alpaca_data_1k.json") and sum(meta["examples"].values()) == 4
    cache.mkdir(parents=True)
    (cache / "alpaca_data.json").write_text(json.dumps(ALPACA), encoding="utf-8")
    meta = script.main(argv)
    assert f"raw data: {cache / 'alpaca_data.json'}\n" in capsys.readouterr().out
    assert meta["source"].endswith("cache/alpaca/alpaca_data.json") and sum(meta["examples"].values()) == 6


def test_no_raw_data_is_one_line_before_any_work(tmp_path, own_manifest):
    own_manifest("gsm8k", "train.jsonl", "test.jsonl")
    with pytest.raises(F.DataUnavailable) as e:
        load_script("gsm8k").main(["--out_dir", str(tmp_path / "out"), "--model", str(tmp_path / "no-model")])
    assert str(e.value).startswith("gsm8k/train.jsonl: not in ") and "DATA_MIRROR" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_pydocs_tarball_gives_the_pages_of_the_jsonl_form(tmp_path, model_dir):
    """CPython's source tarball (Doc/**/*.rst but Doc/README.rst) and the jsonl of the same pages, sorted by
    path as the mirror's is, make the same token files."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    with gzip.open(tmp_path / "a" / "pages.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(p) + "\n" for p in sorted(PAGES, key=lambda p: p["path"])))
    members = {"Doc/" + p["path"]: p["text"] for p in PAGES}
    members.update({"Doc/README.rst": "How to build the docs", "Lib/idlelib/help.rst": "no page", "Doc/conf.py": "x"})
    with tarfile.open(tmp_path / "b" / "Python-3.11.2.tar.xz", "w:xz") as tar:
        for name, text in members.items():
            member = tarfile.TarInfo("Python-3.11.2/" + name)
            member.size = len(text.encode("utf-8"))
            tar.addfile(member, io.BytesIO(text.encode("utf-8")))
    script, model = load_script("pydocs"), ["--model", str(model_dir)]
    meta_a = script.main(["--src", str(tmp_path / "a" / "pages.jsonl.gz"), "--out_dir", str(tmp_path / "out_a"), *model])
    meta_b = script.main(["--src", str(tmp_path / "b"), "--out_dir", str(tmp_path / "out_b")] + model)
    assert meta_a["examples"] == meta_b["examples"] == {"train": 3, "val": 1}
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "out_a" / name).read_bytes() == (tmp_path / "out_b" / name).read_bytes()


def test_shakespeare_from_the_listed_file(tmp_path, model_dir, tokenizer):
    path = raw_file("tinyshakespeare", "input.txt")
    meta = load_script("shakespeare").main(["--out_dir", str(tmp_path / "out"), "--model", str(model_dir)])
    assert (ROOT / meta["source"]).resolve() == path.resolve()
    text = path.read_text(encoding="utf-8")
    n = int(0.9 * len(text))
    assert tokenizer.decode(read_split(tmp_path / "out", meta, "train")[0].tolist()) == text[:n]
    assert tokenizer.decode(read_split(tmp_path / "out", meta, "val")[0].tolist()) == text[n:]

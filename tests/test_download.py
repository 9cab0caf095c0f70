"""download.py: the Hugging Face Hub downloader against a local fake Hub (http.server on 127.0.0.1,
with Range requests), and GGUF -> HF folder conversion of a tiny GGUF written with llama.cpp's own
`gguf` writer, q/k in llama.cpp's permuted order."""
import http.server
import json
import threading

import pytest
import torch

import download
from checkpoint import SafetensorsError, load_safetensors, save_safetensors
from conftest import tiny_model
from model import Transformer
from test_tokenizer import bytes_to_unicode
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------- a tiny byte-level BPE
BYTE_CHAR = bytes_to_unicode()
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w"]
SPECIALS = ["<|im_start|>", "<|im_end|>"]
TOKENS = [BYTE_CHAR[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + SPECIALS  # id = rank
HELLO, SPACE_W, IM_START, IM_END = 259, 260, 261, 262
VOCAB = len(TOKENS)


def write_tokenizer_files(folder):
    added = [{"id": TOKENS.index(s), "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s in SPECIALS]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": {t: i for i, t in enumerate(TOKENS)}, "merges": MERGES}
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": byte_level, "post_processor": byte_level, "decoder": byte_level, "model": model}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}))


def check_tokenizer(folder):
    """The folder's tokenizer gives the BPE answer worked out by hand (and HF's, where installed)."""
    tok = Tokenizer.from_pretrained(folder)
    hello_world = [HELLO, SPACE_W, *(TOKENS.index(c) for c in "orld")]
    assert tok.encode("hello world") == hello_world
    assert tok.encode("<|im_start|>hello<|im_end|>") == [IM_START, HELLO, IM_END]
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        return
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ["hello world", "hell of a well", " w  ww\n\tHELLO 123 ü€😀", "<|im_end|>hello<|im_start|>"]:
        assert tok.encode(text) == hf.encode(text).ids, text


# ----------------------------------------------------------------------------- a fake Hugging Face Hub
class FakeHub(http.server.BaseHTTPRequestHandler):
    """Serves server.files[path] (path = /owner/name/resolve/revision/file) like the Hub: 404 for
    unknown files, 401 for gated repos without the right token, 206 for Range requests."""

    def do_GET(self):
        hub = self.server
        hub.requests.append({"path": self.path, "range": self.headers.get("Range"),
                             "auth": self.headers.get("Authorization")})
        for prefix, token in hub.gated.items():
            if self.path.startswith(prefix) and self.headers.get("Authorization") != f"Bearer {token}":
                return self.send_error(401)
        body = hub.files.get(self.path)
        if body is None:
            return self.send_error(404)
        start, status = 0, 200
        if self.headers.get("Range") and hub.honour_range:
            start = int(self.headers["Range"].removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                return self.send_error(416)
            status = 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.files, server.requests, server.gated, server.honour_range = {}, [], {}, True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    monkeypatch.setattr(download, "HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.shutdown()
    server.server_close()


def publish_repo(hub, repo, folder, revision="main"):
    for f in folder.iterdir():
        hub.files[f"/{repo}/resolve/{revision}/{f.name}"] = f.read_bytes()


def tiny_repo(folder, sharded=False):
    """A model folder as a Hub repo holds it; returns the model whose weights it holds (fp32)."""
    folder.mkdir()
    model = tiny_model(seed=11, vocab_size=VOCAB, tie_word_embeddings=False)
    model.save_pretrained(folder, dtype=torch.float32)
    write_tokenizer_files(folder)
    if sharded:
        state = load_safetensors(folder / "model.safetensors")
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
        for shard, keys in shards.items():
            save_safetensors({k: state[k].clone() for k in keys}, folder / shard)
        index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "model.safetensors").unlink()
    return model


def assert_same_logits(folder, model):
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(folder)(idx)[0], model(idx)[0])


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_download_gives_a_folder_that_loads(tmp_path, hub, sharded):
    model = tiny_repo(tmp_path / "src", sharded)
    publish_repo(hub, "owner/tiny", tmp_path / "src", revision="v1.0")
    out = download.download_hub("owner/tiny", tmp_path / "models" / "tiny", revision="v1.0")
    for f in (tmp_path / "src").iterdir():
        if f.name != "model.safetensors.index.json":  # the index is re-written as JSON
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    if sharded:
        index = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())
        assert json.loads((out / "model.safetensors.index.json").read_text()) == index
    assert_same_logits(out, model)
    check_tokenizer(out)


@pytest.mark.parametrize("server_range", ["honoured", "ignored", "part-complete"])
def test_partial_download_is_resumed(tmp_path, hub, server_range):
    tiny_repo(tmp_path / "src")
    publish_repo(hub, "owner/tiny", tmp_path / "src")
    full = (tmp_path / "src" / "model.safetensors").read_bytes()
    out = tmp_path / "models" / "tiny"
    stage = out.parent / (out.name + ".partial")  # where an interrupted download left its files
    stage.mkdir(parents=True)
    have = len(full) if server_range == "part-complete" else len(full) // 3
    (stage / "model.safetensors.partial").write_bytes(full[:have])
    hub.honour_range = server_range != "ignored"
    download.download_hub("owner/tiny", out)
    weights = [r for r in hub.requests if r["path"].endswith("/model.safetensors")]
    assert [r["range"] for r in weights] == [f"bytes={have}-"]
    assert (out / "model.safetensors").read_bytes() == full
    assert not stage.exists()


def test_missing_repo_is_a_404(tmp_path, hub):
    with pytest.raises(RuntimeError, match="config.json: HTTP 404 not found"):
        download.download_hub("owner/nothing-here", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gated_repo_asks_for_hf_token(tmp_path, hub, monkeypatch):
    model = tiny_repo(tmp_path / "src")
    publish_repo(hub, "owner/gated", tmp_path / "src")
    hub.gated["/owner/gated/"] = "hf_secret"
    with pytest.raises(RuntimeError, match="HTTP 401 .*set HF_TOKEN"):
        download.download_hub("owner/gated", tmp_path / "out")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert_same_logits(download.download_hub("owner/gated", tmp_path / "out"), model)
    assert hub.requests[-1]["auth"] == "Bearer hf_secret"


@pytest.mark.parametrize("shard", ["../evil.safetensors", "ABSOLUTE"])
def test_index_pointing_outside_the_folder_is_refused(tmp_path, hub, shard):
    tiny_repo(tmp_path / "src")
    evil = tmp_path / "elsewhere" / "evil.safetensors"
    shard = str(evil) if shard == "ABSOLUTE" else shard
    publish_repo(hub, "owner/evil", tmp_path / "src")
    index = json.dumps({"weight_map": {"w": shard}}).encode()
    hub.files["/owner/evil/resolve/main/model.safetensors.index.json"] = index
    hub.files["/owner/evil/resolve/main/" + shard] = b"payload"
    with pytest.raises(SafetensorsError, match="points outside"):
        download.download_hub("owner/evil", tmp_path / "models" / "evil")
    assert not (tmp_path / "models" / "evil").exists() and not evil.exists()
    assert [p.name for p in tmp_path.rglob("evil.safetensors")] == []


def test_second_download_says_already_there(tmp_path, hub, capsys):
    tiny_repo(tmp_path / "src")
    publish_repo(hub, "owner/tiny", tmp_path / "src")
    out = download.download_hub("owner/tiny", tmp_path / "out")
    hub.requests.clear()
    capsys.readouterr()
    assert download.download_hub("owner/tiny", tmp_path / "out") == out
    assert "already there" in capsys.readouterr().out
    assert hub.requests == []


def test_bad_repo_names_are_refused(tmp_path):
    for repo in ("no-slash", "a/b/c", "../x"):
        with pytest.raises(ValueError, match="OWNER/NAME"):
            download.download_hub(repo, tmp_path / "out")


def test_default_model_is_not_fetched_twice(tmp_path, capsys, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(download.subprocess, "run", lambda *a, **k: pytest.fail("tried to download again"))
    assert download.default_model(tmp_path) == tmp_path
    assert "already there" in capsys.readouterr().out


# ----------------------------------------------------------------------------- GGUF
def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (HF halves -> interleaved pairs)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensor_name(hf_name):
    if hf_name.startswith("model.layers."):
        layer, module = hf_name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
        return f"blk.{layer}.{GGUF_NAMES[module]}.weight"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]


def write_gguf(path, model, arch="llama", tokenizer_model="gpt2", pre="smollm"):
    import gguf
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (VOCAB - len(SPECIALS)) + [3] * len(SPECIALS))  # NORMAL, CONTROL
    w.add_token_merges(MERGES)
    w.add_bos_token_id(IM_START)
    w.add_eos_token_id(IM_END)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.float()
        if name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, cfg.n_head)
        elif name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, cfg.n_kv_head)
        w.add_tensor(gguf_tensor_name(name), t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_conversion_round_trips_the_weights(tmp_path, tied):
    pytest.importorskip("gguf")
    model = tiny_model(seed=12, vocab_size=VOCAB, rope_theta=5000.0, tie_word_embeddings=tied)
    write_gguf(tmp_path / "tiny.gguf", model)
    download.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["hidden_size"], config["num_key_value_heads"], config["head_dim"], config["rope_theta"],
            config["vocab_size"], config["tie_word_embeddings"]) == (32, 2, 8, 5000.0, VOCAB, tied)
    state = load_safetensors(tmp_path / "out" / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert sorted(state) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(state[name], t.bfloat16()), name  # exact, after rounding to bf16
    loaded = Transformer.from_pretrained(tmp_path / "out")
    assert loaded.config.rms_norm_eps == model.config.rms_norm_eps
    check_tokenizer(tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    (dict(arch="gpt2"), "GGUF architecture is 'gpt2'; only 'llama' is supported"),
    (dict(tokenizer_model="llama"), "GGUF tokenizer model 'llama' is not byte-level BPE"),
    (dict(pre="qwen2"), "GGUF pre-tokenizer 'qwen2' is not supported"),
])
def test_gguf_conversion_refuses_what_it_cannot_represent(tmp_path, change, message):
    pytest.importorskip("gguf")
    write_gguf(tmp_path / "x.gguf", tiny_model(vocab_size=VOCAB), **change)
    with pytest.raises(ValueError, match=message):
        download.convert_gguf(tmp_path / "x.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_old_option_spellings_are_refused(tmp_path, capsys):
    for argv, message in ((["owner/tiny", "--out", str(tmp_path / "m")], "--out is now --out_dir"),
                          (["owner/tiny", "--out_d", str(tmp_path / "m")], "unrecognized arguments: --out_d")):
        with pytest.raises(SystemExit) as e:
            download.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

"""The hand-written safetensors reader/writer: round trips, the reference `safetensors` library (where
installed) reading our files and writing files we read, and every malformed file refused with a message
naming the file and the problem. Then model-folder loading errors and atomic writes."""
import json
import os
import struct

import pytest
import torch

from checkpoint import (SafetensorsError, atomic_open, load_safetensors, load_weights, read_header,
                        save_safetensors)
from conftest import tiny_model
from model import Transformer


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, 2, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, 2, generator=g).double(),
        "i64": torch.tensor([-(2 ** 62), 0, 2 ** 62]),
        "i32": torch.tensor([[-5, 7]], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0),
        "empty_2d": torch.zeros(3, 0, dtype=torch.bfloat16),
        "transposed": torch.arange(6.0).reshape(2, 3).t(),  # not contiguous
    }


def assert_same_tensors(got, expected):
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def test_round_trip_every_dtype_and_empty_tensors(tmp_path):
    tensors = sample_tensors()
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata={"format": "pt", "step": 3})
    assert_same_tensors(load_safetensors(tmp_path / "x.safetensors"), tensors)
    header, start, _ = read_header(tmp_path / "x.safetensors")
    assert header["__metadata__"] == {"format": "pt", "step": "3"}
    assert start % 8 == 0  # tensor data starts aligned


def test_loaded_tensors_are_copy_on_write(tmp_path):
    save_safetensors({"w": torch.ones(4)}, tmp_path / "x.safetensors")
    load_safetensors(tmp_path / "x.safetensors")["w"].add_(1)  # changes memory, never the file
    assert torch.equal(load_safetensors(tmp_path / "x.safetensors")["w"], torch.ones(4))


def test_reference_library_reads_our_files_and_we_read_its(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = sample_tensors()
    save_safetensors(tensors, tmp_path / "ours.safetensors")
    assert_same_tensors(st.load_file(tmp_path / "ours.safetensors"), {k: v.contiguous() for k, v in tensors.items()})
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors")
    assert_same_tensors(load_safetensors(tmp_path / "theirs.safetensors"), tensors)


def test_sharded_index(tmp_path):
    tensors = sample_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:6], "model-00002-of-00002.safetensors": names[6:]}
    for shard, keys in shards.items():
        save_safetensors({k: tensors[k] for k in keys}, tmp_path / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_tensors(load_weights(tmp_path), tensors)

    index["weight_map"]["ghost"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SafetensorsError, match=r"model.safetensors.index.json: tensors listed but absent .*ghost"):
        load_weights(tmp_path)


def test_sharded_index_refuses_shards_outside_the_folder(tmp_path):
    (tmp_path / "m").mkdir()
    save_safetensors({"w": torch.ones(2)}, tmp_path / "evil.safetensors")
    for shard in ("../evil.safetensors", str(tmp_path / "evil.safetensors")):
        (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
        with pytest.raises(SafetensorsError, match="points outside"):
            load_weights(tmp_path / "m")


def test_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_weights(tmp_path)


# ----------------------------------------------------------------------------- malformed files
def write_raw(path, header, data=b"", header_len=None):
    """A safetensors file from parts: header (dict or raw bytes), data bytes, and optionally a lying length."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def truncated(path):
    save_safetensors({"a": torch.ones(4), "b": torch.ones(4)}, path)
    path.write_bytes(path.read_bytes()[:-5])
    return path


BAD_FILES = {
    "truncated data": (truncated, r"data ends at byte 32 but the file has only 27 bytes .*truncated"),
    "too short": (lambda p: (p.write_bytes(b"\x01\x02"), p)[1], "file is 2 bytes, too short"),
    "header past end": (lambda p: write_raw(p, {}, header_len=1000), "header length 1000 runs past the end"),
    "oversized header": (lambda p: write_raw(p, {}, header_len=200_000_000), "header length 200000000 is over"),
    "offsets outside data": (lambda p: write_raw(p, {"a": entry(offsets=(16, 24))}, bytes(8)),
                             "tensor 'a': data ends at byte 24 but the file has only 8 bytes"),
    "overlap": (lambda p: write_raw(p, {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, bytes(12)),
                r"tensors 'a' \[0, 8\] and 'b' \[4, 12\] overlap"),
    "unknown dtype": (lambda p: write_raw(p, {"a": entry(dtype="F8_E4M3", offsets=(0, 2))}, bytes(2)),
                      "tensor 'a': unknown dtype 'F8_E4M3'"),
    "bad json": (lambda p: write_raw(p, b'{"a": {"dtype": "F32",', bytes(8)), "header is not valid JSON"),
    "not an object": (lambda p: write_raw(p, b"[1, 2]"), "header is list, expected a JSON object"),
    "missing fields": (lambda p: write_raw(p, {"a": {"dtype": "F32"}}), "entry needs dtype, shape and data_offsets"),
    "wrong byte count": (lambda p: write_raw(p, {"a": entry(shape=(2, 2), offsets=(0, 12))}, bytes(16)),
                         r"data_offsets \[0, 12\] hold 12 bytes, shape \[2, 2\] F32 needs 16"),
    "reversed offsets": (lambda p: write_raw(p, {"a": entry(offsets=(8, 0))}, bytes(8)), r"data_offsets \[8, 0\]"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_malformed_file_is_refused_naming_file_and_problem(tmp_path, case):
    make, problem = BAD_FILES[case]
    path = make(tmp_path / "bad.safetensors")
    with pytest.raises(SafetensorsError, match=problem) as err:
        load_safetensors(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- model folders
def saved_tiny_model(folder, **kw):
    model = tiny_model(seed=7, **kw)
    model.save_pretrained(folder, dtype=torch.float32)
    return model


def edit_weights(folder, change):
    state = {k: v.clone() for k, v in load_safetensors(folder / "model.safetensors").items()}
    change(state)
    save_safetensors(state, folder / "model.safetensors")


def test_model_folder_round_trip(tmp_path):
    model = saved_tiny_model(tmp_path / "fp32", tie_word_embeddings=False)
    loaded = Transformer.from_pretrained(tmp_path / "fp32")
    idx = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    model.save_pretrained(tmp_path / "bf16")  # the default: bf16 on disk
    for name, t in load_safetensors(tmp_path / "bf16" / "model.safetensors").items():
        assert torch.equal(t, model.state_dict()[name].bfloat16()), name


def test_missing_tensor_is_named(tmp_path):
    saved_tiny_model(tmp_path)
    edit_weights(tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        Transformer.from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    saved_tiny_model(tmp_path)
    edit_weights(tmp_path, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.self_attn.k_proj.weight has shape \(8, 32\), "
                                         r"config.json implies \(16, 32\)"):
        Transformer.from_pretrained(tmp_path)


def test_nan_weights_warn(tmp_path):
    saved_tiny_model(tmp_path)
    edit_weights(tmp_path, lambda s: s["model.norm.weight"].__setitem__(3, float("nan")))
    with pytest.warns(UserWarning, match="tensor model.norm.weight contains NaN"):
        Transformer.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_open_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_open(path, "w") as f:
            f.write("half of the new conte")
            raise RuntimeError("disk on fire")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left behind


def test_atomic_open_replaces_on_success(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with atomic_open(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["state.json"]


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(SafetensorsError, match="tensor 'z': dtype torch.complex64 cannot be stored"):
        save_safetensors({"w": torch.zeros(3), "z": torch.zeros(2, dtype=torch.complex64)}, path)
    assert path.read_bytes() == before

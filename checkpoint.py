"""
Safetensors, read and written by hand: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then raw
little-endian tensor bytes. Reading is mmap'd, so a 1 GB file costs no memory until touched.
Also: atomic file writes, used by everything that saves (a crash never leaves half a file).
"""
import json
import mmap
import os
import tempfile
import warnings
from pathlib import Path

import torch

UMASK = os.umask(0)
os.umask(UMASK)
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation refuses headers over 100 MB


class SafetensorsError(ValueError):
    pass


def read_header(path):
    """Returns (header dict, data start offset, data length), after checking every entry."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise SafetensorsError(f"{path}: file is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER:
            raise SafetensorsError(f"{path}: header length {n} is over the {MAX_HEADER}-byte limit")
        if 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is {type(header).__name__}, expected a JSON object")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise SafetensorsError(f"{where}: entry needs dtype, shape and data_offsets, got {info!r}")
        if info["dtype"] not in DTYPES:
            raise SafetensorsError(f"{where}: unknown dtype {info['dtype']!r} (known: {', '.join(DTYPES)})")
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        expect = numel * DTYPES[info["dtype"]].itemsize
        if not 0 <= begin <= end or end - begin != expect:
            raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, "
                                   f"shape {info['shape']} {info['dtype']} needs {expect}")
        if end > data_len:
            raise SafetensorsError(f"{where}: data ends at byte {end} but the file has only {data_len} "
                                   f"bytes of data (truncated file?)")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SafetensorsError(f"{path}: tensors {n0!r} [{b0}, {e0}] and {n1!r} [{b1}, {e1}] overlap")
    return header, 8 + n, data_len


def load_safetensors(path):
    """{name: tensor} backed by a private (copy-on-write) mmap of the file: nothing is read yet."""
    header, start, _ = read_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.path.getsize(path) else b""
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, (begin, end) = DTYPES[info["dtype"]], info["data_offsets"]
        t = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=start + begin) \
            if end > begin else torch.empty(0, dtype=torch.uint8)
        out[name] = t.view(dtype).reshape(info["shape"])
    return out


def load_weights(folder):
    """All tensors of a model folder: model.safetensors, or the shards listed in its index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        out = {}
        for shard in sorted(set(weight_map.values())):
            out.update(load_safetensors(safe_child(folder, shard)))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise SafetensorsError(f"{index}: tensors listed but absent from the shards: {missing[:5]}")
        return out
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    return load_safetensors(folder / "model.safetensors")


def assign_weights(module, state, dtype, device, where, skip=()):
    """Put the tensors of `state` into `module` (built on the meta device) by assignment, each checked against the
    shape the module expects; a non-finite tensor is warned about."""
    expected = {k: v for k, v in module.state_dict().items() if k not in skip}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{where}: missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise ValueError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, config.json implies "
                             f"{tuple(ref.shape)}")
        if not torch.isfinite(state[k]).all():
            warnings.warn(f"{where}: tensor {k} contains NaN or Inf values")
    module.load_state_dict({k: state[k].to(device=device, dtype=dtype) for k in expected}, strict=False, assign=True)


def read_json(path, what):
    """A JSON file, or one line saying why not (`what`: the hint when it is missing)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{Path(path).parent}: no {Path(path).name} ({what})")
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def safe_child(folder, name):
    """folder/name, refusing names that would escape the folder (absolute, `..`)."""
    p = (Path(folder) / name).resolve()
    if Path(name).is_absolute() or Path(folder).resolve() not in p.parents:
        raise SafetensorsError(f"refusing file name {name!r}: it points outside {folder}")
    return p


def save_safetensors(tensors, path, metadata=None):
    """Writes {name: tensor} atomically. Tensors are written contiguous, in name order."""
    header, offset = {}, 0
    items = sorted(tensors.items())
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so tensor data starts 8-byte aligned
    with atomic_open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, t in items:
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


class atomic_open:
    """`with atomic_open(path, "w") as f:` writes path.tmp-XXXX, fsyncs, then renames over path."""

    def __init__(self, path, mode="w"):
        self.path = Path(path)
        self.mode = mode

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".tmp-")
        self.f = os.fdopen(fd, self.mode)
        return self.f

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.f.flush()
            os.fsync(self.f.fileno())
        self.f.close()
        if exc_type is None:
            os.chmod(self.tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file ordinary permissions
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        return False


def save_json(obj, path):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")

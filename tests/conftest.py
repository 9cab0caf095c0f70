"""Shared fixtures: the default model (loaded once per session) and tiny random models."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"
GOLDEN = ROOT / "tests" / "golden" / "smollm2_135m_instruct_reference.json"

from model import ModelConfig, Transformer  # noqa: E402


def _need_model():
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.fail(f"{MODEL_DIR} is missing: run `python download.py` first")


@pytest.fixture(scope="session")
def model_dir():
    _need_model()
    return MODEL_DIR


@pytest.fixture(scope="session")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="session")
def model_fp32(model_dir):
    return Transformer.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from tokenizer import Tokenizer
    return Tokenizer.from_pretrained(model_dir)


def raw_file(dataset, *names):
    """The path of a raw data file (data/fetch.py: cache, DATA_MIRROR, download), or skip the test naming it."""
    from data.fetch import DataUnavailable, fetch
    try:
        return fetch(dataset, *names)
    except DataUnavailable as e:
        pytest.skip(f"needs the data set {dataset!r} ({'/'.join(names)}): {str(e).split('. ')[0]}")


def tiny_config(**kw):
    """A small llama (2 layers, GQA 4/2 heads) for fast equivalence tests."""
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, n_layer=2, n_head=4, n_kv_head=2,
                head_dim=8, max_seq_len=64, rope_theta=10000.0, tie_word_embeddings=True)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()

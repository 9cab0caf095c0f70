"""bench.py measures what it says: both sides count the same loss positions, run the same computation, and the
model FLOPs behind MFU equal torch's own count of the step's matmuls."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
from conftest import tiny_model
from lora import ALL_TARGETS, apply_lora


@pytest.mark.parametrize("loss", ["masked", "all"])
def test_batch_counts_the_same_positions_for_both_sides(loss):
    x, y, labels, counted = bench.batch(97, 3, 16, loss, 0.5, "cpu")
    ours = y[y != -1]                         # our targets sit at the position that predicts them
    theirs = labels[:, 1:][labels[:, 1:] != -100]  # transformers shifts the labels itself
    per_row = 7 if loss == "masked" else 15  # positions 8..14 or 0..14: the last one predicts nothing
    assert torch.equal(ours, theirs) and counted == len(ours) == 3 * per_row


def test_step_flops_equal_torch_flop_counter():
    model = tiny_model()
    apply_lora(model, ALL_TARGETS, r=4, alpha=8)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    B, T = 2, 16
    x, y, _, counted = bench.batch(97, B, T, "masked", 0.5, "cpu")
    with FlopCounterMode(display=False) as counter:
        model.train()(x, y)[1].backward()
    cfg = model.config
    # The counter sees no attention (CPU SDPA) and layer 0's q/k/v never get an input gradient (the embedding is
    # frozen); step_flops counts both, as model FLOPs do.
    attention = 12 * cfg.n_head * cfg.head_dim * T * cfg.n_layer * B * T
    attn0 = model.model.layers[0].self_attn
    qkv0 = sum(2 * B * T * (m.weight.numel() + m.r * m.in_features) for m in (attn0.q_proj, attn0.k_proj, attn0.v_proj))
    assert bench.step_flops(model, B, T, counted) - attention - qkv0 == counter.get_total_flops()


def test_ours_and_theirs_run_the_same_step(model_dir):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    x, y, labels, _ = bench.batch(49152, 1, 32, "masked", 0.5, "cpu")
    losses = {}
    for side in ("ours", "theirs"):  # LoRA's B starts at zero: both first losses are the base model's
        step, _, _ = bench.training_step(side, "default", torch.float32, "cpu", model_dir, 8, x, y, labels, False)
        losses[side] = step().item()
    assert losses["ours"] == pytest.approx(losses["theirs"], abs=1e-4)


def test_rank_pruning_row_times_real_events(model_dir):
    args = bench.parse_args(["--device", "cpu", "--model", str(model_dir), "--seq", "32", "--k1", "10",
                             "--steps", "1", "--repeats", "2", "--warmup", "1"])
    row = bench.rank_pruning_row(args, "default", "float32", torch.float32, 1, 16, "masked", "eager", 49152)
    # every timed event call removed K2 = 2 components of every adapter: 3 calls, 16 -> 10
    assert row["events"] == 3 and row["ranks_after"] == [10]


def test_loraprune_row_times_real_masking(model_dir):
    args = bench.parse_args(["--device", "cpu", "--model", str(model_dir), "--seq", "32", "--steps", "1",
                             "--repeats", "1", "--warmup", "0"])
    row = bench.loraprune_row(args, "default", "float32", torch.float32, 1, 8, "masked", "eager", 49152)
    # mid-schedule of 20%: some heads and channels are masked, and the update was timed apart from it
    assert row["masked_params"] > 0 and row["sides"]["update"]["ms"] > 0 and row["overhead"] > 0


def test_a_run_cut_short_keeps_its_times(model_dir, tmp_path, monkeypatch):
    def cut(spec):  # as a time limit stopping the run while a side's memory is measured
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "memory", cut)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--model", str(model_dir), "--rows", "train", "--dtype", "float32", "--batch", "1",
                    "--seq", "16", "--loss", "masked", "--sides", "ours", "--steps", "1", "--repeats", "1",
                    "--warmup", "0", "--output", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["kind"] == "train" and row["sides"]["ours"]["ms"] > 0 and "memory" not in row["sides"]["ours"]

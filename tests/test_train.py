"""train.py end to end on a tiny model folder and tiny random token bins (never data/ or models/):
the loss mask, exact resume after SIGKILL, DDP == one process, configurator errors."""
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, tiny_model
from configurator import configure, settings

VOCAB, T = 97, 32


def write_data(folder, train, val, train_mask=None, val_mask=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr, dt in (("train", train, np.uint16), ("val", val, np.uint16),
                          ("train_mask", train_mask, np.uint8), ("val_mask", val_mask, np.uint8)):
        if arr is not None:
            np.asarray(arr, dtype=dt).tofile(folder / f"{name}.bin")
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": VOCAB, "masked": train_mask is not None}))
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_model(seed=0).save_pretrained(folder, dtype=torch.float32)
    return folder


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    tokens = {s: rng.integers(0, VOCAB, n) for s, n in (("train", 3000), ("val", 500))}
    masks = {s: (rng.random(len(t)) < 0.6) for s, t in tokens.items()}
    return write_data(tmp_path_factory.mktemp("tiny_data"), tokens["train"], tokens["val"], masks["train"], masks["val"])


def base_args(model, data, out, **kw):
    args = dict(model=model, data_dir=data, out_dir=out, block_size=T, batch_size=2, lora_r=4, lora_alpha=16,
                rank_prune=False, dtype="float32", device="cpu", eval_iters=2, warmup_iters=2, learning_rate=1e-2,
                min_lr=1e-3)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def train(args, launcher=(sys.executable,), check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([*launcher, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and r.returncode:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def logged(stdout):
    """{iter: (loss, grad norm)} and {step: (train loss, val loss)} from the log lines."""
    iters = {int(m[1]): (float(m[2]), float(m[3]))
             for m in re.finditer(r"^iter (\d+)/\d+: loss ([\d.]+), lr \S+, grad norm ([\d.]+)", stdout, re.M)}
    evals = {int(m[1]): (float(m[2]), float(m[3]))
             for m in re.finditer(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", stdout, re.M)}
    return iters, evals


def adapter_tensors(out):
    from checkpoint import load_safetensors
    return {k: v.clone() for k, v in load_safetensors(out / "adapter" / "adapter_model.safetensors").items()}


# ----------------------------------------------------------------------------- the loss mask
def test_only_response_tokens_count(tiny_dir, tmp_path):
    """One window of T+1 tokens (the only offset there is), mask 1 on a response span with a hole, 0 on a trailing
    prompt span. Changing the trailing prompt tokens (targets not counted, and inputs only to uncounted
    predictions) leaves the loss unchanged; changing a response token does not. The loss equals the mean
    cross-entropy over the counted positions, computed here from full logits."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, T + 1)
    mask = np.zeros(T + 1, dtype=np.uint8)
    mask[1:21] = 1
    mask[7] = 0  # a prompt token inside: its prediction is not counted, yet it is an input to later ones
    prompt_changed = tokens.copy()
    prompt_changed[21:] = (tokens[21:] + 1 + rng.integers(0, VOCAB - 1, T + 1 - 21)) % VOCAB
    response_changed = tokens.copy()
    response_changed[20] = (tokens[20] + 5) % VOCAB

    def eval_losses(train_tokens, val_tokens, name):
        data = write_data(tmp_path / name, train_tokens, val_tokens, mask, mask)
        _, evals = logged(train(base_args(tiny_dir, data, tmp_path / "out", eval_only=True, eval_iters=1,
                                          batch_size=1)).stdout)
        return evals[0]

    loss, loss_prompt_changed = eval_losses(tokens, prompt_changed, "a")
    assert loss == loss_prompt_changed
    _, loss_response_changed = eval_losses(tokens, response_changed, "b")
    assert abs(loss_response_changed - loss) > 1e-4

    model = tiny_model(seed=0)  # the model of tiny_dir
    x, y = torch.tensor(tokens[:-1])[None], torch.tensor(tokens[1:])
    with torch.no_grad():
        logits = model(x)[0][0].double()  # (T, vocab)
    nll = -F.log_softmax(logits, -1)[torch.arange(T), y]
    counted = torch.tensor(mask[1:]).bool()
    assert counted.sum() == 19
    assert loss == pytest.approx(nll[counted].mean().item(), abs=2e-6)
    assert abs(loss - nll.mean().item()) > 1e-3  # the mask did something


# ----------------------------------------------------------------------------- resume == uninterrupted
# PrunedLoRA: events at steps 7, 9, 11; the checkpoint at iter 6 holds the statistics gathered since step 5
RANK_PRUNING = dict(rank_prune=True, rank_target=1, rank_every=2, rank_k=1, rank_start=5)


@pytest.mark.parametrize("pruning", [{}, RANK_PRUNING], ids=["lora", "rank_pruning"])
def test_sigkill_and_resume_matches_uninterrupted(tiny_dir, tiny_data, tmp_path, pruning):
    """Kill a run with SIGKILL after a checkpoint was written, resume it, and compare with a run that never
    stopped: the same losses and gradient norms at every iteration after the checkpoint, the same adapter.
    Dropout is on, so the RNG states must come back too; with rank pruning, its statistics and its log too."""
    common = dict(eval_interval=3, lr_decay_iters=30, lora_dropout=0.1, gradient_accumulation_steps=2, **pruning)
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-u", "train.py", *base_args(tiny_dir, tiny_data, killed, max_iters=10**6,
                                                                        **common)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    saved, lines = False, []
    for line in proc.stdout:  # kill in the middle of the iterations after the second checkpoint
        lines.append(line)
        saved = saved or (line.startswith("saved checkpoint") and sum(l.startswith("saved") for l in lines) >= 2)
        if saved and line.startswith("iter "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(lines[-20:])
    ckpt = torch.load(killed / "ckpt.pt", map_location="cpu", weights_only=True)
    k = ckpt["iter_num"]
    assert k >= 6 and k % 3 == 0 and set(ckpt["rng"]) == {"torch", "batches"}
    assert any(key.endswith("rank_mask") for key in ckpt["adapter"])

    end = k + 4
    resumed = train(base_args(tiny_dir, tiny_data, killed, max_iters=end, init_from="resume", **common)).stdout
    whole = tmp_path / "whole"
    uninterrupted = train(base_args(tiny_dir, tiny_data, whole, max_iters=end, **common)).stdout
    r_iters, r_evals = logged(resumed)
    u_iters, u_evals = logged(uninterrupted)
    assert sorted(r_iters) == list(range(k, end))
    for i in range(k, end):
        assert r_iters[i] == pytest.approx(u_iters[i], abs=1e-6), i
    assert r_evals[end] == pytest.approx(u_evals[end], abs=1e-6)
    a, b = adapter_tensors(killed), adapter_tensors(whole)
    assert a.keys() == b.keys() and all(torch.allclose(a[n], b[n], atol=1e-6, rtol=0) for n in a)
    assert not all(torch.equal(b[n], 0 * b[n]) for n in b if "lora_B" in n)
    metrics = lambda out: [{k: v for k, v in m.items() if k != "ms"}
                           for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert metrics(killed) == pytest.approx(metrics(whole), abs=1e-6)  # a line per logged iteration and evaluation
    assert [m["iter"] for m in metrics(whole) if "loss" in m] == list(range(end))
    # the learning rate: linear warmup over warmup_iters=2 from lr / 3, then a cosine from 1e-2 to min_lr at 30
    lr = lambda i: 1e-2 * (i + 1) / 3 if i < 2 else 1e-3 + 0.5 * (1 + math.cos(math.pi * (i - 2) / 28)) * 9e-3
    assert [m["lr"] for m in metrics(whole) if "loss" in m] == pytest.approx([lr(i) for i in range(end)], rel=1e-12)
    assert [m["iter"] for m in metrics(whole) if "val_loss" in m] == list(range(0, end + 1, 3)) + [end] * (end % 3 > 0)
    if pruning:
        log = lambda out: [json.loads(line) for line in (out / "rank_pruning.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log(killed)] == [e["step"] for e in log(whole)] == [7, 9]
        assert [e["actual"] for e in log(killed)] == pytest.approx([e["actual"] for e in log(whole)], abs=1e-6)
        return

    # the same checkpoint with another model: a clear error, no traceback
    other = tmp_path / "other_model"
    tiny_model(seed=0, hidden_size=16).save_pretrained(other, dtype=torch.float32)
    r = train(base_args(other, tiny_data, killed, init_from="resume"), check=False)
    assert r.returncode != 0 and "was made for the model" in r.stderr and "Traceback" not in r.stderr


def test_resume_may_move_A_too(tiny_dir, tiny_data, tmp_path):
    """A run that compensated on B alone, resumed with rank_recovery_side='AB': the checkpoint has no statistics of
    A (they are kept only when used), so they start at the resume and the events go on."""
    out = tmp_path / "out"
    common = dict(eval_interval=3, always_save_checkpoint=True, **RANK_PRUNING)
    train(base_args(tiny_dir, tiny_data, out, max_iters=6, **common))
    r = train(base_args(tiny_dir, tiny_data, out, max_iters=10, init_from="resume", rank_recovery_side="AB", **common))
    assert "no statistics of A; they start here" in r.stdout
    events = [json.loads(line) for line in (out / "rank_pruning.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [7, 9] and all(math.isfinite(e["predicted"]) for e in events)


# ----------------------------------------------------------------------------- DDP == one process
def test_ddp_two_processes_match_one(tiny_dir, tiny_data, tmp_path):
    """torchrun with 2 CPU processes (gloo) and 4 micro-steps in total sees the same global batch as one process
    with 4 micro-steps: the same losses, gradient norms and final adapter (up to float summation order)."""
    common = dict(max_iters=3, eval_interval=100, gradient_accumulation_steps=4, lora_dropout=0.0)
    one, two = tmp_path / "one", tmp_path / "two"
    single = train(base_args(tiny_dir, tiny_data, one, **common)).stdout
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    ddp = train(base_args(tiny_dir, tiny_data, two, **common), launcher=launcher).stdout
    s_iters, _ = logged(single)
    d_iters, _ = logged(ddp)
    assert sorted(d_iters) == [0, 1, 2] == sorted(s_iters)
    for i in s_iters:
        assert d_iters[i] == pytest.approx(s_iters[i], abs=1e-5, rel=1e-5)
    assert "over 2 processes" in ddp
    a, b = adapter_tensors(one), adapter_tensors(two)
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-5) for n in a)


def test_ddp_rank_pruning_resumed_matches_uninterrupted(tiny_dir, tiny_data, tmp_path):
    """Under DDP each process keeps its own rank-pruning sums and an event averages them; a checkpoint saves the
    average (prune.average_over_processes), so a resumed DDP run takes the same events as one that never stopped."""
    common = dict(eval_interval=3, lr_decay_iters=30, lora_dropout=0.0, gradient_accumulation_steps=4,
                  always_save_checkpoint=True, **RANK_PRUNING)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    train(base_args(tiny_dir, tiny_data, stopped, max_iters=6, **common), launcher=launcher)
    resumed = train(base_args(tiny_dir, tiny_data, stopped, max_iters=10, init_from="resume", **common),
                    launcher=launcher).stdout
    uninterrupted = train(base_args(tiny_dir, tiny_data, whole, max_iters=10, **common), launcher=launcher).stdout
    r_iters, _ = logged(resumed)
    u_iters, _ = logged(uninterrupted)
    assert sorted(r_iters) == list(range(6, 10))
    assert all(r_iters[i] == pytest.approx(u_iters[i], abs=1e-5) for i in r_iters)
    log = lambda out: [json.loads(line) for line in (out / "rank_pruning.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log(stopped)] == [e["step"] for e in log(whole)] == [7, 9]
    assert [e["pruned"] for e in log(stopped)] == [e["pruned"] for e in log(whole)]
    assert [e["actual"] for e in log(stopped)] == pytest.approx([e["actual"] for e in log(whole)], abs=1e-5)
    a, b = adapter_tensors(stopped), adapter_tensors(whole)
    assert a.keys() == b.keys() and all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)


# ----------------------------------------------------------------------------- configurator
def test_configurator_checks_keys_and_types(tmp_path, capsys):
    config = dict(lr=1e-3, iters=10, name="x", flag=False, targets=("a", "b"))
    assert configure(config, ["--lr=1", "--iters=5", "--name=2024", "--flag=True", "--targets=q,v"]) == \
        {"lr", "iters", "name", "flag", "targets"}
    assert config == dict(lr=1.0, iters=5, name="2024", flag=True, targets=("q", "v"))
    for bad, words in ((["--nope=3"], ["unknown key 'nope'", "3"]),
                       (["--iters=2.5"], ["iters=2.5", "float", "expected type int"]),
                       (["--flag=1"], ["flag=1", "expected type bool"]),
                       (["--iters"], ["--iters=VALUE"])):
        with pytest.raises(SystemExit) as e:
            configure(dict(config), bad)
        assert all(w in str(e.value) for w in words), str(e.value)
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("import math\niters = 7\nlr = math.pi\n")
    assert configure(config, [str(cfg_file)]) == {"iters", "lr"} and config["iters"] == 7
    cfg_file.write_text("learning_rat = 1e-4\n")
    with pytest.raises(SystemExit, match="learning_rat"):
        configure(config, [str(cfg_file)])


def test_configurator_takes_key_value_and_true_false_and_names_what_is_near():
    config = dict(learning_rate=1e-3, iters=10, name="x", flag=False)
    assert configure(config, ["--iters", "5", "--flag", "true", "--name", "y", "--flag=False"]) == {"iters", "flag", "name"}
    assert config == dict(learning_rate=1e-3, iters=5, name="y", flag=False)
    with pytest.raises(SystemExit, match="unknown key 'learning_rat'.*did you mean 'learning_rate'"):
        configure(config, ["--learning_rat=1e-4"])
    with pytest.raises(SystemExit, match="--model_dir is now --model"):
        configure(dict(model="m"), ["--model_dir=x"], renamed={"model_dir": "model"})


def train_settings():
    """train.py's settings block, run on its own."""
    block = (ROOT / "train.py").read_text().split("# " + "-" * 77 + " settings\n")[1].split("# " + "-" * 77 + "\n")[0]
    scope = {}
    exec(block, scope)
    return settings(scope)


def test_help_lists_every_setting_with_its_default_and_meaning():
    for flag in ("--help", "-h"):
        r = train([flag])
        lines = {line.split("=")[0].strip(): line for line in r.stdout.splitlines() if line.startswith("  --")}
        for key, value in train_settings().items():
            line = lines[f"--{key}"]
            assert line.startswith(f"  --{key}={value!r} ") and line[len(f"  --{key}={value!r}"):].strip(), line
    assert "python train.py" in r.stdout  # the script's own docstring first


def test_every_config_file_sets_settings_train_py_has():
    files = sorted((ROOT / "config").glob("*.py"))
    assert len(files) >= 6
    for f in files:
        assert configure(train_settings(), [str(f)])


def test_train_rejects_bad_config_without_traceback():
    r = train(["--learning_rate=fast"], check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "learning_rate='fast'" in r.stderr and "expected type float" in r.stderr


def test_config_files_are_valid(tiny_dir, tiny_data, tmp_path):
    """Every key of our config files exists in train.py with the right type (one eval on the tiny model)."""
    files = ["config/lora_gsm8k.py", "config/lora_alpaca.py"]
    out = train([*files, *base_args(tiny_dir, tiny_data, tmp_path, eval_only=True, eval_iters=1)]).stdout
    assert all(f"overriding config with {f}" in out for f in files) and "step 0: train loss" in out


def test_resume_keeps_the_runs_own_pruning_settings(tiny_dir, tiny_data, tmp_path):
    """A plain LoRA run (rank_prune=False) resumed without repeating its settings stays plain LoRA, although
    train.py's default is now rank pruning (which would refuse lora_r=4 <= rank_target=8)."""
    out = tmp_path / "out"
    train(base_args(tiny_dir, tiny_data, out, max_iters=2, eval_interval=2))
    args = [a for a in base_args(tiny_dir, tiny_data, out, max_iters=4, eval_interval=2, init_from="resume")
            if not a.startswith("--rank_prune=")]
    r = train(args)
    assert "resuming from" in r.stdout and "pruned" not in r.stdout and not (out / "rank_pruning.jsonl").exists()


# ----------------------------------------------------------------------------- the run's curves
def test_plot_run_draws_the_curves_or_says_what_is_missing(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import plot_run
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in (
        {"iter": 0, "train_loss": 2.0, "val_loss": 2.1}, {"iter": 0, "loss": 2.0}, {"iter": 1, "loss": 1.7})))
    (tmp_path / "rank_pruning.jsonl").write_text(json.dumps({"step": 1, "rank_mean": 6.5, "rank_min": 6, "rank_max": 7}))
    if importlib.util.find_spec("matplotlib"):
        plot_run.plot(tmp_path)
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="metrics.jsonl is missing or empty"):
        plot_run.plot(tmp_path / "nothing")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit, match="needs matplotlib: pip install matplotlib"):
        plot_run.plot(tmp_path)

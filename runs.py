"""
The plumbing of a training run: its folder (what says it holds a run, the checkpoint, the JSON-lines logs), loading
what a run wrote (a model folder, an adapter folder or a run folder), and the out-of-memory hint.
"""
import json
import sys
from pathlib import Path

import torch

import prunedlora
from checkpoint import atomic_open
from configurator import check, fail
from lora import load_adapter
from model import Transformer


RUN_FILES = ("ckpt.pt", "adapter/adapter_config.json", "merged/config.json")  # what says a folder holds a run


def run_in(out_dir):
    """The first file that says `out_dir` holds a training run, or None."""
    return next((f for f in RUN_FILES if (Path(out_dir) / f).exists()), None)


def read_checkpoint(out_dir):
    """out_dir/ckpt.pt as plain tensors and values (torch.load(weights_only=True) never runs code), or one line
    saying why not."""
    path = Path(out_dir) / "ckpt.pt"
    if not path.exists():
        raise SystemExit(f"init_from='resume' but there is no {path} (out_dir={str(out_dir)!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged, or more than tensors and plain values
        why = next((line for line in str(e).splitlines() if "GLOBAL" in line), str(e).split(". ")[0])
        raise SystemExit(f"{path} cannot be read ({why}): damaged, or not a checkpoint of train.py; "
                         f"start a new out_dir") from None


def write_checkpoint(ckpt, out_dir):
    with atomic_open(Path(out_dir) / "ckpt.pt", "wb") as f:
        torch.save(ckpt, f)


def trim_jsonl(path, last, key="step"):
    """Keep the records of a log up to `last` (a resumed run forgets what came after its checkpoint); a line
    cut short by a kill counts as after."""
    def when(line):
        try:
            return json.loads(line)[key]
        except (ValueError, KeyError):
            return float("inf")
    kept = [line for line in Path(path).read_text().splitlines() if when(line) <= last] if Path(path).exists() else []
    with atomic_open(path, "w") as f:
        f.write("".join(line + "\n" for line in kept))


def start_or_resume(g, overridden, fixed, kept):
    """The checkpoint of a resumed run (init_from 'resume', or 'auto' with a ckpt.pt), with the settings it fixes put
    back into the script's globals g (`fixed` always, `kept` and the data set unless given again), or None for a new
    run, which is refused where out_dir holds a run: nothing of the user's is lost."""
    if g['init_from'] == 'auto':
        g['init_from'] = 'resume' if (Path(g['out_dir']) / 'ckpt.pt').exists() else 'pretrained'
    check(g, choices={'init_from': ('pretrained', 'resume', 'auto')})
    if g['init_from'] == 'pretrained':
        found = run_in(g['out_dir'])
        if found and not g['eval_only']:
            fail(f"out_dir={g['out_dir']!r} holds a run ({found}): choose another out_dir for a new run (or delete that "
                 f"one); --init_from=resume continues that same run, with its adapter's shape")
        if found:
            print(f"note: --eval_only evaluates new adapters on {g['model']}; --init_from=resume evaluates the run "
                  f"in {g['out_dir']}")
        return None
    checkpoint = read_checkpoint(g['out_dir'])
    g['model'] = g['model'] if 'model' in overridden else checkpoint['model_dir']
    data = ('dataset', 'data_dir') if not {'dataset', 'data_dir'} & overridden else ()  # one setting, the data
    for k in (*fixed, *[k for k in (*kept, *data) if k not in overridden]):
        if k in checkpoint['config']:
            g[k] = checkpoint['config'][k]
    return checkpoint


def check_settings(g, rank_keys):
    """train.py's settings that would fail deep inside a run, refused at its start with what was expected."""
    check(g, at_least_one=('block_size', 'batch_size', 'gradient_accumulation_steps', 'eval_interval', 'eval_iters',
                           'log_interval', 'struct_every') + ('max_iters',) * (not g['eval_only']),
          choices={'dtype': ('float32', 'bfloat16', 'auto')})
    if not g['lora_targets']:
        fail(f"lora_targets={g['lora_targets']!r}, expected at least one projection")
    if Path(g['out_dir']).exists() and not Path(g['out_dir']).is_dir():
        fail(f"out_dir={g['out_dir']!r}, expected a folder (a file is there)")
    try:
        prunedlora.check_settings({k: g[k] for k in rank_keys})
    except ValueError as e:
        fail(e)
    if g['rank_prune'] and g['lora_r'] <= g['rank_target']:
        fail(f"rank_prune=True prunes the adapters from lora_r={g['lora_r']} down to rank_target={g['rank_target']}, "
             f"so lora_r must be larger; for plain LoRA at rank {g['lora_r']} set --rank_prune=False")


def oom_hint(config):
    """An excepthook: out of GPU memory ends with the settings to lower (read when it happens), not a traceback."""
    def hook(kind, exc, tb):
        if not issubclass(kind, torch.OutOfMemoryError):
            return sys.__excepthook__(kind, exc, tb)
        c = config
        print(f"out of GPU memory ({str(exc).splitlines()[0]}). Lower batch_size={c['batch_size']} (raising "
              f"gradient_accumulation_steps={c['gradient_accumulation_steps']} keeps the tokens per iteration) or "
              f"block_size={c['block_size']}, or set gradient_checkpointing=True (now {c['gradient_checkpointing']}) "
              f"and dtype='bfloat16' (now {c['dtype']!r})", file=sys.stderr)
    return hook


def resolve(path, adapter=None):
    """(model folder, adapter folder or None) for a model folder (+ `adapter`), an adapter folder, or a train.py run
    folder: its adapter/ on the base the adapter names (its merged/ only when there is no adapter)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path, adapter
    own = next((a for a in (path / "adapter", path) if (a / "adapter_config.json").exists()), None)
    merged = path / "merged"
    if own is None:
        return (merged if (merged / "config.json").exists() else path), adapter
    if adapter and Path(adapter).resolve() != own.resolve():
        raise ValueError(f"--model {path} holds an adapter ({own}) and --adapter {adapter} names another: give one")
    if (merged / "config.json").exists() and \
            (merged / "config.json").stat().st_mtime < (own / "adapter_model.safetensors").stat().st_mtime:
        print(f"note: {merged} is older than {own}: using the adapter", file=sys.stderr)
    base = Path(json.loads((own / "adapter_config.json").read_text()).get("base_model_name_or_path") or "")
    if not (base / "config.json").exists():
        raise FileNotFoundError(f"{own}: its base model {str(base)!r} is not a model folder here; pass the base "
                                f"as --model and the adapter as --adapter")
    return base, own


def load_model(path, adapter=None, dtype=torch.float32, device="cpu"):
    """(model with its adapter, if any; the model folder): see resolve() for what `path` may be."""
    folder, adapter = resolve(path, adapter)
    model = Transformer.from_pretrained(folder, dtype=dtype, device=device)
    return (load_adapter(model, adapter) if adapter else model).eval(), folder

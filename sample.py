"""
Generate text from a model folder and report how fast it went.

  python sample.py --prompt "The capital of France is"                    # plain continuation
  python sample.py --chat --prompt "What is the capital of France?"        # one chat turn
  python sample.py --model out --chat --prompt "..."                      # a train.py run: its adapter on its base
  python sample.py --adapter out/adapter --model models/smollm2-135m-instruct
  python sample.py --model models/other --dtype bfloat16 --temperature 0.8 --top_p 0.9 --seed 1

Plain prompts are continued for --max_new_tokens tokens; --chat wraps the prompt in the model's chat
template and stops at the end of the assistant's turn. --temperature 0 is greedy decoding.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from runs import load_model, resolve
from tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).parent / "models" / "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="a model folder, an adapter folder or a train.py run folder (default: %(default)s)")
    p.add_argument("--adapter", help="a LoRA adapter folder (peft format) to apply to --model")
    p.add_argument("--prompt", default="Once upon a time,")
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user message to a chat model")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be at least 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top_k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top_p must lie in (0, 1], got {args.top_p}")
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        p.error(f"--device {args.device}: expected cpu or cuda[:N] with a CUDA device (this torch sees none)")
    return args


def load(path, adapter, dtype, device):
    """Model and tokenizer; the default model is made on first use."""
    if not Path(path).exists() and Path(path).resolve() == DEFAULT_MODEL.resolve():
        import download
        download.default_model(DEFAULT_MODEL)
    folder, adapter = resolve(path, adapter)
    if not (Path(folder) / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model folder, an adapter folder or a train.py run folder (no "
                                f"config.json); `python download.py OWNER/REPO` fetches a model from the Hugging Face Hub")
    t0 = time.perf_counter()
    model, _ = load_model(folder, adapter, dtype, device)
    tok = Tokenizer.from_pretrained(folder)
    print(f"loaded {folder}{f' + adapter {adapter}' if adapter else ''} ({dtype}, {device}) in "
          f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return model, tok


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, idx, device, **kw):
    """model.generate, timing each step by its output layer's call: the first ends the prefill of the whole
    prompt, every later one decodes a single token. Returns (ids, prefill seconds, decode seconds, decode steps)."""
    stamps = []

    def stamp(*_):  # a forward hook must return None (anything else replaces the output)
        sync(device)
        stamps.append(time.perf_counter())

    hook = model.lm_head.register_forward_hook(stamp)
    sync(device)
    t0 = time.perf_counter()
    try:
        out = model.generate(idx, **kw)
    finally:
        hook.remove()
    return out, stamps[0] - t0, stamps[-1] - stamps[0], len(stamps) - 1


def main(argv=None):
    args = parse_args(argv)
    model, tok = load(args.model, args.adapter, DTYPES[args.dtype], args.device)
    text = tok.apply_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    prompt_ids = tok.encode(text)
    if not prompt_ids:
        sys.exit("sample.py: error: the prompt encodes to no tokens")
    generator = torch.Generator(args.device).manual_seed(args.seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=args.device)
    out, prefill_s, decode_s, steps = timed_generate(
        model, idx, args.device, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, stop_ids=tok.stop_ids if args.chat else None, generator=generator)
    new_ids = out[0, len(prompt_ids):].tolist()
    if args.chat:  # the reply only, without the end-of-turn token
        print(tok.decode([i for i in new_ids if i not in tok.stop_ids]))
    else:
        print(tok.decode(prompt_ids + new_ids))
    decode_rate = f"{steps / decode_s:.1f} tokens/s" if steps and decode_s > 0 else "n/a"
    print(f"---\nprefill {len(prompt_ids)} tokens in {prefill_s * 1000:.0f} ms | "
          f"decode {steps} tokens in {decode_s:.2f} s = {decode_rate} | {len(new_ids)} new tokens", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad folder, prompt too long for the context, ...
        sys.exit(f"sample.py: error: {e}")

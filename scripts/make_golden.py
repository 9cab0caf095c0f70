"""
Remake tests/golden/smollm2_135m_instruct_reference.json with Hugging Face transformers (a reference library, not a
dependency of the project: pip install -r requirements-dev.txt), or check the committed file against a fresh run.

    python scripts/make_golden.py --check                  # recompute and compare with the committed file
    python scripts/make_golden.py --output FILE            # write a new file

The inputs (four texts, three prompts and how many tokens each continues) are the committed file's; the outputs are
transformers' LlamaForCausalLM in float32 on the CPU with the `tokenizers` library's ids, rounded to 5 decimals:
every next-token log-probability, the top 5 at every position, the mean NLL, and greedy continuations (the chat
prompt stops at <|im_end|>).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "smollm2_135m_instruct_reference.json"
MODEL = ROOT / "models" / "smollm2-135m-instruct"


def text_entry(model, tok, text, n_top):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    nxt = logprobs[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    top = logprobs[:n_top].topk(5)
    r = lambda t: [round(x, 5) for x in t.tolist()]
    return dict(text=text, ids=ids, next_logprob=r(nxt), top5_ids=top.indices.tolist(),
                top5_logprob=[r(row) for row in top.values], mean_nll=round(-nxt.mean().item(), 6))


def greedy_entry(model, tok, prompt, n_new):
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    stop = tok.convert_tokens_to_ids("<|im_end|>") if prompt.startswith("<|im_start|>") else None
    out = model.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False, eos_token_id=stop,
                         pad_token_id=2)[0, len(ids):].tolist()
    return dict(prompt=prompt, prompt_ids=ids, new_ids=out, new_text=tok.decode(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--output", type=Path, help="where to write the remade file")
    p.add_argument("--check", action="store_true", help="compare a fresh run with the committed file")
    args = p.parse_args()
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    # tokenizer.json through the `tokenizers` library: AutoTokenizer picks a slow class that skips its digit split
    tok = PreTrainedTokenizerFast(tokenizer_file=str(args.model / "tokenizer.json"))
    old = json.loads(GOLDEN.read_text())
    new = dict(model=old["model"], reference=old["reference"],
               texts=[text_entry(model, tok, t["text"], len(t["top5_ids"])) for t in old["texts"]],
               greedy=[greedy_entry(model, tok, g["prompt"], len(g["new_ids"])) for g in old["greedy"]])
    if args.output:
        args.output.write_text(json.dumps(new, ensure_ascii=False) + "\n")
    if args.check:
        worst = max(abs(a - b) for o, n in zip(old["texts"], new["texts"])
                    for a, b in zip(o["next_logprob"], n["next_logprob"]))
        same = all(o[k] == n[k] for o, n in zip(old["texts"], new["texts"]) for k in ("ids", "top5_ids")) and \
            all(o[k] == n[k] for o, n in zip(old["greedy"], new["greedy"]) for k in ("prompt_ids", "new_ids"))
        print(f"ids, top-5 ids and greedy continuations equal: {same}; largest log-prob difference {worst:.1e}")
        sys.exit(0 if same and worst <= 1e-4 else 1)  # float32 sums in another order: ~1e-5


if __name__ == "__main__":
    main()

"""
Alpaca instructions -> data/alpaca/{train,val}.bin, {train,val}_mask.bin, meta.json.

Raw data (CC BY-NC 4.0): data/manifest.json's "alpaca": the full 52,002-record alpaca_data.json
(tatsu-lab/stanford_alpaca), or the 1,000-record sample alpaca_data_1k.json when that is what the cache or
DATA_MIRROR has; or --src DIR|FILE of your own (alpaca_data.json first). The file used is printed and
recorded in meta.json ("source").

Each record {instruction, input, output} becomes one chat turn: prompt = instruction (+ "\\n\\n" + input
when input is non-empty), response = output; the loss mask covers the response and <|im_end|>.
Val: 5% of the records (at least 50) after a shuffle with seed 1337.

    python data/alpaca/prepare.py [--src DIR|FILE] [--model DIR] [--out_dir DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/, for common.py
import common  # noqa: E402


def example(tok, r):
    prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
    return common.chat_example(tok, prompt, r["output"])


def main(argv=None):
    args = common.parse_args(__doc__, __file__, argv)
    path = common.raw_file(args, "alpaca", "alpaca_data.json", "alpaca_data_1k.json",
                           what="alpaca_data.json or alpaca_data_1k.json (a JSON list of {instruction, input, output})")
    tok = common.load_tokenizer(args.model)
    rows = common.read_records(path, ("instruction", "input", "output"))
    train, val = common.split_off(rows, max(50, round(0.05 * len(rows))))
    splits = {name: [example(tok, r) for r in common.progress(part, f"{name} examples", len(part))]
              for name, part in (("train", train), ("val", val))}
    return common.write_outputs(args, tok, splits, path)


if __name__ == "__main__":
    main()

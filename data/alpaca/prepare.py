"""
Alpaca instructions -> data/alpaca/{train,val}.bin, {train,val}_mask.bin, meta.json.

Raw data (default ../shared/data/alpaca/): alpaca_data_1k.json, a 1,000-record sample (CC BY-NC 4.0), from
  https://raw.githubusercontent.com/wujindou/BLOOM-LORA/11c488c814c650c52e4ebbe1e284085e3a0a5c2d/data/alpaca_data_1k.json
If the folder holds the full 52k alpaca_data.json, that is used instead:
  https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json

Each record {instruction, input, output} becomes one chat turn: prompt = instruction (+ "\\n\\n" + input
when input is non-empty), response = output; the loss mask covers the response and <|im_end|>.
Val: 5% of the records (at least 50) after a shuffle with seed 1337.

    python data/alpaca/prepare.py [--src DIR|FILE] [--model DIR] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/, for common.py
import common  # noqa: E402

URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"


def example(tok, r):
    prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
    return common.chat_example(tok, prompt, r["output"])


def main(argv=None):
    args = common.parse_args(__doc__, __file__, "alpaca", argv)
    path = common.source_file(args.src, "alpaca_data.json", "alpaca_data_1k.json",
                              what="alpaca_data.json or alpaca_data_1k.json (a JSON list of "
                                   "{instruction, input, output})", url=URL)
    tok = common.load_tokenizer(args.model)
    rows = common.read_records(path, ("instruction", "input", "output"))
    train, val = common.split_off(rows, max(50, round(0.05 * len(rows))))
    splits = {"train": [example(tok, r) for r in train], "val": [example(tok, r) for r in val]}
    return common.write_outputs(args, tok, splits, path)


if __name__ == "__main__":
    main()

"""
GSM8K -> data/gsm8k/{train,val,test}.bin, {train,val,test}_mask.bin, meta.json.

Raw data: train.jsonl and test.jsonl (MIT), data/manifest.json's "gsm8k" (openai/grade-school-math), or
--src DIR of your own holding both.

Each record {question, answer} becomes one chat turn: prompt = question (the same prompt eval.py's
zero-shot GSM8K uses), response = the worked answer as in the file (with its <<calc>> notes and the
final "#### N" line); the loss mask covers the response and <|im_end|>.
train/val: train.jsonl after a shuffle with seed 1337, the last 200 as val.
test: test.jsonl in file order (held-out loss on the test answers; never train on it).

    python data/gsm8k/prepare.py [--src DIR] [--model DIR] [--out_dir DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/, for common.py
import common  # noqa: E402


def read(args, name):
    path = common.raw_file(args, "gsm8k", name, what=f"GSM8K {name} (JSON lines of {{question, answer}})")
    return path, common.read_records(path, ("question", "answer"))


def main(argv=None):
    args = common.parse_args(__doc__, __file__, argv)
    if args.src and args.src.is_file():
        raise SystemExit(f"--src {args.src}: expected the folder holding train.jsonl and test.jsonl")
    (train_path, rows), (_, test) = read(args, "train.jsonl"), read(args, "test.jsonl")
    tok = common.load_tokenizer(args.model)
    train, val = common.split_off(rows, 200)
    splits = {name: [common.chat_example(tok, r["question"], r["answer"])
                     for r in common.progress(part, f"{name} examples", len(part))]
              for name, part in (("train", train), ("val", val), ("test", test))}
    return common.write_outputs(args, tok, splits, train_path.parent)


if __name__ == "__main__":
    main()

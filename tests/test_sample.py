"""sample.py end to end on the default model: its greedy text is Hugging Face's (the golden file), and its
timing line counts the steps generate took."""
import re

import sample


def run(capsys, *argv):
    sample.main(["--device", "cpu", "--temperature", "0", *argv])
    out, err = capsys.readouterr()
    return out, err


def test_plain_prompt_continues_as_golden(model_dir, golden, capsys):
    entry = golden["greedy"][0]  # no stop: 30 new tokens
    out, err = run(capsys, "--model", str(model_dir), "--prompt", entry["prompt"],
                   "--max_new_tokens", str(len(entry["new_ids"])))
    assert out == entry["prompt"] + entry["new_text"] + "\n"
    n_prompt, n_new = len(entry["prompt_ids"]), len(entry["new_ids"])
    assert re.search(rf"prefill {n_prompt} tokens in \d+ ms \| decode {n_new - 1} tokens in [\d.]+ s = [\d.]+ "
                     rf"tokens/s \| {n_new} new tokens", err), err


def test_chat_reply_stops_at_the_end_of_turn(model_dir, golden, capsys):
    entry = golden["greedy"][1]  # the chat template with its default system prompt, then "<|im_end|>"
    question = entry["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    out, err = run(capsys, "--model", str(model_dir), "--chat", "--prompt", question)
    assert out == entry["new_text"].removesuffix("<|im_end|>") + "\n"
    assert f"decode {len(entry['new_ids']) - 1} tokens" in err and f"| {len(entry['new_ids'])} new tokens" in err

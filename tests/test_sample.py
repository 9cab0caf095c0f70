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


def test_an_adapter_and_a_run_folder_sample_as_the_merged_model(model_dir, tmp_path, capsys):
    """sample.py --adapter DIR, and --model RUN (a train.py run folder: its adapter on its base), give the greedy
    text of the same adapter merged into an ordinary model folder; a stale merged/ in the run is not used."""
    import os

    import torch

    from lora import apply_lora, save_adapter, save_model
    from model import Transformer
    model = Transformer.from_pretrained(model_dir)
    torch.manual_seed(0)
    apply_lora(model, ("q_proj", "v_proj"), r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    save_adapter(model, tmp_path / "run" / "adapter", base_model_name_or_path=str(model_dir))
    save_model(model, tmp_path / "merged", dtype=torch.float32, tokenizer_from=model_dir)
    prompt = ["--prompt", "The capital of France is", "--max_new_tokens", "8"]
    merged = run(capsys, "--model", str(tmp_path / "merged"), *prompt)[0]
    assert merged != run(capsys, "--model", str(model_dir), *prompt)[0]  # the adapter changes the text
    assert run(capsys, "--model", str(model_dir), "--adapter", str(tmp_path / "run" / "adapter"), *prompt)[0] == merged
    assert run(capsys, "--model", str(tmp_path / "run" / "adapter"), *prompt)[0] == merged
    (tmp_path / "run" / "merged").mkdir()
    (tmp_path / "run" / "merged" / "config.json").write_text("{}")  # an older export, left behind
    os.utime(tmp_path / "run" / "merged" / "config.json", (0, 0))
    out, err = run(capsys, "--model", str(tmp_path / "run"), *prompt)
    assert out == merged and "is older than" in err

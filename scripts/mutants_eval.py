"""Planted bugs in eval.py's formulas and results.py's layout (scripts/mutants.py): each gives a number lm-eval
would not, and the tests named beside it must fail on it."""
T = "tests/test_eval.py::"
R = "tests/test_results.py::"
ACC_NORM = T + "test_acc_norm_divides_by_the_choices_length_in_characters"
ENCODE = T + "test_encode_pair_splits_the_joint_encoding_where_the_context_ends"
COUNTS = T + "test_word_and_byte_counts_of_a_page_with_blank_lines_and_spaces_at_its_ends"
ROLLING = T + "test_rolling_windows_by_hand"
TOKEN_PPL = T + "test_token_perplexity_by_hand"
DETOK = T + "test_wikitext_pages_and_detokenizer"
HELLASWAG = T + "test_hellaswag_preprocess_as_lm_evals " + T + "test_hellaswag_original_jsonl_is_read_as_lm_eval_reads_it"
WINOGRANDE = T + "test_winogrande_partial_scoring"
BOOLQ = T + "test_boolq_in_superglues_form"
GSM8K = " ".join(T + t for t in ("test_gsm8k_answer_extraction", "test_gsm8k_reference_normalisation",
                                 "test_gsm8k_scores_of_given_generations"))
STDERR = T + "test_mean_stderr_is_the_sample_standard_deviation_over_root_n"

MUTANTS = [
    # multiple choice
    ("acc_norm_plus_one", "eval.py", "l / len(c)", "l / (len(c) + 1)", ACC_NORM,
     "acc_norm divides by the choice's length + 1 (the delimiter's space counted)"),
    ("acc_norm_bytes", "eval.py", "l / len(c)", "l / len(c.encode())", ACC_NORM,
     "acc_norm divides by the choice's length in bytes, not characters"),
    ("acc_ties_to_the_last", "eval.py", "acc.append(float(ll.index(max(ll)) == it[\"gold\"]))",
     "acc.append(float(len(ll) - 1 - ll[::-1].index(max(ll)) == it[\"gold\"]))",
     T + "test_ties_go_to_the_first_choice_and_winogrande_has_no_acc_norm", "a tie goes to the last choice, not np.argmax's first"),
    ("no_target_delimiter", "eval.py", 'def mc_item(context, choices, gold, delimiter=" "):',
     'def mc_item(context, choices, gold, delimiter=""):',
     T + "test_mc_item_puts_lm_evals_target_delimiter_before_each_choice " + BOOLQ, "the choices lose lm-eval's leading space"),
    # encoding and log-likelihoods
    ("continuation_encoded_alone", "eval.py", "    return ctx, whole[len(ctx):]",
     "    return ctx, tok.encode(continuation, bos=False)", ENCODE,
     "the continuation encoded on its own, not split off encode(context + continuation)"),
    ("context_keeps_its_space", "eval.py",
     "context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation",
     "context, continuation = context, continuation", ENCODE + " " + T + "test_real_tokenizer_pairs",
     "the context's trailing space stays with the context"),
    ("left_truncation_one_short", "eval.py", "ctx[-(model.config.max_seq_len + 1 - longest):]",
     "ctx[-(model.config.max_seq_len - longest):]", T + "test_loglikelihoods_cut_long_contexts_from_the_left_as_lm_eval",
     "a long context keeps one token fewer than lm-eval's (context + continuation)[-(max_length + 1):]"),
    # perplexity
    ("word_count_drops_empty_ends", "eval.py", r'len(re.split(r"\s+", counted))', "len(counted.split())", COUNTS,
     "words counted by str.split(): the empty ends lm-eval counts are lost"),
    ("byte_count_in_characters", "eval.py", 'len(counted.encode("utf-8"))', "len(counted)", COUNTS,
     "bytes counted as characters"),
    ("words_of_the_detokenized_page", "eval.py", "sum(len(re.split(r\"\\s+\", counted)) for _, counted in docs)",
     "sum(len(re.split(r\"\\s+\", scored)) for scored, _ in docs)", COUNTS,
     "words counted on the detokenized text, not the page as read"),
    ("rolling_without_prefix", "eval.py", "yield [prefix] + tokens[:done - 1], done", "yield tokens[:done], done",
     ROLLING, "the first rolling window has no BOS prefix"),
    ("rolling_short_context", "eval.py", "yield tokens[done + n - L - 1:done + n - 1], n",
     "yield tokens[done - 1:done + n - 1], n", ROLLING, "later windows get only the context they need, not L tokens"),
    ("rolling_stride_short", "eval.py", "n = min(len(tokens) - done, L)", "n = min(len(tokens) - done, L - 1)",
     ROLLING, "windows advance by L - 1 tokens"),
    ("token_ppl_window_plus_one", "eval.py", "tokens[:len(tokens) // ctx * ctx]).view(-1, ctx)",
     "tokens[:len(tokens) // (ctx + 1) * (ctx + 1)]).view(-1, ctx + 1)", TOKEN_PPL,
     "token perplexity over windows of ctx + 1 tokens (nanoGPT's block_size + 1)"),
    ("token_ppl_counts_ctx", "eval.py", "n = len(windows) * (ctx - 1)", "n = len(windows) * ctx", TOKEN_PPL,
     "the token perplexity's mean over ctx, not ctx - 1 predicted tokens per window"),
    ("detokenizer_hyphen", "eval.py", '(" @-@ ", "-")', '(" @-@ ", " - ")', DETOK, "' @-@ ' becomes ' - '"),
    ("detokenizer_possessive", "eval.py", '(" \'s", "\'s")', '(" \'s", " \'s")', DETOK, "\" 's\" keeps its space"),
    ("page_heading_unnormalised", "eval.py", 'heading = line.replace("= = =", "===").replace("= =", "==").strip()',
     "heading = line.strip()", DETOK, "a '= = Section = =' line opens a page"),
    # the data readers
    ("hellaswag_no_capitalize", "eval.py", "{r['ctx_b'].capitalize()}", "{r['ctx_b']}", HELLASWAG,
     "ctx_b not capitalised"),
    ("hellaswag_title_space", "eval.py", '.replace(" [title]", ". ")', '.replace(" [title]", " ")', HELLASWAG,
     "' [title]' becomes a space, not '. '"),
    ("hellaswag_greedy_tags", "eval.py", r're.sub(r"\[.*?\]"', r're.sub(r"\[.*\]"', HELLASWAG,
     "a greedy [tag] pattern deletes the text between two tags"),
    ("winogrande_rest_unstripped", "eval.py", 'rest = " " + r["sentence"][i + 1:].strip()',
     'rest = r["sentence"][i + 1:]', WINOGRANDE, "the shared continuation is not ' ' + the stripped rest"),
    ("winogrande_full_scoring", "eval.py", '(r["sentence"][:i] + o, rest)', '(r["sentence"][:i], " " + o + rest)',
     WINOGRANDE, "the option scored in the continuation (full, not partial, scoring)"),
    ("boolq_without_title", "eval.py", "f\"{r['title']} -- {r['passage']}\\nQuestion:", "f\"{r['passage']}\\nQuestion:",
     BOOLQ, "BoolQ's passage without SuperGLUE's 'title -- '"),
    ("boolq_choices_swapped", "eval.py", '["no", "yes"]', '["yes", "no"]', BOOLQ, "label 1 scored as 'no'"),
    # GSM8K
    ("gsm8k_strict_no_comma", "eval.py", r'r"#### (\-?[0-9\.\,]+)"', r'r"#### (\-?[0-9\.]+)"', GSM8K,
     "strict-match stops at a thousands comma"),
    ("gsm8k_strict_last", "eval.py", "strict[0].strip()", "strict[-1].strip()", GSM8K,
     "strict-match takes the last '#### n', not the first"),
    ("gsm8k_flexible_first", "eval.py", "flexible[-1].strip()", "flexible[0].strip()", GSM8K,
     "flexible-extract takes the first number, not the last"),
    ("gsm8k_flexible_one_char", "eval.py", r'r"(-?[$0-9.,]{2,})|(-?[0-9]+)"', r'r"(-?[$0-9.,]+)|(-?[0-9]+)"', GSM8K,
     "flexible-extract takes a lone '.' for a number"),
    ("gsm8k_keeps_trailing_dot", "eval.py", r'[",", r"\$", r"(?s).*#### ", r"\.$"]', r'[",", r"\$", r"(?s).*#### "]',
     GSM8K, "a trailing '.' is not ignored"),
    ("gsm8k_keeps_the_solution", "eval.py", r'[",", r"\$", r"(?s).*#### ", r"\.$"]', r'[",", r"\$", r"\.$"]',
     GSM8K, "the reference keeps its solution before '#### '"),
    ("gsm8k_exemplars_run_together", "eval.py", "Answer: {r['answer']}\\n\\n\"", "Answer: {r['answer']}\\n\"",
     GSM8K, "the 5-shot exemplars not separated by a blank line"),
    ("stop_cut_at_the_last", "eval.py", "key=len, default=text)", "key=lambda t: -len(t), default=text)",
     T + "test_greedy_until_cuts_at_stop_strings", "a generation cut at the last stop string, not the first"),
    # standard errors and the results layout
    ("stderr_ddof_0", "eval.py", "sum((x - m) ** 2 for x in xs) / (n - 1) / n", "sum((x - m) ** 2 for x in xs) / n / n",
     STDERR, "the population standard deviation (ddof 0), not lm-eval's sample one"),
    ("average_of_acc_only", "results.py", 'out["results"][t][f"{REPORTED[t]},none"]', 'out["results"][t]["acc,none"]',
     R + "test_record_averages_the_seven_reported_metrics_and_writes_the_file",
     "the zero-shot average of acc, not the reported metric of each task"),
    ("old_stderr_name", "results.py", 'old[base].replace(",", "_stderr,")', 'old[base] + "_stderr"',
     R + "test_read_results_gives_the_same_numbers_from_lm_evals_file_and_ours",
     "an earlier file's stderr read under a name lm-eval does not use"),
]

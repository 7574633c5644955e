"""eval_exact_match and the user's metric function: greedy answers of a tiny model fitted to
four rows until it reproduces them, compared with hand-written references."""

from __future__ import annotations

import sys

import pytest
import torch

from trainables.data import IGNORE, collate
from trainables.generate import (
    AnswerMetrics,
    UserMetric,
    answerable,
    generate_answers,
    generate_answers_blocks,
    matches,
    normalise,
    split_row,
)

WORDS = ["<pad>", "<eos>", "capital", "of", "old", "is", "the", "alba", "brun", "cora", "dune",
         "paris", "rome", "oslo", "bern"]
# One prompt longer than the others, so that the batch is left-padded for real.
QUESTIONS = {"capital of alba": "paris is the capital", "capital of old brun": "rome is the capital",
             "capital of cora": "oslo is the capital", "capital of dune": "bern is the capital"}
ANSWERS = list(QUESTIONS.values())
# The same prompts, the first with another country's answer as its reference
WRONG_FIRST = {**QUESTIONS, "capital of alba": "rome is the capital"}
CPU = torch.device("cpu")
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over WORDS: ids are positions in WORDS, decoding joins words with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>")


def row(prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """A tokenized row as the data module writes it: labels -100 on the prompt, then the answer and its end."""
    prompt_ids = [WORDS.index(word) for word in prompt.split()]
    answer_ids = [WORDS.index(word) for word in answer.split()] + [WORDS.index("<eos>")]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


@pytest.fixture(scope="module")
def fitted():
    """A one-layer Llama (2,592 parameters) trained on the four rows until it reproduces them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core CPU, two threads made these tiny steps 20x slower
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=None, eos_token_id=1)
    model = LlamaForCausalLM(config)
    batch = collate([row(q, a) for q, a in QUESTIONS.items()], pad_id=0, device=CPU)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


def test_the_fitted_model_answers_each_prompt_with_its_reference_and_exact_match_is_one(fitted, tokenizer):
    rows = [row(q, a) for q, a in QUESTIONS.items()]

    generations, references = generate_answers(fitted, rows, tokenizer, 0, CPU, NO_AUTOCAST)

    assert references == ANSWERS
    assert generations == ANSWERS
    assert matches(generations, references) == [1.0, 1.0, 1.0, 1.0]


def test_exact_match_counts_a_reference_the_model_does_not_give_as_a_miss(fitted, tokenizer):
    rows = [row(q, a) for q, a in WRONG_FIRST.items()]

    generations, references = generate_answers(fitted, rows, tokenizer, 0, CPU, NO_AUTOCAST)

    assert generations[0] == "paris is the capital" and references[0] == "rome is the capital"
    assert matches(generations, references) == [0.0, 1.0, 1.0, 1.0]  # exact match 0.75


def test_generation_leaves_the_model_in_train_mode_when_it_found_it_so(fitted, tokenizer):
    fitted.train()
    try:
        generate_answers(fitted, [row("capital of alba", "paris is the capital")], tokenizer, 0, CPU, NO_AUTOCAST)
        assert fitted.training
    finally:
        fitted.eval()


def test_slots_of_a_pack_that_answer_together_give_the_answers_each_gives_alone(fitted, tokenizer):
    """A shared trainer's slots that answer at one step decode together (`AnswerMetrics.blocks`):
    each block's answers and metrics are its slot's own, whatever the others answer."""
    from rundir.params import Origin, TrialParams
    from trainables.packed import Pack, unpack

    rows = [row(q, a) for q, a in QUESTIONS.items()]
    pack = Pack(fitted, capacity=3, warmup_steps=1, max_steps=2)
    try:
        g = torch.Generator().manual_seed(0)
        for seed, scale in enumerate([0.0, 0.0, 3.0]):  # slot 2's adapter garbles the answers, the others keep them
            lora = {"r": 4, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"],
                    "use_rslora": False, "use_dora": False, "task_type": "CAUSAL_LM"}
            index = pack.add(TrialParams(lora_config=lora, module_set="x", alpha_ratio=1.0, learning_rate=1e-3,
                                         loraplus_lr_ratio=1.0, seed=seed, origin=Origin.SEARCH))
            pack.load_adapter_state(index, {k: torch.randn(v.shape, generator=g) * scale if "lora_B" in k else v
                                            for k, v in pack.adapter_state(index).items()})
        chosen = [2, 0]
        with pack.only(*chosen) as model:
            together, references = generate_answers_blocks(model, rows, tokenizer, 0, CPU, NO_AUTOCAST, blocks=2)
            metrics = AnswerMetrics(rows, tokenizer, None).blocks(model, 0, CPU, NO_AUTOCAST, blocks=2)
        for slot, answers in zip(chosen, together):
            with pack.only(slot) as model:
                assert (answers, references) == generate_answers(model, rows, tokenizer, 0, CPU, NO_AUTOCAST)
        assert together[1] == ANSWERS and together[0] != ANSWERS  # two adapters, two sets of answers
        assert [m["eval_exact_match"] for m in metrics] == [sum(matches(together[0], ANSWERS)) / len(ANSWERS), 1.0]
    finally:
        unpack(fitted)


def test_a_user_metric_function_receives_exactly_the_generations_and_references(fitted, tokenizer, tmp_path,
                                                                                 monkeypatch):
    (tmp_path / "mymetric.py").write_text(
        "calls = []\n\n\ndef score(generations, references):\n"
        "    calls.append((generations, references))\n    return 0.25\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [row(q, a) for q, a in WRONG_FIRST.items()]
    answer_metrics = AnswerMetrics(rows, tokenizer, UserMetric.load("mymetric:score"))

    metrics = answer_metrics(fitted, 0, CPU, NO_AUTOCAST)

    # three of four right, the first wrong: the standard error of the mean of (0, 1, 1, 1) is 0.5 / sqrt(4)
    assert metrics == {"eval_exact_match": 0.75, "eval_exact_match_se": 0.25, "eval_row_exact_match": [0.0, 1.0, 1.0, 1.0],
                       "mymetric:score": 0.25}
    assert sys.modules["mymetric"].calls == [(ANSWERS, list(WRONG_FIRST.values()))]


@pytest.mark.parametrize("module, returned", [("negative", "-1.0"), ("nan", "float('nan')"), ("text", "'high'"),
                                              ("boolean", "True")])
def test_a_user_metric_that_returns_no_finite_number_at_least_zero_fails_naming_the_function(tmp_path, monkeypatch,
                                                                                              module, returned):
    (tmp_path / f"{module}.py").write_text(f"def score(generations, references):\n    return {returned}\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(ValueError, match=rf"selection.metric='{module}:score' returned .* finite number >= 0"):
        UserMetric.load(f"{module}:score")(["a"], ["a"])


@pytest.mark.parametrize("spec, named", [("nosuchmodule:score", "module 'nosuchmodule' cannot be imported"),
                                         ("json:nosuchfunction", "has no function 'nosuchfunction'")])
def test_a_user_metric_that_cannot_be_found_is_named_with_a_fix(spec, named):
    with pytest.raises(ValueError, match=named) as error:
        UserMetric.load(spec)
    assert f"selection.metric={spec!r}" in str(error.value) and "Fix:" in str(error.value)


def test_only_rows_with_both_a_prompt_and_an_answer_are_answered_up_to_the_limit():
    plain_text = ([7, 8, 9], [7, 8, 9])  # every token an answer token: nothing to prompt with
    rows = [plain_text, *(row(q, a) for q, a in QUESTIONS.items())]

    assert answerable(rows, 2) == rows[1:3]
    assert answerable(rows, 0) == []


def test_a_multi_turn_row_is_asked_its_last_answer_after_the_earlier_turns():
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    labels = [IGNORE, IGNORE, 3, 4, IGNORE, IGNORE, 7, 8]  # two answers: 3 4, then 7 8
    assert split_row(ids, labels) == ([1, 2, 3, 4, 5, 6], [7, 8])
    assert split_row(ids, [IGNORE] * 8) == (ids, [])
    assert split_row(ids, ids) == ([], ids)


@pytest.mark.parametrize("text, normalised", [
    ("  The capital\tof\n\nAlba  is Paris. ", "the capital of alba is paris"),  # whitespace collapsed, case folded
    ("Paris!?", "paris"),
    ('He said “yes.”', 'he said “yes'),  # trailing punctuation, a closing quote included
    ("Oui !", "oui"), ("是。", "是"),
    ("Paris .", "paris"),                 # punctuation after a space, and the space
    ("ÉCOLE", "école"),                   # case folded beyond ASCII
    ("50%", "50%"), ("f(x)", "f(x)"), ("C++", "c++"),  # only what ends a sentence or quote
    ("U.S.A. is", "u.s.a. is"),           # inner punctuation stays
    ("...", ""),
])
def test_normalise_collapses_whitespace_folds_case_and_strips_trailing_punctuation(text, normalised):
    assert normalise(text) == normalised


def test_exact_match_is_the_share_of_answers_equal_to_their_reference_after_normalising():
    assert matches(["Paris.", "rome", "Oslo is cold"], ["paris", "Rome!", "oslo"]) == [1.0, 1.0, 0.0]

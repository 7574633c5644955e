"""trainables/decode.py: greedy decoding over a static cache, its step made to be captured."""

from __future__ import annotations

import pytest
import torch

from helpers import fake_cuda
from rundir.params import Origin, TrialParams
from trainables.decode import greedy_tokens, plain_greedy, static_decoding
from trainables.generate import generate_answers_blocks, stop_token_ids

SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::equal"}


def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval()


def left_padded(lengths: list[int], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, vocab, (length,), generator=g)
        mask[row, width - length:] = 1
    return ids, mask


def generated(model, ids, mask, new: int, stops: list[int], autocast=None) -> torch.Tensor:
    with autocast or torch.autocast("cpu", enabled=False):
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=new,
                             pad_token_id=0, eos_token_id=stops)
    return out[:, ids.shape[1]:]


def packed_pair(tiny_model_dir):
    """A pack of two slots with B drawn, selected both: two adapted models, block by block."""
    from trainables.packed import Pack

    model = tiny(tiny_model_dir)
    model.config.use_cache = False  # as the shared trainer loads its base
    pack = Pack(model, capacity=2, warmup_steps=1, max_steps=10)
    for seed, modules in enumerate((["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj", "o_proj"])):
        lora = {"r": 4 * (seed + 1), "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": modules,
                "use_rslora": False, "use_dora": False, "task_type": "CAUSAL_LM"}
        index = pack.add(TrialParams(lora_config=lora, module_set="+".join(modules), alpha_ratio=2.0, learning_rate=1e-3,
                                     loraplus_lr_ratio=1.0, seed=seed, origin=Origin.SEARCH))
        g = torch.Generator().manual_seed(seed)
        pack.load_adapter_state(index, {key: torch.randn(weight.shape, generator=g) * 0.3
                                        for key, weight in pack.adapter_state(index).items()})
    return pack


@pytest.mark.parametrize("stopping", ["never", "rows at different steps"])
@pytest.mark.parametrize("autocast", [False, True])
def test_greedy_tokens_are_those_of_generate_for_left_padded_rows(tiny_model_dir, stopping, autocast):
    """Rows of different lengths, left-padded, in fp32 and under bf16 autocast: the same tokens
    as transformers' greedy `generate`, rows that stopped padded after their stop token, and as
    many columns as `generate` makes (it ends when the last row stops)."""
    model = tiny(tiny_model_dir)
    ids, mask = left_padded([5, 9, 3, 9, 7], model.config.vocab_size, seed=1)
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    stops = [2]
    if stopping != "never":  # each row stops at the first of the tokens the rows end with: some at once, some later
        stops = sorted(set(generated(model, ids, mask, 12, [2], cast)[:, -1].tolist()))
    expected = generated(model, ids, mask, 12, stops, cast)
    got = greedy_tokens(model, ids, mask, 12, stops, 0, cast)
    if stopping != "never":
        stopped_at = {int(torch.isin(row, torch.tensor(stops)).nonzero()[0]) for row in expected}
        assert expected.shape[1] < 12 and len(stopped_at) > 1, stopped_at
    assert torch.equal(got, expected)


def test_greedy_tokens_of_a_peft_model_and_of_a_packs_selection_are_generates(tiny_model_dir):
    """A per-process trial answers through its PEFT model, a shared trainer through a selection of
    its pack (`Pack.only`), each slot's prompts a block of the rows: both as `generate` answers."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False)).eval()
    ids, mask = left_padded([4, 8, 6], peft_model.config.vocab_size, seed=1)
    assert torch.equal(greedy_tokens(peft_model, ids, mask, 10, [2], 0), generated(peft_model, ids, mask, 10, [2]))

    pack = packed_pair(tiny_model_dir)
    with pack.only(0, 1) as model:
        model.eval()
        blocks = greedy_tokens(model, ids.repeat(2, 1), mask.repeat(2, 1), 10, [2], 0)
        assert torch.equal(blocks, generated(model, ids.repeat(2, 1), mask.repeat(2, 1), 10, [2]))
    assert not torch.equal(blocks[:3], blocks[3:])  # the two slots' adapters answer differently
    for slot in (0, 1):
        with pack.only(slot) as model:
            model.eval()
            assert torch.equal(greedy_tokens(model, ids, mask, 10, [2], 0), blocks[3 * slot:3 * slot + 3])


def test_a_decoding_step_reads_nothing_back_from_the_device(tiny_model_dir):
    """What a CUDA graph of the step needs: no step reads a number back to the host. Eight more
    steps read no more than none: each read off a GPU would wait for its queue, and a capture
    refuses it."""
    from torch.profiler import ProfilerActivity, profile

    pack = packed_pair(tiny_model_dir)
    ids, mask = left_padded([4, 8, 6], pack.model.config.vocab_size, seed=2)
    reads = {}
    with pack.only(0, 1) as model:
        model.eval()
        for new in (2, 10):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                greedy_tokens(model, ids.repeat(2, 1), mask.repeat(2, 1), new, [-5], 0)
            reads[new] = sorted(event.name for event in prof.events() if event.name in SYNCS)
    assert reads[2] and reads[10] == reads[2], reads  # the reads are the answer's length, once


def test_a_generation_config_that_asks_more_than_greedy_tokens_goes_through_generate(tiny_model_dir):
    """A repetition penalty is a logits processor, which only `generate` applies: the answers are
    generate's, with it."""
    from transformers import AutoTokenizer

    model = tiny(tiny_model_dir)
    assert plain_greedy(model) and static_decoding(model, torch.device("cuda", 0))
    assert not static_decoding(model, torch.device("cpu"))  # nothing captured: generate's growing cache is faster
    model.generation_config.repetition_penalty = 5.0
    assert not plain_greedy(model) and not static_decoding(model, torch.device("cuda", 0))
    model.generation_config.repetition_penalty = 1.0
    assert plain_greedy(model)
    model.config.layer_types = ["sliding_attention", "full_attention"]  # a mask of its own in some layers
    assert not plain_greedy(model)
    model.config.layer_types = ["full_attention", "full_attention"]
    assert plain_greedy(model)
    model.generation_config.repetition_penalty = 5.0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [([5, 6, 7, 8, 9], [-100, -100, -100, 8, 9]), ([11, 12, 13], [-100, -100, 13])]
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    stops = stop_token_ids(model, tokenizer)
    penalised = generated(model, ids, mask, 6, stops)
    assert not torch.equal(penalised, greedy_tokens(model, ids, mask, 6, stops, 0))  # the penalty changes them
    answers, _ = generate_answers_blocks(model, rows, tokenizer, 0, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert answers[0][0] == tokenizer.decode(penalised[0], skip_special_tokens=True).strip()


def test_a_model_whose_cache_cannot_be_static_answers_through_generate_with_a_warning_faked(
        tiny_model_dir, monkeypatch, caplog):
    """Faked: a transformers whose StaticCache takes other arguments (another version, or an
    architecture without one); the answers are then generate's, and the log says why."""
    import transformers

    import trainables.decode as decode_module

    def no_static_cache(*args, **kwargs):
        raise TypeError("StaticCache.__init__() got an unexpected keyword argument 'config'")

    model = tiny(tiny_model_dir)
    ids, mask = left_padded([4, 6], model.config.vocab_size, seed=3)
    expected = generated(model, ids, mask, 8, [2])
    monkeypatch.setattr(decode_module, "static_decoding", lambda model, device: True)  # as on a GPU
    monkeypatch.setattr(transformers, "StaticCache", no_static_cache)
    with caplog.at_level("WARNING", logger="trainables.decode"):
        got = decode_module.decode(model, ids, mask, 8, [2], 0, torch.autocast("cpu", enabled=False))
    assert torch.equal(got, expected)
    assert "cannot decode over a static cache (StaticCache.__init__() got an unexpected keyword" in caplog.text


def test_a_static_cache_of_one_dtype_under_autocast_answers_through_generate_faked(tiny_model_dir, monkeypatch, caplog):
    """Faked transformers 5.17 (the GPU machines'): its static cache holds the values in the keys'
    dtype, and an fp32 model under bf16 autocast gives fp32 keys (after the rotary embedding) and
    bf16 values, so filling the cache with the prompts raises. The answers are then generate's."""
    from transformers.cache_utils import StaticLayer

    import trainables.decode as decode_module

    made = StaticLayer.lazy_initialization

    def one_dtype(self, key_states, value_states):
        made(self, key_states, value_states)
        self.values = self.values.to(self.keys.dtype)

    model = tiny(tiny_model_dir)
    ids, mask = left_padded([4, 6], model.config.vocab_size, seed=3)
    cast = torch.autocast("cpu", dtype=torch.bfloat16)
    expected = generated(model, ids, mask, 8, [2], cast)
    monkeypatch.setattr(decode_module, "static_decoding", lambda model, device: True)  # as on a GPU
    monkeypatch.setattr(StaticLayer, "lazy_initialization", one_dtype)
    with caplog.at_level("WARNING", logger="trainables.decode"):
        got = decode_module.decode(model, ids, mask, 8, [2], 0, cast)
    assert torch.equal(got, expected)
    assert "cannot decode over a static cache (index_copy_(): self and source expected to have the same dtype" in caplog.text


def test_smollm2s_greedy_tokens_for_the_reference_tasks_questions_are_generates(smollm2_dir):
    """The embedded default's own weights, on questions of the reference task in its chat template:
    a trained model's answers end at different steps, which a random one's seldom do."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    lines = (Path(__file__).resolve().parents[1] / "bench/data/facts/facts_eval.jsonl").read_text().splitlines()[:6]
    prompts = [tokenizer.apply_chat_template(json.loads(line)["messages"][:-1], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for line in lines]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    # the answers' first sentence: its end comes at a different step in each
    stops = stop_token_ids(model, tokenizer) + tokenizer.convert_tokens_to_ids(["."])
    expected = generated(model, ids, mask, 24, stops)
    assert torch.equal(greedy_tokens(model, ids, mask, 24, stops, 0), expected)
    stopped = torch.isin(expected, torch.tensor(stops))
    ends = {int(row.nonzero()[0]) for row in stopped if row.any()}
    assert len(ends) >= 2, ends


@pytest.mark.parametrize("capture", ["made", "refused"])
def test_the_decoding_step_runs_eagerly_then_is_captured_once_and_replayed_with_a_fake_cuda(monkeypatch, caplog,
                                                                                             capture):
    """What a GPU does with the step, on stand-ins for CUDA's streams and graph (no GPU here): the
    warm-up steps on a side stream, one capture (errors of other threads' CUDA calls left to
    them), a replay for each further token. A capture refused (a step that reads the device)
    leaves the tokens to eager steps, as many as the replays would have made, and says so."""
    import trainables.decode as decode_module
    from trainables.decode import DECODE_WARMUP_PASSES as WARMUP_PASSES

    calls = []
    fake_cuda(monkeypatch, calls, refuse_capture=capture == "refused")
    with caplog.at_level("WARNING", logger="trainables.decode"):
        decode_module._run(lambda: calls.append("step"), 10, capture=True)
    warm = ["side waits for main", "on side", *["step"] * WARMUP_PASSES, "off side", "main waits for side"]
    if capture == "made":
        assert calls == [*warm, "capture begins, thread_local", "step", "capture ends", *["replay"] * (10 - WARMUP_PASSES)]
        assert caplog.text == ""
    else:
        assert calls == [*warm, "capture begins, thread_local", "step", *["step"] * (10 - WARMUP_PASSES)]
        assert "could not be captured (CUDA error: operation not permitted when stream is capturing)" in caplog.text
    calls.clear()
    decode_module._run(lambda: calls.append("step"), 2, capture=True)  # no further token: nothing to capture
    assert calls == ["step", "step"]


def test_a_decoding_step_that_fails_before_its_capture_raises_with_a_fake_cuda(monkeypatch):
    """Only a refused capture leaves the tokens to eager steps: a step that fails in the warm-up
    (out of memory, a bad shape) fails the round, not a retry of it."""
    import trainables.decode as decode_module

    calls = []
    fake_cuda(monkeypatch, calls)

    def step():
        calls.append("step")
        if calls.count("step") == decode_module.DECODE_WARMUP_PASSES:
            raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        decode_module._run(step, 10, capture=True)
    assert calls.count("step") == decode_module.DECODE_WARMUP_PASSES
    assert not any(call.startswith("capture") for call in calls)

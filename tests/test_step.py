"""The trial's train step: the padded, mask-free batch it trains on gives exactly the loss
the model computes with its attention mask and labels, batch by seed and step.
(The CUDA-graph capture itself needs a GPU: bench/step_modes.py exercises it on one.)"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

from helpers import fake_cuda
from trainables.data import IGNORE, batch_indices, collate
from trainables.step import TrainStep, answer_loss, widest


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (5, 9, 13, 7, 11, 6):  # uneven lengths: padding matters
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        labels = [IGNORE] * (n // 2) + ids[n // 2:]  # loss on the "answer" half only
        rows.append((ids, labels))
    return model, rows


def test_answer_loss_on_right_padded_rows_without_a_mask_equals_the_models_masked_loss(tiny):
    model, rows = tiny
    batch = collate(rows, 0, torch.device("cpu"))
    with torch.no_grad():
        expected = model(**batch).loss
        # padded to a wider fixed width, as a captured step is
        wide_ids = torch.nn.functional.pad(batch["input_ids"], (0, 7), value=0)
        wide_labels = torch.nn.functional.pad(batch["labels"], (0, 7), value=IGNORE)
        got = answer_loss(model, wide_ids, wide_labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _loss_and_grads(model, batch, **options):
    model.zero_grad()
    loss = answer_loss(model, batch["input_ids"], batch["labels"], **options)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _rows_into_head(model, batch) -> list[int]:
    """The rows of hidden states the output layer is given in one answer-only loss."""
    seen = []
    head = model.get_base_model().get_output_embeddings() if hasattr(model, "get_base_model") \
        else model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        answer_loss(model, batch["input_ids"], batch["labels"], answer_only=True)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("head", ["plain", "softcapped", "adapted"])
def test_the_answer_only_loss_and_gradients_equal_the_full_logits_and_the_head_sees_only_answer_positions(tiny, head):
    """The output layer computes logits for the positions whose next token is an answer only;
    the loss and every gradient are the full forward's, also where the model's forward changes
    the logits after the head (Gemma 2's softcap) and where the head itself is adapted."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model, rows = copy.deepcopy(tiny[0]), tiny[1]  # PEFT adapts the model in place
    torch.manual_seed(0)
    if head == "softcapped":
        model = Gemma2ForCausalLM(Gemma2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, vocab_size=100, pad_token_id=0, final_logit_softcapping=2.0)).eval()
    targets = ["q_proj", "v_proj", "lm_head"] if head == "adapted" else ["q_proj", "v_proj"]
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    batch = collate(rows, 0, torch.device("cpu"))
    full, full_grads = _loss_and_grads(model, batch)
    only, only_grads = _loss_and_grads(model, batch, answer_only=True)
    with torch.no_grad():
        expected = model(**batch).loss
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(only, full, rtol=1e-5, atol=1e-6)
    assert full_grads.keys() == only_grads.keys() and any("lora_A" in name for name in full_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(only_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    answers = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert _rows_into_head(model, batch) == [answers] and answers < batch["labels"].numel() // 2


def test_a_model_that_does_not_call_its_output_layer_as_a_module_gets_the_answer_positions_of_its_full_logits(tiny):
    """The hook cannot select what the output layer is never given as a module call: such a
    forward's full logits are selected afterwards, to the same loss."""
    model, rows = tiny

    class HeadByWeight(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids):
            hidden = self.inner.get_decoder()(input_ids=input_ids).last_hidden_state
            return type("Out", (), {"logits": torch.nn.functional.linear(hidden, self.get_output_embeddings().weight)})

    batch = collate(rows, 0, torch.device("cpu"))
    with torch.no_grad():
        expected = model(**batch).loss
        got = answer_loss(HeadByWeight(model), batch["input_ids"], batch["labels"], answer_only=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_step_trains_on_the_seeded_batch_of_its_step_and_counts_real_tokens(tiny):
    model, rows = tiny
    model.requires_grad_(True)
    step = TrainStep(model, rows, batch_size=2, seed=3, max_steps=6, pad_token_id=0, device=torch.device("cpu"), cuda_graph=True)
    assert step.mode == "eager"  # no CUDA here: a graph is never attempted
    loss, tokens = step(4)
    chosen = [rows[i] for i in batch_indices(len(rows), 2, 3, 4)]
    assert tokens == sum(len(ids) for ids, _ in chosen)
    with torch.no_grad():
        expected = model(**collate(chosen, 0, torch.device("cpu"))).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in model.parameters())
    model.requires_grad_(False)


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(tiny_model_dir, tiny):
    from peft import LoraConfig, get_peft_model

    from trainables.model import forget_base_model, load_base_model

    _, rows = tiny
    rows = [([min(t, 90) for t in ids], [t if t == IGNORE else min(t, 90) for t in labels]) for ids, labels in rows]
    grads = {}
    for checkpointing in (False, True):
        forget_base_model()
        base = load_base_model(str(tiny_model_dir), "float32", "none", False, torch.device("cpu"), checkpointing)
        assert base.is_gradient_checkpointing == checkpointing
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                init_lora_weights=False))  # B != 0: A gets gradients too
        model.train()
        step = TrainStep(model, rows, batch_size=3, seed=1, max_steps=1, pad_token_id=0, device=torch.device("cpu"),
                         cuda_graph=False)
        loss, _ = step(0)
        grads[checkpointing] = (loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.unload()
    forget_base_model()
    torch.testing.assert_close(grads[True][0], grads[False][0])
    assert grads[True][1].keys() == grads[False][1].keys() and len(grads[True][1]) == 12
    for name, grad in grads[False][1].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[True][1][name], grad, rtol=1e-4, atol=1e-6)


def test_eval_by_token_budget_gives_the_same_loss_and_accuracy_as_by_rows(tiny):
    from trainables.evaluation import EvalBudget, evaluate

    model, rows = tiny
    model.eval()
    no_autocast = torch.autocast("cpu", enabled=False)
    by_rows = evaluate(model, rows, 0, torch.device("cpu"), no_autocast)
    for budget in (13, 30, 1000):  # one row per batch (the longest has 13 tokens), some, all
        by_tokens = evaluate(model, rows, 0, torch.device("cpu"), no_autocast, EvalBudget(budget, budget))
        assert by_tokens.loss == pytest.approx(by_rows.loss, rel=1e-5) and by_tokens.accuracy == by_rows.accuracy
        assert by_tokens.loss_se == pytest.approx(by_rows.loss_se, rel=1e-5) and by_tokens.accuracy_se == by_rows.accuracy_se


def test_an_evaluation_reads_nothing_back_from_the_device_inside_the_models_forward(tiny):
    """On a GPU, a mask's selection of the answer positions at the output layer waited for every
    layer before it, batch by batch: the evaluation chooses them on the host, so that no
    operation inside a forward reads the device (a nonzero, or a scalar's read)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from trainables.evaluation import EvalBudget, evaluate

    model, rows = tiny
    model.eval()
    ranges = []
    model.register_forward_pre_hook(lambda module, args: ranges.append(record_function("model forward").__enter__()))
    model.register_forward_hook(lambda module, args, out: ranges[-1].__exit__(None, None, None))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        evaluate(model, rows, 0, torch.device("cpu"), torch.autocast("cpu", enabled=False), EvalBudget(30, 30))
    events = prof.events()
    forwards = [event.time_range for event in events if event.name == "model forward"]
    reads = [event.name for event in events if event.name in ("aten::nonzero", "aten::_local_scalar_dense")]
    inside = [event.name for event in events if event.name in ("aten::nonzero", "aten::_local_scalar_dense")
              and any(f.start <= event.time_range.start and event.time_range.end <= f.end for f in forwards)]
    assert len(forwards) >= 3 and reads  # several batches; the host's own choices are made outside
    assert inside == []


def test_the_padded_split_is_built_once_per_worker_and_rebuilt_for_other_rows(tiny):
    model, rows = tiny
    cpu = torch.device("cpu")
    first = TrainStep(model, rows, batch_size=2, seed=0, max_steps=1, pad_token_id=0, device=cpu, cuda_graph=False)
    again = TrainStep(model, rows, batch_size=4, seed=1, max_steps=1, pad_token_id=0, device=cpu, cuda_graph=False)
    assert again.ids is first.ids  # the next trial of the worker reuses it
    other_rows = rows[:3]
    other = TrainStep(model, other_rows, batch_size=2, seed=0, max_steps=1, pad_token_id=0, device=cpu, cuda_graph=False)
    assert other.ids is not first.ids and other.ids.shape[0] == 3
    assert other.ids.shape[1] % 8 == 0 and other.ids.shape[1] >= max(len(ids) for ids, _ in other_rows)


def test_eval_of_right_padded_batches_without_a_mask_equals_each_row_alone(tiny):
    """evaluate passes no attention mask: the padding after a row must not change its loss or accuracy."""
    from trainables.evaluation import EvalBudget, evaluate

    model, rows = tiny
    model.eval()
    losses, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for ids, labels in rows:  # unpadded, one at a time
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != IGNORE
            losses += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            hits += (logits[keep].argmax(-1) == target[keep]).sum().item()
            count += int(keep.sum())
    assert len({len(ids) for ids, _ in rows}) > 1  # batches really hold padding
    evaluation = evaluate(model, rows, 0, torch.device("cpu"), torch.autocast("cpu", enabled=False), EvalBudget(1000, 1000))
    assert evaluation.loss == pytest.approx(losses / count, rel=1e-5) and evaluation.accuracy == hits / count


@pytest.mark.parametrize("use_dora", [False, True])
def test_keeping_the_bf16_input_under_autocast_gives_the_same_loss_and_gradients(tiny, use_dora):
    """PEFT casts each adapted layer's bf16 input to the float32 adapter, and bf16 autocast casts
    it back for the matmul; the GPU step turns PEFT's cast off for plain LoRA layers
    (keep_input_dtype). Both must give the same loss and adapter gradients, bit for bit (here on
    CPU under bf16 autocast, as on the GPU)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from trainables.step import keep_input_dtype

    base, rows = tiny
    batch = collate(rows, 0, torch.device("cpu"))
    results = {}
    for keep in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base).to(torch.bfloat16), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            use_dora=use_dora, init_lora_weights=False))  # B != 0: A gets gradients too
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # PEFT's float32 adapter
        if keep:
            keep_input_dtype(model)
            layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
            # plain LoRA layers stop casting; DoRA layers keep PEFT's cast
            assert len(layers) == 14 and all(m.cast_input_dtype_enabled == use_dora for m in layers)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            loss = answer_loss(model, batch["input_ids"], batch["labels"])
        loss.backward()
        results[keep] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    assert results[True][1].keys() == results[False][1].keys()
    for name, grad in results[False][1].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(results[True][1][name], grad, rtol=0, atol=0)


def _qv_adapter(base):
    """A fresh copy of `base` with a seeded q,v r4 adapter whose B is not zero (every adapter
    tensor gets a gradient), in train mode."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    return model.train()


def test_a_compiled_step_pads_to_one_width_and_gives_the_eager_steps_loss_and_gradients(tiny):
    """resources.compile: every batch at the split's full width (one compilation for every
    step), through torch.compile. Here with its "eager" backend (inductor needs a compiler
    and, in trials, a GPU): dynamo really traces the PEFT model; the numbers must not change."""
    base, rows = tiny
    results = {}
    for compiled in (None, "eager"):
        model = _qv_adapter(base)
        step = TrainStep(model, rows, batch_size=2, seed=3, max_steps=4, pad_token_id=0, device=torch.device("cpu"),
                         cuda_graph=False, compiled=compiled)
        widths = []
        model.get_input_embeddings().register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
        losses = [step(k)[0] for k in range(3)]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[compiled] = (step.mode, widths, losses, grads)
        step.close()
    assert results[None][0] == "eager" and results["eager"][0] == "compiled"
    full = max(len(ids) for ids, _ in rows)
    assert len(set(results[None][1])) > 1 and all(w >= full for w in results["eager"][1])  # eager: each batch's own width
    for eager_loss, compiled_loss in zip(results[None][2], results["eager"][2]):
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in results[None][3].items():
        torch.testing.assert_close(results["eager"][3][name], grad, rtol=1e-4, atol=1e-6)


def test_a_compiled_step_compiles_one_decoder_layer_for_all_and_leaves_eval_eager():
    """resources.compile compiles a decoder layer once for every layer of the model (plus the
    first layer's variant, whose input needs no gradient, and the loss), not the model: the
    number of graphs does not grow with the layers. Eval forwards outside the step compile
    nothing. Backend "eager": dynamo traces for real, nothing is code-generated."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    graphs = {}
    for layers in (2, 5):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                            pad_token_id=0, use_cache=False))
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        model.train()
        rows = [(list(range(3, 3 + n)), [IGNORE] * 2 + list(range(5, 3 + n))) for n in (6, 9, 7, 8)]
        torch._dynamo.reset()
        counters.clear()
        step = TrainStep(model, rows, batch_size=2, seed=0, max_steps=3, pad_token_id=0, device=torch.device("cpu"),
                         cuda_graph=False, compiled="eager")
        for k in range(3):
            step(k)
        graphs[layers] = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5]]))
        assert counters["stats"]["unique_graphs"] == graphs[layers]  # the eval pass compiled nothing
        assert step.compiled.blocks and len(step.compiled.blocks) == layers
        step.close()
    assert graphs[2] == graphs[5] <= 3


def test_a_step_whose_compile_fails_runs_uncompiled_with_the_same_loss(tiny, caplog):
    """A model or backend that torch.compile cannot handle does not fail the trial: its first
    step warns, and the trial trains as it would have without compiling (here eagerly, each
    batch at its own width), with the same loss."""
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("this backend compiles nothing")

    base, rows = tiny
    losses = {}
    for compiled in (None, broken_backend):
        model = _qv_adapter(base)
        step = TrainStep(model, rows, batch_size=2, seed=3, max_steps=3, pad_token_id=0, device=torch.device("cpu"),
                         cuda_graph=True, compiled=compiled)
        losses[compiled is None] = [step(k)[0] for k in range(3)]
        assert step.mode == "eager" and step.compiled is None
        step.close()
    assert "compiling the train step failed" in caplog.text and "this backend compiles nothing" in caplog.text
    for eager_loss, fallen_back in zip(losses[True], losses[False]):
        torch.testing.assert_close(fallen_back, eager_loss, rtol=1e-6, atol=1e-7)


def test_a_model_on_several_devices_is_seen_as_such_and_one_on_a_single_device_is_not():
    """A model spread over GPUs (device_map="auto") must not be captured as one GPU's graph:
    the capture is skipped where the parameters sit on more than one device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainables.step import spans_devices

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(config)
    assert not spans_devices(model)
    model.model.layers[1].to("meta")  # stands in for a second GPU: any other device
    assert spans_devices(model)


def test_eval_standard_errors_are_those_of_the_per_row_means_computed_by_hand(tiny):
    """Each row's mean loss and token accuracy, computed alone with torch; the standard error
    of their mean over rows is std (n - 1) / sqrt(n)."""
    from trainables.evaluation import EvalBudget, evaluate

    model, rows = tiny
    model.eval()
    row_losses, row_accuracies = [], []
    with torch.no_grad():
        for ids, labels in rows:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            keep = target != IGNORE
            row_losses.append(torch.nn.functional.cross_entropy(logits[keep], target[keep]).item())
            row_accuracies.append((logits[keep].argmax(-1) == target[keep]).float().mean().item())
    evaluation = evaluate(model, rows, 0, torch.device("cpu"), torch.autocast("cpu", enabled=False), EvalBudget(30, 30))

    by_hand = torch.tensor(row_losses, dtype=torch.float64)
    assert evaluation.loss_se == pytest.approx((by_hand.std() / len(rows) ** 0.5).item(), rel=1e-4)
    by_hand = torch.tensor(row_accuracies, dtype=torch.float64)
    assert evaluation.accuracy_se == pytest.approx((by_hand.std() / len(rows) ** 0.5).item(), rel=1e-6)
    assert evaluation.loss_se > 0


def test_eval_reports_each_rows_own_values_in_the_order_of_the_rows_not_of_its_batches(tiny):
    """Each row's mean loss and token accuracy, computed alone with torch, in the order the rows
    came in (evaluate batches them by length); a row without answer tokens has none and is left
    out. Weighted by each row's answer tokens they give the reported eval loss, and their own
    standard error is the reported one."""
    from trainables.evaluation import EvalBudget, evaluate

    model, rows = tiny
    ids = rows[0][0]
    rows = rows[:2] + [(ids, [IGNORE] * len(ids))] + rows[2:]  # an answer truncated away: nothing to score
    model.eval()
    row_losses, row_accuracies, row_tokens, row_lengths = [], [], [], []
    with torch.no_grad():
        for ids, labels in rows:
            target = torch.tensor(labels[1:])
            keep = target != IGNORE
            if not keep.any():
                continue
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            row_losses.append(torch.nn.functional.cross_entropy(logits[keep], target[keep]).item())
            row_accuracies.append((logits[keep].argmax(-1) == target[keep]).float().mean().item())
            row_tokens.append(int(keep.sum()))
            row_lengths.append(len(ids))
    evaluation = evaluate(model, rows, 0, torch.device("cpu"), torch.autocast("cpu", enabled=False), EvalBudget(30, 30))
    metrics = evaluation.metrics()

    assert row_lengths != sorted(row_lengths)  # the batches' order is not the rows'
    assert metrics["eval_row_loss"] == pytest.approx(row_losses, rel=1e-5)
    assert metrics["eval_row_accuracy"] == pytest.approx(row_accuracies, rel=1e-6)
    by_tokens = sum(loss * tokens for loss, tokens in zip(metrics["eval_row_loss"], row_tokens)) / sum(row_tokens)
    assert by_tokens == pytest.approx(metrics["eval_loss"], rel=1e-5)
    own_se = statistics.stdev(metrics["eval_row_loss"]) / len(row_losses) ** 0.5
    assert own_se == pytest.approx(metrics["eval_loss_se"], rel=1e-5)


def test_the_capture_recipe_warms_up_on_a_side_stream_then_clears_gradients_then_captures_with_a_fake_cuda(monkeypatch):
    """torch.cuda.graph's own recipe, which both the trial's step and the pack's take from
    `cuda_graph`: the order of its calls, on stand-ins for CUDA's stream and graph (no GPU here)."""
    from trainables import step as step_module

    calls = []
    Graph = fake_cuda(monkeypatch, calls)
    graph, out = step_module.cuda_graph(lambda: calls.append("warm-up pass"), lambda: calls.append("step") or "loss",
                                        lambda: calls.append("gradients cleared"))
    assert out == "loss" and isinstance(graph, Graph)
    assert calls == ["side waits for main", "on side", *["warm-up pass"] * step_module.WARMUP_PASSES, "off side",
                     "main waits for side", "gradients cleared", "capture begins, thread_local", "step", "capture ends"]


def test_under_a_capture_sdpa_gets_the_mask_it_gets_outside_one_none_for_causal_rows_and_the_padding_mask_else(
        tiny, monkeypatch):
    """A CUDA graph's capture counts as tracing to transformers (the GPU machine's version), which
    then builds the causal mask it leaves to sdpa's `is_causal` outside one: the captured step ran
    another attention than its warm-up, and torch.compile compiled again under the capture. The
    registered mask function answers as outside a capture whatever tracing says; with padding it
    is sdpa's own. The capture is played by transformers' own test of whether to skip the mask
    answering no, as it does under one."""
    import transformers.masking_utils as masking
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

    from trainables.step import causal_attention_as_sdpa_chooses

    model, _ = tiny
    ids = torch.randint(3, 100, (2, 9))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, 6:] = 0
    before = [model(input_ids=ids).logits, model(input_ids=ids, attention_mask=padding).logits]
    causal_attention_as_sdpa_chooses()
    mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    causal = dict(batch_size=2, q_length=9, kv_length=9, mask_function=causal_mask_function, attention_mask=None)
    assert mask(**causal) is None
    with_padding = dict(causal, attention_mask=padding.bool())
    assert torch.equal(mask(**with_padding), sdpa_mask(**with_padding))  # the rows' padding is masked
    window = dict(causal, local_size=4)  # a sliding window is a mask of its own
    assert torch.equal(mask(**window), sdpa_mask(**dict(window, allow_is_causal_skip=False)))
    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", lambda *args, **kwargs: False)
    assert sdpa_mask(**causal) is not None  # transformers' own, as under a capture
    assert mask(**causal) is None
    # transformers before 5 gives the query positions instead of their count
    assert mask(**{**{k: v for k, v in causal.items() if k != "q_length"}, "cache_position": torch.arange(9)}) is None
    after = [model(input_ids=ids).logits, model(input_ids=ids, attention_mask=padding).logits]
    for was, now in zip(before, after):
        torch.testing.assert_close(now, was, rtol=0, atol=0)


def test_under_a_capture_the_check_for_sequences_packed_in_a_row_leaves_sdpa_its_causal_kernel(
        tiny, monkeypatch, request):
    """Under a capture transformers keeps its check of the position ids for several sequences
    packed in one row, which outside one reads them and finds none: it joins that check to the
    causal mask and builds the mask, so sdpa ran with a mask where the warm-up ran `is_causal`,
    and the compiled decoder layers compiled again under the capture. With the registered
    function the attention is called as outside one. The capture is played by transformers' own
    `is_tracing` answering yes, as it does under one; sdpa is watched where transformers calls it."""
    import transformers.masking_utils as masking
    from transformers.masking_utils import AttentionMaskInterface

    from trainables.step import causal_attention_as_sdpa_chooses

    model, _ = tiny
    monkeypatch.setattr(model.config, "use_cache", False)  # as the trainers load it: no cache, so the check runs
    ids = torch.randint(3, 100, (2, 9))
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def watched(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is None and bool(kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", watched)
    AttentionMaskInterface.register("sdpa", masking.sdpa_mask)  # transformers' own, whatever ran before
    request.addfinalizer(lambda: AttentionMaskInterface.register("sdpa", masking.sdpa_mask))
    outside = model(input_ids=ids).logits
    assert calls and all(calls)  # outside a capture: sdpa's is_causal, no mask
    monkeypatch.setattr(masking, "is_tracing", lambda *args, **kwargs: True)
    calls.clear()
    model(input_ids=ids)
    assert calls and not any(calls)  # transformers' own under a capture: a mask
    causal_attention_as_sdpa_chooses()
    calls.clear()
    captured = model(input_ids=ids).logits
    assert calls and all(calls)
    torch.testing.assert_close(captured, outside, rtol=0, atol=0)
    # a model with windows keeps transformers' mask where it joins functions: they may be its window
    from transformers import MistralConfig
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
    )

    joined = and_masks(causal_mask_function, packed_sequence_mask_function(torch.zeros(2, 9, dtype=torch.long)))
    packed = dict(batch_size=2, q_length=9, kv_length=9, mask_function=joined, attention_mask=None,
                  allow_is_causal_skip=False)
    mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    assert mask(**packed, config=model.config) is None
    assert mask(**packed, config=MistralConfig(sliding_window=4)) is not None
    assert mask(**packed) is not None  # no config: nothing known of its layers
    assert mask(**packed, config=model.config, allow_is_bidirectional_skip=False) is not None  # a bidirectional mask


def test_the_widest_rows_are_the_longest_row_and_the_most_positions_whose_next_token_is_an_answer():
    rows = [([1, 2, 3, 4], [IGNORE, IGNORE, 7, 8]),  # 4 tokens; positions 1 and 2 score 7 and 8
            ([1, 2, 3], [IGNORE, 5, 6]),              # 3 tokens; positions 0 and 1 score
            ([1, 2], [IGNORE, IGNORE])]               # nothing scored
    assert widest(rows) == (4, 2)
    assert widest(rows[1:]) == (3, 2) and widest(rows[2:]) == (2, 0) and widest([]) == (0, 0)

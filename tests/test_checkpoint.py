"""A trial's checkpoint has one format for both trainers: a shared trainer's slot continues from a
per-process trial's checkpoint and the other way round, taking the step the writer would have
taken next. Tiny random-init Llama (tests/conftest.py), in float32 on the CPU, without dropout
(each trainer draws its masks from generators of its own)."""

from __future__ import annotations

import io

import pytest
import torch

from rundir.params import TrialParams
from trainables.checkpoint import TRAINER_STATE, TrialCheckpoint
from trainables.metrics import Progress
from trainables.optim import loraplus_adamw, warmup_cosine
from trainables.packed import Pack
from trainables.step import answer_loss
from trainables.trial import checkpoint, restore

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "use_rslora": False, "use_dora": False, "task_type": "CAUSAL_LM"}
PARAMS = TrialParams(lora_config=LORA, module_set="q+v+down", alpha_ratio=2.0, learning_rate=1e-3,
                     loraplus_lr_ratio=4.0, seed=0)
WARMUP, MAX_STEPS = 2, 10
pytestmark = pytest.mark.filterwarnings("ignore:`get_checkpoint` is meant to only be called:UserWarning")


def base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    ids = torch.randint(3, 1000, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


class ProcessTrial:
    """A per-process trial's model, optimizer and schedule (trainables/trial.py)."""

    def __init__(self, tiny_model_dir):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(PARAMS.seed)
        self.model = get_peft_model(base(tiny_model_dir), LoraConfig(**LORA))
        self.optimizer = loraplus_adamw(self.model, PARAMS.learning_rate, PARAMS.loraplus_lr_ratio, cuda=False)
        self.scheduler = warmup_cosine(self.optimizer, WARMUP, MAX_STEPS)

    def step(self, k: int) -> None:
        answer_loss(self.model, *batch(k)).backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def weights(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)


def same(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_a_slots_checkpoint_continues_in_a_per_process_trial(tiny_model_dir, tmp_path):
    pack = Pack(base(tiny_model_dir), capacity=1, warmup_steps=WARMUP, max_steps=MAX_STEPS)
    slot = pack.add(PARAMS)
    for k in range(3):
        pack.step({slot: batch(k)})
    pack.checkpoint(slot, Progress(called_at=0.0, imported_at=0.0, step=3, tokens=96), str(tiny_model_dir)).save(tmp_path)

    trial, progress = ProcessTrial(tiny_model_dir), Progress(called_at=0.0, imported_at=0.0)
    restore(trial.model, trial.optimizer, trial.scheduler, str(tmp_path), progress)
    pack.step({slot: batch(3)})
    trial.step(3)

    assert (progress.step, progress.tokens) == (3, 96)
    same(trial.weights(), pack.adapter_state(slot))


def test_a_per_process_trials_checkpoint_continues_in_a_slot(tiny_model_dir):
    trial = ProcessTrial(tiny_model_dir)
    for k in range(3):
        trial.step(k)
    files = checkpoint(trial.model, trial.optimizer, trial.scheduler,
                       Progress(called_at=0.0, imported_at=0.0, step=3, tokens=96)).to_files()

    pack = Pack(base(tiny_model_dir), capacity=1, warmup_steps=WARMUP, max_steps=MAX_STEPS)
    slot, progress = pack.add(PARAMS), Progress(called_at=0.0, imported_at=0.0)
    pack.restore(slot, TrialCheckpoint.from_files(files), progress)
    pack.step({slot: batch(3)})
    trial.step(3)

    assert (progress.step, progress.tokens) == (3, 96)
    same(pack.adapter_state(slot), trial.weights())


def test_a_checkpoint_without_a_file_or_with_a_state_of_other_keys_is_refused_naming_them(tiny_model_dir):
    trial = ProcessTrial(tiny_model_dir)
    files = checkpoint(trial.model, trial.optimizer, trial.scheduler, Progress(called_at=0.0, imported_at=0.0)).to_files()
    with pytest.raises(ValueError, match=r"lacks \['trainer_state.pt'\]"):
        TrialCheckpoint.from_files({name: data for name, data in files.items() if name != TRAINER_STATE})

    state = torch.load(io.BytesIO(files[TRAINER_STATE]), weights_only=True)
    state["rng"] = state.pop("dropout_rng")  # as an older trainer named it
    renamed = io.BytesIO()
    torch.save(state, renamed)
    with pytest.raises(ValueError, match=r"lacks \['dropout_rng'\] and has unknown keys \['rng'\]"):
        TrialCheckpoint.from_files({**files, TRAINER_STATE: renamed.getvalue()})

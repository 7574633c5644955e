"""A whole search with the default module sets on mixtures of experts: it runs to its pick, and the
exported adapter (expert weights included) loads in PEFT and scores the eval loss the run reported."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from search.run import main
from test_moe import CONFIGS


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def moe_run(request, smollm2_dir, local_ray, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = request.param
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = CONFIGS[family]()
    config.update({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": True})
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp(family)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    output = tmp_path_factory.mktemp("runs")
    code = main([
        "--output", str(output), "--name", family,
        "--set", f"model.path={model_dir}",
        "--set", "search.ranks=[4,8]",
        "--set", "search.use_dora=[false,true]",
        "--set", "budget.num_samples=5",
        "--set", "budget.max_steps=4",
        "--set", "budget.eval_every=2",
        "--set", "budget.grace_period=2",
        "--set", "budget.warmup_steps=1",
        "--set", "budget.batch_size=4",
        "--set", "data.eval_examples=8",
        "--set", "selection.retrain=true",
    ])
    return code, output / family, model_dir, tokenizer


def test_a_search_with_the_default_module_sets_runs_to_its_pick_on_a_mixture_of_experts(moe_run):
    code, run_dir, _, _ = moe_run
    assert code == 0
    trials = pd.read_csv(run_dir / "trials.csv")
    assert (trials.status != "failed").all(), trials.error.tolist()
    assert set(trials.module_set) <= {"attention_qv", "attention", "mlp", "all_linear"}
    experts = trials[trials.module_set.isin(["mlp", "all_linear"])]
    assert len(experts) and (experts.lora_dropout == 0).all() and not experts.use_dora.any()
    assert all("experts.gate_up_proj" in json.loads(names) for names in experts.target_parameters)
    report = (run_dir / "report.md").read_text()
    assert "lora_dropout held at 0 and use_dora at false" in report
    assert "experts.gate_up_proj" in report.split("## Module sets on this model")[1]


def test_the_exported_adapter_loads_in_peft_and_scores_the_reported_eval_loss(moe_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rundir.layout import DATA
    from trainables.data import load_split
    from trainables.evaluation import evaluate

    code, run_dir, model_dir, tokenizer = moe_run
    assert code == 0
    pick = json.loads((run_dir / "pick.json").read_text())
    exported = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert exported["target_parameters"] == pick["lora_config"].get("target_parameters")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run_dir / "adapter")
    rows = load_split(str(run_dir / DATA), "eval")
    scored = evaluate(model, rows, tokenizer.pad_token_id, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert scored.loss == pytest.approx(pick["retrain"]["eval_loss"], abs=1e-4)


def test_an_expert_trial_s_adapter_loads_in_peft_and_scores_what_the_trial_reported(moe_run):
    """The pick of so small a search is often an attention set; an expert set's trial, saved the
    same way, is held to the same: its last checkpoint's adapter, loaded in PEFT, scores its report."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from helpers import trial_reports
    from rundir.layout import DATA
    from trainables.data import load_split
    from trainables.evaluation import evaluate

    code, run_dir, model_dir, tokenizer = moe_run
    assert code == 0
    reports = trial_reports(run_dir)
    expert_trial = next(rows for rows in reports.values() if rows[-1]["config"]["lora_config"].get("target_parameters"))
    last = expert_trial[-1]
    adapter = next(run_dir.glob(f"tune/trial_{last['trial_id']}/{last['checkpoint_dir_name']}/adapter"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    assert model.peft_config["default"].target_parameters
    rows = load_split(str(run_dir / DATA), "eval")
    scored = evaluate(model, rows, tokenizer.pad_token_id, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert scored.loss == pytest.approx(last["eval_loss"], abs=1e-4)


def test_a_shared_search_trains_expert_trials_in_processes_of_their_own_and_says_so(smollm2_dir, local_ray, tmp_path,
                                                                                   capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = CONFIGS["olmoe"]()
    config.update({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": True})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "olmoe")
    tokenizer.save_pretrained(tmp_path / "olmoe")
    priors = ("[{module_set: experts, r: 2, learning_rate: 1.0e-2}, "
              "{module_set: attention_qv, r: 4, use_dora: false, learning_rate: 1.0e-2}]")
    sets = [f"model.path={tmp_path / 'olmoe'}", "search.module_sets=[attention_qv,experts]", "search.ranks=[2,4]",
            "search.learning_rate=[1e-3,2e-2]", f"search.priors={priors}",
            "budget.num_samples=3", "budget.max_steps=4", "budget.eval_every=2", "budget.grace_period=4",
            "budget.warmup_steps=1", "budget.batch_size=4", "data.eval_examples=8", "data.eval_generate_examples=0",
            "resources.packing=shared", "selection.confirm_top_k=0", "selection.cheaper=0", "selection.promote=false"]
    args = ["--output", str(tmp_path), "--name", "shared", *[x for s in sets for x in ("--set", s)]]
    assert main([*args, "--dry-run"]) == 0
    assert "trials that adapt expert weights (the shared trainer adapts Linear layers only) train in processes" \
        in capsys.readouterr().out
    assert main(args) == 0

    trials = pd.read_csv(tmp_path / "shared" / "trials.csv")
    assert (trials.status == "finished").all() and (trials.step == 4).all()
    experts = trials.module_set == "experts"
    assert experts.any() and set(trials[experts].step_mode) == {"eager"}  # trainables/trial.py's own step
    assert set(trials[~experts].step_mode) == {"packed"}
    assert "trial(s) that adapt expert weights trained in processes of their own" in \
        (tmp_path / "shared" / "report.md").read_text()

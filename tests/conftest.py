"""Shared fixtures: a tiny random-init Llama with the real SmolLM2 tokenizer (so the chat
template and data path are the real ones), and one local Ray for the whole session; and the
test tiers: the tests listed in SLOW are marked `slow`, which the default run leaves out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

ALL = "*"

# The slow tier, by file: every test of the file (ALL) or the tests named. These are the ones that
# take long on a 2-core CPU (tens of seconds to minutes each, measured with --durations): whole
# searches on Ray, clusters, kills and resumes, object storage, the wheel, real trackers.
# `python -m pytest -q` leaves them out (pyproject's addopts); `python -m pytest -q -m slow` runs them.
SLOW: dict[str, str | tuple[str, ...]] = {
    "test_wheel.py": ALL,
    "test_ray_start.py": ALL,
    "test_resume.py": ALL,
    "test_kill_anywhere.py": ALL,
    "test_failures.py": ALL,
    "test_out_of_memory_rerun.py": ALL,
    "test_lost_trials.py": ALL,
    "test_user_data_run.py": ALL,
    "test_landscape_run.py": ("test_a_grid_run_trains_every_point_with_every_seed_to_the_full_budget",
                              "test_the_grid_run_becomes_a_landscape_that_the_simulator_replays"),
    "test_moe_search.py": ALL,
    # premises about libraries' own behaviour, each a fresh interpreter or a killed writer: the
    # fast tier keeps a test of the product's own behaviour in each of these modules
    "test_worker_imports.py": ("test_peft_imports_bitsandbytes_when_nothing_hides_it",
                               "test_bitsandbytes_stays_importable_where_it_may_be_needed"),
    "test_atomicfs.py": ("test_premise_pyarrows_own_local_filesystem_leaves_half_a_file_when_killed_midway",
                         "test_a_sync_killed_midway_leaves_a_whole_state_file"),
    "test_console.py": (
        "test_every_trial_has_a_start_line_with_its_configuration_and_an_end_line_that_says_how_it_ended",
        "test_a_failed_trial_s_line_gives_its_one_line_reason",
        "test_the_status_line_counts_the_trials_and_names_the_best_at_the_full_budget",
        "test_the_default_console_has_no_library_output_and_at_most_three_lines_per_trial",
        "test_the_libraries_own_output_is_in_the_runs_logs",
        "test_quiet_prints_the_result_and_each_failed_trial_only",
        "test_a_signal_while_the_model_is_prepared_exits_with_one_line_and_nothing_written",
        "test_ctrl_c_during_the_search_says_one_line_and_neither_it_nor_the_resume_shows_ray_s_hints",
    ),
    "test_cluster.py": (
        "test_trials_run_on_both_nodes_and_land_in_one_run_directory",
        "test_more_gpus_per_trial_than_any_node_has_is_refused_with_exit_2",
        "test_trial_slots_count_the_whole_clusters_gpus_and_cpus",
        # each waits out a join's timeout
        "test_sigterm_while_joining_a_head_that_never_answers_exits_143_within_10_s",
        "test_an_address_where_nothing_listens_exits_2_within_15_s_with_one_line",
        "test_ray_address_is_joined_and_said_so_not_ignored",
    ),
    "test_storage.py": (
        "test_the_whole_run_lands_in_the_bucket",
        "test_the_bucket_and_the_drivers_copy_agree",
        "test_a_resume_from_another_machine_pulls_the_run_and_trains_nothing_again",
        "test_a_new_run_over_a_run_in_the_bucket_is_refused_and_nothing_is_touched",
        "test_a_bucket_that_does_not_exist_is_an_input_error",
        "test_a_trial_continues_from_a_checkpoint_kept_at_a_uri",
        "test_on_two_nodes_with_their_own_caches_each_reads_the_data_from_the_bucket",
        "test_sigkill_as_tune_deletes_a_checkpoint_in_the_bucket_then_resume_continues_every_trial",
        "test_the_analysis_redoes_the_pick_of_a_run_in_the_bucket_and_uploads_it_back",
        "test_the_analysis_of_an_empty_uri_is_an_input_error",
    ),
    "test_tracking.py": (
        "test_mlflow_holds_one_run_per_trial_with_its_parameters_and_reports_under_the_searchs_run",
        "test_the_searchs_mlflow_run_holds_the_pick_report_plots_and_adapter",
        "test_wandb_offline_writes_each_trials_run_files_into_the_run_directory",
        "test_ray_s_own_lines_stay_off_the_console_and_are_in_the_runs_logs",
        "test_tensorboard_event_files_are_in_each_trials_directory",
        "test_the_optuna_journal_in_the_run_holds_one_study_with_each_search_trial_once",
        "test_a_dry_run_with_mlflow_on_creates_no_database_and_prints_nothing_of_mlflow",
    ),
    "test_cli.py": ("test_a_trusted_metric_function_is_announced_first_and_one_that_cannot_be_imported_exits_2",),
    # SmolLM2's own weights, 10 s: the fast tier keeps the decoding's equality on tiny models
    "test_decode.py": ("test_smollm2s_greedy_tokens_for_the_reference_tasks_questions_are_generates",),
    # fresh interpreters: the fast tier keeps the simulator's own tests in process
    "test_simulate.py": ("test_the_simulator_cli_refuses_more_eval_rows_than_the_landscape_kept",
                         "test_the_simulator_cli_exits_2_with_one_error_line_naming_the_row"),
    "test_search_run.py": (
        "test_search_finishes_and_writes_the_four_outputs",
        "test_the_run_config_records_the_resources_as_resolved",
        "test_the_driver_records_when_each_step_of_its_setup_ended_before_the_first_training_step",
        "test_asha_stops_some_trials_before_the_full_budget",
        "test_stopped_trials_within_tolerance_are_promoted_from_their_checkpoint",
        "test_promotions_and_confirmations_run_in_the_searchs_tuner_on_its_workers",
        "test_leading_candidates_are_confirmed_with_other_seeds_and_picked_on_the_mean",
        "test_retrained_pick_exports_loadable_adapter_weights",
        "test_every_trial_reports_the_contract_metrics",
        "test_every_finished_trial_reports_its_per_row_eval_losses_and_the_pick_pairs_them",
        "test_exported_config_is_the_picked_trials_and_applies_to_the_base_model",
        "test_pick_agrees_with_trials_csv_under_the_stated_rule_and_plots_are_real_pngs",
        "test_default_config_runs_with_a_tiny_budget",
        "test_a_user_metric_function_is_run_by_every_trial_on_its_answers_and_picks",
        # a fresh interpreter: the fast tier keeps test_bad_input.py's cases of the same exit, in process
        "test_bad_input_on_the_command_line_exits_the_process_with_2_and_no_traceback",
    ),
    "test_bench_plumbing.py": ("test_the_grid_runs_end_to_end_in_smoke_mode",
                               "test_the_packing_benchmark_on_random_shapes_runs_without_ray_optuna_datasets_or_pandas",
                               "test_the_tokenizing_benchmark_times_every_row_of_the_data_it_is_given"),
    "test_retrain.py": ("test_a_tiny_search_then_the_retrain_command_gives_weights_that_load_from_the_printed_path",),
    "test_packed.py": ("test_a_packed_step_compiles_whole_with_no_graph_break_and_trains_as_the_eager_one",
                       "test_inductors_warm_up_makes_no_cpu_kernel_of_its_own_so_an_empty_cache_costs_it_no_cpp_compile",
                       "test_a_capture_with_compiled_layers_that_runs_out_of_memory_is_made_in_passes_and_trains_the_same_with_a_fake_gpu_error"),
    "test_local_ray.py": ("test_a_stale_current_cluster_file_is_ignored_and_the_search_runs_on_its_own_loopback_ray",
                          "test_sigterm_while_the_local_ray_starts_exits_143_with_the_resume_line_and_leaves_nothing_running",
                          "test_a_local_ray_shut_down_without_waiting_goes_down_in_its_thread_while_the_caller_goes_on",
                          "test_the_loopback_switch_is_gone_from_the_process_once_its_local_ray_runs_on_loopback"),
    "test_ray_contract.py": ("test_contract_tune_keeps_as_many_trials_pending_as_tune_max_pending_trials_pg_says",
                             "test_contract_tune_fit_imports_the_modules_the_driver_imports_while_ray_starts"),
    "test_host.py": ("test_a_host_takes_one_actor_and_an_actor_on_another_gpu_or_after_it_makes_a_trainer_of_its_own",
                     "test_an_actor_that_asks_for_another_trainer_than_its_host_made_makes_its_own_and_the_host_goes",
                     "test_a_host_exits_when_the_actor_that_took_it_is_killed",
                     "test_an_actor_whose_host_died_ends_itself_for_ray_to_make_it_again",
                     "test_a_host_told_its_model_loads_the_weights_only_after_the_drivers_go",
                     "test_a_host_whose_pack_will_compile_makes_inductors_one_time_setup_before_it_loads_the_weights",
                     "test_a_host_that_crashes_in_native_code_leaves_its_python_stack_in_its_log"),
    "test_shared_faults.py": ("test_a_trainer_that_cannot_load_the_model_ends_the_run_with_exit_1_and_its_reason_in_one_line",),
    "test_shared_search.py": (
        "test_shared_packing_of_conv1d_layers_exits_2_before_ray_starts",  # a fresh interpreter
        "test_a_dora_trial_of_a_shared_search_trains_in_a_process_of_its_own_beside_the_packed_ones",
        "test_a_trainer_leaves_a_dora_trial_its_share_of_the_gpu_named_to_ray",
        "test_a_shared_search_of_four_concurrent_trials_runs_to_its_exported_pick",
        "test_a_shared_run_records_its_trainers_start_which_began_before_rays_and_ended_before_the_first_step",
        "test_a_shared_run_records_where_its_packs_time_went",
        "test_a_killed_shared_search_resumes_with_every_trial_once",
        "test_a_trainer_killed_mid_search_fails_its_trials_with_the_reason_and_retries_carry_them_on",
    ),
}


def pytest_collection_modifyitems(config, items):
    """Mark SLOW's tests `slow`; a file or a name in SLOW that does not exist is an error, so a
    renamed test cannot drop into the default tier unnoticed."""
    missing = [file for file in SLOW if not (Path(__file__).parent / file).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py SLOW names files that do not exist: {', '.join(missing)}")
    seen = {}
    for item in items:
        file = item.path.name
        seen[file] = item.module
        listed = SLOW.get(file, ())
        if listed == ALL or item.originalname in listed:
            item.add_marker(pytest.mark.slow)
    stale = [f"{file}::{name}" for file, module in seen.items() if SLOW.get(file, ALL) != ALL
             for name in SLOW[file] if not hasattr(module, name)]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {', '.join(stale)}")


@pytest.fixture(scope="session")
def smollm2_dir():
    from trainables.model import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer Llama (hidden 32) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def local_ray():
    import ray

    from search.cluster.connect import connect

    connect(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def trial_setup(tiny_model_dir, tmp_path_factory):
    """What a shared trainer is given: the tiny model, 24 train and 6 eval rows of random tokens
    (the first four of each masked out of the loss), 6 steps with an eval every 3."""
    import datasets
    import torch

    from trainables.config import TrialSetup
    from trainables.data import save_splits

    g = torch.Generator().manual_seed(0)

    def split(n: int) -> datasets.Dataset:
        ids = [torch.randint(3, 1000, (int(torch.randint(8, 14, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
        return datasets.Dataset.from_dict({"input_ids": ids, "labels": [[-100] * 4 + x[4:] for x in ids]})

    data_dir = tmp_path_factory.mktemp("shared") / "data"
    train = split(24)
    save_splits({"search_train": train, "train": train, "eval": split(6)}, data_dir)
    return TrialSetup(model_path=str(tiny_model_dir), dtype="float32", quantization="none", trust_remote_code=False,
                      data_dir=str(data_dir), max_steps=6, eval_every=3, batch_size=4, cpu_threads=1,
                      warmup_steps=2, total_params=1, pad_token_id=0)

"""The names of what a run directory holds (docs: README "What you get")."""

RUN_CONFIG = "run_config.json"   # the resolved config and the facts of the model and data
DATA = "data"                    # the tokenized splits, written once by the driver
TRIALS_CSV = "trials.csv"
PICK = "pick.json"
ADAPTER = "adapter"
PLOTS = "plots"
REPORT = "report.md"
PICKS = "picks"                  # every analysis's own outputs, picks/<time>/, never overwritten
ASHA_STATE = "asha_state.pkl"    # ASHA's state (saved by its own `save`), which Tune's restore would otherwise forget
DRIVER_PID = "driver.pid"        # meaningful on the driver's machine only: never uploaded
RAY_SESSION = "ray_session"      # the name of the driver's Ray session, to find its leftover workers
LOGS = "logs"                    # what Ray, Optuna, datasets and transformers log in the driver, a file each
SETUP_TIMES = "setup_times.json"  # in LOGS: seconds from the command's start to each step of the driver's setup
TRAINER_TIME = "trainer_time.json"  # in LOGS: where each shared trainer's pack spent its time, a run's search
TRAINER_HOST_LOG = "trainer_host.log"  # in LOGS: what the shared trainer's process started by the driver printed
OPTUNA_STUDY = "optuna_study.log"      # Optuna's journal of the search's study: optuna-dashboard opens it
MLFLOW_RUN = "mlflow_run.json"   # the MLflow run of the search, under which each trial's run is nested

# Ray Tune experiments, one directory each. The search, its promotions and its confirmations
# run in one Tuner, so their trials compete with one another; the retrain trains the pick on
# all the data, so its metrics are not comparable with theirs.
SEARCH_EXPERIMENT = "tune"
RETRAIN_EXPERIMENT = "retrain"
EXPERIMENTS = (SEARCH_EXPERIMENT, RETRAIN_EXPERIMENT)
COMPETING_EXPERIMENTS = (SEARCH_EXPERIMENT,)

# What an analysis writes into picks/<time>/ and copies to the top of the run as the latest.
LATEST = (PICK, ADAPTER, PLOTS, REPORT)
# What the analysis writes, and so what a re-analysis of a run at a URI uploads back.
ANALYSIS_OUTPUTS = (TRIALS_CSV, PICKS, *LATEST)


def trial_directory(trial_id: str) -> str:
    """A trial's directory inside its experiment (Ray's default spells the whole config into it)."""
    return f"trial_{trial_id}"

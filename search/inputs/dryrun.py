"""The dry run: for each module set and rank, what LoRA would train, from the model's shapes alone
(a meta-device model: no weights, no Ray); and what the data holds, read and tokenized in memory."""

from __future__ import annotations

from search.config import SHARED, Config, ConfigError, ResourcesConfig, bad_input
from search.inputs.data import DataInfo, eval_sample_line, read
from search.inputs.modules import adapter_param_count, base_param_count, resolve
from search.inputs.prepare import PreparedModel, load_tokenizer, prepare_data
from search.tuning.space import module_set_key

# LoRA adapters usually train 0.05% to 1% of the base model; a row outside that range deserves a
# second look: too few parameters to learn the task, or a cost approaching full fine-tuning's.
LOW_PCT = 0.05
HIGH_PCT = 1.0
FP32_BYTES = 4
MIB = 2**20


def dry_run_rows(model, module_sets: list, ranks: list[int], use_dora_choices: list[bool]) -> list[dict]:
    """One row per module set x rank x distinct DoRA choice (DoRA off only, for a set that holds it
    off: `ResolvedModules.holds_fixed`), in the order given. Each row holds: module_set (the set's
    name, or an explicit list's names joined by "+"), target_modules (and target_parameters),
    layers (number of adapted layers and expert weights), r, use_dora, trainable_params (exact),
    trainable_pct (percent of the base model's parameters; an expert weight counts r per expert),
    adapter_mb (the adapter's size in fp32, in MiB of 2**20 bytes), flag ("below 0.05%", "above 1%"
    or "") and note (the resolution's note without the architecture's, which `format_table` says
    once; or "").
    Raises ValueError as `resolve` does for a set the model cannot take."""
    base = base_param_count(model)
    rows = []
    for spec in module_sets:
        resolved = resolve(model, spec)
        for r in ranks:
            for use_dora in dict.fromkeys([False] if resolved.holds_fixed else use_dora_choices):
                trainable = adapter_param_count(model, resolved, r, use_dora)
                pct = 100 * trainable / base
                rows.append({
                    "module_set": module_set_key(spec),
                    "target_modules": resolved.target_modules + resolved.target_parameters,
                    "layers": len(resolved.layers) + len(resolved.parameters),  # an expert weight: one per block
                    "r": r,
                    "use_dora": use_dora,
                    "trainable_params": trainable,
                    "trainable_pct": pct,
                    "adapter_mb": trainable * FP32_BYTES / MIB,
                    "flag": _flag(pct),
                    "note": resolved.own_note or "",
                })
    return rows


def format_table(rows: list[dict], model_name: str, architecture_note: str | None = None) -> str:
    """A plain-text report: what was inferred about the architecture (`architecture_note`) once,
    each module set's target modules (and expert weights), layer count and note once, then one
    aligned table line per row of `dry_run_rows`."""
    sets = {row["module_set"]: row for row in rows}
    lines = [f"LoRA dry run for {model_name}", ""]
    lines += [f"Architecture: {architecture_note}", ""] if architecture_note else []
    lines += ["Module sets:"]
    for name, row in sets.items():
        lines.append(f"  {name}: {', '.join(row['target_modules'])} ({row['layers']} layers)")
        lines += [f"    note: {row['note']}"] if row["note"] else []
    header = ["module_set", "r", "dora", "trainable params", "% of base", "adapter MiB (fp32)", "flag"]
    cells = [[row["module_set"], str(row["r"]), "yes" if row["use_dora"] else "no", f"{row['trainable_params']:,}",
              f"{row['trainable_pct']:.3f}", f"{row['adapter_mb']:.2f}", row["flag"]] for row in rows]
    widths = [max(len(line[i]) for line in [header] + cells) for i in range(len(header))]
    left_aligned = {0, 6}

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in left_aligned else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()
    return "\n".join(lines + ["", line(header)] + [line(values) for values in cells])


def _flag(pct: float) -> str:
    """"below 0.05%" or "above 1%" for a trainable share outside the usual LoRA range, else ""."""
    if pct < LOW_PCT:
        return f"below {LOW_PCT}%"
    if pct > HIGH_PCT:
        return f"above {HIGH_PCT:g}%"
    return ""


def data_lines(config: Config, prepared: PreparedModel) -> str:
    """What the data holds, read, checked and tokenized in memory: one line on each source, the
    part of it used, its rows and format, the template and the turns that carry loss, how many
    rows data.max_length truncates and drops and how many have an empty answer; one line on the
    eval rows every round scores (`eval_sample_line`); then the first training row as the model
    sees it, its trained part marked. A model known from its config.json alone (no tokenizer
    beside it, none in model.tokenizer) has its data read and checked, not tokenized: one line.
    ConfigError for bad data."""
    try:
        tokenizer = load_tokenizer(config, prepared.path)
    except ConfigError as no_tokenizer:
        if config.model.tokenizer:
            raise
        with bad_input():
            train, evaluate = read(config.data, config.seed)
        return (f"Data: train {_source(train.source, train.part, len(train.data), train.format)}; eval "
                f"{_source(evaluate.source, evaluate.part, len(evaluate.data), evaluate.format)}; token lengths "
                f"against data.max_length not checked: {no_tokenizer}")
    _, info = prepare_data(config, tokenizer)
    train, evaluate = info.train, info.eval
    empty = train.empty + evaluate.empty
    kept = "kept" if config.data.keep_empty_answers else "dropped"
    return "\n".join([
        (f"Data: train {_source(train.source, train.part, train.rows, train.format)}; eval "
        f"{_source(evaluate.source, evaluate.part, evaluate.rows, evaluate.format)}; {_template(info, config)}; "
        f"at max_length {info.max_length}: {train.truncated + evaluate.truncated} rows truncated, "
        f"{train.dropped + evaluate.dropped} dropped (no token left to train on); {empty} rows with an empty answer "
        f"{kept} (data.keep_empty_answers={str(config.data.keep_empty_answers).lower()})"),
        eval_sample_line(info, config.data.eval_examples),
        "Example: the first training row as the model sees it, its trained tokens between [[ and ]]:",
        info.example,
        "(end of the example)",
    ])


def _template(info: DataInfo, config: Config) -> str:
    """How rows became tokens: the template (with the plain one's separator) and the turns that
    carry loss."""
    if info.train.format == "text":
        return "no template (text: loss on every token)"
    template = (f"template plain (data.separator={config.data.separator!r} between turns)"
                if info.template == "plain" else f"template {info.template}")
    turns = "every assistant turn" if info.train_turns == "all" else "the last assistant turn only"
    return f"{template}, loss on {turns} (data.train_turns={info.train_turns})"


def _source(source: str, part: str, rows: int, format_: str) -> str:
    return f"{source}, {part}: {rows} {format_} rows"


def packing_line(resources: ResourcesConfig, plan, dora: bool = False, experts: bool = False) -> str:
    """One line on how the run's trials would share a GPU: `plan.packing`, as `resolve_packing`
    made it of resources.packing, what that means, and why where `auto` chose it; `dora`: the
    space has DoRA trials; `experts`: module sets that adapt expert weights (PEFT's target_parameters)."""
    given = f"resources.packing={resources.packing}"
    why = f"; auto's reason: {plan.packing_reason}" if plan.packing_reason else ""
    if plan.packing == SHARED:
        return (f"Packing: shared ({given}): one trainer per GPU (one on a CPU) holds the base model once and trains "
                f"up to {resources.pack_slots} trials' adapters together"
                + (f"; their decoder layers compiled into the captured step (resources.pack_compile_layers="
                   f"{str(resources.pack_compile_layers).lower()}: the first search on a machine compiles them, "
                   f"later ones read inductor's cache)" if plan.layers_compiled else "")
                + "".join(f"; {kind} train in processes of their own beside it" for kind, present in (
                    ("DoRA trials", dora),
                    ("trials that adapt expert weights (the shared trainer adapts Linear layers only)", experts))
                    if present) + why)
    return f"Packing: processes ({given}): every trial is a process of its own with its own copy of the base model{why}"

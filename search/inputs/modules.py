"""Which layers a LoRA module set adapts in a given model, and what adapting them costs.

Module sets are semantic (`attention_qv`, `attention`, `mlp`, `attention_mlp`, `all_linear`,
`experts`) and are resolved by inspecting the model's own `nn.Linear` and transformers `Conv1D`
layers inside its decoder blocks (never `lm_head` or embeddings), so one search config works for
Llama, Phi-3, GPT-NeoX, GPT-2 and their kin; and, in mixtures of experts whose routed experts are
3-D parameters (Qwen3-MoE, Mixtral, OLMoE, gpt-oss, DeepSeek-V3, Jamba: `experts.gate_up_proj`,
`experts.down_proj`, one matrix per expert), those parameters, which PEFT adapts through
`target_parameters`. Everything here except `load_model_config` is pure: it reads a model,
usually built on the meta device by `meta_model`, and returns plain values.

PEFT adapts a module when its full dotted name equals a `target_modules` entry or ends with
`"." + entry`, and a parameter by the same rule on `target_parameters`; every name produced or
accepted here is checked against that rule.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from search.tuning.space import HELD_FIXED, MODULE_SETS, ResolvedModules

# A parent module whose name contains one of these words places a layer in that part of the block.
ATTENTION_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "ffn", "feed_forward")
# The state-space mixers of hybrid models (Jamba, Bamba, Falcon-H1): their layers are neither attention
# nor MLP, and only all_linear adapts them.
STATE_SPACE_WORDS = ("mamba", "ssm")
# Roles of layer names in the families we support: they place layers that sit directly in a
# block (OPT's fc1/fc2) and find the query and value projections inside attention.
QUERY_NAMES = frozenset({"q_proj", "query"})
VALUE_NAMES = frozenset({"v_proj", "value"})
FUSED_QKV_NAMES = frozenset({"qkv_proj", "query_key_value", "c_attn"})
# Multi-head latent attention (DeepSeek-V2/V3): q and k-with-v come out of low-rank latents through the
# up-projections q_b_proj and kv_b_proj, the layers that play q_proj's and v_proj's part there (the
# down-projections q_a_proj and kv_a_proj_with_mqa only compress the hidden state).
LATENT_QV_NAMES = frozenset({"q_b_proj", "kv_b_proj"})
ATTENTION_NAMES = (QUERY_NAMES | VALUE_NAMES | FUSED_QKV_NAMES | LATENT_QV_NAMES
                   | {"k_proj", "key", "o_proj", "out_proj", "q_a_proj", "kv_a_proj_with_mqa"})
MLP_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc",
                       "dense_h_to_4h", "dense_4h_to_h"})
# model_type values whose resolution the tests pin down; for any other the note says what was inferred.
MLP_WEIGHTS_NOTE = ("its MLP layers are named in target_parameters by their weight (mlp.down_proj.weight): PEFT "
                    "moves MLP layer names in target_modules of a mixture of experts onto the expert weights")
VERIFIED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "gemma", "phi3", "gpt_neox", "falcon", "gpt2", "opt",
                                    "qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3", "jamba", "bamba"})


def load_model_config(path: str, trust_remote_code: bool = False):
    """The transformers config of the model in local directory `path` (a directory holding
    only config.json is enough; nothing is downloaded). Raises ValueError naming the path
    and what is wrong with it."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"model.path {path!r} holds no config.json. "
                         "Fix: give the local directory of a transformers model (the one with config.json)")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model.path {path!r}: its config.json cannot be read: {' '.join(str(e).split())}") from None


def meta_model(config) -> nn.Module:
    """The causal-LM model for `config`, built on the meta device: every shape, no weights, no memory.
    A config whose own class came from the model's repository (loaded with trust_remote_code)
    builds the model from that repository too. Raises ValueError when transformers has no
    causal-LM model for the config."""
    from transformers import AutoModelForCausalLM

    remote = type(config).__module__.startswith("transformers_modules")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    except ValueError:
        raise ValueError(f"model_type {config.model_type!r} ({type(config).__name__}) has no causal language model "
                         "in transformers. Fix: give a decoder-only (causal LM) model, such as Llama, Qwen2 or GPT-2"
                         ) from None


def resolve(model: nn.Module, spec: str | list[str]) -> ResolvedModules:
    """The layers and expert weights of `model` that module set `spec` adapts, and the
    `target_modules` and `target_parameters` that make PEFT adapt exactly those. `spec` is one of
    MODULE_SETS or a list of names (suffixes of full module or parameter names, as PEFT takes
    them): layers, and parameters inside the blocks that no layer holds (expert weights, a
    router's weight). Raises ValueError for an unknown set, an empty list, a set the model has
    nothing for, or any listed name that is neither (each name is checked, not just one of them);
    the message lists the model's layer and expert names and ends with a Fix line."""
    layers = _block_layers(model)
    if isinstance(spec, str):
        if spec not in MODULE_SETS:
            raise ValueError(f"module set {spec!r} is unknown; allowed: {', '.join(MODULE_SETS)}, "
                             "or a list of layer names")
        return _resolve_set(model, spec, layers)
    return _resolve_names(model, list(spec), layers)


def adapter_param_count(model: nn.Module, resolved: ResolvedModules, r: int, use_dora: bool = False) -> int:
    """Exactly the trainable parameters PEFT adds: r * (d_in + d_out) per adapted layer (the A and
    B matrices), plus d_out per layer for DoRA's magnitude vector; r * (d_in + d_out) per expert of
    an adapted expert weight (PEFT gives each expert its own pair: A is r x experts by d_in).
    Raises ValueError if r < 1."""
    if r < 1:
        raise ValueError(f"r is {r}; allowed: positive integers")
    modules = dict(model.named_modules())
    total = 0
    for name in resolved.layers:
        d_in, d_out = _dims(modules[name])
        total += r * (d_in + d_out) + (d_out if use_dora else 0)
    parameters = dict(model.named_parameters())
    for name in resolved.parameters:
        experts, d_in, d_out = _param_dims(parameters[name])
        total += experts * r * (d_in + d_out)
    return total


def base_param_count(model: nn.Module) -> int:
    """All parameters of the base model, tied ones (input and output embeddings) counted once,
    as `model.num_parameters()` and PEFT count them."""
    return sum(p.numel() for p in model.parameters())


def max_rank(model: nn.Module, resolved: ResolvedModules) -> int:
    """The largest rank every adapted layer and expert can take: the smallest min(d_in, d_out) among them."""
    modules, parameters = dict(model.named_modules()), dict(model.named_parameters())
    return min([min(_dims(modules[name])) for name in resolved.layers]
               + [min(_param_dims(parameters[name])[1:]) for name in resolved.parameters])


def has_experts(model: nn.Module) -> bool:
    """Whether the model's blocks hold expert weights (3-D parameters, one matrix per expert)."""
    return bool(_expert_weights(model))


def peft_check_needed(model: nn.Module) -> bool:
    """Whether `model` is of a kind whose module sets PEFT may refuse although every name matches:
    a mixture of experts or a hybrid with state-space layers (PEFT refuses a Mamba mixer's out_proj
    in Falcon-H1, say). Dense models are not tried: their sets are pinned by the tests."""
    return has_experts(model) or any(any(word in name.lower() for word in STATE_SPACE_WORDS)
                                     for name in _block_layers(model).values())


def peft_refuses(model: nn.Module, resolved: ResolvedModules) -> str | None:
    """PEFT's own objection to adapting `resolved` in `model`, found by adapting a copy on the meta
    device (no weights, no memory): its error's first line, or None when PEFT takes it."""
    import copy
    import warnings

    from peft import LoraConfig, get_peft_model

    from search.tuning.space import lora_config

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's notes on the copy are no one's business
            get_peft_model(copy.deepcopy(model), LoraConfig(**lora_config(resolved, 1, 1.0, 0.0, False, False)))
    except ValueError as e:
        return (str(e).splitlines() or [type(e).__name__])[0]
    return None


def _dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a transformers Conv1D (whose weight is stored in x out)."""
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    return layer.in_features, layer.out_features


def _param_dims(parameter: torch.Tensor) -> tuple[int, int, int]:
    """(experts, d_in, d_out) of an expert weight as PEFT reads it (experts x d_in x d_out), or of a
    2-D weight (d_out x d_in: one expert). Which of the two inner sizes is d_in changes no count."""
    if parameter.dim() == 3:
        return tuple(parameter.shape)
    return 1, parameter.shape[1], parameter.shape[0]


def _blocks_prefix(model: nn.Module) -> str | None:
    """The decoder blocks' path and a dot ("model.layers."): the ModuleList holding the most parameters."""
    lists = [(name, sum(p.numel() for p in m.parameters())) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList)]
    return f"{max(lists, key=lambda item: item[1])[0]}." if lists else None


def _inside_block(name: str, prefix: str | None) -> str | None:
    """The name inside its block ("model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"), None outside the blocks."""
    index_and_rel = name.removeprefix(prefix).split(".", 1) if prefix and name.startswith(prefix) else []
    return index_and_rel[1] if len(index_and_rel) == 2 else None


def _block_layers(model: nn.Module) -> dict[str, str]:
    """Every Linear/Conv1D inside the model's decoder blocks: full name -> name inside its block
    (e.g. "model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"), in model order. Raises
    ValueError if there are no such layers."""
    prefix = _blocks_prefix(model)
    layers = {name: rel for name, module in model.named_modules()
              if isinstance(module, (nn.Linear, Conv1D)) and (rel := _inside_block(name, prefix))}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv1D layers inside a list of decoder blocks "
                         "(nn.ModuleList) for LoRA to adapt. Fix: give a transformer decoder model")
    return layers


def _block_parameters(model: nn.Module) -> dict[str, str]:
    """Every matrix or stack of matrices (2-D or 3-D parameter) inside the decoder blocks that is
    not the weight of a layer LoRA adapts as a module, nor of a convolution or an embedding: the
    expert weights, a router's weight. Full name -> name inside its block, in model order."""
    prefix = _blocks_prefix(model)
    skipped = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
    return {f"{owner}.{name}": rel for owner, module in model.named_modules() if not isinstance(module, skipped)
            for name, parameter in module.named_parameters(recurse=False)
            if parameter.dim() in (2, 3) and (rel := _inside_block(f"{owner}.{name}", prefix))}


def _expert_weights(model: nn.Module) -> dict[str, str]:
    """The routed experts' weights: the 3-D parameters among `_block_parameters` (experts x in x out)."""
    parameters = dict(model.named_parameters())
    return {name: rel for name, rel in _block_parameters(model).items() if parameters[name].dim() == 3}


def _peft_matcher(names: list[str]):
    """A function: a target_modules (or target_parameters) entry -> those of `names` (full module,
    or parameter, names) that PEFT would adapt for it."""
    by_leaf: dict[str, list[str]] = {}
    for name in names:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)

    def matches(entry: str) -> list[str]:
        return [name for name in by_leaf.get(entry.rsplit(".", 1)[-1], [])
                if name == entry or name.endswith(f".{entry}")]
    return matches


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


def _parameter_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def _names_for(names: list[str], chosen: list[str], shortest: int = 1) -> dict[str, str]:
    """For each chosen module (or parameter), the shortest suffix of its full name, of at least
    `shortest` parts, that PEFT matches only to chosen ones among `names`: "q_proj" in Llama, but
    "attn.c_proj" for GPT-2's attention output, where a bare "c_proj" would also take the MLP's."""
    matches = _peft_matcher(names)
    wanted = set(chosen)
    out = {}
    for name in chosen:
        parts = name.split(".")
        suffixes = (".".join(parts[-k:]) for k in range(min(shortest, len(parts)), len(parts) + 1))
        out[name] = next(s for s in suffixes if set(matches(s)) <= wanted)
    return out


def _parameter_targets(model: nn.Module, chosen: list[str]) -> list[str]:
    """target_parameters for the chosen parameters; with their owner's name ("experts.gate_up_proj"),
    so that they read apart from target_modules such as a shared expert's "down_proj"."""
    return sorted(set(_names_for(_parameter_names(model), chosen, shortest=2).values()))


def _layer_listing(model: nn.Module, layers: dict[str, str]) -> str:
    """The model's adaptable layers by name, with counts: "q_proj (30 layers), k_proj (30), ...",
    then its expert weights where it has them: "; expert weights: experts.gate_up_proj (30), ..."."""
    def counted(names: list[str], where: dict[str, str], shortest: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rel in dict.fromkeys(where.values()):
            for short in _names_for(names, [name for name, r in where.items() if r == rel], shortest).values():
                counts[short] = counts.get(short, 0) + 1
        return counts

    (first, n_first), *rest = counted(_module_names(model), layers, 1).items()
    listing = ", ".join([f"{first} ({n_first} layers)"] + [f"{name} ({n})" for name, n in rest])
    experts = counted(_parameter_names(model), _expert_weights(model), 2)
    if experts:
        listing += "; expert weights: " + ", ".join(f"{name} ({n})" for name, n in experts.items())
    return listing


def _has_conv1d(model: nn.Module, chosen: list[str]) -> bool:
    """Whether any chosen layer is a Conv1D, which PEFT must be told about (fan_in_fan_out)."""
    wanted = set(chosen)
    return any(isinstance(m, Conv1D) for name, m in model.named_modules() if name in wanted)


def _mlp_weights(model: nn.Module, chosen: list[str], layers: dict[str, str]) -> list[str]:
    """The weights of the chosen MLP layers (a dense block's, a shared expert's) in a model with expert
    weights: PEFT (0.21, with transformers 5) takes a target_modules entry named like an MLP layer
    (gate_proj, up_proj, down_proj, w1 to w3) in such a model for an expert of transformers 4 and
    moves it onto the fused expert weights, so these layers are named in target_parameters by their
    weight ("mlp.down_proj.weight"), which PEFT adapts with the same r x (d_in + d_out) pair."""
    if not has_experts(model):
        return []
    return [f"{name}.weight" for name in chosen if (place := _place_by_name(layers[name])) and place[0] == "mlp"]


def _resolved(model: nn.Module, name: str, chosen: list[str], notes: list[str], parameters: list[str],
              layers: dict[str, str], architecture_note: str | None = None) -> ResolvedModules:
    """A ResolvedModules for `chosen` layers and expert `parameters` (full names, in model order),
    named for PEFT; a name that needs its parent module to stay unambiguous is said in the note,
    and so are the settings that expert weights hold fixed (HELD_FIXED) and MLP layers named by
    their weight (`_mlp_weights`)."""
    weights = _mlp_weights(model, chosen, layers)
    chosen = [layer for layer in chosen if f"{layer}.weight" not in weights]
    parameters = [p for p in _block_parameter_names(model) if p in set(parameters) | set(weights)]
    names = sorted(set(_names_for(_module_names(model), chosen).values()))
    notes = notes + [f"{n.rsplit('.', 1)[-1]!r} also names layers outside this set, so target_modules says {n!r} "
                     "(PEFT matches it as a suffix of the full name)" for n in names if "." in n]
    notes += [HELD_FIXED] if parameters else []
    notes += [MLP_WEIGHTS_NOTE] if weights else []
    return ResolvedModules(name=name, target_modules=names, fan_in_fan_out=_has_conv1d(model, chosen),
                           layers=chosen, note="; ".join(notes) or None,
                           target_parameters=_parameter_targets(model, parameters), parameters=parameters,
                           architecture_note=architecture_note)


def _block_parameter_names(model: nn.Module) -> list[str]:
    """Every parameter name inside the blocks, in model order: the order `parameters` keeps."""
    prefix = _blocks_prefix(model)
    return [name for name in _parameter_names(model) if _inside_block(name, prefix)]


def _resolve_names(model: nn.Module, names: list[str], layers: dict[str, str]) -> ResolvedModules:
    """The explicit list `names`, every entry checked against the model's adaptable layers, and an
    entry that names no module against the parameters inside its blocks (`_block_parameters`)."""
    if not names:
        raise ValueError(f"target_modules is an empty list; the adaptable layers of {type(model).__name__} are: "
                         f"{_layer_listing(model, layers)}.\n"
                         f"Fix: name some of them, or use a module set: {', '.join(MODULE_SETS)}")
    matches, parameter_matches = _peft_matcher(_module_names(model)), _peft_matcher(_parameter_names(model))
    block_parameters = _block_parameters(model)
    problems = []
    chosen: set[str] = set()
    chosen_parameters: set[str] = set()
    parameter_entries = []
    for entry in names:
        found = matches(entry)
        others = [name for name in found if name not in layers]
        if not found:
            found_parameters = parameter_matches(entry)
            if found_parameters and set(found_parameters) <= set(block_parameters):
                chosen_parameters.update(found_parameters)
                parameter_entries.append(entry)
            elif found_parameters:
                listed = ", ".join(name for name in found_parameters if name not in block_parameters)
                problems.append(f"{entry!r} names {listed}, a weight of a layer (name the layer) or outside the blocks")
            else:
                problems.append(f"{entry!r} matches no layer or expert weight")
        elif others:
            listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            problems.append(f"{entry!r} {'also ' if len(others) < len(found) else ''}names {listed}, "
                            "not a Linear/Conv1D layer inside the decoder blocks")
        chosen.update(found)
    if problems:
        raise ValueError(f"target_modules {names}: {'; '.join(problems)}. "
                         f"The adaptable layers of {type(model).__name__} are: {_layer_listing(model, layers)}.\n"
                         f"Fix: use names from that list, or a module set: {', '.join(MODULE_SETS)}")
    ordered = [name for name in layers if name in chosen]
    parameters = [name for name in block_parameters if name in chosen_parameters]
    if _mlp_weights(model, ordered, layers):  # named anew, as the sets are
        return _resolved(model, "custom", ordered, [], parameters, layers)
    return ResolvedModules(name="custom", target_modules=sorted(set(names) - set(parameter_entries)),
                           fan_in_fan_out=_has_conv1d(model, ordered), layers=ordered,
                           note=HELD_FIXED if parameters else None,
                           target_parameters=sorted(set(parameter_entries)), parameters=parameters)


def _resolve_set(model: nn.Module, spec: str, layers: dict[str, str]) -> ResolvedModules:
    """Module set `spec` (one of MODULE_SETS): the layers chosen by where they sit in the block, and
    the expert weights for the sets that take the MLP (`mlp`, `attention_mlp`, `all_linear`, `experts`)."""
    experts = list(_expert_weights(model))
    parameters = experts if spec in ("mlp", "attention_mlp", "all_linear", "experts") else []
    if spec == "experts" and not experts:
        raise ValueError(f"module set 'experts' matches nothing in {type(model).__name__}: its blocks hold no expert "
                         f"weights (3-D parameters); its adaptable layers are: {_layer_listing(model, layers)}.\n"
                         "Fix: use another module set")
    if spec in ("all_linear", "experts"):  # need no placing: they take an architecture that names no part
        return _resolved(model, spec, list(layers) if spec == "all_linear" else [], [], parameters, layers)
    model_type = _model_type(model)
    places = _place(list(dict.fromkeys(layers.values())), model_type)
    architecture_note = _inference_note(places, model_type)
    notes = [architecture_note] if architecture_note else []
    parts = {"attention_qv": {"attention"}, "attention": {"attention"}, "mlp": {"mlp"},
             "attention_mlp": {"attention", "mlp"}}[spec]
    chosen = [name for name, rel in layers.items() if places[rel][0] in parts]
    if spec == "attention_qv":
        chosen, qv_note = _query_value(chosen, layers)
        notes += [qv_note] if qv_note else []
    if not chosen and not parameters:
        raise ValueError(f"module set {spec!r} matches no layer of {type(model).__name__}, whose adaptable layers are: "
                         f"{_layer_listing(model, layers)}.\nFix: use another module set, or name the layers")
    return _resolved(model, spec, chosen, notes, parameters, layers, architecture_note)


def _query_value(attention: list[str], layers: dict[str, str]) -> tuple[list[str], str | None]:
    """The query and value projections among the attention layers, and a note when they are not
    separate layers: latent attention's up-projections (LATENT_QV_NAMES); a fused q/k/v layer is
    adapted whole (q and v cannot be adapted alone inside it; this is also what PEFT picks by
    default for GPT-2, GPT-NeoX and Falcon); attention with no recognisable q or v falls back to
    every attention layer."""
    leaf = {name: layers[name].rsplit(".", 1)[-1] for name in attention}
    latent = [name for name in attention if leaf[name] in LATENT_QV_NAMES | QUERY_NAMES]
    if any(leaf[name] in LATENT_QV_NAMES for name in latent):
        latent_names = ", ".join(dict.fromkeys(leaf[name] for name in latent))
        return latent, (f"attention_qv on latent attention (MLA): adapted {latent_names}, the up-projections that "
                        "make the queries and the keys with the values (k and v come out of one layer there)")
    separate = [name for name in attention if leaf[name] in QUERY_NAMES | VALUE_NAMES]
    if separate:
        return separate, None
    fused = [name for name in attention if leaf[name] in FUSED_QKV_NAMES]
    if fused:
        fused_names = ", ".join(dict.fromkeys(leaf[name] for name in fused))
        return fused, (f"attention_qv is not expressible with q, k and v fused in {fused_names}: "
                       f"adapted {fused_names} whole (q, k and v; the nearest set)")
    names = ", ".join(dict.fromkeys(layers[name] for name in attention))
    return attention, (f"attention_qv: no query or value projection recognised among the attention layers "
                       f"({names}); used attention (nearest)")


def _model_type(model: nn.Module) -> str:
    """The transformers model_type of `model`, or its class name for a plain module."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _place(rels: list[str], model_type: str) -> dict[str, tuple[str, str]]:
    """Place each layer (its name inside the block, in block order) in "attention" or "mlp", with
    how it was told: "parent module name", "layer name" or "position". A layer neither name
    places goes by position, because attention precedes the MLP in a decoder block: before the
    block's last attention layer it is attention, after it MLP (if no layer is attention: before
    the first MLP layer attention, else MLP). Raises ValueError when no layer can be placed."""
    placed = {rel: where for rel in rels if (where := _place_by_name(rel))}
    if not placed:
        raise ValueError(f"architecture {model_type!r}: none of its layers ({', '.join(rels)}) sits in a module "
                         f"named like attention ({', '.join(ATTENTION_WORDS)}) or MLP ({', '.join(MLP_WORDS)}).\n"
                         "Fix: use all_linear, or name the layers to adapt")
    attention = [i for i, rel in enumerate(rels) if rel in placed and placed[rel][0] == "attention"]
    boundary = attention[-1] + 1 if attention else min(i for i, rel in enumerate(rels) if rel in placed)
    return {rel: placed.get(rel) or ("attention" if i < boundary else "mlp", "position") for i, rel in enumerate(rels)}


def _place_by_name(rel: str) -> tuple[str, str] | None:
    """("attention" | "mlp" | "state_space", how) from the innermost parent module whose name says
    so, else from a known layer name; None if neither tells."""
    *parents, leaf = rel.split(".")
    for parent in reversed(parents):
        if any(word in parent.lower() for word in STATE_SPACE_WORDS):
            return "state_space", "parent module name"
        if any(word in parent.lower() for word in ATTENTION_WORDS):
            return "attention", "parent module name"
        if any(word in parent.lower() for word in MLP_WORDS):
            return "mlp", "parent module name"
    if leaf in ATTENTION_NAMES:
        return "attention", "layer name"
    if leaf in MLP_NAMES:
        return "mlp", "layer name"
    return None


def _inference_note(places: dict[str, tuple[str, str]], model_type: str) -> str | None:
    """What was inferred about the layers of an architecture the tests do not pin down, or of any
    layer placed by position: "architecture 'foo' unknown: classified layers by parent module
    name: attn.wq -> attention, ...; by position: w_out -> mlp"; and which layers only all_linear
    adapts (a hybrid's state-space layers). None when there is nothing to say."""
    state_space = [rel for rel, (where, _) in places.items() if where == "state_space"]
    only_all_linear = (f"state-space layers ({', '.join(state_space)}) are adapted by all_linear only"
                       if state_space else None)
    by_position = any(how == "position" for _, how in places.values())
    if model_type in VERIFIED_ARCHITECTURES and not by_position:
        return only_all_linear
    by_how: dict[str, list[str]] = {}
    for rel, (where, how) in places.items():
        by_how.setdefault(how, []).append(f"{rel} -> {where}")
    status = "unknown" if model_type not in VERIFIED_ARCHITECTURES else "has unfamiliar layer names"
    inferred = f"architecture {model_type!r} {status}: classified layers " + "; ".join(
        f"by {how}: {', '.join(items)}" for how, items in by_how.items())
    return "; ".join(filter(None, [inferred, only_all_linear]))

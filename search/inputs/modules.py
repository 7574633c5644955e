"""Which layers a LoRA module set adapts in a given model, and what adapting them costs.

Module sets are semantic (`attention_qv`, `attention`, `mlp`, `attention_mlp`, `all_linear`)
and are resolved by inspecting the model's own `nn.Linear` and transformers `Conv1D` layers
inside its decoder blocks (never `lm_head` or embeddings), so one search config works for
Llama, Phi-3, GPT-NeoX, GPT-2 and their kin. Everything here except `load_model_config`
is pure: it reads a model, usually built on the meta device by `meta_model`, and returns
plain values.

PEFT adapts a module when its full dotted name equals a `target_modules` entry or ends with
`"." + entry`; every name produced or accepted here is checked against that rule.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from search.tuning.space import MODULE_SETS, ResolvedModules

# A parent module whose name contains one of these words places a layer in that part of the block.
ATTENTION_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "ffn", "feed_forward")
# Roles of layer names in the families we support: they place layers that sit directly in a
# block (OPT's fc1/fc2) and find the query and value projections inside attention.
QUERY_NAMES = frozenset({"q_proj", "query"})
VALUE_NAMES = frozenset({"v_proj", "value"})
FUSED_QKV_NAMES = frozenset({"qkv_proj", "query_key_value", "c_attn"})
ATTENTION_NAMES = QUERY_NAMES | VALUE_NAMES | FUSED_QKV_NAMES | {"k_proj", "key", "o_proj", "out_proj"}
MLP_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc",
                       "dense_h_to_4h", "dense_4h_to_h"})
# model_type values whose resolution the tests pin down; for any other the note says what was inferred.
VERIFIED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "gemma", "phi3", "gpt_neox", "falcon", "gpt2", "opt"})


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
    """The layers of `model` that module set `spec` adapts, and the `target_modules` that make
    PEFT adapt exactly those. `spec` is one of MODULE_SETS or a list of layer names (suffixes
    of full module names, as PEFT takes them). Raises ValueError for an unknown set, an empty
    list, or any listed name that is not an adaptable layer of the model (each name is checked,
    not just one of them); the message lists the model's layer names and ends with a Fix line."""
    layers = _block_layers(model)
    if isinstance(spec, str):
        if spec not in MODULE_SETS:
            raise ValueError(f"module set {spec!r} is unknown; allowed: {', '.join(MODULE_SETS)}, "
                             "or a list of layer names")
        return _resolve_set(model, spec, layers)
    return _resolve_names(model, list(spec), layers)


def adapter_param_count(model: nn.Module, resolved: ResolvedModules, r: int, use_dora: bool = False) -> int:
    """Exactly the trainable parameters PEFT adds: r * (d_in + d_out) per adapted layer (the A and
    B matrices), plus d_out per layer for DoRA's magnitude vector. Raises ValueError if r < 1."""
    if r < 1:
        raise ValueError(f"r is {r}; allowed: positive integers")
    modules = dict(model.named_modules())
    total = 0
    for name in resolved.layers:
        d_in, d_out = _dims(modules[name])
        total += r * (d_in + d_out) + (d_out if use_dora else 0)
    return total


def base_param_count(model: nn.Module) -> int:
    """All parameters of the base model, tied ones (input and output embeddings) counted once,
    as `model.num_parameters()` and PEFT count them."""
    return sum(p.numel() for p in model.parameters())


def max_rank(model: nn.Module, resolved: ResolvedModules) -> int:
    """The largest rank every adapted layer can take: the smallest min(d_in, d_out) among them."""
    modules = dict(model.named_modules())
    return min(min(_dims(modules[name])) for name in resolved.layers)


def _dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a transformers Conv1D (whose weight is stored in x out)."""
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    return layer.in_features, layer.out_features


def _block_layers(model: nn.Module) -> dict[str, str]:
    """Every Linear/Conv1D inside the model's decoder blocks: full name -> name inside its block
    (e.g. "model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"), in model order. The blocks
    are the ModuleList holding the most parameters. Raises ValueError if there are no such layers."""
    lists = [(name, sum(p.numel() for p in m.parameters())) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList)]
    prefix = f"{max(lists, key=lambda item: item[1])[0]}." if lists else None
    layers = {}
    for name, module in model.named_modules():
        index_and_rel = name.removeprefix(prefix).split(".", 1) if prefix and name.startswith(prefix) else []
        if len(index_and_rel) == 2 and isinstance(module, (nn.Linear, Conv1D)):
            layers[name] = index_and_rel[1]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv1D layers inside a list of decoder blocks "
                         "(nn.ModuleList) for LoRA to adapt. Fix: give a transformer decoder model")
    return layers


def _peft_matcher(model: nn.Module):
    """A function: target_modules entry -> full names of the modules PEFT would adapt for it."""
    by_leaf: dict[str, list[str]] = {}
    for name, _ in model.named_modules():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)

    def matches(entry: str) -> list[str]:
        return [name for name in by_leaf.get(entry.rsplit(".", 1)[-1], [])
                if name == entry or name.endswith(f".{entry}")]
    return matches


def _names_for(model: nn.Module, chosen: list[str]) -> dict[str, str]:
    """For each chosen layer, the shortest suffix of its full name that PEFT matches only to
    chosen layers: "q_proj" in Llama, but "attn.c_proj" for GPT-2's attention output, where a
    bare "c_proj" would also take the MLP's."""
    matches = _peft_matcher(model)
    wanted = set(chosen)
    out = {}
    for name in chosen:
        parts = name.split(".")
        suffixes = (".".join(parts[-k:]) for k in range(1, len(parts) + 1))
        out[name] = next(s for s in suffixes if set(matches(s)) <= wanted)
    return out


def _layer_listing(model: nn.Module, layers: dict[str, str]) -> str:
    """The model's adaptable layers by name, with counts: "q_proj (30 layers), k_proj (30), ..."."""
    counts: dict[str, int] = {}
    for rel in dict.fromkeys(layers.values()):
        for short in _names_for(model, [name for name, r in layers.items() if r == rel]).values():
            counts[short] = counts.get(short, 0) + 1
    (first, n_first), *rest = counts.items()
    return ", ".join([f"{first} ({n_first} layers)"] + [f"{name} ({n})" for name, n in rest])


def _has_conv1d(model: nn.Module, chosen: list[str]) -> bool:
    """Whether any chosen layer is a Conv1D, which PEFT must be told about (fan_in_fan_out)."""
    wanted = set(chosen)
    return any(isinstance(m, Conv1D) for name, m in model.named_modules() if name in wanted)


def _resolved(model: nn.Module, name: str, chosen: list[str], notes: list[str]) -> ResolvedModules:
    """A ResolvedModules for `chosen` (full names, in model order), named for PEFT; a name that
    needs its parent module to stay unambiguous is said in the note."""
    names = sorted(set(_names_for(model, chosen).values()))
    notes = notes + [f"{n.rsplit('.', 1)[-1]!r} also names layers outside this set, so target_modules says {n!r} "
                     "(PEFT matches it as a suffix of the full name)" for n in names if "." in n]
    return ResolvedModules(name=name, target_modules=names, fan_in_fan_out=_has_conv1d(model, chosen),
                           layers=chosen, note="; ".join(notes) or None)


def _resolve_names(model: nn.Module, names: list[str], layers: dict[str, str]) -> ResolvedModules:
    """The explicit list `names`, every entry checked against the model's adaptable layers."""
    if not names:
        raise ValueError(f"target_modules is an empty list; the adaptable layers of {type(model).__name__} are: "
                         f"{_layer_listing(model, layers)}.\n"
                         f"Fix: name some of them, or use a module set: {', '.join(MODULE_SETS)}")
    matches = _peft_matcher(model)
    problems = []
    chosen: set[str] = set()
    for entry in names:
        found = matches(entry)
        others = [name for name in found if name not in layers]
        if not found:
            problems.append(f"{entry!r} matches no layer")
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
    return ResolvedModules(name="custom", target_modules=sorted(set(names)),
                           fan_in_fan_out=_has_conv1d(model, ordered), layers=ordered, note=None)


def _resolve_set(model: nn.Module, spec: str, layers: dict[str, str]) -> ResolvedModules:
    """Module set `spec` (one of MODULE_SETS): the layers chosen by where they sit in the block."""
    if spec == "all_linear":
        return _resolved(model, spec, list(layers), [])
    model_type = _model_type(model)
    places = _place(list(dict.fromkeys(layers.values())), model_type)
    notes = [note] if (note := _inference_note(places, model_type)) else []
    parts = {"attention_qv": {"attention"}, "attention": {"attention"}, "mlp": {"mlp"},
             "attention_mlp": {"attention", "mlp"}}[spec]
    chosen = [name for name, rel in layers.items() if places[rel][0] in parts]
    if spec == "attention_qv":
        chosen, qv_note = _query_value(chosen, layers)
        notes += [qv_note] if qv_note else []
    if not chosen:
        raise ValueError(f"module set {spec!r} matches no layer of {type(model).__name__}, whose adaptable layers are: "
                         f"{_layer_listing(model, layers)}.\nFix: use another module set, or name the layers")
    return _resolved(model, spec, chosen, notes)


def _query_value(attention: list[str], layers: dict[str, str]) -> tuple[list[str], str | None]:
    """The query and value projections among the attention layers, and a note when they are not
    separate layers: a fused q/k/v layer is adapted whole (q and v cannot be adapted alone
    inside it; this is also what PEFT picks by default for GPT-2, GPT-NeoX and Falcon), and
    attention with no recognisable q or v falls back to every attention layer."""
    leaf = {name: layers[name].rsplit(".", 1)[-1] for name in attention}
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
    """("attention" | "mlp", how) from the innermost parent module whose name says so, else from
    a known layer name; None if neither tells."""
    *parents, leaf = rel.split(".")
    for parent in reversed(parents):
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
    name: attn.wq -> attention, ...; by position: w_out -> mlp". None when nothing was inferred."""
    by_position = any(how == "position" for _, how in places.values())
    if model_type in VERIFIED_ARCHITECTURES and not by_position:
        return None
    by_how: dict[str, list[str]] = {}
    for rel, (where, how) in places.items():
        by_how.setdefault(how, []).append(f"{rel} -> {where}")
    status = "unknown" if model_type not in VERIFIED_ARCHITECTURES else "has unfamiliar layer names"
    return f"architecture {model_type!r} {status}: classified layers " + "; ".join(
        f"by {how}: {', '.join(items)}" for how, items in by_how.items())

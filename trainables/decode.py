"""Greedy decoding whose step is captured once per call as a CUDA graph.

A decoding step is one forward of the model for one token a row. On a GPU, launching its kernels
takes far longer than running them: with SmolLM2 and 8 packed slots an H100 spent 75 ms a token,
an answer round of 16 tokens 1.2 s (`bench/pack_profile.py`). So the step runs over static
tensors, a static KV cache (transformers' `StaticCache`) and an attention mask made inside the
step from the cache position, with nothing read back to the host: after a few eager steps it is
captured, and each further token is a replay. Without a GPU (tests) the same step runs eagerly.

The tokens are those of transformers' greedy `generate`: the rows left-padded, each row's
positions counting its own tokens, a row that has stopped padded after its stop token, and the
answer as long as the longest row's. Models whose generation config asks for more than greedy
tokens (a repetition penalty, suppressed or forced tokens) go through `generate` instead
(`plain_greedy`), as do a CPU's answers, where nothing is captured (`static_decoding`). A step
that cannot be captured (a mixture of experts routes its tokens on the host) runs eagerly."""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext

import torch

from trainables.step import cuda_graph, first_line

log = logging.getLogger(__name__)
# eager decoding steps on a side stream before the capture: one makes what a step makes lazily
# (cuBLAS's workspace on that stream); the cache was allocated and filled by the prefill, and no
# optimizer's state or autocast cache is made (a per-process trial's WARMUP_PASSES are for those).
# Each is a token decoded eagerly where a replay would do.
DECODE_WARMUP_PASSES = 1

# Generation-config fields that leave greedy tokens as the argmax of the logits: ids, lengths,
# caching, and sampling settings that greedy decoding ignores. Any other field set (a repetition
# penalty, bad words) adds a logits processor, which only `generate` applies.
GREEDY_FIELDS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length", "max_new_tokens",
    "do_sample", "num_beams", "temperature", "top_k", "top_p", "min_p", "typical_p", "use_cache",
    "cache_implementation", "transformers_version", "_from_model_config", "return_dict_in_generate",
    "output_attentions", "output_hidden_states", "output_scores", "output_logits",
})
# Values at which a logits processor's field leaves the logits as they are, as a config may spell them out
NEUTRAL = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "length_penalty": 1.0,
           "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0, "num_return_sequences": 1,
           "diversity_penalty": 0.0, "renormalize_logits": False, "remove_invalid_values": False}


class StaticCacheRefused(Exception):
    """The model's static cache could not be made or filled with the prompts (its cause says why):
    its transformers version or architecture has no static cache, or one that holds keys and values
    of one dtype where autocast gives them two (transformers 5.17 with fp32 weights)."""


def static_decoding(model, device: torch.device) -> bool:
    """Whether `decode` answers through `greedy_tokens`: on a GPU, where its step is captured, for
    a model whose greedy decoding is the argmax of its logits (`plain_greedy`). On a CPU nothing is
    captured, and `generate`'s cache, which grows with the answer, is the faster: 5.2 s against
    5.7 s for 32 of the reference task's answers with SmolLM2 on the 2-core machine."""
    return device.type == "cuda" and plain_greedy(model)


def plain_greedy(model) -> bool:
    """Whether greedy decoding of `model`, as its generation config sets it, is the argmax of its
    logits at each step (`GREEDY_FIELDS`), and every layer attends to all the tokens before it,
    which is the mask `greedy_tokens` makes (no sliding window, no chunked or linear attention)."""
    config = getattr(model, "generation_config", None)
    diff = config.to_diff_dict() if config is not None else {}
    set_fields = {name for name, value in diff.items() if value is not None and not (name in NEUTRAL and NEUTRAL[name] == value)}
    text = model.config.get_text_config()
    full_attention = (getattr(text, "sliding_window", None) is None
                      and set(getattr(text, "layer_types", None) or ["full_attention"]) == {"full_attention"})
    return set_fields <= GREEDY_FIELDS and full_attention


def decode(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop_ids: list[int], pad_token_id: int,
           autocast) -> torch.Tensor:
    """The new tokens of `model`'s greedy answers to the left-padded rows `ids`: `greedy_tokens`
    where it pays (`static_decoding`), else transformers' `generate`, which also answers, with a
    warning, for a model whose cache cannot be static."""
    if static_decoding(model, ids.device):
        try:
            return greedy_tokens(model, ids, mask, max_new_tokens, stop_ids, pad_token_id, autocast)
        except StaticCacheRefused as refused:
            log.warning("%s cannot decode over a static cache (%s): its answers go through generate",
                        type(model).__name__, first_line(refused.__cause__))
    with autocast:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=stop_ids)
    return out[:, ids.shape[1]:]


def greedy_tokens(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
                  pad_token_id: int, autocast=None) -> torch.Tensor:
    """`model`'s greedy continuation of the left-padded rows `ids` (`mask` 1 at their real tokens):
    `[rows, n]` new tokens, n at most `max_new_tokens`, a row padded with `pad_token_id` after its
    first of `stop_ids`, and n the last step at which a row still had not stopped, as `generate`
    ends. On a GPU the decoding step is captured after DECODE_WARMUP_PASSES eager steps. Raises
    StaticCacheRefused where the model's static cache cannot be made or take the prompts."""
    from transformers import StaticCache

    rows, width = ids.shape
    device = ids.device
    length = width + max_new_tokens
    keys = torch.arange(length, device=device)
    real = torch.cat([mask.bool(), torch.ones(rows, max_new_tokens, dtype=torch.bool, device=device)], dim=1)
    stops = torch.tensor(stop_ids or [-1], device=device)
    capture = device.type == "cuda"
    # no autocast cache under capture (torch.cuda.graph's own rule): casts are redone at every replay
    context = (torch.autocast("cuda", dtype=autocast.fast_dtype, cache_enabled=False) if capture and autocast is not None
               else autocast or nullcontext())

    with torch.no_grad(), context:
        queries = torch.arange(width, device=device)
        # a row's tokens see its real tokens up to themselves; a padding token sees itself too, so
        # that no row of the attention is empty: what an empty row gives differs by kernel (NaN in
        # some), and it would go into the padding's keys and values of the next layer
        attend = (real[:, None, :] & (keys <= queries[:, None])) | (keys == queries[:, None])
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as `generate` counts them
        try:  # the cache is made and first filled here: nothing is captured yet, and `generate` can still answer
            forward = _forward(model, StaticCache(config=model.config, max_cache_len=length))
            first = forward(ids, attend[:, None], positions, queries).argmax(-1)
        except torch.OutOfMemoryError:
            raise  # generate's cache would not fit either
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
            raise StaticCacheRefused from error
        out = torch.full((rows, max_new_tokens), pad_token_id, dtype=ids.dtype, device=device)
        out[:, 0] = first
        done = torch.isin(first, stops)
        token, position = first[:, None].clone(), positions[:, -1:] + 1
        cache_position, column = torch.tensor([width], device=device), torch.tensor([1], device=device)

        def step() -> None:
            attend = (real & (keys <= cache_position))[:, None, None, :]
            chosen = forward(token, attend, position, cache_position).argmax(-1)
            chosen = torch.where(done, pad_token_id, chosen)
            done.logical_or_(torch.isin(chosen, stops))
            out.index_copy_(1, column, chosen[:, None])
            token.copy_(chosen[:, None])
            for counter in (position, cache_position, column):
                counter.add_(1)

        _run(step, max_new_tokens - 1, capture)
    stopped = torch.isin(out, stops).cumsum(1) > 0
    going = (~stopped).any(0).nonzero()  # the steps at which a row had not yet stopped
    n = min(max_new_tokens, int(going.max()) + 2) if len(going) else 1
    return out[:, :n]


def _run(step, steps: int, capture: bool) -> None:
    """`step()` `steps` times: with `capture` and two more than DECODE_WARMUP_PASSES of them, the warm-up
    passes and one capture of `cuda_graph`'s recipe, then a replay for each further step (eager
    steps where the capture is refused); else eagerly."""
    if not capture or steps <= DECODE_WARMUP_PASSES + 1:  # a capture is paid back from its second replay
        for _ in range(steps):
            step()
        return
    warmed = []

    def warmup() -> None:
        step()
        warmed.append(True)

    try:
        # the capture records the step without running it: the tensors stay as the warm-up left them
        graph, _ = cuda_graph(warmup, step, lambda: None, DECODE_WARMUP_PASSES)
    except RuntimeError as error:
        if len(warmed) < DECODE_WARMUP_PASSES:
            raise  # an eager step failed, not the capture
        log.warning("the decoding step could not be captured (%s): it runs eagerly", first_line(error))
        for _ in range(steps - DECODE_WARMUP_PASSES):
            step()
        return
    for _ in range(steps - DECODE_WARMUP_PASSES):
        graph.replay()


def _forward(model, cache):
    """The model's last-position logits for `ids` at `positions`, its cache passed under the name
    its transformers version gives it, and the arguments it takes passed only if it does."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    takes = set(inspect.signature(base.forward).parameters)
    cache_name = "cache" if "cache" in takes else "past_key_values"

    def forward(ids, attend, positions, cache_position):
        kwargs = {cache_name: cache, "attention_mask": attend, "position_ids": positions, "use_cache": True}
        if "cache_position" in takes:
            kwargs["cache_position"] = cache_position
        if "logits_to_keep" in takes:
            kwargs["logits_to_keep"] = 1
        return model(input_ids=ids, **kwargs).logits[:, -1]

    return forward

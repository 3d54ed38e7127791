"""From a trained mapper to what a sampler needs: timestep-ranged K contexts and the V-path patch.

``build_schedule`` encodes the user's prompt once per stage / timestep bin:

* stage 1 (t_high, T): the prompt with the trigger replaced by the supercategory word ("face");
* stage 2 [t_low, t_high]: the mapper at each bin's middle timestep (``dynamic_bins``), K and V contexts;
* stage 3 [0, t_low): the mapper frozen at t_low (the official "reuse the t = 400 embedding").

Quantisation: a sampler with S steps visits only a handful of timesteps in the dynamic stage, but which
ones is not known when the conditioning is built, so the stage is cut into ``bins`` runs of consecutive
integer timesteps (DEFAULT_BINS = 100, i.e. 4 timesteps each for the official [400, 800]). A discrete SD
model evaluates at an integer timestep, so a visited t gets mapper(rep(t)) with |t − rep(t)| ≤ 2.
``quantization_error`` measures the cost against the continuous mapper (benchmarks/bench_personamagic.py
prints a table). At 100 bins, for a CLIP-L-wide mapper in the official init on the random CLIP-L: base tokens
max 5.0 % / mean 1.8 % relative L2 error, K and V contexts (rows from the first placeholder on) max 1.1 % /
mean 0.36 %; for scale, one bin for the whole stage (no dynamics at all) gives 38 % / 26 % and 7.7 % / 5.6 %.
50 bins roughly doubles and 200 bins halves the error; ``bins`` = stage width (401) is exact, and so is the
apply node with the sampler's SIGMAS connected (``stages.bins_for_visited``: one entry per visited timestep).

SDXL: the same with ``contexts.KVText`` over CLIP-L and CLIP-G (``schedule_for``); every entry also carries the
pooled CLIP-G output of its K prompt, from which the host builds the UNet's ``y`` for that timestep range.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..text_encoder import CLIPTextEncoder, PromptTokenizer
from .contexts import KVContexts, KVText, expand_trigger, internal_placeholders, supercategory_prompt
from .mapper import PersonaMagicMapper
from .stages import StagePlan, TimestepBin, dynamic_bins
from .vpath import ValuePathPatch

DEFAULT_BINS = 100


@dataclass
class ScheduleEntry:
    stage: int  # 1 supercategory, 2 dynamic, 3 frozen
    t_min: int  # integer timesteps [t_min, t_max] this entry serves
    t_max: int
    rep: Optional[int]  # the timestep the mapper was evaluated at (None for stage 1)
    key: torch.Tensor  # (1, L, D) the conditioning tensor (K context)
    value: torch.Tensor  # (1, L, D) the V context (equals key in stage 1)
    pooled: Optional[torch.Tensor] = None  # (1, 1280) SDXL: the K prompt's pooled CLIP-G output


@torch.no_grad()
def mapper_contexts(
    text: KVText,
    mapper: PersonaMagicMapper,
    prompt: str,
    trigger: str,
    timesteps: Sequence[int],
    image_embed: Optional[torch.Tensor],
    bypass: bool = True,
) -> KVContexts:
    """K and V contexts (len(timesteps), L, D) of ``prompt`` with the mapper's tokens at each timestep."""
    n = mapper.config.token_num
    t = torch.tensor(list(timesteps), dtype=torch.long, device=text.device)
    out = mapper(t, image_embed if mapper.config.output_bypass else None)
    prompts = [expand_trigger(prompt, trigger, n)] * len(t)
    return text.encode(prompts, internal_placeholders(n), out.base, out.bypass if bypass else None)


def build_schedule(encoder: CLIPTextEncoder, tokenizer: PromptTokenizer, *args, **kwargs) -> list[ScheduleEntry]:
    """``schedule_for`` with one text encoder (SD1.x, SD2.x); the other arguments are ``schedule_for``'s."""
    return schedule_for(KVText([(encoder, tokenizer)]), *args, **kwargs)


@torch.no_grad()
def schedule_for(
    text: KVText,
    mapper: PersonaMagicMapper,
    prompt: str,
    trigger: str,
    plan: StagePlan,
    image_embed: Optional[torch.Tensor] = None,
    bins: Union[int, Sequence[TimestepBin]] = DEFAULT_BINS,
    supercategory: str = "face",
    bypass: bool = True,
    batch: int = 32,
) -> list[ScheduleEntry]:
    """The stage-1 entry, one entry per dynamic bin (high t first) and the stage-3 entry.

    ``bins``: a count (uniform bins, ``dynamic_bins``) or explicit bins (``bins_for_visited``).
    """
    mapper = mapper.eval()
    entries: list[ScheduleEntry] = []
    static, static_pooled = text.encode_plain([supercategory_prompt(prompt, trigger, supercategory)])
    entries.append(ScheduleEntry(1, plan.t_high + 1, plan.num_timesteps - 1, None, static.cpu(), static.cpu(),
                                 None if static_pooled is None else static_pooled.cpu()))
    runs = dynamic_bins(plan, bins) if isinstance(bins, int) else list(bins)
    reps = [b.rep for b in runs] + [plan.t_low]  # the last one is the frozen stage-3 embedding
    keys, values, pooled = [], [], []
    for start in range(0, len(reps), batch):
        ctx = mapper_contexts(text, mapper, prompt, trigger, reps[start : start + batch], image_embed, bypass)
        keys.append(ctx.key.cpu())
        values.append(ctx.value.cpu())
        if ctx.pooled is not None:
            pooled.append(ctx.pooled.cpu())
    keys_all, values_all = torch.cat(keys), torch.cat(values)
    pooled_all = torch.cat(pooled) if pooled else None

    def entry(stage: int, first: int, last: int, rep: int, i: int) -> ScheduleEntry:
        return ScheduleEntry(stage, first, last, rep, keys_all[i : i + 1], values_all[i : i + 1],
                             None if pooled_all is None else pooled_all[i : i + 1])

    entries += [entry(2, b.first, b.last, b.rep, i) for i, b in enumerate(runs)]
    if plan.t_low > 0:
        entries.append(entry(3, 0, plan.t_low - 1, plan.t_low, len(reps) - 1))
    return entries


def value_patch_for(entries: Sequence[ScheduleEntry], name: str = "personamagic") -> ValuePathPatch:
    return ValuePathPatch([(e.key[0], e.value[0]) for e in entries], name=name)


@torch.no_grad()
def quantization_error(
    encoder: CLIPTextEncoder,
    tokenizer: PromptTokenizer,
    mapper: PersonaMagicMapper,
    prompt: str,
    trigger: str,
    plan: StagePlan,
    bins: Union[int, Sequence[TimestepBin]],
    image_embed: Optional[torch.Tensor] = None,
    stride: int = 1,
    batch: int = 32,
    contexts: bool = True,
) -> dict[str, float]:
    """How far the binned contexts are from the continuous mapper over the dynamic stage.

    For every ``stride``-th integer t in [t_low, t_high]: relative L2 error ‖C(rep(t)) − C(t)‖ / ‖C(t)‖ of the
    K and V contexts at the placeholder-affected rows (rows from the first placeholder on), and of the base
    tokens themselves (``contexts=False``: the tokens only, no text-encoder runs). Returns the max and mean of each.
    """
    runs = dynamic_bins(plan, bins) if isinstance(bins, int) else list(bins)
    ts = list(range(plan.t_low, plan.t_high + 1, stride))
    rep_of = {t: next(b.rep for b in runs if b.first <= t <= b.last) for t in ts}
    text = KVText([(encoder, tokenizer)])
    errs: dict[str, list[float]] = {"key": [], "value": [], "tokens": []} if contexts else {"tokens": []}
    first_slot = None
    for start in range(0, len(ts), batch):
        chunk = ts[start : start + batch]
        if contexts:
            exact = mapper_contexts(text, mapper, prompt, trigger, chunk, image_embed)
            binned = mapper_contexts(text, mapper, prompt, trigger, [rep_of[t] for t in chunk], image_embed)
            if first_slot is None:
                first_slot = int((exact.slot_ids[0] >= 0).nonzero()[0])
            for name, a, b in (("key", exact.key, binned.key), ("value", exact.value, binned.value)):
                a, b = a[:, first_slot:], b[:, first_slot:]
                errs[name] += ((b - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).tolist()
        dev = next(mapper.parameters()).device
        t_true = torch.tensor(chunk, device=dev)
        t_rep = torch.tensor([rep_of[t] for t in chunk], device=dev)
        img = image_embed if mapper.config.output_bypass else None
        tok, tokq = mapper(t_true, img).base, mapper(t_rep, img).base
        errs["tokens"] += ((tokq - tok).flatten(1).norm(dim=1) / tok.flatten(1).norm(dim=1)).tolist()
    out = {}
    for name, vals in errs.items():
        out[f"{name}_max"] = max(vals)
        out[f"{name}_mean"] = sum(vals) / len(vals)
    return out

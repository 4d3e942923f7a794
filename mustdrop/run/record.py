"""Trace assembly, for every host: the run's decisions taken off the device in one transfer and
written as plain data (:class:`mustdrop.trace.Trace`), with the geometry the host reported (each
crop's (rows, cols) grid; the patches each LLM token covers, with weights)."""

from __future__ import annotations


import numpy as np
import torch

from .. import stages, vision_tokens
from ..hosts.base import VisionResult
from ..images import pixel_sha256
from ..trace import SCHEMA_VERSION, Trace
from .decisions import _record_baseline
from .prompt import input_hash


def build_trace(runner, img, question, prompt, config, sampling, max_new_tokens, state, vision: VisionResult,
                kv_stages, gen, timings, n_vanilla: int) -> Trace:
    """The trace of one run of ``runner`` (its host, model id and defaults). ``n_vanilla``: the vision
    tokens the unpruned model feeds the LLM for this image (the processor's placeholders), which the
    accounting's vanilla figures count: N patches on LLaVA-1.5, N / 4 on Qwen-VL (2 x 2 merger), N plus
    a newline per row on LLaVA-NeXT, the interpolated tiles' rows on OneVision."""
    host = runner.host
    S, T, N0 = state.S, state.T, state.N0
    fetched = _fetch(vision, state, gen)
    alive = _alive_per_stage(state, fetched)
    arrays, crops = _vision_arrays(vision, fetched, N0)
    stage2, vision_per_layer = _stage2_arrays(state, fetched, alive, arrays, host.num_layers)
    entries, vision_entries = [], []
    for layer, stage in enumerate(kv_stages):
        idx = alive[stage].astype(np.int64)
        arrays[f"kv.L{layer}"] = idx
        entries.append(int(idx.size))
        vision_entries.append(int(((idx >= S) & (idx < S + N0)).sum()))
    llm, bytes_per_entry = _llm_meta(host)
    n_patches = sum(int(c["grid"][0]) * int(c["grid"][1]) for c in crops)
    meta = {
        "schema": SCHEMA_VERSION,
        "model": {"id": runner.model_id, "family": host.family, "layout": host.layout,
                  "dtype": str(host.model.dtype).replace("torch.", ""),
                  "device": str(host.model.device), "vision": host.vision_meta(), "llm": llm},
        "config": config.to_dict(),
        "method": config.method,
        "defaults_source": runner.defaults.source,
        "input": {"question": question, "prompt": prompt,
                  "image": {"width": img.width, "height": img.height,
                            "sha256": pixel_sha256(img)},
                  "mapping": vision.crops[0]["mapping"]},
        "crops": crops,
        "sequence": {"S": S, "T": T, "N": n_patches, "N0": N0, "N_vanilla": int(n_vanilla)},
        "stage1a": {"enabled": config.merge, "window": config.window, "threshold": config.merge_threshold,
                    "merged_windows": crops[0]["merged_windows"]},
        "stage1b": {"enabled": config.key_set, "keep_rate": config.key_keep_rate,
                    "score": host.key_score_name(), "key_tokens": fetched["key_tokens"].tolist()},
        "stage2": stage2,
        "vision_tokens_per_layer": vision_per_layer,
        "kv": {"entries_per_layer": entries, "vision_entries_per_layer": vision_entries,
               "bytes_per_entry": int(bytes_per_entry)},
        "generation": _generation_meta(host.processor.tokenizer, gen, sampling, max_new_tokens, fetched["probs"]),
        "timings": timings,
    }
    meta["input"]["input_hash"] = input_hash(meta["input"]["image"]["sha256"], question)
    _record_baseline(vision, meta, arrays)
    return Trace.build(meta, arrays)


def _fetch(vision: VisionResult, state, gen) -> dict:
    """Everything the trace needs from the device, in one transfer."""
    want = {"groups": vision.groups, "key_tokens": vision.key_tokens, "protected": vision.protected,
            "probs": gen["probs"]}
    for c, sim in enumerate(vision.similarity):
        if sim is not None:
            want[f"sim{c}"] = sim
    if vision.key_score is not None:
        want["key_score"] = vision.key_score
    if vision.weights is not None:
        want["weights"] = vision.weights
    if vision.merged is not None:
        want["merged_tokens"] = vision.merged
    for c, crop in enumerate(vision.crops):
        if isinstance(crop["merged_windows"], torch.Tensor):
            want[f"merged{c}"] = crop["merged_windows"]
    for i, rec in enumerate(state.records):
        if rec["result"] is not None:
            res = rec["result"]
            want.update({f"gs{i}": res.global_share, f"im{i}": res.individual_max, f"st{i}": res.status})
    return _to_host(want)


def _vision_arrays(vision: VisionResult, fetched: dict, N0: int):
    """The vision block's arrays (tokens' patches and weights, similarity, newline rows, key score)
    and the crops' records with their merged windows on the host."""
    crops = [{**crop, "merged_windows": fetched[f"merged{c}"].tolist() if f"merged{c}" in fetched
              else crop["merged_windows"]} for c, crop in enumerate(vision.crops)]
    groups = fetched["groups"].astype(np.int64)
    arrays: dict[str, np.ndarray] = {"tokens.groups": groups}
    if "weights" in fetched:
        arrays["tokens.weights"] = fetched["weights"].astype(np.float32)
    if "merged_tokens" in fetched:
        arrays["tokens.merged"] = fetched["merged_tokens"].astype(np.uint8)
    for c, sim in enumerate(vision.similarity):
        if sim is not None:
            arrays["stage1a.similarity" if c == 0 else f"stage1a.c{c}.similarity"] = \
                fetched[f"sim{c}"].astype(np.float32)
    if fetched["protected"].size:
        newline = np.zeros(N0, np.uint8)
        newline[fetched["protected"]] = 1
        arrays["tokens.newline"] = newline
    if vision.key_score is not None:
        arrays["stage1b.key_score"] = fetched["key_score"].astype(np.float32)
    return arrays, crops


def _stage2_arrays(state, fetched: dict, alive: list, arrays: dict, num_layers: int):
    """Each prune layer's tokens, scores and statuses into ``arrays``; its meta record; the vision
    tokens each LLM layer processed."""
    S = state.S
    stage2 = []
    for i, rec in enumerate(state.records):
        layer, res, V = rec["layer"], rec["result"], rec["V"]
        p = f"stage2.L{layer}"
        arrays[f"{p}.tokens"] = (alive[i][S:S + V] - S).astype(np.int64)   # merged-token ids
        if res is not None:
            arrays[f"{p}.global_share"] = fetched[f"gs{i}"].astype(np.float32)
            arrays[f"{p}.individual_max"] = fetched[f"im{i}"].astype(np.float32)
            arrays[f"{p}.status"] = fetched[f"st{i}"].astype(np.int8)
            kept_n, dropped_n = int(res.kept.numel()), int((arrays[f"{p}.status"] == stages.DROPPED).sum())
        else:
            arrays[f"{p}.global_share"] = np.zeros(0, np.float32)
            arrays[f"{p}.individual_max"] = np.zeros(0, np.float32)
            arrays[f"{p}.status"] = np.zeros(0, np.int8)
            kept_n, dropped_n = 0, 0
        stage2.append({"layer": layer, "entering": V, "kept": kept_n, "dropped": dropped_n})
    vision_per_layer = vision_tokens.per_layer(state.N0, [(s["layer"], s["kept"]) for s in stage2], num_layers)
    return stage2, vision_per_layer


def _llm_meta(host) -> tuple[dict, int]:
    """The trace's model.llm record, and the bytes one cached token costs (K + V, every head)."""
    tc = host.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    bytes_per_entry = 2 * n_kv * head_dim * torch.finfo(host.model.dtype).bits // 8
    return {"num_layers": host.num_layers, "hidden_size": tc.hidden_size,
            "intermediate_size": tc.intermediate_size, "num_heads": tc.num_attention_heads,
            "num_kv_heads": n_kv, "head_dim": head_dim, "vocab_size": tc.vocab_size}, bytes_per_entry


def _generation_meta(tok, gen, sampling, max_new_tokens: int, probs) -> dict:
    ids = gen["token_ids"]   # pieces that concatenate to the decoded text (leading spaces kept)
    texts = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
    pieces = [texts[i + 1][len(texts[i]):] if texts[i + 1].startswith(texts[i]) else tok.decode([ids[i]])
              for i in range(len(ids))]
    answer = tok.decode(gen["token_ids"], skip_special_tokens=True).strip()
    return {"mode": "greedy" if sampling.greedy else "sampling",
            "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
            "max_new_tokens": max_new_tokens, "token_ids": gen["token_ids"], "tokens": pieces,
            "probs": probs.tolist(), "answer": answer, "stop": gen["stop"]}


_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
                 torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
                 torch.uint8: np.uint8, torch.bool: np.bool_}


def _to_host(tensors: dict, pack: bool | None = None) -> dict:
    """Host numpy arrays of ``tensors`` (name -> tensor), with ONE device-to-host copy for all that
    live on a device: each copy waits until the device has finished everything queued before it,
    so one per array would stall it once per array. The tensors are packed as bytes into one
    buffer (widest elements first, so every array stays aligned) and split on the host; a tensor
    under several names is copied once. Host tensors are read in place unless ``pack`` is True."""
    distinct = {}
    for t in tensors.values():
        distinct.setdefault(id(t), t)
    packed = [(key, t) for key, t in distinct.items() if pack or (pack is None and t.device.type != "cpu")]
    packed_keys = {key for key, _ in packed}
    host = {key: t.numpy() for key, t in distinct.items() if key not in packed_keys}
    if packed:
        packed = [(key, t.float() if t.dtype == torch.bfloat16 else t) for key, t in packed]
        packed.sort(key=lambda kt: -kt[1].element_size())
        buf = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in packed]).cpu().numpy()
        offset = 0
        for key, t in packed:
            size = t.numel() * t.element_size()
            host[key] = buf[offset:offset + size].view(_NUMPY_DTYPES[t.dtype]).reshape(tuple(t.shape))
            offset += size
    return {name: host[id(t)] for name, t in tensors.items()}


def _alive_per_stage(state, fetched: dict) -> list:
    """The original-sequence indices of the tokens each stage of layers processed (stage i: the
    sequence entering prune layer i; the last: the survivors of every drop), rebuilt on the host from
    the recorded statuses (a token is kept where its status is not DROPPED), so that the trace needs
    no index array from the device. Checked against the kept counts the device used."""
    S, T = state.S, state.T
    alive = [np.arange(state.L0, dtype=np.int64)]
    for i, rec in enumerate(state.records):
        a, V = alive[-1], rec["V"]
        if rec["result"] is not None:
            kept = np.flatnonzero(fetched[f"st{i}"] != stages.DROPPED)
            if kept.size != rec["result"].kept.numel():
                raise RuntimeError(f"prune layer {rec['layer']}: {kept.size} statuses say kept, but "
                                   f"{rec['result'].kept.numel()} tokens were kept")
            if kept.size < V:
                a = np.concatenate([a[:S], a[S + kept], a[S + V:S + V + T]])
        alive.append(a)
    return alive

"""Where a trained toy model loses relative position: a probe of one checkpoint.

    python -m analysis.probe_position --model assets/toy-llava --n 120 [--json out.json]

On `n` position questions ("where is the A relative to the B ?") of the validation split it prints:
- accuracy and which answers the model gives;
- pooled centre R^2: how well the object centres (x, y) are read linearly (ridge, 2-fold) from
  the coverage-weighted mean of each object's projected image tokens, the decoder's input: can an
  attention head spread over an object find where it is?
- the attention mass the last prompt row (the one that predicts the answer) puts on the first
  and on the second named object, per MustDrop prune layer and head (eager attention): does each
  head find its object, and can it tell the two apart?
- read R^2: how well (dx, dy) between the two objects is read linearly (ridge, 2-fold) from what
  that row's heads read at each prune layer: each head's attention-weighted mean of the projected
  image tokens, mapped to an (x, y) by the same linear map that reads object centres from pooled
  tokens (fitted on all objects), heads concatenated: is the answer there to be computed?
- offset R^2: the same from that row's hidden state after each decoder layer: is it computed?
These are the figures the model card quotes; the probe only reads the model (no training).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from analysis.toy_model import prompt
from analysis.toyworld import ask, make_sample
from mustdrop import ModelDefaults


def ridge_r2(features: np.ndarray, targets: np.ndarray, lam: float = 0.1) -> list[float]:
    """R^2 per target column of a ridge fit on one half, scored on the other half, both ways.

    Features are standardised on the fitting half; `lam` is relative to the number of fitted
    samples, so that a few dozen samples of 128-d states are not simply memorised."""
    k = len(features) // 2
    folds = [(slice(0, k), slice(k, None)), (slice(k, None), slice(0, k))]
    pred = np.zeros_like(targets)
    for fit, score in folds:
        mu, sd = features[fit].mean(0), features[fit].std(0) + 1e-6
        a = (features[fit] - mu) / sd
        t_mu = targets[fit].mean(0)
        w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ (targets[fit] - t_mu))
        pred[score] = (features[score] - mu) / sd @ w + t_mu
    ss_res = ((pred - targets) ** 2).sum(0)
    ss_tot = ((targets - targets.mean(0)) ** 2).sum(0)
    return [float(v) for v in 1 - ss_res / np.maximum(ss_tot, 1e-12)]


def probe(model, processor, n: int, split: str = "val", prune_layers=(1, 2, 3, 4)) -> dict:
    image_id = model.config.image_token_id
    mass_a, mass_b, hidden, offsets, pooled, centres, read = [], [], [], [], [], [], []
    answers, correct = [], []
    i = 0
    while len(offsets) < n:
        s = make_sample(split, i)
        q = ask(s.scene, "position", np.random.default_rng(i))
        i += 1
        if q is None:
            continue
        a, b = (s.scene.objects[j] for j in q.targets)
        inputs = processor(images=s.image, text=prompt(processor, q.text), return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, output_attentions=True, output_hidden_states=True)
        img = (inputs["input_ids"][0] == image_id).nonzero()[:, 0]
        on_a = torch.from_numpy(a.patch_mask.reshape(-1) > 0)
        on_b = torch.from_numpy(b.patch_mask.reshape(-1) > 0)
        att = torch.stack([out.attentions[layer][0, :, -1, img] for layer in prune_layers])  # (P, H, 576)
        mass_a.append(att[:, :, on_a].sum(-1).numpy())
        mass_b.append(att[:, :, on_b].sum(-1).numpy())
        hidden.append(np.stack([h[0, -1].numpy() for h in out.hidden_states[1:]]))
        offsets.append([(a.center[0] - b.center[0]) / 100, (a.center[1] - b.center[1]) / 100])
        tokens = out.hidden_states[0][0, img].numpy()  # the projected image tokens the decoder gets
        share = att / att.sum(-1, keepdim=True)                 # each head's weights over the image
        read.append((share.numpy() @ tokens).reshape(len(prune_layers), -1))  # (P, H * d)
        for o in s.scene.objects:
            w = o.patch_mask.reshape(-1)
            pooled.append((w[:, None] * tokens).sum(0) / w.sum())
            centres.append(o.center)
        word = processor.tokenizer.convert_ids_to_tokens(int(out.logits[0, -1].argmax()))
        answers.append(word)
        correct.append(word == q.answer)
    offsets = np.array(offsets)
    hidden = np.stack(hidden)  # (n, layers, d)
    pooled, centres = np.stack(pooled), np.array(centres, dtype=np.float64) / 100
    x = np.concatenate([pooled, np.ones((len(pooled), 1))], 1)
    to_centre = np.linalg.lstsq(x, centres, rcond=None)[0]           # (d + 1, 2)
    read = np.stack(read)                                              # (n, P, H * d)
    d = pooled.shape[1]
    heads = read.reshape(len(read), len(prune_layers), -1, d)
    seen = np.concatenate([heads, np.ones(heads.shape[:-1] + (1,))], -1) @ to_centre  # (n, P, H, 2)
    return {
        "n": n, "split": split, "accuracy": float(np.mean(correct)),
        "answers": {w: answers.count(w) for w in sorted(set(answers))},
        "pooled_centre_r2": ridge_r2(pooled, centres),
        "prune_layers": list(prune_layers),
        "mass_first": np.mean(mass_a, 0).round(3).tolist(),   # [prune layer][head]
        "mass_second": np.mean(mass_b, 0).round(3).tolist(),
        "read_r2_by_prune_layer": [ridge_r2(seen[:, p].reshape(len(seen), -1), offsets)
                                   for p in range(len(prune_layers))],
        "offset_r2_by_layer": [ridge_r2(hidden[:, layer], offsets) for layer in range(hidden.shape[1])],
    }


def format_report(r: dict) -> str:
    lines = [f"{r['n']} position questions ({r['split']}): accuracy {r['accuracy']:.3f}, answers {r['answers']}",
             "pooled centre R^2 (x, y) from projected tokens: "
             + " ".join(f"{v:.2f}" for v in r["pooled_centre_r2"]),
             "attention mass of the answer row on the first / second named object:"]
    for layer, fa, fb in zip(r["prune_layers"], r["mass_first"], r["mass_second"]):
        lines.append(f"  layer {layer}: " + "  ".join(f"h{h} {x:.2f}/{y:.2f}" for h, (x, y) in enumerate(zip(fa, fb))))
    lines.append("offset (dx, dy) R^2 from what the answer row's heads read, per prune layer: "
                 + "  ".join(f"L{k} {x:.2f},{y:.2f}" for k, (x, y) in zip(r["prune_layers"], r["read_r2_by_prune_layer"])))
    lines.append("offset (dx, dy) R^2 from the answer row after each layer: "
                 + "  ".join(f"L{k} {x:.2f},{y:.2f}" for k, (x, y) in enumerate(r["offset_r2_by_layer"])))
    return "\n".join(lines)


def main(argv=None):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="assets/toy-llava")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = LlavaForConditionalGeneration.from_pretrained(a.model, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(a.model)
    layers = ModelDefaults.load(a.model, model.config.text_config.num_hidden_layers).prune_layers
    r = probe(model, processor, a.n, a.split, tuple(layers))
    print(format_report(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()

"""Unpruned greedy accuracy of a saved toy checkpoint on a split of the scene world.

    python -m analysis.toy_accuracy --model assets/toy-llava --split test --n 1000

Loads the model exactly as a user would (from_pretrained + AutoProcessor, offline), runs
`generate` one question at a time (no padding, so nothing differs from single-image use) and
prints accuracy overall and per question type, plus the wall time of a 16-token generation.
This is the plain-model check; the MustDrop evaluation with pruning lives with the library.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from analysis.toyworld import QUESTION_TYPES, make_sample


def load(path: str):
    model = LlavaForConditionalGeneration.from_pretrained(path)
    model.eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


@torch.no_grad()
def answer(model, processor, image, question: str, max_new_tokens: int = 4) -> str:
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def evaluate(model, processor, split: str, n: int, start: int = 0) -> dict:
    hits: dict[str, list[int]] = {t: [] for t in QUESTION_TYPES}
    for i in range(start, start + n):
        s = make_sample(split, i)
        hits[s.qtype].append(int(answer(model, processor, s.image, s.question) == s.answer))
    res = {t: float(np.mean(v)) for t, v in hits.items() if v}
    res["all"] = float(np.mean([h for v in hits.values() for h in v]))
    res["n"] = n
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="assets/toy-llava")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load(args.model)
    res = evaluate(model, processor, args.split, args.n, args.start)
    s = make_sample(args.split, args.start)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
    inputs = processor(images=s.image, text=processor.apply_chat_template(conv, add_generation_prompt=True),
                       return_tensors="pt")
    times = []
    for _ in range(5):
        t = time.perf_counter()
        model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        times.append(time.perf_counter() - t)
    res["seconds_16_tokens"] = float(np.median(times))
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

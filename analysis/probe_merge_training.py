"""Probe: does training on stage-1a-merged batches make a checkpoint's decoder robust to merging?

    python -m analysis.probe_merge_training --model assets/toy-llava --out runs/merge-ft --minutes 12 --merge-share 0.6
    python -m analysis.probe_merge_training --model assets/toy-llava --out runs/plain-ft --minutes 12 --merge-share 0

Fine-tunes an existing checkpoint at a constant learning rate in the joint phase's late regime
(background fully in, 30% of batches dropped; --merge-share of the rest run the library's stage 1a
merge, as `train_toy --merge-share` does), then saves a checkpoint to evaluate with
`analysis.calibrate` and `analysis.evaluate`. The run with --merge-share 0 is the control: the same
extra training without merged batches. This answers whether a from-scratch run with --merge-share is
worth its budget; its output is not a shippable model (issue 4 asks for one from-scratch run).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from analysis.toy_model import save
from analysis.train_toy import Trainer, build_parser


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="assets/toy-llava")
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = by minutes)")
    ap.add_argument("--merge-share", type=float, default=0.6)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tr = Trainer(build_parser().parse_args(["--merge-share", str(a.merge_share), "--lr", str(a.lr),
                                            "--warmup", "1", "--seed", str(a.seed)]))
    tr.model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(a.model).state_dict())
    tr.model.train()
    tr.lr_at = lambda step, frac: a.lr
    t0, step, acc = time.time(), 0, {"merged": [], "other": []}
    while time.time() - t0 < a.minutes * 60 and not (a.max_steps and step >= a.max_steps):
        s = tr.step(0.99, step)
        step += 1
        acc["merged" if "merged_acc" in s else "other"].append(s["acc"])
        if step % 50 == 0:
            print(f"step {step} t {(time.time() - t0) / 60:.1f}m train acc on merged batches "
                  f"{np.mean(acc['merged'][-50:] or [np.nan]):.3f}, on the others "
                  f"{np.mean(acc['other'][-50:] or [np.nan]):.3f}", flush=True)
    tr.model.eval()
    save(tr.model, tr.processor, a.out)
    print(f"saved {a.out} after {step} steps ({len(acc['merged'])} merged batches); calibrate it before "
          f"evaluating a preset (python -m analysis.calibrate --model {a.out} --budget 64 --n 32 --write)")
    return step, len(acc["merged"])


if __name__ == "__main__":
    main()

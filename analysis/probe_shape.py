"""Vision-only probe: how fast does the toy CLIP tower learn object shape, under which target?

    python -m analysis.probe_shape --mode pool --steps 4000 [--device cuda] [--log runs/probe.log]

Trains the toy model's vision tower and projector alone (colour per patch, plus a shape target)
and prints, every 100 steps, the shape accuracy of a linear head on 60 fixed validation scenes,
read from the coverage-weighted mean of each object's tokens ("pooled") and per object patch.
Shape targets (--mode): obj = per object patch; pool = per object, on the pooled tokens;
edge = per boundary patch; both / pooledge / pooledge05 = sums. These probes chose the pooled
target of analysis.train_toy (figures in assets/toy-llava/README.md).
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from analysis.toy_model import build_model
from analysis.train_toy import image_tokens, object_means, patch_labels
from analysis.toyworld import SHAPES, generate_scene, scene_seed

MODES = ("obj", "pool", "edge", "both", "pooledge", "pooledge05")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split(chr(10))[0])
    ap.add_argument("--mode", default="pool", choices=sorted(MODES), help="the shape target (see above)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--minutes", type=float, default=6.5, help="stop after this wall time as well")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=128, help="vision tower width")
    ap.add_argument("--layers", type=int, default=4, help="vision tower layers")
    ap.add_argument("--heads", type=int, default=4, help="vision tower heads")
    ap.add_argument("--batch", type=int, default=6, help="scenes per step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log", default=None, help="also write the lines to this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(1 if a.device != "cpu" else 2)
    dev = torch.device(a.device)
    m, _ = build_model(0, vision_width=a.width, vision_layers=a.layers, heads=a.heads)
    vt, pj = m.model.vision_tower.to(dev), m.model.multi_modal_projector.to(dev)
    aux = torch.nn.Linear(128, 12).to(dev)
    opt = torch.optim.AdamW(list(vt.parameters()) + list(pj.parameters()) + list(aux.parameters()), a.lr, weight_decay=0.01)
    logf = open(a.log, "w", buffering=1) if a.log else None
    def log(s):
        print(s, flush=True)
        if logf: logf.write(s + "\n")
    log(str(vars(a)))
    def feats(imgs):
        return image_tokens(m, imgs, dev)
    val = [generate_scene(scene_seed("val", 5000 + b)) for b in range(60)]
    t0 = time.time(); k = 0
    for step in range(a.steps):
        if time.time() - t0 > a.minutes * 60: break
        scs = [generate_scene(scene_seed("train", k + b)) for b in range(a.batch)]; k += a.batch
        f = feats(np.stack([s.image for s in scs])); o = aux(f)
        lab = {kk: v.to(dev) for kk, v in patch_labels(scs).items()}
        lc = F.cross_entropy(o[..., :7].reshape(-1, 7), lab["color"].reshape(-1), ignore_index=-100)
        sh = lab["shape"].reshape(-1); sel = sh > 0
        l_obj = F.cross_entropy(o[..., 8:12].reshape(-1, 4)[sel], sh[sel] - 1)
        p, y, _ = object_means(f, scs); l_pool = F.cross_entropy(aux(p)[:, 8:12], y)
        eb, ei, ey = [], [], []
        for b, sc in enumerate(scs):
            for ob in sc.objects:
                c = ob.patch_mask.reshape(-1); idx = np.flatnonzero((c > 0.05) & (c < 0.95))
                eb += [b] * len(idx); ei += idx.tolist(); ey += [SHAPES.index(ob.shape)] * len(idx)
        l_edge = F.cross_entropy(o[torch.tensor(eb, device=dev), torch.tensor(ei, device=dev)][:, 8:12], torch.tensor(ey, device=dev))
        ls = {"obj": l_obj, "pool": l_pool, "both": l_obj + l_pool, "edge": l_edge, "pooledge": l_pool + l_edge,
              "pooledge05": l_pool + 0.5 * l_edge}[a.mode]
        opt.zero_grad(); (lc + ls).backward(); opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                accs, paccs = [], []
                for i in range(0, 60, 20):
                    scs = val[i:i + 20]; f = feats(np.stack([s.image for s in scs]))
                    p, y, _ = object_means(f, scs); accs.append((aux(p)[:, 8:12].argmax(-1) == y).float())
                    sh = patch_labels(scs)["shape"].reshape(-1).to(dev); sel = sh > 0
                    paccs.append((aux(f)[..., 8:12].reshape(-1, 4).argmax(-1)[sel] == sh[sel] - 1).float())
            log(f"step {step} t {time.time()-t0:.0f}s lobj {l_obj.item():.3f} lpool {l_pool.item():.3f} "
                f"val pooled {torch.cat(accs).mean().item():.3f} patch {torch.cat(paccs).mean().item():.3f}")


if __name__ == "__main__":
    main()

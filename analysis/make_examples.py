"""Write assets/examples/: a few test-split scenes with questions and masks, plus natural photos.

    python -m analysis.make_examples --out assets/examples

Scenes are chosen from the test split (so they regenerate from their seed) to cover every
question type and background kind; each PNG gets a sibling .npz (Scene.to_npz: image, pixel and
patch masks, metadata) and an entry in examples.json. The natural photographs are copied from
scikit-image's bundled sample data (licences in assets/examples/README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from analysis.toyworld import QUESTION_TYPES, make_sample

PHOTOS = {"astronaut.png": "astronaut", "coffee.png": "coffee", "chelsea.png": "chelsea"}
# Questions a real checkpoint can answer from the photo (what, how many, which colour), with the
# answer a person gives; the scene-world toy model cannot read them (the app offers it none).
PHOTO_QUESTIONS = {
    "astronaut": [("What is the woman wearing?", "an orange spacesuit", "what"),
                  ("How many flags are in the picture?", "one", "count")],
    "coffee": [("What drink is in the cup?", "coffee", "what"),
               ("What color is the saucer?", "red", "color")],
    "chelsea": [("What animal is this?", "a cat", "what"),
                ("What color are its eyes?", "green", "color")],
}
N_SCENES = 6


def pick_samples(n: int) -> list[tuple[int, object]]:
    """First test indices (scenes with >= 2 objects) that together cover every question type and
    background kind, topped up in index order to n scenes."""
    chosen, rest = [], []
    types, kinds = set(), set()
    for i in range(400):
        s = make_sample("test", i)
        if len(s.scene.objects) < 2:
            continue
        kind = s.scene.background["kind"]
        if s.qtype not in types or kind not in kinds:
            chosen.append((i, s))
            types.add(s.qtype)
            kinds.add(kind)
        else:
            rest.append((i, s))
        if types == set(QUESTION_TYPES) and len(kinds) == 4 and len(chosen) + len(rest) >= n:
            break
    chosen += rest[: max(0, n - len(chosen))]
    return sorted(chosen, key=lambda c: c[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="assets/examples")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    listing = []
    for i, s in pick_samples(N_SCENES):
        stem = f"scene_test_{i:04d}"
        s.image.save(out / f"{stem}.png")
        s.scene.to_npz(out / f"{stem}.npz")
        listing.append({"file": f"{stem}.png", "world": "scene", "masks": f"{stem}.npz", "split": "test", "index": i,
                        "seed": s.scene.seed, "question": s.question, "answer": s.answer,
                        "question_type": s.qtype, "target_ids": list(s.targets),
                        "background": s.scene.background["kind"],
                        "objects": [o.meta() for o in s.scene.objects]})
    import skimage
    data = Path(skimage.__file__).parent / "data"
    for fname, name in PHOTOS.items():
        shutil.copyfile(data / fname, out / f"photo_{name}.png")
        for question, answer, kind in PHOTO_QUESTIONS[name]:
            listing.append({"file": f"photo_{name}.png", "world": "photo", "source": f"scikit-image data/{fname}",
                            "question": question, "answer": answer, "question_type": f"photo_{kind}"})
    (out / "examples.json").write_text(json.dumps(listing, indent=1) + "\n")
    print(f"wrote {len(listing)} examples to {out}")


if __name__ == "__main__":
    main()

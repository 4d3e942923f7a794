"""analysis.sweep compare on a folder of images + JSONL (no scene ground truth): every baseline row
is there, nothing failed, accuracy has its bootstrap interval and recall is left empty."""

import json

import pandas as pd

from analysis import sweep as SW
from conftest import half_textured_image


def test_compare_on_a_folder_and_jsonl(tiny_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for k in range(2):
        half_textured_image(k).save(images / f"im{k}.png")
        lines.append(json.dumps({"image": f"im{k}.png", "question": "what colour is the square?", "answer": "yellow"}))
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert SW.main(["compare", "--model", str(tiny_dir), "--out", str(out), "--preset", "64", "--no-ablations",
                    "--images", str(images), "--questions", str(tmp_path / "q.jsonl"), "--max-new-tokens", "1",
                    "--no-figures", "--no-traces"]) == 0
    ct = pd.read_csv(out / "compare.csv", dtype={"preset": str})
    assert list(ct["config"]) == ["off", "64"] + [f"{m}@64" for m in SW.compared()]
    assert (ct["failed"] == 0).all() and (ct["n"] == 2).all()
    assert ct["acc_ci95_low"].notna().all() and ct["recall_final_tokens"].isna().all()

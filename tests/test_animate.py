"""python -m mustdrop.vis TRACE --animate out.gif|out.mp4: one frame per LLM layer (after 1a and 1b),
each panel the app's overlay of that layer, read back from the pixels against the trace."""

import numpy as np
import pytest
from PIL import Image

from mustdrop import vis
from mustdrop.trace import Trace
from mustdrop.vis.animate import CAPTION_H, PANEL, frames
from mustdrop.vis.geometry import decode_categories, geometry
from mustdrop.vis.slides import main


@pytest.fixture(scope="module")
def trace(dataset_run):
    return Trace.load(dataset_run / "traces" / "64" / "test-0000002.safetensors")


def test_each_layer_frame_is_that_layers_decisions(trace):
    fr = frames(trace)
    assert len(fr) == 2 + trace.num_layers and len({f.shape for f in fr}) == 1
    geom = geometry(trace, PANEL)
    status_pal = {**vis.STATUS_COLOURS, vis.NO_TOKEN_CODE: vis.NO_TOKEN}
    kv_pal = {**vis.KV_COLOURS, vis.NO_TOKEN_CODE: vis.NO_TOKEN}
    for layer in range(trace.num_layers):
        f = fr[2 + layer][CAPTION_H:]
        left, right = f[:, :geom.size], f[:, geom.size + 8:geom.size * 2 + 8]
        np.testing.assert_array_equal(decode_categories(right, geom, kv_pal), vis.kv_map(trace, layer))
        pl = trace.stage2_layer_for(layer)
        if pl is not None and pl <= layer:
            np.testing.assert_array_equal(decode_categories(left, geom, status_pal), vis.status_map(trace, pl))


def test_cli_writes_gif_and_mp4_and_refuses_other_formats(trace, dataset_run, tmp_path, capsys):
    path = dataset_run / "traces" / "64" / "test-0000002.safetensors"
    assert main([str(path), "--animate", str(tmp_path / "a.gif"), "--fps", "2"]) == 0
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 2 + trace.num_layers
    assert main([str(path), "--animate", str(tmp_path / "a.mp4")]) == 0
    import cv2
    cap = cv2.VideoCapture(str(tmp_path / "a.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 2 + trace.num_layers
    assert main([str(path), "--animate", str(tmp_path / "a.avi")]) == 2
    assert "writes .gif or .mp4" in capsys.readouterr().err

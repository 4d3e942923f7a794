"""MustDrop Lens, the app: what MustDrop does to each image patch, stage by stage.

    engine.py     the model: loaded once, one lock, a cache of vanilla runs, ``Lens.analyze``
                  (the only model call, under ``spaces.GPU`` on a ZeroGPU Space)
    session.py    ``Session``: one visitor's two traces and canvases; ``Frame``: layer, patch, outlines
    inputs.py     the visitor's numbers, prune layers, knobs and decoding settings, checked
    examples.py   the example scenes (one documented format) and their ground-truth masks
    views/        one module per view, each building its components and drawing from a Session
    app.py        layout and events (their outputs derived from the views' registry), ``launch``
    cli.py        ``python viz_app.py`` (arguments, environment variables of a Space)
    cache_files.py  Gradio's cached image copies written atomically (installed on import)
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from . import cache_files  # noqa: E402  (after the environment: gradio reads it on import)

cache_files.install()

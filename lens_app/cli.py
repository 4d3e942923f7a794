"""``python viz_app.py [--model PATH_OR_ID] [--device ...] [--dtype ...] [--host ...] [--port ...]
[--method-file PATH ...]``"""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

log = logging.getLogger("mustdrop.app")


def parser() -> argparse.ArgumentParser:
    """The command line (defaults from the environment a Space sets)."""
    from .engine import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description="MustDrop Lens: see what MustDrop does to every image patch.")
    env = os.environ
    ap.add_argument("--model", default=env.get("MUSTDROP_MODEL", DEFAULT_MODEL),
                    help="LLaVA checkpoint: a local folder or a hub id (default: $MUSTDROP_MODEL, else the shipped "
                         "toy model assets/toy-llava)")
    ap.add_argument("--device", default=env.get("MUSTDROP_DEVICE"), help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--dtype", default=env.get("MUSTDROP_DTYPE"), help="float32, float16 or bfloat16 (default: per device)")
    ap.add_argument("--host", default=env.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="address to bind (default 127.0.0.1; a HuggingFace Space sets GRADIO_SERVER_NAME)")
    ap.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--runs", default=env.get("MUSTDROP_RUNS"),
                    help="folder whose run folders (analysis.batch --out, lmms-eval output) the Dataset tab offers")
    ap.add_argument("--method-file", action="append", default=[], metavar="PATH",
                    help="a Python file declaring METHOD (see examples/methods/): its method joins the "
                         "'compare with' choice and /analyze's method argument; repeat for several")
    return ap


def main(argv=None):
    from .app import build_app, launch
    from .engine import Lens, user_errors
    from .workdir import remove_on_sigterm

    from mustdrop import methods

    args = parser().parse_args(argv)
    remove_on_sigterm()              # a stopped app (SIGTERM, Ctrl-C) removes its work folder on the way out
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        for m in methods.load_files(args.method_file):
            log.info("method %s (%s) loaded", m.name, m.label)
    except methods.MethodError as e:
        raise SystemExit(f"error: {e}") from None
    lens = Lens(args.model, args.device, args.dtype)
    try:
        lens.load()
    except user_errors() as e:
        log.warning("model not loaded (%s); the app still replays uploaded traces", e)
    launch(build_app(lens, runs_dir=args.runs), args.host, args.port)

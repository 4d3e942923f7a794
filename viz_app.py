"""MustDrop Lens: ``python viz_app.py [--model PATH_OR_ID]``, and the HuggingFace Spaces entry.

The app is the package ``lens_app`` (engine, session, inputs, examples, views, app, cli).
"""

from lens_app.cli import main

if __name__ == "__main__":
    main()

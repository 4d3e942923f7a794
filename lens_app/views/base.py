"""What a view is, and the registry of them."""

from __future__ import annotations

REGISTRY: list[type["View"]] = []
SLOTS = ("sidebar", "top", "caption", "tab", "below")

# What a redraw can change; a view redraws on the changes it names (and always for a new session).
LAYER, SELECTION, CROP, GT = "layer", "selection", "crop", "gt"
NO_SESSION = "run an analysis or upload a trace first"     # an event on a page with nothing shown yet


class View:
    """One view: components built in ``build``, drawn by ``draw``; its own run inputs built in
    ``build_inputs`` and its own events attached in ``wire``.

    slot     where app.py places it: "sidebar" (under the inputs), "top" (above the layer controls),
             "caption" (under them), "tab" (in the tab named ``tab``), "below" (under the tabs)
    order    position within the slot (and the tab)
    depends  the changes it redraws on: LAYER, SELECTION, CROP, GT
    """

    slot: str = "tab"
    tab: str | None = None
    tab_id: str | None = None
    order: int = 0
    depends: frozenset = frozenset()
    draw_last: bool = False        # drawn after the others of a redraw (the caption that times them)

    def build(self) -> None:
        raise NotImplementedError

    @property
    def outputs(self) -> list:
        """Every component ``draw`` may return a value for."""
        raise NotImplementedError

    @property
    def clickable(self) -> list:
        """Images on which a click selects the patch under it."""
        return []

    def draw(self, session, frame) -> dict:
        raise NotImplementedError

    def build_inputs(self, lens) -> dict:
        """Inputs this view places among the run inputs (under the preset choice), by role, e.g.
        {"compare": dropdown}: the stale note reads them. The app reads roles, never view classes.
        ``lens``: the app's model (``lens.runner`` is None when none loaded), for choices it can run."""
        return {}

    @property
    def run_inputs(self) -> dict:
        """Values this view feeds to a Run, by role: /run passes them to Lens.analyze as keywords."""
        return {}

    def wire(self, app) -> None:
        """Attach this view's own events (inside the page's gr.Blocks). ``app`` (lens_app.handlers.App)
        holds the page's components (app.page), the session callbacks and ``guarded``; lens_app.events
        the shared inputs and outputs."""


def view(cls: type[View]) -> type[View]:
    """Register a view class (once, however often its module is imported)."""
    if not any(v.__module__ == cls.__module__ and v.__qualname__ == cls.__qualname__ for v in REGISTRY):
        REGISTRY.append(cls)
    return cls


def image_output(label: str, elem_id: str):
    """An overlay image: PNG (lossless: its colours decode back), downloadable, not editable."""
    import gradio as gr

    from ..session import CANVAS

    return gr.Image(label=label, elem_id=elem_id, format="png", interactive=False, height=CANVAS,
                    buttons=["download", "fullscreen"])

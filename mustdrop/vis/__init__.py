"""Trace -> pictures: per-stage overlays, legends, text readouts, curves and the slide figure.

Everything here reads a :class:`mustdrop.trace.Trace` (and, for the background only, the image the
run saw); nothing touches a model. The trace's patch queries (``Trace.patch``, ``processed_at``,
``kv_cached_at`` ...) are already in original-patch coordinates (G x G per crop), so no view
re-maps token ids. One module per job:

    palette    one meaning per colour (the table), the score ramp, the opacity of the tints
    geometry   the canvas: the image as the model saw it, patch cells, painting, reading pixels back
    overlays   one picture per stage decision (1a merge, heatmaps, 1b key set, 2 filter, 3 KV)
    legends    what each colour means (HTML)
    readouts   patch lifecycle, one layer in numbers, run summary, answer comparison (Markdown)
    plots      token curve and KV bytes (plotly)
    slides     the 1920 x 1080 slide (PNG + PDF); ``python -m mustdrop.vis TRACE --out DIR``
"""

from .geometry import (Geometry, base_canvas, decode_categories, decode_dots, geometry, model_view,
                       original_box, outline, paint)
from .legends import legend_html
from .overlays import (GroundTruth, blank_overlay, filter_overlay, has_untokened, heatmap_overlay, heatmap_values,
                       key_overlay, kv_map, kv_overlay, merge_overlay, status_map)
from .palette import (ANSWER_DIFFERS, BACKGROUND, COMPARE_BOTH, COMPARE_LABELS, COMPARE_ONLY_MUSTDROP,
                      COMPARE_ONLY_OTHER, DEFAULT_OPACITY, GONE, GT_OUTLINE, GT_TARGET, HEATMAPS, KEPT_STATUSES,
                      KEY_OUTLINE, KV_ABSENT, KV_CACHED, KV_COLOURS, KV_LABELS, KV_TRIMMED, MEANINGS, NAN_COLOUR,
                      NO_TOKEN, NO_TOKEN_CODE, NO_TOKEN_LABEL, SCORE_CMAP, SELECT_OUTLINE, STATUS_COLOURS,
                      STATUS_LABELS, UNMERGED_DOT, UNTOUCHED, check_opacity, css, group_colour, heat_colours, lut,
                      oklch, window_shade)
from .plots import kv_bytes_figure, token_curve
from .readouts import (answer_diff, display_pieces, format_bytes, layer_markdown, lifecycle_markdown,
                       object_coverage, patch_lifecycle, special_tokens, strip_special, summary_markdown)
from .slides import SLIDE_RC, main, save_slides, slide_figure, slide_stem, text_lines

__all__ = [
    "Geometry", "base_canvas", "decode_categories", "decode_dots", "geometry", "model_view", "original_box",
    "outline", "paint", "legend_html", "GroundTruth", "blank_overlay", "filter_overlay", "has_untokened",
    "heatmap_overlay", "heatmap_values", "key_overlay", "kv_map", "kv_overlay", "merge_overlay", "status_map",
    "ANSWER_DIFFERS", "COMPARE_BOTH", "COMPARE_LABELS", "COMPARE_ONLY_MUSTDROP", "COMPARE_ONLY_OTHER",
    "DEFAULT_OPACITY", "GONE", "MEANINGS", "SCORE_CMAP", "UNTOUCHED", "check_opacity", "css", "oklch", "window_shade",
    "special_tokens", "strip_special", "slide_stem", "text_lines",
    "BACKGROUND", "GT_OUTLINE", "GT_TARGET", "HEATMAPS", "KEPT_STATUSES", "KEY_OUTLINE", "KV_ABSENT", "KV_CACHED",
    "KV_COLOURS", "KV_LABELS", "KV_TRIMMED", "NAN_COLOUR", "NO_TOKEN", "NO_TOKEN_CODE", "NO_TOKEN_LABEL",
    "SELECT_OUTLINE", "STATUS_COLOURS", "STATUS_LABELS", "UNMERGED_DOT", "group_colour", "heat_colours", "lut",
    "kv_bytes_figure", "token_curve", "answer_diff", "display_pieces", "format_bytes", "layer_markdown",
    "lifecycle_markdown", "object_coverage", "patch_lifecycle", "summary_markdown", "SLIDE_RC", "main",
    "save_slides", "slide_figure",
]

"""Interactive curves (plotly): vision tokens per LLM layer, KV-cache bytes per layer.

Lines are black and greys told apart by dash, so they take no hue from the overlays' meanings; the
prune layers are marked in the vermillion of "dropped" (where stage 2 drops). Layers count from 0.
"""

from __future__ import annotations

from .. import accounting
from ..methods import words_of
from .palette import GONE, VERMILLION, css
from .text import html_text

VANILLA_LINE = "rgb(150,150,150)"


def token_curve(trace, vanilla=None):
    """Plotly figure: vision tokens each LLM layer processes in prefill and holds in its KV cache."""
    import plotly.graph_objects as go

    x = list(range(trace.num_layers))
    label = html_text(words_of(trace).label)           # plotly renders trace names as HTML
    fig = go.Figure()
    if vanilla is not None:
        fig.add_trace(go.Scatter(x=x, y=vanilla.meta["vision_tokens_per_layer"], mode="lines+markers",
                                 name="vanilla: vision tokens", line=dict(color=VANILLA_LINE, dash="dot", width=2.5)))
    fig.add_trace(go.Scatter(x=x, y=trace.meta["vision_tokens_per_layer"], mode="lines+markers",
                             name=f"{label}: vision tokens in prefill", line=dict(color="black", width=3)))
    fig.add_trace(go.Scatter(x=x, y=trace.meta["kv"]["vision_entries_per_layer"], mode="lines+markers",
                             name=f"{label}: vision entries in KV cache", line=dict(color=css(GONE), dash="dash", width=2.5)))
    for p in trace.prune_layers:
        fig.add_vline(x=p, line=dict(color=css(VERMILLION), width=1, dash="dot"))
    fig.update_layout(title=f"Vision tokens per LLM layer (prune layers {trace.prune_layers or 'none'}, dotted vermillion)",
                      xaxis_title="LLM layer (0-based)", yaxis_title="vision tokens", height=360,
                      margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.25),
                      template="plotly_white")
    return fig


def kv_bytes_figure(trace, vanilla=None):
    """Plotly bars: KV-cache bytes per LLM layer after prefill (MustDrop vs vanilla)."""
    import plotly.graph_objects as go

    s = accounting.summarize(trace)
    x = list(range(trace.num_layers))
    fig = go.Figure()
    if vanilla is not None:
        fig.add_trace(go.Bar(x=x, y=accounting.summarize(vanilla)["kv"]["bytes_per_layer"], name="vanilla",
                             marker_color=VANILLA_LINE))
    fig.add_trace(go.Bar(x=x, y=s["kv"]["bytes_per_layer"], name="MustDrop", marker_color="black"))
    fig.update_layout(title="KV-cache bytes per LLM layer after prefill", xaxis_title="LLM layer (0-based)",
                      yaxis_title="bytes", barmode="group", height=300, template="plotly_white",
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig

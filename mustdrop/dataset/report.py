"""``python -m mustdrop report RUN_DIR --out report.html [--json summary.json]``: the dataset lens as one
self-contained HTML file.

Why one file: a researcher mails it, opens it from disk on a laptop with no server and no network,
and pastes its figures into slides. Figures are embedded as base64 PNG and also written beside it
(``<out stem>-figures/*.png`` and ``.pdf``); every string from the run (questions, answers, ids,
config names, settings) is escaped with html.escape; nothing is fetched. The JSON holds, per config,
at least accuracy, lost, gained (against the vanilla rows of the same samples) and n_samples.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from . import aggregate as A
from . import figures as F
from .traceset import RunError, TraceSet

MAX_TABLE_ROWS = 5000

CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1300px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
th{background:#eee}tr.lost td{background:#fbe3d6}tr.gained td{background:#dcefe3}img{max-width:100%}
h2{border-bottom:1px solid #ccc;margin-top:32px}code{background:#f3f3f3}.note{color:#555;font-size:13px}"""


def esc(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return html.escape(f"{v:.4g}")
    return html.escape(str(v))


def table_html(records: list[dict], columns: list[str], row_class=None) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for r in records:
        cls = row_class(r) if row_class else ""
        body.append(f"<tr class=\"{html.escape(cls)}\">" + "".join(f"<td>{esc(r.get(c))}</td>" for c in columns)
                    + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


class Figures:
    """Saves each figure as PNG + PDF beside the report and returns its embedded <img>."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []

    def add(self, fig, name: str, alt: str) -> str:
        import matplotlib.pyplot as plt

        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80]
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        (self.folder / f"{stem}.png").write_bytes(buf.getvalue())
        fig.savefig(self.folder / f"{stem}.pdf")
        plt.close(fig)
        self.written += [self.folder / f"{stem}.png", self.folder / f"{stem}.pdf"]
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def summary_json(ts: TraceSet) -> dict:
    """Per config: accuracy, lost, gained, n_samples (+ method, agreement and accounting means)."""
    return {"run": ts.root.name, "model": ts.settings.get("model"), "vanilla": ts.vanilla,
            "configs": A.config_summary(ts)}


def build_html(ts: TraceSet, figs: Figures) -> str:
    import matplotlib

    matplotlib.use("Agg")
    s = ts.settings
    parts = [f"<!doctype html><html><head><meta charset=\"utf-8\"><title>MustDrop Lens report: {esc(ts.root.name)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>MustDrop Lens: run {esc(ts.root.name)}</h1>",
             "<p class=\"note\">" + " · ".join(f"{esc(k)}: {esc(v if not isinstance(v, (dict, list)) else json.dumps(v))}"
                                               for k, v in s.items() if k in ("producer", "model", "dataset", "created",
                                                                              "versions")) + f" · read as: {esc(ts.kind)}</p>"]
    if ts.problems:
        parts.append(f"<p class=\"note\">{len(ts.problems)} trace(s) could not be read and are left out: "
                     + "; ".join(esc(p) for p in ts.problems[:20]) + "</p>")
    summ = A.config_summary(ts)
    recs = [dict(config=c, **v) for c, v in summ.items()]
    parts += ["<h2>Configs</h2>",
              "<p class=\"note\">lost: vanilla right and this config wrong; gained: the reverse (same samples). "
              "Equivalent tokens in the authors' convention and the compute convention (mean vision tokens "
              "per LLM layer); FLOPs and KV as ratios to vanilla.</p>",
              table_html(recs, ["config", "method", "n_samples", "n_failed", "accuracy", "lost", "gained", "agrees_vanilla",
                                "eq_tokens_authors", "eq_tokens_compute", "flops_ratio_image", "kv_ratio"])]
    parts.append("<h2>Failure attribution</h2><p class=\"note\">For each lost answer whose sample has object "
                 "masks: where the asked objects' patches went (coverage-weighted). Walking the losses in order "
                 "(before the LLM, then each prune layer), the category is the point where at least half of them "
                 "are gone, with the score nearer its threshold for MustDrop's drops (both were below); else at "
                 "least half merged in 1a or trimmed from the KV cache; else they were mostly kept.</p>")
    for cfg in ts.configs:
        if cfg == ts.vanilla:
            continue
        t = A.attribution_table(ts, cfg)
        parts.append(f"<h3>{esc(cfg)}</h3>")
        if t.empty:
            parts.append("<p class=\"note\">no lost answers with object masks</p>")
            continue
        parts.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in A.attribution_sentences(ts, cfg)) + "</ul>")
        parts.append(table_html(t.to_dict("records"), list(t.columns)))
        parts.append(figs.add(F.attribution_figure(ts, cfg), f"attribution-{cfg}", f"failure attribution {cfg}"))
    parts += ["<h2>Survival curves</h2>", figs.add(F.survival_figure(ts), "survival", "survival curves")]
    parts.append("<h2>Positional bias</h2><p class=\"note\">Share of the patches kept after the last layer in each "
                 "row band of the grid against a uniform choice among patches with a token (attention-based "
                 "pruning is reported to favour the bottom of the image, arXiv 2508.17807).</p>")
    parts.append(figs.add(F.bias_figure(ts), "positional-bias", "positional bias"))
    for cfg in ts.configs:
        if cfg == ts.vanilla:
            continue
        df = A.positional_bias(ts, cfg)
        parts.append(f"<h3>{esc(cfg)}</h3>" + table_html(df.to_dict("records"), list(df.columns)))
    parts.append("<h2>Where patches go: frequency maps on the image grid</h2>")
    for cfg in ts.configs:
        parts.append(f"<h3>{esc(cfg)}</h3>" + figs.add(F.maps_figure(ts, cfg), f"maps-{cfg}", f"frequency maps {cfg}"))
    table = A.sample_table(ts)
    cols = ["id", "config", "qtype", "question", "answer", "prediction", "correct", "lost", "gained", "recall",
            "eq_tokens_authors", "eq_tokens_compute", "flops_ratio_image", "kv_ratio"]
    parts.append(f"<h2>Samples</h2><p class=\"note\">{len(table)} rows (sample x config); lost rows shaded "
                 f"red, gained green; recall: share of the asked objects' patches still present after the last "
                 f"layer.{' First ' + str(MAX_TABLE_ROWS) + ' rows shown.' if len(table) > MAX_TABLE_ROWS else ''}</p>")
    recs = table.head(MAX_TABLE_ROWS).to_dict("records")
    parts.append(table_html(recs, cols, lambda r: "lost" if r.get("lost") else ("gained" if r.get("gained") else "")))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir, out, json_out=None) -> dict:
    """Open the run, write the HTML (and figures beside it, and the JSON); return the JSON summary."""
    ts = TraceSet.open(run_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figs = Figures(out.parent / f"{out.stem}-figures")
    out.write_text(build_html(ts, figs), encoding="utf-8")
    summary = summary_json(ts)
    if json_out:
        Path(json_out).write_text(json.dumps(_clean(summary), indent=1) + "\n")
    return summary


def _clean(o):
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="the dataset lens of a run folder as one self-contained HTML file")
    p.add_argument("run", help="run folder (analysis.batch / sweep compare --out, or lmms-eval's OUTPUT/mustdrop)")
    p.add_argument("--out", default="report.html", help="HTML file; figures go beside it in <stem>-figures/")
    p.add_argument("--json", default=None, help="also write per-config accuracy, lost, gained, n_samples here")


def main(args) -> int:
    import sys

    from ..trace import TraceError

    try:
        summary = write_report(args.run, args.out, args.json)
    except (RunError, TraceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for cfg, v in summary["configs"].items():
        acc = "–" if v["accuracy"] is None else f"{v['accuracy']:.3f}"
        print(f"{cfg:>16}  n {v['n_samples']:>5}  accuracy {acc}  lost {v['lost']}  gained {v['gained']}")
    print(f"report written to {args.out}")
    return 0

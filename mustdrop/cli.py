"""Command line:

    python -m mustdrop run --model M --image IMG --question Q [--preset 64] [--out trace.safetensors]
        [--method NAME [--budget N] [--layer K]] [--method-file PATH]
    python -m mustdrop methods [--method-file PATH]      # the registered methods, one per line
    python -m mustdrop show TRACE
"""

from __future__ import annotations

import argparse
import sys

from .config import POSITION_MODES, PRESET_NAMES, config_from_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mustdrop",
                                description="MustDrop Lens: run MustDrop on a LLaVA model and record what it did.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one image + question; print the answer and a per-stage summary")
    r.add_argument("--model", default="assets/toy-llava",
                   help="local folder or hub id (e.g. llava-hf/llava-1.5-7b-hf); default: the shipped toy model")
    r.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    r.add_argument("--question", required=True)
    r.add_argument("--preset", default="64", choices=PRESET_NAMES,
                   help="MustDrop's preset; with --method and no --budget, the budget is its run's layer average")
    r.add_argument("--method", default="mustdrop",
                   help="any registered method (python -m mustdrop methods); default mustdrop")
    r.add_argument("--budget", type=float, default=None,
                   help="a method's layer-averaged vision tokens (compute convention); default: those of the MustDrop "
                        "run at --preset on this input, as the app's comparison does (mustdrop.matched)")
    r.add_argument("--layer", type=int, default=None,
                   help="drop layer K of one-drop methods (FastV ...); default: mustdrop.matched.auto_baseline_layer")
    _method_file_arg(r)
    r.add_argument("--positions", choices=POSITION_MODES, default=None,
                   help="RoPE positions after dropping (default: reference, as the authors' code)")
    r.add_argument("--layout", choices=("stock", "reference"), default="stock",
                   help="LLaVA-NeXT only: transformers' packing (stock) or the authors' flat crops (reference)")
    r.add_argument("--max-new-tokens", type=int, default=16)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default=None)
    r.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    r.add_argument("--out", default=None, help="write the trace here (one safetensors file)")
    r.add_argument("--no-vanilla", action="store_true", help="skip the unpruned comparison run")
    s = sub.add_parser("show", help="print the summary of a saved trace")
    s.add_argument("trace")
    from .dataset.report import add_parser as add_report
    add_report(sub)
    m = sub.add_parser("methods", help="list the registered methods, one per line, name first")
    _method_file_arg(m)
    return p


def _method_file_arg(p) -> None:
    p.add_argument("--method-file", action="append", default=[], metavar="PATH",
                   help="a Python file declaring METHOD (see examples/methods/); repeat for several")


def method_lines() -> list[str]:
    """One line per registered method: name, label, stages, how it meets a budget, where it comes from."""
    from . import methods

    out = []
    for name in methods.names():
        m = methods.get(name)
        kind = "built-in" if methods.is_builtin(name) else "plug-in"
        out.append(f"{name}\t{m.label}\t{'+'.join(m.stages)}\t{kind}\t{m.budget_rule}")
    return out


def summary_lines(trace) -> list[str]:
    from .accounting import summarize, vanilla_vision_tokens
    from .methods import words_of

    m, acc = trace.meta, summarize(trace)
    seq = m["sequence"]
    cfg = m["config"]
    plan = (m.get("baseline") or {}).get("plan")
    if plan is None:
        config_line = (f"config    preset {cfg['preset']}: window {cfg['window']}, merge thr {cfg['merge_threshold']}, "
                       f"key rate {cfg['key_keep_rate']}, prune layers {cfg['prune_layers']}, "
                       f"thresholds (global {cfg['global_thr']}, individual {cfg['individual_thr']}), "
                       f"positions {cfg['positions']}")
    else:
        config_line = (f"config    {cfg['preset']}: budget {plan['budget']:g}, kept before the LLM {plan['pre_keep']} of "
                       f"{plan['n0']}, after layers {plan['layers']}: {plan['keep']} ({plan['rule']}), "
                       f"positions {cfg['positions']}")
    lines = [f"model     {m['model']['id']}  ({m['model']['dtype']}, {m['model']['device']})",
             f"method    {words_of(trace).label} ({m.get('method', cfg.get('method'))})",
             config_line,
             f"question  {m['input']['question']}",
             f"answer    {m['generation']['answer']!r}",
             f"stage 1a  {vanilla_vision_tokens(m)} vision tokens -> {seq['N0']} ({seq['N']} patches; "
             + ", ".join(f"{trace.crop_name(c)}: {len(crop_windows(trace, c))} windows merged"
                         for c in range(trace.n_crops)) + ")",
             f"stage 1b  {len(m['stage1b']['key_tokens'])} key tokens"]
    for s in m["stage2"]:
        lines.append(f"stage 2   layer {s['layer']:>2}: {s['entering']} -> {s['kept']} ({s['dropped']} dropped)")
    kv = acc["kv"]
    lines += [f"stage 3   KV cache {kv['total_bytes'] / 1e6:.3f} MB (vanilla {kv['vanilla_total_bytes'] / 1e6:.3f} MB); "
              f"vision entries {kv['vision_bytes'] / 1e6:.3f} MB",
              f"tokens    equivalent {acc['equivalent_tokens']['authors']:.1f} (authors' convention "
              f"{acc['equivalent_tokens']['authors_formula']}), {acc['equivalent_tokens']['compute']:.1f} "
              f"(compute convention, mean over layers)",
              f"FLOPs     {acc['flops']['ratio_image_only']:.3f} x vanilla (image tokens only), "
              f"{acc['flops']['ratio_full_sequence']:.3f} x (full sequence, n_sys {acc['flops']['n_sys']}, "
              f"n_text {acc['flops']['n_text']}); {acc['flops']['formula']}",
              "time      vision {vision_s:.3f} s, prefill {prefill_s:.3f} s, decode {decode_s:.3f} s".format(
                  **m["timings"])]
    return lines


def crop_windows(trace, crop: int) -> list:
    """The stage-1a windows merged in one crop (the run's list for a trace without crop records)."""
    crops = trace.meta.get("crops")
    rec = crops[crop] if isinstance(crops, list) and crop < len(crops) else trace.meta["stage1a"]
    return rec.get("merged_windows", [])


def show(path) -> int:
    """``show TRACE``: the summary, or one message on stderr and exit code 2 (never a traceback)."""
    from .trace import Trace, TraceError

    try:
        lines = summary_lines(Trace.load(path))
    except (TraceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError, IndexError) as e:   # a field the checks let through
        print(f"error: {path}: the trace cannot be summarised ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def _save(trace, out):
    """trace.save with a message instead of a traceback when the disk is full or not writable (the
    write is atomic: a file already at ``out`` stays as it was)."""
    import errno

    from safetensors import SafetensorError

    from .trace import TraceError

    try:
        return trace.save(out)
    except (OSError, SafetensorError) as e:
        text = str(e)
        full = getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in text or "code: 28" in text \
            or "No space left" in text
        reason = "no space left on device" if full else (e.strerror if getattr(e, "strerror", None) else text)
        raise TraceError(f"cannot write the trace to {out}: {reason}; a file already there is left unchanged") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "show":
        return show(args.trace)
    if args.command == "report":          # the dataset lens: no model, no adapter import
        from .dataset.report import main as report_main
        return report_main(args)
    from . import methods
    from .adapters import make_runner
    from .images import ImageInputError
    from .loading import ModelLoadError, load_llava
    from .question import check_question
    from .run.decode import Sampling
    from .trace import TraceError

    try:
        methods.load_files(args.method_file)
        if args.command == "methods":
            print("\n".join(method_lines()))
            return 0
        method = methods.get(args.method)
        if method.name == methods.DEFAULT and (args.budget is not None or args.layer is not None):
            raise ValueError("--budget and --layer are for the other methods; MustDrop's budget is set by --preset")
        check_question(args.question)           # before the model loads: invalid UTF-8 in argv, length
        sampling = Sampling(args.temperature, args.top_p, args.seed)
        model, processor = load_llava(args.model, args.device, args.dtype)
        runner = make_runner(model, processor, args.model, layout=args.layout)
        config = config_from_text(runner.config_for, args.preset, positions=args.positions or None)
        if method.name != methods.DEFAULT:
            config = _method_config(runner, method.name, args, config, sampling)
        result = runner.run(args.image, args.question, config, args.max_new_tokens, sampling)
        print("\n".join(summary_lines(result.trace)))
        if not args.no_vanilla and config.enabled:
            vanilla = runner.run(args.image, args.question, runner.config_for("off"), args.max_new_tokens, sampling)
            print(f"vanilla   {vanilla.trace.answer!r}  (prefill {vanilla.trace.meta['timings']['prefill_s']:.3f} s)")
        if args.out:
            print(f"trace     written to {_save(result.trace, args.out)}")
        return 0
    except (ValueError, ImageInputError, TraceError, ModelLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _method_config(runner, method: str, args, mustdrop_config, sampling):
    """The config of a method other than MustDrop: at --budget, else at the budget of the MustDrop
    run at --preset on this input (mustdrop.matched, the app's rule)."""
    from .config import MustDropConfig
    from .matched import auto_baseline_layer, matched_config, run_budget

    positions = mustdrop_config.positions
    if args.budget is not None:
        k = args.layer if args.layer is not None else auto_baseline_layer(runner, args.budget)
        return MustDropConfig.baseline(method, args.budget, layer=k, seed=args.seed, positions=positions)
    md = runner.run(args.image, args.question, mustdrop_config, args.max_new_tokens, sampling).trace
    print(f"budget    {run_budget(md):.2f} vision tokens per layer: the MustDrop run at preset {args.preset} "
          f"(its answer {md.answer!r})")
    return matched_config(runner, method, md, seed=args.seed, layer=args.layer, positions=positions)


if __name__ == "__main__":
    sys.exit(main())

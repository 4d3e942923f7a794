"""Command line: ``python -m mustdrop run --model M --image IMG --question Q [--preset 64] [--out trace.safetensors]``."""

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
    r.add_argument("--preset", default="64", choices=PRESET_NAMES)
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
    return p


def summary_lines(trace) -> list[str]:
    from .accounting import summarize

    m, acc = trace.meta, summarize(trace)
    seq = m["sequence"]
    cfg = m["config"]
    lines = [f"model     {m['model']['id']}  ({m['model']['dtype']}, {m['model']['device']})",
             f"config    preset {cfg['preset']}: window {cfg['window']}, merge thr {cfg['merge_threshold']}, "
             f"key rate {cfg['key_keep_rate']}, prune layers {cfg['prune_layers']}, "
             f"thresholds (global {cfg['global_thr']}, individual {cfg['individual_thr']}), positions {cfg['positions']}",
             f"question  {m['input']['question']}",
             f"answer    {m['generation']['answer']!r}",
             f"stage 1a  {seq['N']} patches -> {seq['N0']} vision tokens ("
             + ", ".join(f"{c['name']}: {len(c['merged_windows'])} windows merged" for c in m["crops"]) + ")",
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .adapters import ModelLoadError, Sampling, load_llava, make_runner
    from .images import ImageInputError
    from .trace import Trace, TraceError

    try:
        if args.command == "show":
            print("\n".join(summary_lines(Trace.load(args.trace))))
            return 0
        model, processor = load_llava(args.model, args.device, args.dtype)
        runner = make_runner(model, processor, args.model, layout=args.layout)
        config = config_from_text(runner.config_for, args.preset, positions=args.positions or None)
        sampling = Sampling(args.temperature, args.top_p, args.seed)
        result = runner.run(args.image, args.question, config, args.max_new_tokens, sampling)
        print("\n".join(summary_lines(result.trace)))
        if not args.no_vanilla and args.preset != "off":
            vanilla = runner.run(args.image, args.question, runner.config_for("off"), args.max_new_tokens, sampling)
            print(f"vanilla   {vanilla.trace.answer!r}  (prefill {vanilla.trace.meta['timings']['prefill_s']:.3f} s)")
        if args.out:
            print(f"trace     written to {result.trace.save(args.out)}")
        return 0
    except (ValueError, ImageInputError, TraceError, ModelLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

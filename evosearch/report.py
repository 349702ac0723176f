"""What a search folder holds, summarised and drawn: ``evosearch show`` and ``evosearch report``.

`summarize(folder)` reads a run folder into one JSON-serialisable dict:

    status       "finished" (result.json is there) or "interrupted" (only the study)
    result       result.json as written, every field kept (also ones this module
                 does not know, such as other spaces' per-unit sections)
    recipe       the run's recipe (`evosearch.recipe`), from result.json or recipe.yaml
    study        the Optuna study: trials per state, fitness evaluations, the best
                 feasible candidate so far, the Pareto set of a multi-objective search
    allocation   the chosen assignment (or the best so far) as a grid of unit types x
                 layers, valued by the budget's resource
    resume       for an interrupted search, the command that continues it

The allocation needs to know no space: rows and columns come from the unit names
(the first all-digit part of ``model.layers.7.self_attn.q_proj`` is the layer, the
rest the row), and each cell's value is the budget's resource (sparsity, bits,
dropped...) at the unit's level, read from ``space.yaml``, the space the run wrote
for its model. Levels named by strings (``keep``/``drop``, ``2:4``) are shown by name.

`render_text(summary)` is the terminal view; `write_report(folder)` draws the plots
(matplotlib: ``pip install "evosearch[plot]"``) and writes a one-page ``report.md``
and a self-contained ``report.html`` beside result.json.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import optuna

from evosearch.allocation import RESOURCE_LABELS, allocation
from evosearch.engine import History, Point, history
from evosearch.engine import _storage as open_storage  # a storage URL or journal file, read as the engine reads it
from evosearch.errors import EvosearchError
from evosearch.recipe import Recipe
from evosearch.run import RunFolder
from evosearch.space import Space

# --- reading a run folder --------------------------------------------------------------


def summarize(folder: str | Path) -> dict:
    """Everything `show` prints, as one JSON-serialisable dict (see the module docstring)."""
    return _read_run(folder)[0]


def _read_run(folder: str | Path) -> tuple[dict, History | None]:
    """The summary of a run folder, and its study's history (None when the study is out of reach)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvosearchError(f"{folder} is not a folder; pass the --out folder of a search")
    result = _read_json(folder / "result.json")
    recipe = result.get("recipe") if result else _read_recipe(folder / "recipe.yaml")
    storage = (recipe or {}).get("storage") or _study_file(folder)
    if result is None and storage is None:
        raise EvosearchError(f"{folder} holds no result.json and no study.journal: it is not a search folder")
    history = read_history(storage, (result or {}).get("search", {}).get("study")) if storage else None
    if result:  # the chosen assignment, or the best so far
        assignment, resource = result["assignment"], result["budget"]["resource"]
    elif history.best:
        assignment, resource = history.best.assignment, history.budgets[0]["resource"]
    else:
        assignment = resource = None
    space_file = folder / "space.yaml"
    space = Space.from_yaml(space_file) if space_file.exists() else None
    summary = {
        "folder": str(folder),
        "status": "finished" if result else "interrupted",
        "result": result,
        "recipe": recipe,
        "study": study_summary(history, storage) if history else None,
        "allocation": allocation(assignment, space, resource) if assignment else None,
        "resume": None if result else _resume_command(folder, recipe),
    }
    return summary, history


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvosearchError(f"{path} is not valid JSON ({exc.msg}); the run may have been cut off while "
                             f"writing it: delete it and resume the search") from None


def _read_recipe(path: Path) -> dict | None:
    return Recipe.load(path).model_dump(mode="json") if path.exists() else None


def _study_file(folder: Path) -> str | None:
    """The study a search wrote in ``folder``, where the search keeps it, if any."""
    run = RunFolder(folder)
    return run.study_storage() if run.has_study() else None


def _resume_command(folder: Path, recipe: dict | None) -> str:
    if recipe is None:
        return (f"no recipe.yaml in {folder}: repeat the `evosearch search ... --out {folder}` command that started "
                f"it, with --resume")
    return f"evosearch run {folder / 'recipe.yaml'} --out {folder} --resume"


# --- the study ---------------------------------------------------------------------------


def read_history(storage: str, study_name: str | None = None) -> History:
    """Read an evosearch study (by name, or the only study in the storage) as the engine sees it."""
    opened = open_storage(storage)  # a server out of reach or a missing journal: one line
    try:
        names = optuna.get_all_study_names(storage=opened)
    except Exception as exc:  # SQLAlchemy and journal readers raise many kinds of errors on a bad file
        raise EvosearchError(f"cannot read the study storage {storage}: {str(exc).splitlines()[0]}") from None
    if study_name is None:
        evosearch_studies = [n for n in names if n.startswith("evosearch-")] or names
        if len(evosearch_studies) != 1:
            raise EvosearchError(f"storage {storage} holds {len(evosearch_studies)} studies ({', '.join(names)}); "
                                 f"expected the one study of a search folder")
        study_name = evosearch_studies[0]
    elif study_name not in names:
        raise EvosearchError(f"storage {storage} has no study {study_name!r} (it has: {', '.join(names) or 'none'})")
    return history(optuna.load_study(study_name=study_name, storage=opened))


def study_summary(found: History, storage: str) -> dict:
    """What ``show`` says of a study: trials per state, evaluations, the best so far, the Pareto set."""
    best = found.best
    return {
        "name": found.name, "storage": storage, "sampler": found.sampler, "trials": found.states,
        "evaluations": found.evaluations, "budgets": found.budgets, "tradeoff": found.tradeoff,
        "best": None if best is None else _point_dict(best, with_assignment=True),
        "pareto": [_point_dict(p) for p in found.pareto()],
        "runs": len(found.runs), "seconds": round(sum(found.runs), 1),
    }


def _point_dict(p: Point, with_assignment: bool = False) -> dict:
    record = {"trial": p.trial, "value": p.value, "fidelity": p.fidelity, "usage": p.usage}
    if p.tradeoff is not None:
        record["tradeoff"] = p.tradeoff
    if with_assignment:
        record["assignment"] = p.assignment
    return record


# --- the terminal view -------------------------------------------------------------------


def render_text(summary: dict) -> str:
    """`evosearch show`: the run at a glance, robust to fields and spaces it does not know."""
    lines: list[str] = []
    result, recipe, study = summary["result"], summary["recipe"] or {}, summary["study"]
    sampler = (result or {}).get("search", {}).get("sampler") or recipe.get("sampler") or (study or {}).get("sampler")
    space_name = ((result or {}).get("space") or {}).get("name") or recipe.get("space", "?")
    where = (f"seed {recipe.get('seed')}; model {recipe.get('model') or 'smollm2-135m'}, corpus "
             f"{recipe.get('corpus') or 'brown'}" if recipe else "no recipe recorded")
    lines.append(f"{summary['folder']}: {summary['status']} {space_name} search with {sampler} ({where})")
    if result:
        lines += _result_lines(result)
    if study:
        states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(study["trials"].items()))
        runs = f"; {_runs(study['seconds'], study['runs'])} of search" if study.get("runs") else ""
        lines.append(f"study {study['name']} in {study['storage']}: {study['evaluations']} fitness evaluations; "
                     f"trials {states}{runs}")
        best = study["best"]
        if not result and best:
            usage = ", ".join(f"{k} {v:.4f}" for k, v in best["usage"].items())
            lines.append(f"best feasible candidate so far: trial {best['trial']}, fitness {best['value']:.5g} at "
                         f"fidelity {best['fidelity']} ({usage})")
        elif not result:
            lines.append("no candidate has completed the last selection stage yet")
        if study["pareto"]:
            lines += _pareto_lines(study)
    if summary["resume"]:
        lines.append(f"resume: {summary['resume']}")
    if summary["allocation"]:
        lines += ["", *_allocation_lines(summary["allocation"], "chosen" if result else "best so far")]
    extra = [k for k in (result or {}) if k not in _KNOWN_SECTIONS]
    if extra:
        lines.append(f"\nalso in result.json: {', '.join(extra)} (see --json)")
    return "\n".join(lines)


_KNOWN_SECTIONS = {"settings", "space", "budget", "assignment", "levels", "draws", "fitness", "perplexity", "baselines", "parameters",
                   "search", "timings", "versions", "recipe", "database", "quantization", "formats", "reformation",
                   "widths", "heal"}


def _result_lines(result: dict) -> list[str]:
    lines = []
    ppl, fitness = result.get("perplexity", {}), result.get("fitness", {})
    baselines = result.get("baselines", {})
    search = result.get("search", {})
    columns = ["dense", *baselines, search.get("sampler", "search")]
    rows = []
    if ppl:
        rows.append((f"perplexity ({ppl.get('tokens', 0):,} tokens of {ppl.get('corpus')})",
                     [ppl.get("dense"), *(b.get("perplexity") for b in baselines.values()), ppl.get("compressed")],
                     ".3f"))
    if fitness:
        rows.append((f"KL to dense ({fitness.get('tokens', 0):,} tokens)",
                     [0.0, *(b.get("kl") for b in baselines.values()), fitness.get("kl")], ".4f"))
    if rows:
        width = max(len(r[0]) for r in rows)
        lines.append(f"{'':<{width}}" + "".join(f"  {c:>12}" for c in columns))
        for name, values, fmt in rows:
            lines.append(f"{name:<{width}}" + "".join(f"  {_fmt(v, fmt):>12}" for v in values))
    budget = result.get("budget")
    if budget:
        lines.append(f"{budget.get('label', 'budget')}: target {budget.get('value')}, planned "
                     f"{_fmt(budget.get('planned'), '.4f')}, counted from the weights {_fmt(budget.get('measured'), '.4f')}")
        if budget.get("whole_model_planned") is not None:
            lines.append(f"whole model planned{' on ' + budget['target'] if budget.get('target') else ''}: "
                         f"{budget['whole_model_planned']:.4g} (measured on the export)")
    params = result.get("parameters")
    if params:
        lines.append(f"parameters in searched units: {params['dense'] / 1e6:.2f}M dense, {params['kept'] / 1e6:.2f}M kept")
    quant = result.get("quantization")
    if quant:
        lines.append(f"packed searched units: {quant['bytes'] / 2**20:.2f} MiB ({quant['fp16_fraction']:.1%} of "
                     f"float16), {quant['bits']:.3f} bits per weight on average")
    reformation = result.get("reformation")
    if reformation:
        lines.append(f"reformation ({reformation.get('method')}): perplexity {_fmt(reformation.get('perplexity_before'), '.3f')}"
                     f" -> {_fmt(reformation.get('perplexity_after'), '.3f')}, KL {_fmt(reformation.get('kl_before'), '.4f')}"
                     f" -> {_fmt(reformation.get('kl_after'), '.4f')}")
    if result.get("heal"):
        from evosearch.heal import summary as heal_summary

        lines += ["", heal_summary(result["heal"])]
    timings = result.get("timings")
    if search:
        runs = search.get("runs", 1)
        which = "the last run's seconds" if runs > 1 else "seconds"  # the stages of the run that wrote result.json
        stages = f" ({which} per stage: {', '.join(f'{k} {v:.0f}' for k, v in timings.items())})" if timings else ""
        lines.append(f"search: {search.get('evaluations')} evaluations, best trial {search.get('best_trial')}; "
                     f"{_runs(search.get('seconds', 0), runs)}{stages}")
    return lines


def _runs(seconds: float, runs: int) -> str:
    """``95 s`` or, for a resumed search, ``95 s over 3 runs``."""
    return f"{seconds:.0f} s" + (f" over {runs} runs" if runs > 1 else "")


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pareto_lines(study: dict) -> list[str]:
    label = study["tradeoff"]["label"]
    lines = [f"Pareto set ({len(study['pareto'])} candidates, fitness against {label}):",
             f"  {'trial':>6}  {'fitness':>10}  {label:>20}"]
    for p in study["pareto"]:
        lines.append(f"  {p['trial']:>6}  {p['value']:>10.5g}  {p['tradeoff']:>20.4f}")
    return lines


def _allocation_lines(alloc: dict, which: str) -> list[str]:
    rows, layers = alloc["rows"], alloc["layers"]
    heads = _short_names(rows)
    numeric = any(v is not None for row in alloc["values"] for v in row)
    resource = alloc["resource"]
    if resource == "level":
        title = f"{which} assignment: level per unit (no space.yaml beside it to read the levels' resources from)"
    elif numeric:
        title = f"{which} assignment: {resource} per unit (mean: the layer's, weighted by unit size)"
    else:
        title = f"{which} assignment: level per unit"
    lines = [title]
    width = max(6, *(len(h) for h in heads))
    lines.append(f"{'layer':>5}" + "".join(f"  {h:>{width}}" for h in heads) + (f"  {'mean':>6}" if numeric else ""))
    for j, layer in enumerate(layers):
        cells = [alloc["labels"][i][j] or "" for i in range(len(rows))]
        mean = alloc["layer_mean"][j]
        lines.append(f"{layer:>5}" + "".join(f"  {c:>{width}}" for c in cells)
                     + (f"  {_fmt(mean, '.3f'):>6}" if numeric else ""))
    for name, label in alloc["other"].items():
        lines.append(f"{name}: {label}")
    return lines


def _short_names(rows: list[str]) -> list[str]:
    """The last part of each row name when those are unique (``q_proj``), else the full names."""
    last = [r.rsplit(".", 1)[-1] for r in rows]
    return last if len(set(last)) == len(last) else rows


# --- plots and the one-page report ------------------------------------------------------


def write_report(folder: str | Path, compare: list[str | Path] = ()) -> list[Path]:
    """Draw the plots and write report.md and report.html into a finished run's folder.

    ``compare`` names other run folders of the same problem (say, other samplers) whose
    fitness over evaluations is drawn beside this run's. Returns the files written.
    """
    folder = Path(folder)
    summary, history = _read_run(folder)
    if summary["status"] != "finished":
        raise EvosearchError(f"{folder} holds no result.json yet; `evosearch show {folder}` shows the search so far")
    others = [_read_run(c) for c in compare]
    plots = _plots(summary, history, others, folder)
    sections = _sections(summary, [s for s, _ in others], plots)
    (folder / "report.md").write_text(_markdown(sections))
    (folder / "report.html").write_text(_html(sections, folder))
    return [*plots.values(), folder / "report.md", folder / "report.html"]


def _plots(summary: dict, history: History | None, others: list[tuple[dict, History | None]],
           folder: Path) -> dict[str, Path]:
    try:
        from evosearch import plots
    except ImportError:
        raise EvosearchError('plots need matplotlib: pip install "evosearch[plot]"') from None
    result = summary["result"]
    written = {}
    alloc, budget = summary["allocation"], result.get("budget", {})
    if alloc and alloc["layers"]:
        # The layer means are size-weighted averages: comparable to an average budget only.
        comparable = budget.get("resource") == alloc["resource"] and "average" in budget.get("label", "")
        written["allocation"] = plots.heatmap(alloc, folder / "allocation.png", title=_title(result),
                                              target=budget.get("value") if comparable else None)
    runs = [(s["folder"], h, (s["result"] or {}).get("baselines") or {})
            for s, h in [(summary, history), *others] if h is not None and h.points]
    if runs:
        written["convergence"] = plots.convergence(runs, folder / "convergence.png")
    if history is not None and history.pareto():
        written["pareto"] = plots.pareto_front(history, folder / "pareto.png", chosen=result["search"].get("best_trial"))
    return written


def _title(result: dict) -> str:
    recipe = result.get("recipe") or result.get("settings", {})
    return (f"{result.get('space', {}).get('name') or recipe.get('space')} search on "
            f"{recipe.get('model') or 'smollm2-135m'}: {result['budget'].get('label')} {result['budget'].get('value')}"
            f", {result['search'].get('sampler')}")


# The report is a list of sections, each a heading and blocks: ("text", str), ("table", rows),
# ("image", path) or ("code", str), rendered to Markdown and to HTML.


def _sections(summary: dict, others: list[dict], plots: dict[str, Path]) -> list[tuple[str, list]]:
    result, recipe = summary["result"], summary["recipe"] or {}
    folder = Path(summary["folder"])
    sections = [(_title(result), [
        ("text", f"Run folder `{folder}`; evosearch {result.get('versions', {}).get('evosearch', '?')}, torch "
                 f"{result.get('versions', {}).get('torch', '?')}, transformers "
                 f"{result.get('versions', {}).get('transformers', '?')}."),
        ("table", _result_table(result)),
        ("text", _budget_text(result)),
    ])]
    search = result.get("search", {})
    study = summary["study"] or {}
    cost = [["run", "sampler", "fitness evaluations", "trials", "search seconds", "best fitness"]]
    for s in [summary, *others]:
        r, st = s["result"] or {}, s["study"] or {}
        cost.append([s["folder"], (r.get("search") or {}).get("sampler") or st.get("sampler", "?"),
                     st.get("evaluations", (r.get("search") or {}).get("evaluations")),
                     sum((st.get("trials") or {}).values()), (r.get("search") or {}).get("seconds", "-"),
                     _fmt((st.get("best") or {}).get("value"), ".5g")])
    blocks = [("table", cost),
              ("text", f"Best trial {search.get('best_trial')}; stages (seconds): "
                       + ", ".join(f"{k} {v:g}" for k, v in (result.get("timings") or {}).items()) + ".")]
    if "convergence" in plots:
        blocks.append(("image", plots["convergence"]))
    sections.append(("Search", blocks))
    if "allocation" in plots:
        alloc = summary["allocation"]
        sections.append(("Allocation per layer", [
            ("text", f"{RESOURCE_LABELS.get(alloc['resource'], alloc['resource'])} of each unit at its chosen level; "
                     f"rows are unit types, columns layers; above, each layer's size-weighted mean."),
            ("image", plots["allocation"])]))
    if study.get("pareto"):
        table = [["trial", "fitness (KL)", study["tradeoff"]["label"]]] + [[p["trial"], f"{p['value']:.5g}", f"{p['tradeoff']:.4f}"]
                                                      for p in study["pareto"]]
        blocks = [("table", table)]
        if "pareto" in plots:
            blocks.insert(0, ("image", plots["pareto"]))
        sections.append(("Pareto set", blocks))
    sections.append(("Reproduce", [
        ("text", "The recipe below is recorded in result.json; either file repeats the run:"),
        ("code", f"evosearch run {folder / 'result.json'} --out NEW_FOLDER\nevosearch report NEW_FOLDER"),
        ("code", _recipe_yaml(recipe))]))
    return sections


def _result_table(result: dict) -> list[list]:
    ppl, fitness, baselines = result.get("perplexity", {}), result.get("fitness", {}), result.get("baselines", {})
    sampler = result.get("search", {}).get("sampler", "search")
    table = [["", "dense", *baselines, f"searched ({sampler})"]]
    if ppl:
        table.append([f"perplexity ({ppl.get('tokens', 0):,} held-out tokens of {ppl.get('corpus')})",
                      _fmt(ppl.get("dense"), ".3f"), *(_fmt(b.get("perplexity"), ".3f") for b in baselines.values()),
                      _fmt(ppl.get("compressed"), ".3f")])
    if fitness:
        table.append([f"KL to dense, nats/token ({fitness.get('tokens', 0):,} calibration tokens)", "0",
                      *(_fmt(b.get("kl"), ".4f") for b in baselines.values()), _fmt(fitness.get("kl"), ".4f")])
    return table


def _budget_text(result: dict) -> str:
    budget, params = result.get("budget", {}), result.get("parameters")
    text = (f"Budget: {budget.get('label')} {budget.get('value')}; planned {_fmt(budget.get('planned'), '.4f')}, "
            f"counted from the compressed weights {_fmt(budget.get('measured'), '.4f')}.")
    if params:
        text += f" Parameters in the searched units: {params['dense']:,} dense, {params['kept']:,} kept."
    return text


def _recipe_yaml(recipe: dict) -> str:
    return Recipe.model_validate(recipe).to_yaml() if recipe else "# no recipe recorded"


def _markdown(sections: list[tuple[str, list]]) -> str:
    out = []
    for level, (heading, blocks) in enumerate(sections):
        out.append(f"{'#' if level == 0 else '##'} {heading}\n")
        for kind, body in blocks:
            if kind == "text":
                out.append(body + "\n")
            elif kind == "table":
                out.append("| " + " | ".join(map(str, body[0])) + " |")
                out.append("|" + "---|" * len(body[0]))
                out += ["| " + " | ".join(map(str, row)) + " |" for row in body[1:]]
                out.append("")
            elif kind == "image":
                out.append(f"![{body.stem}]({body.name})\n")
            else:
                out.append(f"```\n{body.rstrip()}\n```\n")
    return "\n".join(out)


def _html(sections: list[tuple[str, list]], folder: Path) -> str:
    out = ["<!doctype html><meta charset='utf-8'>",
           "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
           "td:first-child,th:first-child{text-align:left}img{max-width:100%}pre{background:#f4f4f4;padding:.6em}"
           "</style>"]
    for level, (heading, blocks) in enumerate(sections):
        tag = "h1" if level == 0 else "h2"
        out.append(f"<{tag}>{html.escape(heading)}</{tag}>")
        for kind, body in blocks:
            if kind == "text":
                out.append(f"<p>{html.escape(body)}</p>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(str(c))}</th>" for c in body[0])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                               for row in body[1:])
                out.append(f"<table><tr>{head}</tr>{rows}</table>")
            elif kind == "image":
                data = base64.b64encode((folder / body.name).read_bytes()).decode()
                out.append(f"<p><img alt='{body.stem}' src='data:image/png;base64,{data}'></p>")
            else:
                out.append(f"<pre>{html.escape(body)}</pre>")
    return "\n".join(out) + "\n"

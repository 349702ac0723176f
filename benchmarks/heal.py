"""Perplexity before and after healing, on the packaged model (issue 11's "Must show" rows).

Heals each result directory given (``evosearch.heal.heal``) and writes one markdown table:
perplexity of the dense, searched and healed models on the search's held-out text (Brown)
and on a second corpus used neither by the search nor by the heal (Britannica, whole), and
the KL to the dense model on the search's fitness sequences (also unseen by the heal).

The default directories are those ``benchmarks/search_llm.py`` writes (``runs/bench/sparsity-0.7``,
``runs/bench/drop-0.25``) and ``runs/bench/gptq-3bit``, which this script writes first when it
is missing: every linear layer quantised to 3 bits (GPTQ, groups of 128) with the data
settings of the first directory, and a ``formats`` record as ``evosearch.heal`` reads it. It
is a uniform allocation; a searched one (``benchmarks/quant.py``'s result folders) can be
given as a result directory instead.

    python benchmarks/search_llm.py --device cuda                     # first: the searched results
    python benchmarks/heal.py --device cuda --out heal.md             # on the H200, a few minutes
    python benchmarks/search_llm.py --device cpu --tiny --targets 0.7 --runs /tmp/runs
    python benchmarks/heal.py --device cpu --tiny --runs /tmp/runs --out /tmp/heal.md   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evosearch.data import load_corpus  # noqa: E402
from evosearch.blocks import capture_block_inputs, run_block  # noqa: E402
from evosearch.database.hessian import Hessian  # noqa: E402
from evosearch.database.quantization import GPTQ, QuantFormat  # noqa: E402
from evosearch.evaluate import perplexity  # noqa: E402
from evosearch.heal import HealSettings, heal  # noqa: E402
from evosearch.model import load_model  # noqa: E402
from evosearch.pipeline import SearchSettings, versions  # noqa: E402
from evosearch.units import architecture  # noqa: E402

QUANTIZED = "gptq-3bit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", help="result directories (default: the three under --runs)")
    parser.add_argument("--runs", default="runs/bench", help="where search_llm.py wrote its results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a few steps on few tokens: a smoke test")
    parser.add_argument("--tokens", type=int, default=None, help="healing tokens (default 2^20; tiny 1024)")
    parser.add_argument("--loss", default="kl", choices=["kl", "reverse-kl", "mix"])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16; tiny 2)")
    parser.add_argument("--sequence-length", type=int, default=None, help="(default 512; tiny 128)")
    parser.add_argument("--eval-corpus", default="britannica", help="the second corpus, evaluated whole")
    parser.add_argument("--bits", type=int, default=3, help="bit-width of the quantised result it writes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    runs = Path(args.runs)
    results = [Path(r) for r in args.results] or [runs / "sparsity-0.7", runs / "drop-0.25", runs / QUANTIZED]
    missing = [r for r in results if not (r / "result.json").exists() and r.name != QUANTIZED]
    if missing:
        sys.exit(f"no search result in {', '.join(map(str, missing))}: run benchmarks/search_llm.py first")
    for result in results:
        if result.name == QUANTIZED and not (result / "result.json").exists():
            donor = next(r for r in results if r.name != QUANTIZED)
            start = time.perf_counter()
            write_quantized_result(result, donor, args.bits, args.device)
            print(f"{result}: written in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    settings = HealSettings(
        tokens=args.tokens or (1024 if args.tiny else 2**20), loss=args.loss, lr=args.lr,
        batch_size=args.batch_size or (2 if args.tiny else 16),
        sequence_length=args.sequence_length or (128 if args.tiny else 512),
        checkpoint_every=10**6, eval_corpora=[args.eval_corpus], device=args.device)
    rows = []
    for result in results:
        start = time.perf_counter()
        section = heal(result, settings, force=True, progress=False)
        seconds = time.perf_counter() - start
        rows.append((result, json.loads((result / "result.json").read_text()), section, seconds))
        print(f"{result}: healed in {seconds:.0f} s", file=sys.stderr)
    table = render(rows, settings, args)
    if args.out:
        Path(args.out).write_text(table)
    print(table)


@torch.no_grad()
def write_quantized_result(folder: Path, donor: Path, bits: int, device: str, group_size: int = 128) -> None:
    """Every linear layer of the donor's dense model quantised with GPTQ, block by block (each block's
    Hessians from the outputs of the blocks already quantised), saved as a search result."""
    base = json.loads((donor / "result.json").read_text())["settings"]
    settings = SearchSettings.model_validate(base | {"space": f"uniform GPTQ {bits}-bit (benchmarks/heal.py)",
                                                     "budget": bits, "sampler": "uniform", "baselines": []})
    model, tokenizer = load_model(settings.model, device=device, dtype=settings.dtype)
    arch = architecture(model)
    corpus = load_corpus(settings.corpus, tokenizer, text_field=settings.text_field)
    windows = corpus.evaluation_windows(settings.eval_tokens, 1024)
    dense = perplexity(model, windows, progress=False).perplexity
    calibration = corpus.calibration_sequences(settings.calibration_sequences, settings.sequence_length,
                                               seed=settings.seed)
    inputs = capture_block_inputs(model, arch, calibration, batch_size=8)
    fmt = QuantFormat(bits, group_size)
    for b, block in enumerate(arch.blocks):
        names = arch.linears(b)
        hessians = {name: Hessian(arch.module(name).in_features, device=model.device) for name in names}
        hooks = [arch.module(name).register_forward_hook(lambda m, a, o, h=hessians[name]: h.add_batch(a[0]))
                 for name in names]
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            run_block(block, hidden, kwargs)
        for hook in hooks:
            hook.remove()
        for name in names:
            layer = arch.module(name)
            layer.weight.copy_(GPTQ(layer.weight, hessians[name].H).quantize(fmt).dequantize())
        inputs.hidden = [run_block(block, hidden, kwargs) for hidden, kwargs in zip(inputs.hidden, inputs.kwargs)]
    compressed = perplexity(model, windows, progress=False).perplexity
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    linears = [u.name for u in arch.units("linear")]
    report = {
        "settings": settings.model_dump(),
        "space": {"name": f"uniform GPTQ {bits}-bit", "description": "every linear layer, groups of "
                  f"{group_size} (benchmarks/heal.py)", "units": len(linears)},
        "assignment": {name: bits for name in linears},
        "formats": {name: {"bits": bits, "group_size": group_size, "symmetric": False} for name in linears},
        "perplexity": {"corpus": corpus.name, "tokens": windows[:, 1:].numel(), "dense": dense,
                       "compressed": compressed},
        "versions": versions(),
    }
    (folder / "result.json").write_text(json.dumps(report, indent=1))


def render(rows, settings: HealSettings, args) -> str:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    first = rows[0][2]
    corpus, second = list(first["perplexity"])
    header = (f"Packaged SmolLM2-135M, {device}, {date.today()}. Healing: {first['text']['tokens']:,} tokens "
              f"of {first['text']['corpus']} calibration text the search did not draw ({first['text']['passes']:g} "
              f"passes over it), {settings.loss}, lr {settings.lr:g}, {settings.batch_size} x {settings.sequence_length} "
              f"tokens per step. Perplexity on {first['perplexity'][corpus]['tokens']:,} held-out {corpus} tokens "
              f"and on {first['perplexity'][second]['tokens']:,} tokens of {second} (used by neither); KL to the "
              f"dense model on the search's {first['kl']['tokens']:,} fitness tokens.\n"
              f"Command: `python benchmarks/heal.py --device {args.device}{' --tiny' if args.tiny else ''}`\n")
    lines = [f"| result | ppl {corpus}: dense / searched / healed | ppl {second}: dense / searched / healed "
             f"| KL searched / healed | loss first / last tenth | steps | seconds (training) | kept |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result, report, section, seconds in rows:
        p, q, kl, loss = section["perplexity"][corpus], section["perplexity"][second], section["kl"], section["loss"]
        kept = "checks " + ("passed" if all(section["checks"].values()) else "FAILED")
        lines.append(f"| {result.name} ({report['space']['name']}) | {p['dense']:.2f} / {p['before']:.2f} / "
                     f"{p['after']:.2f} | {q['dense']:.2f} / {q['before']:.2f} / {q['after']:.2f} | "
                     f"{kl['before']:.4f} / {kl['after']:.4f} | {loss['first']:.4f} / {loss['last']:.4f} | "
                     f"{section['steps']} | {seconds:.0f} ({section['training_seconds']:.0f}) | {kept} |")
    return header + "\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

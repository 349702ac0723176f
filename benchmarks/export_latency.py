"""Exports of one model, measured: size on disk, device memory, prefill and decode latency.

Here (once, writes the packaged model in bf16 and Brown token ids for a machine without network):

    PYTHONPATH=. python benchmarks/export_latency.py --write-inputs bench-inputs

On the GPU (one command, a few minutes; prints a markdown table last):

    PYTHONPATH=. python benchmarks/export_latency.py --model bench-inputs/model \\
        --tokens bench-inputs/tokens.npy --device cuda --out export_latency.md

A CPU smoke test: ``--device cpu --prompt 16 --new-tokens 2 --generations 1 --repeats 1 --length 64
--sequences 2``.

Each variant is built from the dense model in memory by a direct assignment, written with
``evosearch.export`` and loaded back with ``load_exported`` on the device, then measured
(median of repetitions, CUDA events): prefill = one forward over batch x prompt tokens;
decode = ms per generated token over ``new_tokens`` steps with a KV cache after the prompt;
KL = to the dense model on held-out sequences of the token ids.

- dense;
- 25% of blocks dropped: the blocks with the lowest ShortGPT influence (1 - cos between a
  block's input and output) on the tokens;
- ~30% fewer block parameters: MLP channels removed by weight norm, unlike per block (no
  reformation: this measures the export of a sub-network; the width search supplies better
  channels);
- 4-bit: RTN, groups of 64, symmetric, packed (the dequantising kernel in kernels/quant.py);
- 2:4: magnitude 2:4 in every block linear layer, semi-structured sparse tensors on the GPU;
- latency budget: attention and MLP blocks dropped by an EvoPress search (KL fitness) under
  ``--budget-fraction`` of the dense model's predicted decode latency, from a hardware
  table profiled on this device; its export must meet the budget within 10%.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evosearch import search
from evosearch.candidate import CandidateModel
from evosearch.compression import CompressionSpace
from evosearch.database.quantization import QuantFormat, rtn_quantize
from evosearch.database.sparsity import magnitude_prune
from evosearch.evaluate import Teacher
from evosearch.export import ExportJob, export_model, load_exported, run_exporters
from evosearch.fitness import KLFitness
from evosearch.hardware import Timer, Workload, attach, budget_for, measure_model, profile
from evosearch.model import load_model
from evosearch.units import architecture

log = logging.getLogger("evosearch")


def write_inputs(folder: Path, sequences: int = 64, length: int = 512) -> None:
    """The packaged model (bf16) and calibration token ids of Brown, for a machine without network."""
    from evosearch.data import load_corpus

    model, tokenizer = load_model(None, device="cpu", dtype=torch.bfloat16)
    model.save_pretrained(folder / "model", max_shard_size="60MB")  # shards small enough to carry one by one
    tokenizer.save_pretrained(folder / "model")
    corpus = load_corpus("brown", tokenizer)
    tokens = corpus.calibration_sequences(sequences, length, seed=0)
    np.save(folder / "tokens.npy", tokens.numpy().astype(np.int32))
    print(f"wrote {folder}/model and {folder}/tokens.npy ({tuple(tokens.shape)} token ids)")


def drop_blocks(model, arch, tokens: torch.Tensor, fraction: float) -> ExportJob:
    """Remove the blocks whose output is most like their input (ShortGPT's block influence)."""
    with torch.inference_mode():
        hidden = model.base_model(input_ids=tokens, output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity
    influence = [float((1 - cos(hidden[b].float(), hidden[b + 1].float(), dim=-1)).mean())
                 for b in range(len(arch.blocks))]
    dropped = sorted(np.argsort(influence)[: round(fraction * len(arch.blocks))].tolist())
    return ExportJob(model, arch, removed={arch.block_name(b) for b in dropped})


def slice_mlp_channels(model, arch, fraction: float, multiple: int = 64) -> ExportJob:
    """Remove MLP channels of lowest |gate| |up| |down| norm product, one threshold over all blocks,
    until ``fraction`` of the blocks' parameters are gone; each block keeps a multiple of ``multiple``."""
    block_params = sum(p.numel() for b in arch.blocks for p in b.parameters())
    scores, per_channel = [], []
    for b in range(len(arch.blocks)):
        (gate, up), down = [arch.module(n) for n in arch.mlp_linears(b)[0]], arch.module(arch.mlp_linears(b)[1])
        scores.append(gate.weight.float().norm(dim=1) * up.weight.float().norm(dim=1) * down.weight.float().norm(dim=0))
        per_channel.append(gate.in_features + up.in_features + down.out_features)
    target = fraction * block_params
    order = torch.cat([s / s.mean() for s in scores]).argsort()
    owner = torch.cat([torch.full_like(s, b, dtype=torch.long) for b, s in enumerate(scores)])[order]
    removed, total = [0] * len(scores), 0
    for b in owner.tolist():
        if total >= target:
            break
        removed[b] += 1
        total += per_channel[b]
    for b, s in enumerate(scores):
        keep = max(multiple, (len(s) - removed[b]) // multiple * multiple)
        kept = s.topk(keep).indices.sort().values
        inputs, output = arch.mlp_linears(b)
        for name in inputs:
            _replace(model, name, arch.module(name).weight.index_select(0, kept))
        _replace(model, output, arch.module(output).weight.index_select(1, kept))
    return ExportJob(model, arch)


def _replace(model, name: str, weight: torch.Tensor) -> None:
    parent, child = name.rsplit(".", 1)
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    setattr(model.get_submodule(parent), child, layer)


def quantize_blocks(model, arch, fmt: QuantFormat) -> ExportJob:
    job = ExportJob(model, arch)
    for b in range(len(arch.blocks)):
        for name in arch.linears(b):
            layer = arch.module(name)
            qw = rtn_quantize(layer.weight, fmt)
            with torch.no_grad():
                layer.weight.copy_(qw.dequantize())
            job.quantized[name] = qw
    return job


def two_four(model, arch) -> ExportJob:
    job = ExportJob(model, arch)
    for b in range(len(arch.blocks)):
        for name in arch.linears(b):
            with torch.no_grad():
                arch.module(name).weight.copy_(magnitude_prune(arch.module(name).weight, 0.5, (2, 4)))
            job.semi_structured.add(name)
    return job


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def measure_export(folder: Path, device: torch.device, workload: Workload, timer: Timer, teacher: Teacher) -> dict:
    gc.collect()
    before = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
    model, _ = load_exported(folder, device=device)
    memory = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else None
    sparse = sum(type(m.weight).__name__.startswith("SparseSemiStructured") for m in model.modules()
                 if isinstance(m, torch.nn.Linear))
    times = measure_model(model, workload, timer)
    record = json.loads((folder / "evosearch.json").read_text())
    result = {"blocks": len(record["blocks"]["kept"]), "parameters": record["parameters"],
              "disk_bytes": folder_bytes(folder), "memory_bytes": memory, "semi_structured": sparse,
              "kl": teacher.kl(model), **times}
    del model
    return result


def latency_search(model, workload: Workload, timer: Timer, teacher: Teacher, fraction: float, generations: int,
                   out: Path) -> dict:
    """Drop attention/MLP blocks under a decode-latency budget; export; return the budget and the prediction."""
    arch = architecture(model)
    started = time.perf_counter()
    table = profile(model, str(next(model.parameters()).device), workload, classes=("dense",),
                    kinds=("attention", "mlp"), timer=timer, progress=False)
    table.save(out / "hardware.json")
    problem = attach(CompressionSpace.load("drop").materialize_levels(arch), table)
    dense = table.predict(problem, {u.name: "keep" for u in problem.space.units})
    limit = fraction * dense
    budget = budget_for("latency_ms", limit, problem, table)
    problem = problem.with_budget(budget)
    candidate = CandidateModel(model, arch, problem, None)
    fitness = KLFitness(candidate, teacher)
    result = search(problem.space, fitness, budget, sampler="evopress", seed=0, progress=False,
                    sampler_options={"offspring": 16, "generations": generations})
    best = result.best.assignment
    candidate.apply(best)
    job = ExportJob(model, arch, problem, best)
    run_exporters(job)
    export_model(job, out / "latency-budget")
    return {"limit_ms": limit, "dense_predicted_ms": dense, "predicted_ms": table.predict(problem, best),
            "dense_measured_ms": table.whole["decode_ms"], "dropped": sorted(job.removed),
            "evaluations": result.n_evaluations, "seconds": time.perf_counter() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-inputs", type=Path, help="write the packaged model and token ids here, then stop")
    parser.add_argument("--model", help="Hugging Face model directory (or .gguf)")
    parser.add_argument("--tokens", type=Path, help=".npy of token ids (sequences x length, or flat)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget-fraction", type=float, default=0.8, help="decode latency budget / dense")
    parser.add_argument("--generations", type=int, default=10, help="EvoPress generations of the budget search")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence for KL and the search")
    parser.add_argument("--sequences", type=int, default=8, help="calibration sequences of the budget search")
    parser.add_argument("--variants", default=None, help="comma-separated subset of dense,drop,width,4bit,2:4")
    parser.add_argument("--work", type=Path, default=None, help="folder for the exports (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", stream=sys.stderr)
    if args.write_inputs:
        write_inputs(args.write_inputs)
        return 0
    if not args.model or not args.tokens:
        parser.error("--model and --tokens are required (make them with --write-inputs)")

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # timing on a shared CPU: no OpenMP threads waiting on each other
    model, _ = load_model(args.model, device=device, dtype=args.dtype)
    dtype = next(model.parameters()).dtype
    ids = torch.as_tensor(np.load(args.tokens).astype(np.int64)).flatten()
    ids = ids[: len(ids) // args.length * args.length].reshape(-1, args.length)
    held_out, calibration = ids[:4].to(device), ids[4:4 + args.sequences].to(device)
    workload = Workload(batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens)
    timer = Timer(device, repeats=args.repeats)
    teacher = Teacher.build(model, held_out, progress=False)
    work = args.work or Path(tempfile.mkdtemp(prefix="evosearch-export-"))
    for old in [*work.glob("variant*"), work / "latency-budget"]:  # exports of an earlier run in --work
        shutil.rmtree(old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    variants = {
        "dense": ("dense", lambda m, a: ExportJob(m, a)),
        "drop": ("25% of blocks dropped", lambda m, a: drop_blocks(m, a, calibration[:4], 0.25)),
        "width": ("~30% fewer block parameters (MLP channels)", lambda m, a: slice_mlp_channels(m, a, 0.30)),
        "4bit": ("4-bit (RTN, g64, sym), packed", lambda m, a: quantize_blocks(m, a, QuantFormat(4, 64, True))),
        "2:4": ("2:4 (magnitude)", lambda m, a: two_four(m, a)),
    }
    chosen = args.variants.split(",") if args.variants else list(variants)
    unknown = set(chosen) - set(variants)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(variants)}")
    rows, failed = {}, {}
    for i, (name, build) in enumerate(variants[key] for key in chosen):
        try:  # one variant failing on a new device must not cost the others their measurement
            copy_ = copy.deepcopy(model)
            job = build(copy_, architecture(copy_))
            folder = work / f"variant{i}"
            export_model(job, folder, format="packed" if job.quantized else "hf")
            del copy_, job
            rows[name] = measure_export(folder, device, workload, timer, teacher)
            log.info("%s: %s", name, rows[name])
        except Exception as exc:  # noqa: BLE001 (reported in the table)
            log.exception("%s failed", name)
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    budget = None
    try:
        search_copy = copy.deepcopy(model)
        budget = latency_search(search_copy, workload, timer, Teacher.build(model, calibration, progress=False),
                                args.budget_fraction, args.generations, work)
        del search_copy
        name = f"latency budget {budget['limit_ms']:.3f} ms/token (searched)"
        rows[name] = measure_export(work / "latency-budget", device, workload, timer, teacher)
        budget["measured_ms"] = rows[name]["decode_ms"]
    except Exception as exc:  # noqa: BLE001 (reported below the table)
        log.exception("latency-budget search failed")
        failed["latency-budget search"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    (work / "results.json").write_text(json.dumps({"rows": rows, "failed": failed, "budget": budget}, indent=1,
                                                  default=str))
    if args.work is None:
        shutil.rmtree(work)

    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))")
    lines = [
        f"Command: `python benchmarks/export_latency.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
        f"{device_name}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}; {datetime.date.today()}; "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        f"Prefill: batch {args.batch} x {args.prompt} tokens. Decode: ms per token over {args.new_tokens} tokens "
        f"after the prompt, KV cache. KL to dense on {held_out.numel()} held-out tokens.",
        "",
        "| model | blocks | parameters (M) | disk (MB) | GPU memory (MB) | prefill (ms) | decode (ms/token) | KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        memory = "n/a" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 1e6:.1f}"
        note = f" ({r['semi_structured']} layers semi-structured)" if "2:4" in name else ""
        lines.append(f"| {name}{note} | {r['blocks']} | {r['parameters'] / 1e6:.2f} | {r['disk_bytes'] / 1e6:.1f} | "
                     f"{memory} | {r['prefill_ms']:.3f} | {r['decode_ms']:.4f} | {r['kl']:.4f} |")
    for name, error in failed.items():
        lines.append(f"| {name} | failed: {error} | | | | | | |")
    if budget is not None:
        ratio = budget["measured_ms"] / budget["limit_ms"]
        lines += ["", f"Latency budget {budget['limit_ms']:.4f} ms/token ({args.budget_fraction:g} x the dense "
                      f"model's predicted {budget['dense_predicted_ms']:.4f}; measured dense "
                      f"{budget['dense_measured_ms']:.4f}): "
                      f"search predicted {budget['predicted_ms']:.4f}, export measured {budget['measured_ms']:.4f} "
                      f"({ratio:.3f} x budget: {'meets' if ratio <= 1.10 else 'misses'} it within 10%); "
                      f"{len(budget['dropped'])} sub-blocks dropped, {budget['evaluations']} evaluations, "
                      f"{budget['seconds']:.0f} s with profiling."]
    table = "\n".join(lines)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

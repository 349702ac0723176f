"""How fast is a fitness evaluation, and how far from the hardware's limit?

For the packaged model on one GPU this measures, in one run:

- the ceilings: a large bf16 matrix product (FLOP/s) and a device-to-device copy (B/s);
- the database builds: SparseGPT at every level of the ``sparsity`` space, GPTQ at every
  bit-width of the ``quant`` space (``--no-gptq`` skips the latter);
- time per candidate at 4K, 16K and 64K calibration tokens for the fast path (database on
  the GPU, in-place swaps of the changed units, block-by-block runs with prefix reuse,
  fused KL), in four variants: eager, CUDA graphs, ``torch.compile``'d blocks, both;
  against the roofline: 2 x parameters x tokens / matmul rate + one read of the teacher at
  copy bandwidth;
- where the time goes at 64K tokens: GPU kernel time by kind (matrix products,
  attention, KL, the rest), from the profiler, eager and compiled;
- the simple reference loop: the whole candidate state loaded per candidate
  (``load_state_dict`` from host memory), a plain forward, full-vocabulary fp32 KL; per
  candidate at 64K tokens, and per generation of EvoPress's multi-step selection
  (16 offspring at 4K tokens, the best 8 at 16K, the best 2 and the parent at 64K);
- agreement: fast vs simple in fp32, and each variant vs eager in bf16;
- how well each fidelity ranks candidates (Spearman correlation with the 64K ranking and
  whether the 64K-best candidate survives), which is what multi-step selection relies on.

    python benchmarks/fitness_gpu.py --device cuda --out fitness.md
    python benchmarks/fitness_gpu.py --device cpu --tiny --no-gptq   # a smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evosearch.candidate import CandidateModel  # noqa: E402
from evosearch.compression import CompressionSpace  # noqa: E402
from evosearch.data import load_corpus  # noqa: E402
from evosearch.database.build import build_database  # noqa: E402
from evosearch.database.store import Database  # noqa: E402
from evosearch.evaluate import Teacher, hidden_states  # noqa: E402
from evosearch.fitness import KLFitness  # noqa: E402
from evosearch.model import load_model  # noqa: E402
from evosearch.units import architecture  # noqa: E402

VARIANTS = {"eager": {"cuda_graphs": False}, "CUDA graphs": {"cuda_graphs": True},
            "compiled": {"compile_blocks": True, "cuda_graphs": False},
            "compiled + CUDA graphs": {"compile_blocks": True, "cuda_graphs": True}}
AUTOTUNED = {"compiled (max-autotune) + CUDA graphs": {"compile_blocks": True, "cuda_graphs": True,
                                                       "compile_mode": "max-autotune-no-cudagraphs"}}


class Timer:
    """Wall time of a region, synchronising the device first and last."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn, repeat: int = 1) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        self.sync()
        return (time.perf_counter() - start) / repeat

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def ceilings(device: torch.device, tiny: bool) -> tuple[float, float]:
    """Measured bf16 matmul FLOP/s and copy bytes/s (read + write)."""
    timer = Timer(device)
    n = 1024 if tiny else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timer(lambda: a @ b, 3)
    flops = 2 * n**3 / timer(lambda: a @ b, 10)
    x = torch.randn(2**28 if not tiny else 2**22, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    timer(lambda: y.copy_(x), 3)
    bandwidth = 2 * x.numel() * 4 / timer(lambda: y.copy_(x), 10)
    return flops, bandwidth


def offspring(problem, rng: np.random.Generator, count: int, parent: dict | None = None) -> list[dict]:
    """EvoPress-like children of ``parent`` (default: uniform): one to three level switches each."""
    space = problem.space
    parent = parent or {u.name: 0 for u in space.units}
    children = []
    while len(children) < count:
        child = dict(parent)
        for _ in range(min(rng.integers(1, 4), rng.integers(1, 4))):
            up, down = rng.choice(len(space.units), size=2, replace=False)
            a, b = space.units[up], space.units[down]
            if child[a.name] + 1 in a.levels and child[b.name] - 1 in b.levels:
                child[a.name] += 1
                child[b.name] -= 1
        if child != parent and problem.budget.is_met(space, child):
            children.append(child)
    return children


def reference_kl(model, teacher: Teacher, tokens: int, batch_size: int) -> float:
    """The simple loop's fitness: a plain forward and full-vocabulary fp32 KL."""
    n = -(-tokens // teacher.sequence_length)
    total = 0.0
    device = next(model.parameters()).device
    for start in range(0, n, batch_size):
        ids = teacher.sequences[start : min(start + batch_size, n)].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float().reshape(-1, model.config.vocab_size)
        rows = slice(start * teacher.sequence_length, start * teacher.sequence_length + len(logits))
        t = teacher.logprobs[rows].float()
        total += float((t.exp() * (t - torch.log_softmax(logits, -1))).sum())
    return total / (n * teacher.sequence_length)


def staged_generation(fitness: KLFitness, children: list[dict], parent: dict, stages) -> None:
    """One generation of multi-step selection: score, keep the best, score them on more tokens."""
    candidates = children
    for i, (tokens, survivors) in enumerate(stages):
        if i == len(stages) - 1:
            candidates = [parent, *candidates]
        values = fitness.evaluate_batch(candidates, tokens)
        candidates = [candidates[j] for j in np.argsort(values)[:survivors]]


def kernel_breakdown(fn, device: torch.device) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """GPU time (s) of one call of ``fn`` by kind of kernel, and the kernels taking the most, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    # Attention first: cuDNN's and FlashAttention's kernel names also name the matrix instructions.
    kinds = {"attention": ("flash", "fmha", "attention", "sdpa", "cudnn", "efficient"),
             "matrix products": ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "cublas", "sm90_", "_mm_"),
             "KL": ("_kl_rows",)}
    rest = "the rest (norms, rotary, activations, copies)"
    totals = dict.fromkeys([*kinds, rest], 0.0)
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if not us or event.key.startswith(("ProfilerStep", "cudaDeviceSynchronize")):
            continue
        name = event.key.lower()
        kind = next((k for k, words in kinds.items() if any(w in name for w in words)), rest)
        totals[kind] += us / 1e6
        kernels.append((event.key, us / 1e6))
    return totals, sorted(kernels, key=lambda k: -k[1])[:8]


def kilo(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 else str(tokens)


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=None, help="model directory (default: the packaged model)")
    parser.add_argument("--tiny", action="store_true", help="small sizes: a smoke test on a CPU")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--json", default=None, help="write the measurements here as JSON")
    parser.add_argument("--database", default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--no-gptq", action="store_true", help="skip the GPTQ database build")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="only the per-candidate ratio to the simple loop at the top token count, in N "
                             "alternating rounds (default path: compiled blocks and CUDA graphs)")
    parser.add_argument("--autotune", action="store_true",
                        help="time only eager and blocks compiled with max-autotune (its compilation takes minutes)")
    args = parser.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    timer = Timer(device)

    length = 128 if tiny else 2048
    token_counts = [256, 512, 1024] if tiny else [4096, 16384, 65536]
    top = token_counts[-1]
    rows: list[tuple[str, str]] = []
    out = Path(args.out) if args.out else None

    def row(name: str, value: str) -> None:  # written as it goes: a cut-off run still leaves its table
        rows.append((name, value))
        print(f"{name}: {value}", file=sys.stderr)
        if out:
            out.write_text(table(rows, args, device, tiny, length))

    flops, bandwidth = ceilings(device, tiny)
    row("ceiling: matmul", f"{flops / 1e12:.1f} TFLOP/s")
    row("ceiling: copy (read + write)", f"{bandwidth / 1e12:.2f} TB/s")

    model, tokenizer = load_model(args.model, device=device, dtype="bf16" if device.type == "cuda" else "fp32")
    arch = architecture(model)
    corpus = load_corpus(None, tokenizer)
    problem = CompressionSpace.load("sparsity").materialize(arch, 0.5)
    database = Database(args.database or None)
    calibration = corpus.calibration_sequences(4 if tiny else 64, length, seed=0)
    seconds = timer(lambda: build_database(model, arch, problem, database, calibration, batch_size=8,
                                           progress=False))
    levels = sum(len(k) for k in problem.keys.values())
    row(f"database: SparseGPT, {levels} (layer, level) entries, {len(calibration) * length} tokens", f"{seconds:.1f} s")

    sequences = corpus.calibration_sequences(top // length, length, seed=1)
    teacher = Teacher.build(model, sequences, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                            progress=False)
    candidate = CandidateModel(model, arch, problem, database)
    held = candidate.preload()
    row("database entries held on the device", f"{held / 2**30:.2f} GiB")
    batch = 8 if tiny else 32
    params = model.num_parameters()
    parent = {u.name: 0 for u in problem.space.units}
    children = offspring(problem, rng, args.candidates)

    def roofline(tokens: int) -> float:
        return 2 * params * tokens / flops + teacher.logprobs[:tokens].numel() * 2 / bandwidth

    def simple_seconds(states: list[dict], tokens: int) -> float:
        """The simple loop's time per candidate: load each whole state from host memory, score it."""
        def reload_and_score():
            for state in states:
                model.load_state_dict(state)
                reference_kl(model, teacher, tokens, batch)

        seconds = timer(reload_and_score) / len(states)
        candidate.restore()  # load_state_dict wrote behind the candidate's back: back to a known state
        candidate.apply(parent)
        return seconds

    def states_of(assignments: list[dict]) -> list[dict]:
        states = []
        for c in assignments:
            candidate.apply(c)
            states.append({k: v.to("cpu", copy=True) for k, v in model.state_dict().items()})
        return states

    if args.paired:
        # The per-candidate ratio at the top token count, measured in alternating rounds: the
        # simple loop's time swings between runs (host-to-device copies on a shared host).
        name = "compiled + CUDA graphs"
        fitness = KLFitness(candidate, teacher, batch_size=batch, **VARIANTS[name])
        for _ in range(2):
            for tokens in (token_counts[1], top):
                fitness.evaluate_batch(children, tokens)
        states = states_of(children[:5])
        candidate.apply(parent)
        ratios = []
        for i in range(args.paired):
            fitness.evaluate_batch(children, token_counts[1])  # so the timed call rebuilds the reference
            fast = timer(lambda: fitness.evaluate_batch(children, top)) / len(children)
            simple = simple_seconds(states, top)
            ratios.append(simple / fast)
            row(f"{kilo(top)} tokens, round {i + 1}: simple loop / fast path ({name}) per candidate",
                f"{simple * 1e3:.1f} / {fast * 1e3:.1f} ms = {simple / fast:.2f}x")
        row(f"{kilo(top)} tokens: median of {args.paired} rounds", f"{statistics.median(ratios):.2f}x")
        print(table(rows, args, device, tiny, length))
        return

    # The fast path in each variant. Every batch is run twice first: graphs are captured on a
    # (batch, start block)'s second run, and compiled code on its first; then timed.
    variants = {"eager": VARIANTS["eager"]} if device.type != "cuda" else dict(VARIANTS)
    if args.autotune and device.type == "cuda":
        variants = {"eager": VARIANTS["eager"]} | AUTOTUNED
    if args.no_compile:
        variants = {k: v for k, v in variants.items() if "compile_blocks" not in v}
    per_candidate: dict[tuple[str, int], float] = {}
    values: dict[str, list[float]] = {}
    fitnesses: dict[str, KLFitness] = {}
    for name, options in variants.items():
        fitness = fitnesses[name] = KLFitness(candidate, teacher, batch_size=batch, **options)
        start = time.perf_counter()
        for tokens in token_counts:
            for _ in range(2):
                fitness.evaluate_batch(children, tokens)
        warm = time.perf_counter() - start
        # Three rounds over the token counts, the median of each: every call rebuilds the
        # reference's cached blocks (the token count changed since the last), as a selection stage does.
        rounds = [[timer(lambda: fitness.evaluate_batch(children, tokens)) / len(children) for tokens in token_counts]
                  for _ in range(3)]
        for i, tokens in enumerate(token_counts):
            per_candidate[name, tokens] = statistics.median(r[i] for r in rounds)
        cached = timer(lambda: values.__setitem__(name, fitness.evaluate_batch(children, top))) / len(children)
        agreement = max(abs(a - b) / b for a, b in zip(values[name], values["eager"]))
        times = " / ".join(f"{per_candidate[name, t] * 1e3:.1f}" for t in token_counts)
        fractions = " / ".join(f"{roofline(t) / per_candidate[name, t]:.0%}" for t in token_counts)
        row(f"fast path, {name}: ms per candidate at {' / '.join(f'{kilo(t)}' for t in token_counts)} tokens",
            f"{times} ms = {fractions} of roofline; {cached * 1e3:.1f} ms at {kilo(top)} with the reference's "
            f"blocks already cached (warm-up {warm:.0f} s; values within {agreement:.1e} of eager)")
    best = min(variants, key=lambda name: per_candidate[name, top])
    for tokens in token_counts:
        row(f"{kilo(tokens)} tokens: roofline / best ({best})",
            f"{roofline(tokens) * 1e3:.1f} / {per_candidate[best, tokens] * 1e3:.1f} ms "
            f"= {roofline(tokens) / per_candidate[best, tokens]:.0%}")

    # The sections below are independent: one that fails is a row saying so, and the rest still run.
    def guarded(section) -> None:
        try:
            section()
        except Exception as exc:
            row(f"{section.__name__.replace('_', ' ')}", f"failed: {type(exc).__name__}: {str(exc)[:160]}")

    # Is the GPU busy during a 64K selection stage of the best variant, or waiting on the host?
    def occupancy() -> None:
        if device.type != "cuda":
            return
        from torch.profiler import ProfilerActivity, profile

        fitness = fitnesses[best]
        fitness.evaluate_batch(children, token_counts[1])  # so the 64K call rebuilds the reference, as when timed
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            wall = timer(lambda: fitness.evaluate_batch(children, top))
        busy = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                   for e in prof.key_averages()) / 1e6
        row(f"{kilo(top)} tokens, {best}: GPU busy / wall time per candidate (profiled)",
            f"{busy / len(children) * 1e3:.1f} / {wall / len(children) * 1e3:.1f} ms")
    guarded(occupancy)
    if args.autotune:  # its own run: the rest is the same as in a run without it
        print(table(rows, args, device, tiny, length))
        return

    # Where the time goes: no prefix reuse, one candidate, the whole model.
    def breakdown() -> None:
        no_reuse = KLFitness(candidate, teacher, batch_size=batch, reuse_prefix=False, cuda_graphs=False)
        no_reuse.evaluate_batch(children[:1], top)
        plain = timer(lambda: no_reuse.evaluate_batch(children, top)) / len(children)
        swap = statistics.median(timer(lambda c=c: (candidate.apply(c), candidate.apply(children[0])))
                                 for c in children[1:6]) / 2
        ids = teacher.sequences[: -(-top // length)].to(device)
        forward = timer(lambda: [hidden_states(model, ids[i : i + batch]) for i in range(0, len(ids), batch)])
        row(f"{kilo(top)} tokens, eager, no prefix reuse: candidate / swap / forward / head+KL",
            f"{plain * 1e3:.1f} / {swap * 1e3:.2f} / {forward * 1e3:.1f} / {(plain - forward - swap) * 1e3:.1f} ms")
        if device.type == "cuda":
            for name in [n for n in ("eager", "compiled") if n in variants]:
                options = dict(VARIANTS[name], reuse_prefix=False)
                whole = KLFitness(candidate, teacher, batch_size=batch, **options)
                whole._run_block = fitnesses[name]._run_block  # the same compiled code, not a second compilation
                kinds, kernels = kernel_breakdown(lambda: whole.evaluate_batch(children[:1], top), device)
                total = sum(kinds.values())
                row(f"{kilo(top)} tokens, {name}, whole model: GPU time by kernel kind",
                    "; ".join(f"{k} {v * 1e3:.1f} ms ({v / total:.0%})" for k, v in kinds.items()))
                row(f"{kilo(top)} tokens, {name}: the kernels taking the most",
                    "; ".join(f"`{k[:70]}` {v * 1e3:.1f} ms" for k, v in kernels).replace("|", "/"))
                if name == "eager":
                    linear_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2
                                        and "embed" not in n) + model.get_output_embeddings().weight.numel()
                    layers, width = model.config.num_hidden_layers, model.config.hidden_size
                    rate = 2 * linear_params * top / kinds["matrix products"]
                    causal = 2 * layers * length * width * top  # QK^T and PV, half of each under the causal mask
                    row("achieved: linear layers and head / attention (causal FLOPs)",
                        f"{rate / 1e12:.0f} / {causal / max(kinds['attention'], 1e-9) / 1e12:.0f} TFLOP/s")
    guarded(breakdown)


    # The simple reference loop: per candidate at 64K tokens, and per generation of multi-step selection.
    def simple_loop() -> None:
        stages = [(token_counts[0], 8), (token_counts[1], 2), (token_counts[2], 1)]
        states = states_of(children[:3])
        simple = {tokens: simple_seconds(states, tokens) for tokens in token_counts}
        row(f"{kilo(top)} tokens: simple reference loop per candidate",
            f"{simple[top] * 1e3:.1f} ms = {simple[top] / per_candidate[best, top]:.1f}x the fast path ({best})")
        evaluations = [(tokens, len(children) if i == 0 else stages[i - 1][1] + (i == len(stages) - 1))
                       for i, (tokens, _) in enumerate(stages)]
        simple_generation = sum(count * simple[tokens] for tokens, count in evaluations)
        plan = ", ".join(f"{count} at {kilo(tokens)}" for tokens, count in evaluations)
        for name in variants:
            fitness = fitnesses[name]
            generation = [offspring(problem, rng, len(children), parent) for _ in range(9)]
            for kids in generation[:6]:  # some generations in, most (batch, start block) pairs have their graph
                staged_generation(fitness, kids, parent, stages)
            timed = iter(generation[6:])
            fast_generation = timer(lambda f=fitness: staged_generation(f, next(timed), parent, stages), repeat=3)
            row(f"one generation ({plan}), {name}",
                f"{fast_generation * 1e3:.0f} ms; simple loop {simple_generation * 1e3:.0f} ms "
                f"= {simple_generation / fast_generation:.1f}x")
    guarded(simple_loop)

    # Agreement in fp32: the fast path (graphs where they run) against the simple loop.
    def agreement() -> None:
        model32, _ = load_model(args.model, device=device, dtype="fp32")
        arch32 = architecture(model32)
        teacher32 = Teacher.build(model32, sequences[: (token_counts[0] // length)], progress=False)
        candidate32 = CandidateModel(model32, arch32, problem, database)
        fast32 = KLFitness(candidate32, teacher32, batch_size=batch)
        fast32.evaluate_batch(children[:4], token_counts[0])
        fast32_values = fast32.evaluate_batch(children[:4], token_counts[0])
        simple32 = []
        for c in children[:4]:
            candidate32.apply(c)
            simple32.append(reference_kl(model32, teacher32, token_counts[0], batch))
        worst = max(abs(a - b) / abs(b) for a, b in zip(fast32_values, simple32))
        row("fp32 agreement, fast vs simple (max relative difference)", f"{worst:.2e}")
        del model32, teacher32, candidate32, fast32
    guarded(agreement)

    # Fidelity: does a short evaluation rank candidates like the longest one?
    def ranking() -> None:
        fitness = fitnesses["eager"]
        scores = {tokens: fitness.evaluate_batch(children, tokens) for tokens in
                  sorted({*token_counts, *(t // 2 for t in token_counts)})}
        best_child = int(np.argmin(scores[top]))
        for tokens, scored in sorted(scores.items())[:-1]:
            rank = int(np.flatnonzero(np.argsort(scored) == best_child)[0]) + 1
            row(f"ranking at {tokens} tokens vs {top}: Spearman / rank of the true best",
                f"{spearman(scored, scores[top]):.2f} / {rank} of {len(children)}")
    guarded(ranking)

    def gptq() -> None:
        if not args.no_gptq:  # last: the slowest build, and a cut-off run keeps everything above
            quant = CompressionSpace.load("quant").materialize(arch, 4.0)
            entries = sum(len(k) for k in quant.keys.values())
            seconds = timer(lambda: build_database(model, arch, quant, Database(None), calibration, batch_size=8,
                                                   progress=False))
            row(f"database: GPTQ, {entries} (layer, bit-width) entries, {len(calibration) * length} tokens",
                f"{seconds:.1f} s")
    guarded(gptq)

    print(table(rows, args, device, tiny, length))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "per_candidate_ms": {
            f"{k[0]} {k[1]}": v * 1e3 for k, v in per_candidate.items()}}, indent=1))


def table(rows, args, device: torch.device, tiny: bool, length: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    flags = "".join(f" --{f}" for f in ("tiny", "no_compile", "no_gptq", "autotune") if getattr(args, f))
    flags += f" --paired {args.paired}" if args.paired else ""
    header = (f"Fitness throughput, {name}, {date.today()}, torch {torch.__version__}, packaged model, "
              f"sequences of {length} tokens, {args.candidates} EvoPress-like offspring of the uniform 50% "
              f"SparseGPT assignment.\nCommand: `python benchmarks/fitness_gpu.py --device {args.device}"
              f"{flags.replace('_', '-')}`\n")
    return header + "\n| measurement | value |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


if __name__ == "__main__":
    main()

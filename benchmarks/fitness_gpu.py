"""How fast is a fitness evaluation, and how far from the hardware's limit?

For the packaged model on one GPU this measures, in one run:

- the ceilings: a large bf16 matrix product (FLOP/s) and a device-to-device copy (B/s);
- the database build (SparseGPT at every level of the ``sparsity`` space);
- time per candidate at 4K, 16K and 64K calibration tokens for the fast path (database on
  the GPU, in-place swaps of the changed units, block-by-block runs with prefix reuse,
  chunked KL) and its breakdown (swap, forward, KL), against the roofline:
  2 x parameters x tokens / matmul rate + one read of the teacher at copy bandwidth;
- the simple reference loop: the whole candidate state loaded per candidate
  (``load_state_dict`` from host memory), a plain forward, full-vocabulary fp32 KL;
- agreement of the two (fp32 model, relative difference of the fitness values);
- how well each fidelity ranks candidates (Spearman correlation with the 64K ranking and
  whether the 64K-best candidate survives), which is what multi-step selection relies on.

    python benchmarks/fitness_gpu.py --device cuda --out fitness.md
    python benchmarks/fitness_gpu.py --device cpu --tiny          # a smoke test on a CPU
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
from evosearch.evaluate import Teacher, hidden_states, logits_from_hidden  # noqa: E402
from evosearch.fitness import KLFitness  # noqa: E402
from evosearch.model import load_model  # noqa: E402
from evosearch.units import architecture  # noqa: E402


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


def offspring(problem, rng: np.random.Generator, count: int) -> list[dict]:
    """EvoPress-like children of the uniform assignment: one to three level switches each."""
    space = problem.space
    parent = {u.name: 0 for u in space.units}
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
    parser.add_argument("--database", default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    args = parser.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    length = 128 if tiny else 2048
    token_counts = [256, 512, 1024] if tiny else [4096, 16384, 65536]
    rows = []

    flops, bandwidth = ceilings(device, tiny)
    rows.append(("ceiling: matmul", f"{flops / 1e12:.1f} TFLOP/s"))
    rows.append(("ceiling: copy (read + write)", f"{bandwidth / 1e12:.2f} TB/s"))
    print("ceilings measured", file=sys.stderr)

    model, tokenizer = load_model(args.model, device=device, dtype="bf16" if device.type == "cuda" else "fp32")
    arch = architecture(model)
    corpus = load_corpus(None, tokenizer)
    problem = CompressionSpace.load("sparsity").materialize(arch, 0.5)
    timer = Timer(device)
    database = Database(args.database or None)
    calibration = corpus.calibration_sequences(4 if tiny else 64, length, seed=0)
    seconds = timer(lambda: build_database(model, arch, problem, database, calibration, batch_size=8,
                                           progress=False))
    levels = sum(len(k) for k in problem.keys.values())
    rows.append((f"database: SparseGPT, {levels} (layer, level) entries, {len(calibration) * length} tokens",
                 f"{seconds:.1f} s"))
    print(f"database built in {seconds:.0f} s", file=sys.stderr)

    sequences = corpus.calibration_sequences(max(token_counts) // length, length, seed=1)
    teacher = Teacher.build(model, sequences, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                            progress=False)
    candidate = CandidateModel(model, arch, problem, database)
    held = candidate.preload()
    rows.append(("database entries held on the device", f"{held / 2**30:.2f} GiB"))
    batch = 8 if tiny else 32
    fitness = KLFitness(candidate, teacher, batch_size=batch)
    params = model.num_parameters()
    children = offspring(problem, rng, args.candidates)

    for tokens in token_counts:
        fitness.evaluate_batch(children[:2], tokens)  # warm-up
        per_candidate = timer(lambda: fitness.evaluate_batch(children, tokens)) / len(children)
        no_reuse = KLFitness(candidate, teacher, batch_size=batch, reuse_prefix=False)
        no_reuse.evaluate_batch(children[:1], tokens)
        plain = timer(lambda: no_reuse.evaluate_batch(children, tokens)) / len(children)
        # breakdown on one candidate without prefix reuse
        swap = statistics.median(timer(lambda c=c: (candidate.apply(c), candidate.apply(children[0])))
                                 for c in children[1:6]) / 2
        ids = teacher.sequences[: -(-tokens // length)].to(device)
        forward = timer(lambda: [hidden_states(model, ids[i : i + batch]) for i in range(0, len(ids), batch)])
        kl_only = plain - forward - swap
        roofline = 2 * params * tokens / flops + teacher.logprobs[:tokens].numel() * 2 / bandwidth
        rows.append((f"{tokens // 1024}K tokens: fast path per candidate (prefix reuse, batch of {len(children)})",
                     f"{per_candidate * 1e3:.1f} ms = {roofline / per_candidate:.0%} of roofline {roofline * 1e3:.1f} ms"))
        rows.append((f"{tokens // 1024}K tokens: without prefix reuse", f"{plain * 1e3:.1f} ms"))
        rows.append((f"{tokens // 1024}K tokens: breakdown swap / forward / head+KL",
                     f"{swap * 1e3:.2f} / {forward * 1e3:.1f} / {kl_only * 1e3:.1f} ms"))
        print(f"{tokens} tokens measured", file=sys.stderr)
        if tokens == token_counts[-1] or tiny:
            host_states = []
            for c in children[:3]:
                candidate.apply(c)
                host_states.append({k: v.to("cpu", copy=True) for k, v in model.state_dict().items()})

            def simple_loop():
                for state in host_states:
                    model.load_state_dict(state)
                    reference_kl(model, teacher, tokens, batch)

            simple = timer(simple_loop) / len(host_states)
            rows.append((f"{tokens // 1024}K tokens: simple reference loop per candidate",
                         f"{simple * 1e3:.1f} ms ({simple / per_candidate:.1f}x slower than the fast path)"))

    # torch.compile of the blocks: does fusing the elementwise work pay at the largest size?
    tokens = token_counts[-1]
    try:
        if args.no_compile:
            raise RuntimeError("skipped (--no-compile)")
        compiled = KLFitness(candidate, teacher, batch_size=batch, compile_blocks=True)
        start = time.perf_counter()
        warm = compiled.evaluate_batch(children[:2], tokens)
        compile_seconds = time.perf_counter() - start
        per_compiled = timer(lambda: compiled.evaluate_batch(children, tokens)) / len(children)
        same = max(abs(a - b) / b for a, b in zip(warm, fitness.evaluate_batch(children[:2], tokens)))
        rows.append((f"{tokens // 1024}K tokens: fast path with torch.compile'd blocks",
                     f"{per_compiled * 1e3:.1f} ms per candidate (compile + warm-up {compile_seconds:.0f} s; "
                     f"values within {same:.1e} of eager)"))
    except Exception as exc:  # compilation support varies across torch/transformers versions
        rows.append((f"{tokens // 1024}K tokens: torch.compile'd blocks", f"failed: {type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:120]}"))

    # Agreement in fp32: the fast path against the simple loop on the same candidates.
    model32, _ = load_model(args.model, device=device, dtype="fp32")
    arch32 = architecture(model32)
    teacher32 = Teacher.build(model32, sequences[: (token_counts[0] // length)], progress=False)
    candidate32 = CandidateModel(model32, arch32, problem, database)
    fast32 = KLFitness(candidate32, teacher32, batch_size=batch).evaluate_batch(children[:4], token_counts[0])
    simple32 = []
    for c in children[:4]:
        candidate32.apply(c)
        simple32.append(reference_kl(model32, teacher32, token_counts[0], batch))
    worst = max(abs(a - b) / abs(b) for a, b in zip(fast32, simple32))
    rows.append(("fp32 agreement, fast vs simple (max relative difference)", f"{worst:.2e}"))
    del model32, teacher32, candidate32

    # Fidelity: does a short evaluation rank candidates like the longest one?
    scores = {tokens: fitness.evaluate_batch(children, tokens) for tokens in
              sorted({*token_counts, *(t // 2 for t in token_counts)})}
    best = int(np.argmin(scores[max(token_counts)]))
    for tokens, values in sorted(scores.items())[:-1]:
        order = np.argsort(values)
        rank_of_best = int(np.flatnonzero(order == best)[0]) + 1
        rows.append((f"ranking at {tokens} tokens vs {max(token_counts)}: Spearman / rank of the true best",
                     f"{spearman(values, scores[max(token_counts)]):.2f} / {rank_of_best} of {len(children)}"))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"Fitness throughput, {name}, {date.today()}, torch {torch.__version__}, packaged model "
              f"({params / 1e6:.1f}M parameters), sequences of {length} tokens, "
              f"{len(children)} EvoPress-like offspring of the uniform 50% SparseGPT assignment.\n"
              f"Command: `python benchmarks/fitness_gpu.py --device {args.device}{' --tiny' if tiny else ''}`\n")
    table = header + "\n| measurement | value |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"
    if args.out:
        Path(args.out).write_text(table)
    print(table)
    print(json.dumps({"rows": rows}), file=sys.stderr)


if __name__ == "__main__":
    main()

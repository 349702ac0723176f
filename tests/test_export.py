"""Export: every format reloads and computes what the compressed model in memory computed;
what it writes is what the budget counted; the packing is compressed-tensors' own."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_llama
from evosearch.compression import CompressionSpace
from evosearch.database.quantization import QuantFormat, QuantizedWeight, rtn_quantize
from evosearch.errors import EvosearchError
from evosearch.export import ExportJob, export_model
from evosearch.hardware import attach, base_bytes
from evosearch.kinds import level_from_name
from evosearch.layouts import pack_quantized
from evosearch.runtime import load_exported
from evosearch.units import architecture

ROOT = Path(__file__).parent.parent


def inputs(vocab=128, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def drop_job(model, dropped: dict):
    """The drop space on ``model``, ``dropped`` units at "drop", applied to the weights as the search does."""
    arch = architecture(model)
    problem = attach(CompressionSpace.load("drop").materialize(arch, None), None)
    assignment = {u.name: "drop" if u.name in dropped else "keep" for u in problem.space.units}
    with torch.no_grad():
        for unit in dropped:
            mu = problem.model_units[unit]
            linears = arch.attention_linears if mu.kind == "attention" else arch.mlp_linears
            arch.module(linears(mu.block)[1]).weight.zero_()
    job = ExportJob.for_problem(model, problem, assignment)
    return job


def test_dropped_attention_and_mlp_reload_with_matching_logits_generation_and_cache(tmp_path):
    model = tiny_llama(layers=4)
    dropped = {"model.layers.1.self_attn", "model.layers.1.mlp", "model.layers.2.self_attn", "model.layers.3.mlp"}
    job = drop_job(model, dropped)
    ids = inputs()
    expected = model(ids).logits
    report = export_model(job, tmp_path / "out")
    assert report.record["blocks"]["kept"] == [0, 2, 3]  # both halves of block 1 gone: the block is removed
    assert report.record["blocks"]["overrides"] == [{}, {"skip": ["self_attn"]}, {"skip": ["mlp"]}]

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(loaded).__name__ == "EvosearchLlamaForCausalLM"
    assert torch.equal(loaded(ids).logits, expected)
    kept = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for name, p in model.named_parameters()
        if name.startswith(("model.layers.1.", "model.layers.2.self_attn", "model.layers.2.input_layernorm",
                            "model.layers.3.mlp", "model.layers.3.post_attention_layernorm")))
    assert loaded.num_parameters() == kept == report.parameters

    out = loaded(ids[:1], use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    written = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    assert len(written) == 2  # blocks 0 and 3 keep attention; the MLP-only block holds no cache
    prompt = ids[:1, :5]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False),
                       model.generate(prompt, max_new_tokens=6, do_sample=False))


def test_whole_blocks_dropped_give_a_plain_llama_with_fewer_layers(tmp_path):
    model = tiny_llama(layers=4)
    model.config.layer_types = ["full_attention"] * 4
    arch = architecture(model)
    problem = CompressionSpace.load("drop").model_copy(
        update={"compression": CompressionSpace.load("drop").compression.model_copy(update={"units": ["block"]})}
    ).materialize(arch, None)
    assignment = {u.name: "drop" if u.name == "model.layers.2" else "keep" for u in problem.space.units}
    with torch.no_grad():
        for name in arch.attention_linears(2)[1], arch.mlp_linears(2)[1]:
            arch.module(name).weight.zero_()
    job = ExportJob.for_problem(model, problem, assignment)
    ids = inputs()
    export_model(job, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 3 and len(config["layer_types"]) == 3
    assert "auto_map" not in config and not (tmp_path / "out" / "modeling_evosearch.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert [layer.self_attn.layer_idx for layer in loaded.model.layers] == [0, 1, 2]
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def slice_linear(model, name: str, rows=None, columns=None):
    """Replace a linear layer by one holding only some of its rows or columns (what a width exporter does)."""
    weight = model.get_submodule(name).weight
    weight = weight[rows] if rows is not None else weight[:, columns]
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    parent, child = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), child, layer)


def test_physically_sliced_heads_and_channels_are_read_from_the_modules(tmp_path):
    model = tiny_llama(layers=3)
    head = model.config.head_dim
    attention, mlp = "model.layers.0.self_attn", "model.layers.1.mlp"
    # Block 0 keeps the first key/value group (2 query heads, 1 kv head); block 1 keeps 80 MLP channels.
    for name in ("q_proj", "k_proj", "v_proj"):
        slice_linear(model, f"{attention}.{name}", rows=slice(0, (2 if name == "q_proj" else 1) * head))
    slice_linear(model, f"{attention}.o_proj", columns=slice(0, 2 * head))
    for name in ("gate_proj", "up_proj"):
        slice_linear(model, f"{mlp}.{name}", rows=slice(0, 80))
    slice_linear(model, f"{mlp}.down_proj", columns=slice(0, 80))
    ids = inputs()
    report = export_model(ExportJob(model, architecture(model)), tmp_path / "out")
    assert report.record["blocks"]["overrides"] == [{"num_attention_heads": 2, "num_key_value_heads": 1},
                                                    {"intermediate_size": 80}, {}]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.num_parameters() == sum(p.numel() for p in model.parameters())


def test_exported_bytes_are_what_the_bytes_budget_counted(tmp_path):
    model = tiny_llama(layers=3)
    job = drop_job(model, {"model.layers.0.mlp", "model.layers.2.self_attn"})
    report = export_model(job, tmp_path / "out")
    problem = attach(CompressionSpace.load("drop").materialize(job.arch, None), None)
    planned = sum(problem.space.unit(u).resources["bytes"][problem.levels[u].index(level)]
                  for u, level in job.levels.items())
    assert planned + base_bytes(problem) == report.tensor_bytes
    on_disk = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert 0 < on_disk - report.tensor_bytes < 20_000  # the safetensors header


FORMATS = {"q_proj": "bits=4,group=32", "k_proj": "bits=3,group=row,sym", "v_proj": "bits=5,group=48",
           "o_proj": "bits=8,group=64,sym", "gate_proj": "bits=2,group=16", "up_proj": "bits=4,group=64,sym"}


def quantise(model, arch, blocks, formats=FORMATS):
    """RTN-quantise the blocks' linear layers in place (dequantised weights); the codes per layer."""
    quantized = {}
    for b in blocks:
        for name in arch.linears(b):
            fmt = level_from_name(formats.get(name.rsplit(".", 1)[1], "bits=6,group=32")).fmt
            qw = rtn_quantize(arch.module(name).weight, fmt)
            with torch.no_grad():
                arch.module(name).weight.copy_(qw.dequantize())
            quantized[name] = qw
    return quantized


def test_packed_export_keeps_codes_and_loads_with_the_same_logits(tmp_path):
    model = tiny_llama(layers=3)
    job = drop_job(model, {"model.layers.1.mlp"})
    job.quantized = quantise(model, job.arch, [0, 2])
    ids = inputs()
    expected = model(ids).logits
    report = export_model(job, tmp_path / "packed", format="packed")

    loaded, _ = load_exported(tmp_path / "packed", device="cpu")
    layer = loaded.model.layers[0].self_attn.k_proj
    assert type(layer).__name__ == "PackedLinear" and layer.weight_packed.dtype == torch.int32
    assert torch.equal(loaded(ids).logits, expected)

    names = {name: FORMATS.get(name.rsplit(".", 1)[1], "bits=6,group=32") for name in job.quantized}
    linears = [u for u in job.arch.units("linear") if not u.name.startswith("model.layers.1.mlp.")]
    counted = sum(level_from_name(names.get(u.name, "dense")).bytes(job.arch, u) for u in linears)
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters()  # tied head counted once
               if not n.endswith("_proj.weight") and n != "model.layers.1.post_attention_layernorm.weight")
    assert counted + rest == report.tensor_bytes
    assert report.record["packed"]["model.layers.0.self_attn.k_proj"] == {"bits": 3, "group_size": None,
                                                                           "symmetric": True}
    reasons = " ".join(report.record["vllm"]["reasons"])
    assert "3-bit" in reasons and "q_proj/k_proj/v_proj differ" in reasons and not report.record["vllm"]["servable"]

    export_model(job, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert torch.equal(hf(ids).logits, expected)  # --format hf: the dequantised weights, dense


def test_pack_is_compressed_tensors_packing():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits in range(2, 9):
        for rows, columns in ((5, 1), (7, 7), (3, 64), (9, 100)):
            codes = torch.randint(0, 2**bits, (rows, columns), dtype=torch.uint8)
            zeros = torch.randint(0, 2**bits, (rows, 2), dtype=torch.uint8)
            qw = QuantizedWeight(codes, torch.rand(rows, 2), zeros, QuantFormat(bits, -(-columns // 2)), torch.float32)
            tensors = pack_quantized(qw)
            offset = 2 ** (bits - 1)  # compressed-tensors packs signed codes plus this offset
            assert torch.equal(tensors["weight_packed"], helpers.pack_to_int32((codes - offset).to(torch.int8), bits))
            assert torch.equal(tensors["weight_zero_point"],
                               helpers.pack_to_int32((zeros - offset).to(torch.int8), bits, packed_dim=0))


def test_compressed_tensors_reads_the_packed_export(tmp_path):
    """transformers + compressed-tensors load a symmetric export; its decompressor reads an asymmetric one."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    ids = inputs()
    layers = (*FORMATS, "down_proj")
    for formats, name in (({n: "bits=3,group=32,sym" for n in layers}, "sym"),
                          ({n: "bits=4,group=32" for n in layers}, "asym")):
        model = tiny_llama(layers=2)
        arch = architecture(model)
        quantized = quantise(model, arch, [0, 1], formats)
        report = export_model(ExportJob(model, arch, quantized=quantized), tmp_path / name, format="packed")
        if name == "sym":
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
            assert torch.equal(loaded(ids).logits, model(ids).logits)
            continue
        config = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert report.record["vllm"]["servable"] and len(config["config_groups"]) == 1
        group = config["config_groups"]["group_0"]
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
        tensors = load_file(str(tmp_path / name / "model.safetensors"))
        for layer in group["targets"]:
            local = {k.removeprefix(f"{layer}."): v for k, v in tensors.items() if k.startswith(f"{layer}.")}
            weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            assert torch.equal(weight, model.get_submodule(layer).weight)


def test_two_four_layers_are_flagged_and_stay_dense_on_cpu(tmp_path):
    model = tiny_llama(layers=2)
    arch = architecture(model)
    problem = CompressionSpace.load("sparsity-2of4").materialize(arch, 0.25)
    assignment = {u.name: "2:4" if "mlp" in u.name else 0.0 for u in problem.space.units}
    with torch.no_grad():
        for name, level in assignment.items():
            if level == "2:4":
                w = arch.module(name).weight
                keep = w.abs().reshape(-1, 4).topk(2, dim=1).indices
                w.mul_(torch.zeros_like(w.reshape(-1, 4)).scatter_(1, keep, 1.0).reshape(w.shape))
    job = ExportJob.for_problem(model, problem, assignment)
    report = export_model(job, tmp_path / "out")
    assert report.record["semi_structured"] == sorted(n for n, level in assignment.items() if level == "2:4")
    loaded, _ = load_exported(tmp_path / "out", device="cpu")
    assert not loaded.model.layers[0].mlp.up_proj.weight.is_sparse  # no semi-structured kernels on a CPU
    assert torch.equal(loaded(inputs()).logits, model(inputs()).logits)


def test_bad_exports_are_refused(tmp_path):
    model = tiny_llama(layers=2)
    arch = architecture(model)
    with pytest.raises(EvosearchError, match="removes every decoder block"):
        export_model(ExportJob(model, arch, removed={"model.layers.0", "model.layers.1"}), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(EvosearchError, match="not empty"):
        export_model(ExportJob(model, arch), tmp_path / "b")
    with pytest.raises(EvosearchError, match="not an evosearch export"):
        load_exported(tmp_path / "b")


KERNEL_CHECK = textwrap.dedent("""
    import torch
    from evosearch.kernels import quant as q
    torch.manual_seed(0)
    worst = {}
    for bits, group, N, K in [(4, 64, 70, 130), (3, None, 33, 100), (8, 32, 64, 64), (5, 48, 20, 100), (2, 16, 40, 64)]:
        codes = torch.randint(0, 2**bits, (N, K))
        G = 1 if group is None else -(-K // group)
        w = q.PackedWeight(q.pack(codes, bits), torch.rand(N, G) + 0.1,
                           torch.randint(0, 2**bits, (N, G), dtype=torch.uint8), bits, group, (N, K))
        assert torch.equal(q.dequantize(w, torch.float32), q.dequantize_reference(w, torch.float32))
        for M in (1, 17, q.FUSED_MAX_ROWS + 3):
            x = torch.randn(M, K, dtype=torch.float64).float()
            # the two Triton paths of dequant_matmul: fused for few rows, dequantise then matmul for many
            if M <= q.FUSED_MAX_ROWS:
                out = q.fused_matmul(x, w)
            else:
                out = torch.nn.functional.linear(x, q.dequantize(w, x.dtype))
            exact = x.double() @ q.dequantize_reference(w, torch.float64).T
            worst[(bits, M)] = float((out.double() - exact).norm() / exact.norm())
    assert max(worst.values()) < 1e-5, worst
    print("ok", max(worst.values()))
""")


def test_dequant_matmul_kernel_matches_the_reference_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def test_export_command_writes_a_search_folder_and_hardware_budgets_build_the_problem(tmp_path, capsys):
    from evosearch.cli import main
    from evosearch.pipeline import SearchSettings, search_problem
    from evosearch.run import BudgetRecord, RunFolder, RunResult, SearchRecord

    model = tiny_llama(layers=4)
    arch = architecture(model)
    settings = SearchSettings(space="drop", budget=float(3 * 2**20), budget_resource="bytes")
    problem, table = search_problem(settings, CompressionSpace.load("drop"), arch)
    assert table is None and problem.budget.max_total == 3 * 2**20 - base_bytes(problem)
    with pytest.raises(EvosearchError, match="needs a hardware table"):
        search_problem(settings.model_copy(update={"budget_resource": "latency_ms"}), CompressionSpace.load("drop"),
                       arch)

    assignment = {u.name: "drop" if u.name == "model.layers.2.mlp" else "keep" for u in problem.space.units}
    with torch.no_grad():
        arch.module("model.layers.2.mlp.down_proj").weight.zero_()
    model.save_pretrained(tmp_path / "run" / "model")
    spec = CompressionSpace.load("drop")
    RunFolder(tmp_path / "run").write_result(RunResult(
        settings=settings, space={"units": len(problem.space.units)} | spec.model_dump(mode="json"),
        budget=BudgetRecord(resource="bytes", label="max_total bytes", value=settings.budget,
                            planned=problem.budget.usage(problem.space, assignment)),
        assignment=assignment, levels=problem.typed(assignment), fitness={}, perplexity={},
        parameters={"dense": 0, "kept": 0},
        search=SearchRecord(sampler="evopress", evaluations=0, seconds=0.0, best_trial=0, study="s")))
    assert main(["export", str(tmp_path / "run")]) == 0
    assert "4 decoder blocks" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export-hf", trust_remote_code=True)
    assert loaded.model.layers[2].mlp is None
    assert torch.equal(loaded(inputs()).logits, model(inputs()).logits)
    record = json.loads((tmp_path / "run" / "export-hf" / "evosearch.json").read_text())
    assert record["search"]["settings"]["budget_resource"] == "bytes" and record["assignment"] == assignment

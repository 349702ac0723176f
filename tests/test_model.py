import re

import pytest
import torch

from evosearch.errors import EvosearchError
from evosearch.model import load_model, resolve_dtype


def test_directory_without_tokenizer_is_refused(tmp_path, llama):
    llama.save_pretrained(tmp_path)
    with pytest.raises(EvosearchError, match="has config.json but no tokenizer"):
        load_model(tmp_path, device="cpu")


def test_directory_with_model_and_tokenizer(tmp_path, llama, real):
    _, tokenizer = real
    llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = load_model(tmp_path, device="cpu")
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.allclose(model(ids).logits, llama(ids).logits)
    assert model.dtype == torch.float32 and not model.training
    assert loaded_tokenizer("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_dtype_defaults():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(EvosearchError, match="dtype 'int3'"):
        resolve_dtype("int3", torch.device("cpu"))


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "not a model directory"),
    (lambda p: (p / "weights.bin").write_bytes(b"x") and p / "weights.bin", "not a .gguf file"),
    (lambda p: (p / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64) and p / "broken.gguf", "not a readable GGUF"),
])
def test_bad_model_paths(tmp_path, monkeypatch, make, message):
    monkeypatch.setenv("EVOSEARCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    with pytest.raises(EvosearchError, match=message) as info:
        load_model(make(tmp_path), device="cpu")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("remove, message", [
    (["model.safetensors"], "has config.json but no weights (model.safetensors"),
    (["tokenizer.json"], "has config.json but no tokenizer (tokenizer.json"),
    (["model.safetensors", "tokenizer.json"], "but no weights (model.safetensors, pytorch_model.bin or a sharded "
                                              "*.index.json) and no tokenizer"),
])
def test_a_model_folder_names_the_files_it_lacks(tmp_path, llama, remove, message):
    """Without them transformers says "Couldn't instantiate the backend tokenizer", or builds an empty tokenizer."""
    llama.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # the files are checked before anything is read
    for name in remove:
        (tmp_path / name).unlink()
    with pytest.raises(EvosearchError, match=re.escape(message)) as info:
        load_model(tmp_path, device="cpu")
    assert "\n" not in str(info.value)


def test_a_folder_above_a_model_folder_names_it(tmp_path, llama):
    llama.save_pretrained(tmp_path / "model")
    with pytest.raises(EvosearchError, match=f"no config.json and no .gguf file; pass its subfolder {tmp_path}/model$"):
        load_model(tmp_path, device="cpu")


@pytest.mark.real
def test_packaged_model_is_smollm2(real):
    model, tokenizer = real
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert 134_000_000 < model.num_parameters() < 135_000_000
    assert tokenizer("The jury", add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has n CUDA GPUs (0: torch built without CUDA), whatever it has."""
    def pretend(n):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.version, "cuda", "12.8" if n else None)
        monkeypatch.setattr(torch.version, "hip", None)
    return pretend


@pytest.mark.parametrize("argv", [
    ["eval", "--device", "{}"],
    ["heal", "{result}", "--tokens", "1000", "--device", "{}"],
    ["profile", "--target", "{}"],
    ["worker", "--storage", "{result}/s.journal", "--study", "s", "--device", "{}"],
    ["search", "sparsity", "--budget", "0.5", "--out", "{result}/run", "--device", "{}"],
])
def test_a_cuda_device_this_machine_lacks_is_one_line(gpus, capsys, tmp_path, argv):
    from evosearch.cli import main

    (tmp_path / "model").mkdir()  # enough of a search result for heal to read its settings
    (tmp_path / "result.json").write_text('{"settings": {"budget": 0.5}}')
    field = "--target" if "profile" in argv else "--device"
    for count, device, machine in [(0, "cuda", f"no CUDA GPU (torch {torch.__version__} is built without CUDA); use"),
                                   (1, "cuda:3", "1 CUDA GPU, cuda:0; use one of them or")]:
        gpus(count)
        assert main([a.format(device, result=tmp_path) for a in argv]) == 2
        # The one line, and nothing before it: no model was loaded, no study waited for.
        assert capsys.readouterr().err == f"evosearch: error: {field} {device}: this machine has {machine} {field} cpu\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "result.json"]


def test_devices_resolve_in_one_place(gpus, monkeypatch):
    from evosearch.model import resolve_device

    gpus(2)
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(EvosearchError, match=r"--device cuda:2: this machine has 2 CUDA GPUs, cuda:0 to cuda:1"):
        load_model(None, device="cuda:2")
    with pytest.raises(EvosearchError, match=r"--device gpu: not a device; use cpu, cuda or cuda:N"):
        resolve_device("gpu")
    gpus(0)
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build that sees no device
    with pytest.raises(EvosearchError, match=r"no CUDA GPU \(no CUDA device is visible\)"):
        resolve_device("cuda")

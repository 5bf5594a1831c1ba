"""Whole-model bundles of real library models, as built, with no wrapper class: transformers
(GPT-2, BERT, T5, Llama: tiny configs, random init, no downloads), timm and torchvision.

Each bundle is saved here and loaded in ONE fresh interpreter (nothing of the original model
is in memory there), which runs every model on the same inputs and writes the outputs and its
tie checks back; the outputs must be bit-identical and tied weights must still share storage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests._compat import require_transformers_with_torch
from tests._source import SRC

COMPAT = "needs the newest-torch compat venv (timm/torchvision beside torch), see make test-compat"

# The child: load each bundle, run it on the saved inputs, save the outputs, report ties.
CHILD = """
import json, sys, torch, torchkeep as tk
from pathlib import Path
root = Path(sys.argv[1])
torch.set_num_threads(1)  # as the parent computed its outputs: sums split alike
jobs = json.loads((root / "jobs.json").read_text())
inputs = tk.load_state_dict(root / "inputs.safetensors")
outputs, report = {}, {}
for name, job in jobs.items():
    model = tk.load_model(root / name)
    kwargs = {key: inputs[f"{name}.{key}"] for key in job["inputs"]}
    with torch.no_grad():
        out = model(**kwargs)
    outputs[name] = out if isinstance(out, torch.Tensor) else out[job["output"]]
    params = dict(model.named_parameters(remove_duplicate=False))
    report[name] = {
        "class": type(model).__module__ + "." + type(model).__qualname__,
        "training": model.training,
        "ties": {
            alias: params[alias].untyped_storage().data_ptr()
            == params[target].untyped_storage().data_ptr()
            and params[alias] is params[target]
            for alias, target in job["ties"].items()
        },
    }
tk.save_weights({k: v.contiguous() for k, v in outputs.items()}, root / "outputs.safetensors")
(root / "report.json").write_text(json.dumps(report))
"""


def _round_trip_in_a_fresh_process(
    tmp_path: Path,
    models: dict[str, tuple[nn.Module, dict[str, torch.Tensor], str, dict[str, str]]],
) -> None:
    """Save each ``name: (model, inputs, output key, {tied name: name it is tied to})``, load
    them all in one fresh interpreter and compare outputs bit for bit and ties."""
    jobs: dict[str, dict[str, object]] = {}
    inputs: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for name, (model, kwargs, output, ties) in models.items():
        model.eval()
        tk.save_model(model, tmp_path / name)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["format_version"] == 2, "a builder bundle is format version 2"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread here and in the child: sums split alike
        try:
            with torch.no_grad():
                out = model(**kwargs)
        finally:
            torch.set_num_threads(threads)
        expected[name] = out if isinstance(out, torch.Tensor) else out[output]
        inputs.update({f"{name}.{key}": value for key, value in kwargs.items()})
        jobs[name] = {"inputs": list(kwargs), "output": output, "ties": ties}
        for alias, target in ties.items():  # the premise: the original is tied
            params = dict(model.named_parameters(remove_duplicate=False))
            assert params[alias] is params[target]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    tk.save_weights(inputs, tmp_path / "inputs.safetensors")
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        check=True,
        timeout=600,
    )
    outputs = tk.load_state_dict(tmp_path / "outputs.safetensors")
    report = json.loads((tmp_path / "report.json").read_text())
    for name, (model, _, _, ties) in models.items():
        assert report[name]["class"] == f"{type(model).__module__}.{type(model).__qualname__}"
        assert report[name]["training"] is False
        assert report[name]["ties"] == dict.fromkeys(ties, True), name
        assert torch.equal(outputs[name], expected[name]), f"{name}: outputs differ"


def _tokens(vocab: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def test_transformers_models_as_built_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    transformers = require_transformers_with_torch()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    vocab = 96
    ids = _tokens(vocab, 2, 9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32,
            bos_token_id=0, eos_token_id=0,
        )
    )  # fmt: skip
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            vocab_size=vocab, max_position_embeddings=32,
        )
    )  # fmt: skip
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            d_model=32, d_ff=48, num_layers=2, num_heads=2, d_kv=16, vocab_size=vocab,
            decoder_start_token_id=0,
        )
    )  # fmt: skip
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )  # fmt: skip
    _round_trip_in_a_fresh_process(
        tmp_path,
        {
            "gpt2": (
                gpt2, {"input_ids": ids, "attention_mask": mask}, "logits",
                {"lm_head.weight": "transformer.wte.weight"},
            ),
            "bert": (
                bert, {"input_ids": ids, "attention_mask": mask}, "logits",
                {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"},
            ),
            "t5": (
                t5, {"input_ids": ids, "decoder_input_ids": ids[:, :5]}, "logits",
                {"lm_head.weight": "shared.weight", "encoder.embed_tokens.weight": "shared.weight"},
            ),
            "llama": (
                llama, {"input_ids": ids, "attention_mask": mask}, "logits",
                {"lm_head.weight": "model.embed_tokens.weight"},
            ),
        },
    )  # fmt: skip


def _vision_inputs(size: int = 64) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))}


def test_timm_models_as_built_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm", reason=COMPAT)
    torch.manual_seed(0)
    create: Callable[..., nn.Module] = timm.create_model
    _round_trip_in_a_fresh_process(
        tmp_path,
        {
            "resnet18": (create("resnet18", num_classes=7), _vision_inputs(), "", {}),
            "efficientnet_b0": (create("efficientnet_b0"), _vision_inputs(), "", {}),
            "vit_tiny": (create("vit_tiny_patch16_224"), _vision_inputs(224), "", {}),
        },
    )


def test_torchvision_models_as_built_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision", reason=COMPAT)
    torch.manual_seed(0)
    get = torchvision.models.get_model
    resnet = get("resnet18", weights=None, num_classes=10)
    models = {
        "mobilenet_v3_small": (get("mobilenet_v3_small", weights=None), _vision_inputs(), "", {}),
        "squeezenet1_1": (get("squeezenet1_1", weights=None), _vision_inputs(), "", {}),
    }
    with pytest.raises(tk.InitArgsError, match=r"init_args=\{'num_classes': 10\}"):
        tk.save_model(resnet, tmp_path / "resnet18")  # built with num_classes=10
    assert not (tmp_path / "resnet18").exists()
    _round_trip_in_a_fresh_process(tmp_path, models)
    tk.save_model(resnet.eval(), tmp_path / "resnet18", init_args={"num_classes": 10})
    x = _vision_inputs()["x"]
    with torch.no_grad():
        assert torch.equal(tk.load_model(tmp_path / "resnet18")(x), resnet(x))

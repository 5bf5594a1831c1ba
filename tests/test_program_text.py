"""``torch.export`` programs of text models: keyword inputs, a dynamic sequence length through
``dynamic_shapes``, outputs of a registered pytree type (a transformers ``ModelOutput``) loaded
in a process that never imported the model class, ``.eval()``/``.train()``, ``forward(*args)``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests._source import SRC
from torchkeep.model.program import export_program

transformers = pytest.importorskip("transformers")
# transformers 5 disables its torch models under torch < 2.6 (tests/_compat.py)
pytestmark = pytest.mark.usefixtures("transformers_models")

VOCAB = 100
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2_program(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A GPT-2 (default config: use_cache on) program, batch and sequence dynamic."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, VOCAB, (2, 8))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
    program = export_program(
        model, {"input_ids": ids}, dynamic_shapes={"input_ids": {0: batch, 1: sequence}}
    )
    assert model.config.use_cache is True  # turned off for the export only
    path = tmp_path_factory.mktemp("gpt2") / "gpt2.pt2"
    torch.export.save(program, str(path))
    return path, model


def _child(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip


def test_model_output_program_loads_where_only_the_library_is_imported(
    gpt2_program: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    path, model = gpt2_program
    ids = torch.randint(0, VOCAB, (3, 13))  # a batch and a length never traced
    model.eval()  # the program was exported in eval mode (dropout off)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    torch.save(ids, tmp_path / "ids.pt")
    result = _child(f"""
        import sys, torch
        import transformers.modeling_outputs  # the library's output types, not GPT-2's module
        import torchkeep as tk
        module = tk.load_model({str(path)!r}, trust_program=True)
        out = module(input_ids=torch.load({str(tmp_path / "ids.pt")!r}))
        torch.save(out.logits, {str(tmp_path / "logits.pt")!r})
        print(type(out).__name__, "transformers.models.gpt2.modeling_gpt2" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["CausalLMOutputWithCrossAttentions", "False"]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


def test_unregistered_output_type_is_named_with_the_import_to_add(
    gpt2_program: tuple[Path, nn.Module],
) -> None:
    path, _ = gpt2_program
    result = _child(f"""
        import sys, torchkeep as tk
        try:
            tk.load_model({str(path)!r}, trust_program=True)
        except tk.ModelClassNotFoundError as exc:
            print(exc)
        print("transformers" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert "transformers.modeling_outputs.CausalLMOutputWithCrossAttentions" in result.stdout
    assert "import transformers.modeling_outputs" in result.stdout
    assert result.stdout.split()[-1] == "False"  # never imported on the program's word


def test_a_type_named_by_a_program_is_never_imported(
    gpt2_program: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    """A program naming a type in an importable module that fires on import: torchkeep refuses
    with its own error and the module never runs (torch.export.load would only look it up)."""
    path, _ = gpt2_program
    canary = tmp_path / "imported"
    package = tmp_path / "site" / "tk_planted"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"open({str(canary)!r}, 'w').close()\n")
    hostile = tmp_path / "hostile.pt2"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(hostile, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("models/model.json"):
                data = data.replace(
                    b"transformers.modeling_outputs.CausalLMOutputWithCrossAttentions",
                    b"tk_planted.Output",
                )
            target.writestr(info.filename, data)
    assert tk.scan(hostile).is_safe  # plain data as far as the whitelists go
    result = _child(f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "site")!r})
        import torchkeep as tk
        try:
            tk.load_model({str(hostile)!r}, trust_program=True)
        except tk.ModelClassNotFoundError as exc:
            print("refused:", exc)
    """)
    assert "refused:" in result.stdout, result.stderr
    assert "tk_planted.Output" in result.stdout
    assert not canary.exists()


def test_program_eval_is_a_no_op_and_train_explains_itself(
    gpt2_program: tuple[Path, nn.Module],
) -> None:
    path, _ = gpt2_program
    import transformers.modeling_outputs  # noqa: F401  (registers the output type)

    module = tk.load_model(path, trust_program=True)
    assert module.eval() is module
    assert module.train(False) is module
    with pytest.raises(tk.ExportError, match="fixed in eval mode"):
        module.train()


def test_save_model_passes_dynamic_shapes_through(tmp_path: Path) -> None:
    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.embed(ids).mean(1)

    # a class a test defines cannot be imported: the bundle falls back to its program
    sequence = torch.export.Dim("sequence")
    shapes = {"ids": {0: torch.export.Dim("batch"), 1: sequence}}
    model = Pool()
    bundle = tk.save_model(
        model, tmp_path / "pool.bundle", example_inputs=(torch.randint(0, VOCAB, (2, 6)),),
        dynamic_shapes=shapes,
    )  # fmt: skip
    program = tk.load_model(bundle / "program.pt2", trust_program=True)
    ids = torch.randint(0, VOCAB, (3, 17))
    torch.testing.assert_close(program(ids), model(ids))


class VarArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 2)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.l(args[0]) + args[1]


def test_forward_with_star_args_gets_a_program(tmp_path: Path) -> None:
    model = VarArgs()
    program = export_program(model, (torch.randn(1, 4), torch.randn(1, 2)))
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    torch.testing.assert_close(program.module()(x, y), model(x, y))


def test_program_specs_name_output_types_the_whitelist_accepts(
    gpt2_program: tuple[Path, nn.Module],
) -> None:
    path, _ = gpt2_program
    with zipfile.ZipFile(path) as archive:
        [member] = [n for n in archive.namelist() if n.endswith("models/model.json")]
        document = json.loads(archive.read(member))
    from torchkeep.security.programs import is_plain_treespec, pytree_types

    signature = document["graph_module"]["module_call_graph"][0]["signature"]
    assert is_plain_treespec(signature["out_spec"])
    assert "transformers.modeling_outputs.CausalLMOutputWithCrossAttentions" in pytree_types(
        json.dumps(document).encode()
    )

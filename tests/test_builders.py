"""Builders: recipes that record how to rebuild a library's model as data (tk.register_builder,
the built-in transformers/timm/torchvision ones), the rebuild check that keeps a bundle that
would not load from being written, the bundle format version, and hostile builder records."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from tests._compat import require_transformers_with_torch
from tests._live import prove_live
from torchkeep.errors import InvalidDocumentError
from torchkeep.hashing import hash_file
from torchkeep.manifest import MANIFEST_NAME, FileRecord, read_manifest, write_manifest
from torchkeep.model import classpath
from torchkeep.model.builders import construct, registry
from torchkeep.models import Net

# ---- a small "library" whose models are made by a factory, and its recipe -----------------


class ZooNet(nn.Module):
    """A model made by :func:`zoo_create`; its constructor's arguments are not recorded."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.head = nn.Linear(width, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x * self.scale))


def zoo_create(name: str, **kwargs: Any) -> ZooNet:
    model = ZooNet(**kwargs)
    model.arch = name  # type: ignore[assignment]
    return model


def _zoo_record(model: nn.Module, init_args: Any) -> dict[str, Any]:
    first = model.layers[0]  # type: ignore[index]
    return {"name": model.arch, "kwargs": {"width": first.in_features, "depth": len(model.layers)}}


@pytest.fixture
def zoo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the zoo recipe for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(registry, "_BUILDERS", {})
    tk.register_builder(
        "zoo",
        matches=lambda m: isinstance(m, ZooNet),
        record=_zoo_record,
        build=lambda spec: zoo_create(spec["name"], **spec["kwargs"]),
    )


def _tripwire(monkeypatch: pytest.MonkeyPatch, *, libraries: bool = True) -> None:
    """From now on, fail the test if torchkeep imports a class (or, with ``libraries``, a
    builder's library) by name."""

    def refuse(name: str, package: str | None = None) -> ModuleType:
        raise AssertionError(f"torchkeep imported {name!r}")

    tripwire = SimpleNamespace(import_module=refuse)
    monkeypatch.setattr(classpath, "importlib", tripwire)
    if libraries:
        monkeypatch.setattr(registry, "importlib", tripwire)


@pytest.fixture
def no_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if torchkeep imports anything by name (a class or a library)."""
    _tripwire(monkeypatch)


def _forge(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite ``config.json`` with ``edit`` and re-record the manifest consistently, as an
    attacker who rewrites the whole bundle would."""
    document = json.loads((bundle / "config.json").read_text())
    edit(document)
    (bundle / "config.json").write_text(json.dumps(document))
    files = {n: FileRecord(*hash_file(bundle / n)) for n in read_manifest(bundle)["files"]}
    (bundle / MANIFEST_NAME).unlink()
    write_manifest(bundle, kind="torchkeep.bundle", files=files, format_version=2)


def _manifest(bundle: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((bundle / MANIFEST_NAME).read_text())
    return result


# ---- registered recipes ----------------------------------------------------------------------


@pytest.mark.usefixtures("zoo")
def test_a_registered_recipe_rebuilds_a_factory_model_with_identical_outputs(
    tmp_path: Path,
) -> None:
    model = zoo_create("tiny", width=6, depth=2).eval()
    bundle = tk.save_model(model, tmp_path / "zoo")
    config = json.loads((bundle / "config.json").read_text())
    assert config["builder"] == {
        "name": "zoo", "spec": {"name": "tiny", "kwargs": {"width": 6, "depth": 2}}
    }  # fmt: skip
    assert config["class"] == "tests.test_builders.ZooNet"
    assert _manifest(bundle)["format_version"] == 2
    assert tk.verify(bundle).ok
    loaded = tk.load_model(bundle)
    x = torch.randn(4, 6)
    assert isinstance(loaded, ZooNet)
    assert torch.equal(loaded(x), model(x))


def test_a_bundle_without_a_builder_stays_format_version_1(tmp_path: Path, net: Net) -> None:
    bundle = tk.save_model(net, tmp_path / "net")
    assert _manifest(bundle)["format_version"] == 1
    assert "builder" not in json.loads((bundle / "config.json").read_text())


def test_a_newer_format_version_is_refused_naming_the_upgrade(tmp_path: Path, net: Net) -> None:
    bundle = tk.save_model(net, tmp_path / "net")
    manifest = _manifest(bundle)
    manifest["format_version"] = 3  # as a newer torchkeep would write it
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(tk.FormatVersionError, match=r"bundle format version 3.*upgrade"):
        tk.load_model(bundle)


def test_a_recipe_that_does_not_rebuild_the_model_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "_BUILDERS", {})
    tk.register_builder(
        "zoo",
        matches=lambda m: isinstance(m, ZooNet),
        record=lambda m, init_args: {"name": "tiny", "kwargs": {"width": 6, "depth": 1}},
        build=lambda spec: zoo_create(spec["name"], **spec["kwargs"]),
    )
    with pytest.raises(tk.InitArgsError, match=r"'layers\.1\.weight' is not rebuilt"):
        tk.save_model(zoo_create("tiny", width=6, depth=2), tmp_path / "zoo")
    assert not (tmp_path / "zoo").exists()


@pytest.mark.usefixtures("zoo")
def test_a_non_persistent_buffer_the_recipe_computes_differently_is_refused(
    tmp_path: Path,
) -> None:
    model = zoo_create("tiny", width=6, depth=2)
    model.scale.mul_(2)  # not stored in the weights file: a load would compute the old values
    with pytest.raises(tk.InitArgsError, match="non-persistent buffer 'scale' is rebuilt with"):
        tk.save_model(model, tmp_path / "zoo")
    assert not (tmp_path / "zoo").exists()


@pytest.mark.parametrize("name", ["", "Zoo", "../zoo", "zoo lib", "z" * 65, 3])
def test_register_builder_refuses_names_a_bundle_could_not_hold(name: Any) -> None:
    with pytest.raises(tk.BuilderNameError, match="not valid"):
        tk.register_builder(name, matches=bool, record=dict, build=ZooNet)


@pytest.mark.parametrize("name", ["transformers", "timm", "torchvision"])
def test_register_builder_refuses_a_built_in_name(name: str) -> None:
    with pytest.raises(tk.BuilderNameError, match="built-in"):
        tk.register_builder(name, matches=bool, record=dict, build=ZooNet)


@pytest.mark.usefixtures("zoo")
def test_a_bundle_naming_an_unregistered_builder_is_refused_before_any_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_imports: None
) -> None:
    bundle = tk.save_model(zoo_create("tiny", width=4, depth=1), tmp_path / "zoo")
    monkeypatch.setattr(registry, "_BUILDERS", {})
    with pytest.raises(InvalidDocumentError, match=r"'zoo'.*call tk.register_builder"):
        tk.load_model(bundle)


def test_loading_builds_weights_without_initialising_them(
    tmp_path: Path, zoo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tk.save_model(zoo_create("tiny", width=6, depth=3), tmp_path / "zoo")
    initialised: list[torch.Tensor] = []
    original = nn.init.kaiming_uniform_

    def spy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not tensor.is_meta:
            initialised.append(tensor)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(nn.init, "kaiming_uniform_", spy)
    zoo_create("tiny", width=6, depth=1)
    assert initialised, "the spy must see a normal build's initialisation"
    initialised.clear()
    loaded = tk.load_model(bundle)
    assert initialised == []
    assert torch.equal(loaded.scale, torch.linspace(0.5, 1.5, 6))  # computed for real


def test_parameters_on_meta_keeps_ties_and_restores_registration() -> None:
    original = nn.Module.register_parameter
    with construct.parameters_on_meta():
        model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
        model[1].weight = model[0].weight
    assert nn.Module.register_parameter is original
    assert model[0].weight.is_meta
    assert model[1].weight is model[0].weight
    construct.materialise(model, torch.device("cpu"), {"0.weight": torch.float64})
    assert model[1].weight is model[0].weight
    assert model[0].weight.dtype == torch.float64


# ---- Keepable and plain classes --------------------------------------------------------------


class Base(nn.Module):
    def __init__(self, width: int, depth: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Mine(tk.Keepable, Base):
    pass


def test_keepable_before_a_base_records_the_bases_arguments(tmp_path: Path) -> None:
    model = Mine(5, depth=3).eval()
    bundle = tk.save_model(model, tmp_path / "mine")
    config = json.loads((bundle / "config.json").read_text())
    assert config["init"] == {"args": [], "kwargs": {"width": 5, "depth": 3}}
    x = torch.randn(2, 5)
    assert torch.equal(tk.load_model(bundle)(x), model(x))
    assert "_torchkeep_init_args" not in Base(2).__dict__  # the base itself is untouched


class NeedsConfig(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.linear = nn.Linear(config.width, config.width)


def test_arguments_that_would_not_rebuild_the_model_are_refused_before_writing(
    tmp_path: Path,
) -> None:
    model = NeedsConfig(SimpleNamespace(width=4))
    with pytest.raises(tk.InitArgsError, match=r"init_args=\{'config': \.\.\.\} with JSON values"):
        tk.save_model(model, tmp_path / "m")
    with pytest.raises(tk.InitArgsError, match=r"cannot be rebuilt.*AttributeError"):
        tk.save_model(model, tmp_path / "m", init_args={"config": {"width": 4}})
    assert not (tmp_path / "m").exists()


# ---- hostile builder records ---------------------------------------------------------------


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit setting the dotted ``key`` of config.json to ``value``."""

    def edit(document: dict[str, Any]) -> None:
        *parents, last = key.split(".")
        node = document
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return edit


def _builder(name: str, klass: str, spec: Any) -> Callable[[dict[str, Any]], None]:
    def edit(document: dict[str, Any]) -> None:
        document.update({"class": klass, "builder": {"name": name, "spec": spec}})

    return edit


GPT2 = "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"
HF_SPEC = {"architecture": "GPT2LMHeadModel", "model_type": "gpt2", "config": {}, "kwargs": {}}
TIMM = "timm.models.resnet.ResNet"
TV = "torchvision.models.resnet.ResNet"

HOSTILE_RECORDS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "unknown builder": (_builder("nosuch", GPT2, {}), "does not know"),
    "odd builder name": (_builder("../evil", GPT2, {}), r"builder\.name .* not of the expected"),
    "spec not an object": (_builder("transformers", GPT2, ["x"]), "must be an object"),
    "builder not an object": (_set("builder", "transformers"), "must be an object"),
    "oversized spec": (
        _builder("zoo", "tests.test_builders.ZooNet", {"x": "a" * (1 << 20)}),
        "bytes of JSON",
    ),
    "bad tag in spec": (_builder("zoo", "tests.test_builders.ZooNet", {"$tuple": 3}), "spec"),
    "class outside transformers": (
        _builder("transformers", "torchkeep.models.Net", HF_SPEC),
        "outside the 'transformers.'",
    ),
    "class outside timm": (
        _builder("timm", "os.path.Thing", {"model_name": "resnet18", "kwargs": {}}),
        "outside the 'timm.'",
    ),
    "odd model_type": (
        _builder("transformers", GPT2, {**HF_SPEC, "model_type": "../x"}),
        "model_type",
    ),
    "auto_map": (
        _builder("transformers", GPT2, {**HF_SPEC, "config": {"auto_map": {"AutoModel": "x.Y"}}}),
        "'auto_map'",
    ),
    "nested auto_map": (
        _builder("transformers", GPT2, {**HF_SPEC, "config": {"text_config": {"auto_map": {}}}}),
        r"'text_config\.auto_map'",
    ),
    "private config key": (
        _builder("transformers", GPT2, {**HF_SPEC, "config": {"_attn_implementation": "x"}}),
        "private",
    ),
    "hub attention kernel": (
        _builder("transformers", GPT2, {**HF_SPEC, "attn_implementation": "kernels-community/x"}),
        "attn_implementation",
    ),
    "architecture not a name": (
        _builder("transformers", GPT2, {**HF_SPEC, "architecture": "os.system"}),
        "architecture",
    ),
    "timm pretrained": (
        _builder("timm", TIMM, {"model_name": "resnet18", "kwargs": {"pretrained": True}}),
        "'pretrained'",
    ),
    "timm checkpoint_path": (
        _builder("timm", TIMM, {"model_name": "resnet18", "kwargs": {"checkpoint_path": "x"}}),
        "'checkpoint_path'",
    ),
    "timm hub name": (
        _builder("timm", TIMM, {"model_name": "hf-hub:evil/model", "kwargs": {}}),
        "model_name",
    ),
    "buffer_dtype not a dtype": (_set("buffer_dtype", "Tensor"), "not a torch dtype"),
    "torchvision weights": (
        _builder("torchvision", TV, {"model_name": "resnet18", "kwargs": {"weights": "DEFAULT"}}),
        "'weights'",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_RECORDS)
@pytest.mark.usefixtures("zoo")
def test_hostile_builder_records_are_typed_errors_before_any_import(
    case: str, tmp_path: Path, net: Net, no_imports: None
) -> None:
    edit, message = HOSTILE_RECORDS[case]
    bundle = tk.save_model(net, tmp_path / "net")
    _forge(bundle, edit)
    with pytest.raises(tk.CorruptFileError, match=message):  # InvalidDocumentError, or a tag's
        tk.load_model(bundle)
    assert not tk.verify(bundle).ok or case == "unknown builder"


def test_a_builder_class_outside_its_library_never_runs_that_module(
    tmp_path: Path, net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    canary = tmp_path / "canary"
    (site / "evilmod.py").write_text(f"open({str(canary)!r}, 'w').write('ran')\nclass Net: pass\n")
    prove_live(f"import sys; sys.path.insert(0, {str(site)!r}); import evilmod", canary)
    monkeypatch.syspath_prepend(str(site))
    bundle = tk.save_model(net, tmp_path / "net")
    _forge(bundle, _builder("transformers", "evilmod.Net", HF_SPEC))
    with pytest.raises(InvalidDocumentError, match=r"outside the 'transformers\.' package"):
        tk.load_model(bundle)
    assert not canary.exists()


def test_a_missing_library_is_a_typed_error_naming_what_to_install(
    tmp_path: Path, net: Net
) -> None:
    try:
        import timm  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("timm is installed here; this checks a process without it")
    bundle = tk.save_model(net, tmp_path / "net")
    _forge(bundle, _builder("timm", TIMM, {"model_name": "resnet18", "kwargs": {}}))
    with pytest.raises(tk.MissingDependencyError, match="pip install timm"):
        tk.load_model(bundle)


# ---- transformers: recipes given as init_args, and records only the library can check ---------


@pytest.fixture(scope="module")
def hf() -> Any:
    transformers = require_transformers_with_torch()
    transformers.logging.set_verbosity_error()
    return transformers


def _gpt2_config_model(hf: Any, cls: Any) -> nn.Module:
    config = hf.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model: nn.Module = cls(config)
    return model.eval()


def _gpt2(hf: Any) -> nn.Module:
    return _gpt2_config_model(hf, hf.GPT2LMHeadModel)


def test_init_args_config_as_a_dict_or_object_rebuilds_a_transformers_model(
    hf: Any, tmp_path: Path
) -> None:
    model = _gpt2(hf)
    ids = torch.randint(0, 50, (1, 5))
    config: Any = model.config
    for name, init_args in [("dict", {"config": config.to_dict()}), ("object", {"config": config})]:
        bundle = tk.save_model(model, tmp_path / name, init_args=init_args)
        with torch.no_grad():
            assert torch.equal(tk.load_model(bundle)(ids).logits, model(ids).logits)
    with pytest.raises(tk.InitArgsError, match="init_args\\['config'\\] is a str"):
        tk.save_model(model, tmp_path / "junk", init_args={"config": "gpt2"})
    assert not (tmp_path / "junk").exists()


def test_constructor_keywords_a_config_does_not_hold_are_checked_by_the_rebuild(
    hf: Any, tmp_path: Path
) -> None:
    config = hf.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        vocab_size=40, max_position_embeddings=16,
    )  # fmt: skip
    model = hf.BertModel(config, add_pooling_layer=False).eval()
    with pytest.raises(tk.InitArgsError, match=r"'pooler\.dense\.weight' is rebuilt but not"):
        tk.save_model(model, tmp_path / "bert")
    assert not (tmp_path / "bert").exists()
    bundle = tk.save_model(model, tmp_path / "bert", init_args={"add_pooling_layer": False})
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        assert torch.equal(
            tk.load_model(bundle)(ids).last_hidden_state, model(ids).last_hidden_state
        )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model_type", "no_such_type", "'builder.spec.model_type' is 'no_such_type'"),
        ("architecture", "AutoConfig", "'builder.spec.architecture' is 'AutoConfig'"),
    ],
)
def test_names_the_library_does_not_register_are_refused_before_the_class_is_imported(
    hf: Any,
    key: str,
    value: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bundle = tk.save_model(_gpt2(hf), tmp_path / "gpt2")
    _forge(bundle, _set(f"builder.spec.{key}", value))
    _tripwire(monkeypatch, libraries=False)  # the library's own registry is asked
    with pytest.raises(InvalidDocumentError, match=message):
        tk.load_model(bundle)


def test_a_recipe_that_builds_another_class_than_recorded_is_refused(
    hf: Any, tmp_path: Path
) -> None:
    bundle = tk.save_model(_gpt2(hf), tmp_path / "gpt2")
    _forge(bundle, _set("builder.spec.architecture", "GPT2Model"))
    with pytest.raises(tk.ModelClassNotFoundError, match=r"rebuilt bundle .* as a .*GPT2Model"):
        tk.load_model(bundle)


def test_keepable_before_a_transformers_model_records_its_config_object(
    hf: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = type("HFMine", (tk.Keepable, hf.GPT2LMHeadModel), {"__module__": __name__})
    monkeypatch.setattr(sys.modules[__name__], "HFMine", mine, raising=False)
    model = _gpt2_config_model(hf, mine)
    bundle = tk.save_model(model, tmp_path / "mine")
    recorded = json.loads((bundle / "config.json").read_text())["init"]["kwargs"]["config"]
    assert recorded["$config"]["model_type"] == "gpt2"
    assert _manifest(bundle)["format_version"] == 2  # torchkeep 0.2.0 cannot decode "$config"
    loaded = tk.load_model(bundle)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert type(loaded) is mine
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_a_recorded_config_object_is_checked_like_a_builder_spec(
    hf: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = type("HFMine", (tk.Keepable, hf.GPT2LMHeadModel), {"__module__": __name__})
    monkeypatch.setattr(sys.modules[__name__], "HFMine", mine, raising=False)
    bundle = tk.save_model(_gpt2_config_model(hf, mine), tmp_path / "mine")
    _forge(bundle, _set("init.kwargs.config.$config.config.auto_map", {"AutoModel": "x.Y"}))
    _tripwire(monkeypatch)
    with pytest.raises(InvalidDocumentError, match="'auto_map'"):
        tk.load_model(bundle)


def test_a_config_sized_beyond_the_weights_file_is_refused_before_allocating(
    hf: Any, tmp_path: Path
) -> None:
    bundle = tk.save_model(_gpt2(hf), tmp_path / "gpt2")
    _forge(bundle, _set("builder.spec.config.vocab_size", 10**9))  # 64 GB of embeddings
    with pytest.raises(tk.InitArgsError, match=r"make a model of [\d,]+ bytes, but its weights"):
        tk.load_model(bundle)


def test_a_model_cast_after_it_was_built_loads_with_the_same_buffers(
    hf: Any, tmp_path: Path
) -> None:
    config = hf.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    model = hf.LlamaForCausalLM(config).to(torch.bfloat16).eval()  # casts inv_freq too
    bundle = tk.save_model(model, tmp_path / "llama")
    assert json.loads((bundle / "config.json").read_text())["buffer_dtype"] == "bfloat16"
    assert _manifest(bundle)["format_version"] == 2
    loaded = tk.load_model(bundle)
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

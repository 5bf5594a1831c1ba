"""Builder for Hugging Face ``transformers`` models (any ``PreTrainedModel`` the library defines).

Recorded: the model's class name, its config's ``model_type`` and ``config.to_dict()``, the
attention implementation, and any extra constructor keywords given as ``init_args``. Rebuilt
with the config class the library registers for that ``model_type`` and the model class the
library exports under that name: nothing is imported from the bundle, and a config never names
code (keys that make ``transformers`` fetch or run code are refused, see :data:`FORBIDDEN`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from torch import nn

from ...errors import InitArgsError, InvalidDocumentError
from ...schema import Map, Object, Satisfies, Schema, Str, validate
from .registry import Builder, Spec, import_library

NAME = "transformers"
INSTALL = "'torchkeep[transformers]'"
MAX_CONFIG_KEYS = 4096

FORBIDDEN = frozenset(
    {
        "auto_map",  # custom code from the Hub (trust_remote_code)
        "quantization_config",  # quantizer back-ends, replaced weights
        "attn_implementation",  # may name a Hub kernel, which is downloaded
        "_attn_implementation",
        "_attn_implementation_internal",
        "_experts_implementation",
        "trust_remote_code",
        "custom_pipelines",
    }
)
"""Config keys a bundle may not hold (at any depth): each makes ``transformers`` fetch or run
code, or replaces the recorded weights. Other keys starting with ``_`` are refused too, except
``_name_or_path``."""

ATTENTION = frozenset({"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"})
"""Attention implementations a bundle may ask for: built into ``transformers`` (the flash ones
need their package installed); never a Hub kernel."""


def _config_problem(config: Mapping[str, Any], where: str = "") -> str | None:
    """The first forbidden key at any depth: in nested objects, in lists, and under keys that
    are not names (an int-keyed ``per_layer_config`` entry is a config too)."""
    for key, value in config.items():
        name = f"{where}{key}"
        if isinstance(key, str) and (
            key in FORBIDDEN or (key.startswith("_") and key != "_name_or_path")
        ):
            return (
                f"holds key {name!r}, which makes transformers fetch or run code (or is "
                "private to the library); a bundle records only plain settings"
            )
        found = _nested_problem(value, name)
        if found is not None:
            return found
    return None


def _nested_problem(value: object, where: str) -> str | None:
    if isinstance(value, Mapping):
        return _config_problem(value, f"{where}.")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _nested_problem(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def _attention_problem(name: str) -> str | None:
    if name in ATTENTION:
        return None
    return f"{name[:80]!r} is not one of {', '.join(sorted(ATTENTION))}"


_CONFIG_FIELDS: dict[str, Schema] = {
    "model_type": Str(max_len=64, pattern=r"[a-z0-9][a-z0-9_\-]*"),
    "config": Satisfies(Map(max_len=MAX_CONFIG_KEYS), _config_problem),
    "attn_implementation": Satisfies(Str(max_len=64), _attention_problem),
}
CONFIG_SCHEMA = Object(_CONFIG_FIELDS, required=("model_type", "config"))
"""A config object recorded as a constructor argument (``{"$config": spec}``)."""
SCHEMA = Object(
    {
        **_CONFIG_FIELDS,
        "architecture": Str(max_len=128, pattern=r"[A-Za-z_][A-Za-z0-9_]*"),
        "kwargs": Map(max_len=64),
    },
    required=("architecture", "model_type", "config", "kwargs"),
)
"""A model rebuilt by this builder: its class name, config and extra constructor keywords."""


def _library() -> ModuleType:
    return import_library("transformers", INSTALL)


def _matches(model: nn.Module) -> bool:
    module = sys.modules.get("transformers")
    return (
        module is not None
        and type(model).__module__.startswith("transformers.")
        and isinstance(model, module.PreTrainedModel)
    )


def _config_dict(config: object, library: ModuleType) -> dict[str, Any]:
    if isinstance(config, library.PretrainedConfig):
        data: dict[str, Any] = config.to_dict()
        return data
    if isinstance(config, Mapping):
        return dict(config)
    raise InitArgsError(
        f"init_args['config'] is a {type(config).__name__}; give the model's config object "
        "or its config.to_dict() (or leave init_args out: the model's own config is recorded)"
    )


def _config_spec(config: Any) -> Spec:
    """A config object as a spec (``model_type``, ``config.to_dict()``, attention)."""
    spec: Spec = {"model_type": config.model_type, "config": config.to_dict()}
    attention = getattr(config, "_attn_implementation", None)
    if isinstance(attention, str):
        spec["attn_implementation"] = attention
    return spec


def config_value(value: object) -> Spec | None:
    """``value``'s spec if it is a transformers config object (e.g. the ``config`` argument of
    a ``class Mine(tk.Keepable, GPT2LMHeadModel)``), else None; transformers is not imported.

    Raises:
        InitArgsError: the config holds keys a bundle may not record.
    """
    module = sys.modules.get("transformers")
    if module is None or not isinstance(value, module.PretrainedConfig):
        return None
    spec = _config_spec(value)
    try:
        validate(spec, CONFIG_SCHEMA, source="the transformers config")
    except InvalidDocumentError as exc:
        raise InitArgsError(f"a transformers config argument cannot be stored: {exc}") from None
    return spec


def make_config(spec: Spec) -> Any:
    """The config object a :func:`config_value` spec describes, made by the installed library."""
    return _make_config(spec, _library())


def _record(model: nn.Module, init_args: Mapping[str, Any]) -> Spec:
    library = _library()
    model_config: Any = model.config
    own: dict[str, Any] = model_config.to_dict()
    config = _config_dict(init_args.get("config", model_config), library)
    spec: Spec = {
        "architecture": type(model).__name__,
        "model_type": str(config.get("model_type") or own.get("model_type") or ""),
        "config": config,
        "kwargs": {k: v for k, v in init_args.items() if k != "config"},
    }
    attention = getattr(model_config, "_attn_implementation", None)
    if isinstance(attention, str):
        spec["attn_implementation"] = attention
    rebuilt: dict[str, Any] = _make_config(spec, library).to_dict()
    differing = sorted(k for k in {*own, *rebuilt} if own.get(k) != rebuilt.get(k))
    if differing:
        raise InitArgsError(
            f"the config recorded for {type(model).__qualname__} does not rebuild the model's "
            f"config (it differs in {', '.join(map(repr, differing[:5]))}). Leave init_args "
            "out to record the model's own config, or pass init_args={'config': model.config}"
        )
    return spec


def _make_config(spec: Spec, library: ModuleType) -> Any:
    mapping = library.models.auto.configuration_auto.CONFIG_MAPPING
    model_type = spec["model_type"]
    if model_type not in mapping:
        raise InvalidDocumentError(
            f"the bundle's config.json: key 'builder.spec.model_type' is {model_type!r}, which "
            f"transformers {library.__version__} does not register. Upgrade transformers if the "
            "model type is newer, or register its config with AutoConfig.register"
        )
    config = mapping[model_type].from_dict(dict(spec["config"]))
    if "attn_implementation" in spec:
        config._attn_implementation = spec["attn_implementation"]
    return config


def _build(spec: Spec) -> nn.Module:
    library = _library()
    config = _make_config(spec, library)
    model_class = getattr(library, spec["architecture"], None)
    if not (isinstance(model_class, type) and issubclass(model_class, library.PreTrainedModel)):
        raise InvalidDocumentError(
            f"the bundle's config.json: key 'builder.spec.architecture' is "
            f"{spec['architecture']!r}, which is not a model class transformers "
            f"{library.__version__} exports. Upgrade transformers, or load the weights with "
            "tk.load_weights into a model you build"
        )
    model: nn.Module = model_class(config, **spec["kwargs"])
    return model


def _tie(model: nn.Module) -> None:
    model.tie_weights()  # type: ignore[operator]


BUILDER = Builder(
    name=NAME,
    matches=_matches,
    record=_record,
    build=_build,
    tie=_tie,
    schema=SCHEMA,
    class_prefix="transformers.",
)

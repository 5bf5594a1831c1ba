"""restore() checks every object against the step before changing any of them.

Each test saves a step, builds live objects that do not fit it in one way, and asserts that
restore raises a typed error naming the entry and what differs, while every byte of live state
(parameters, buffers, optimizer state and hyperparameters, scheduler, the torch, Python and
NumPy generators) is exactly what it was before the call.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep as tk
from torchkeep.checkpoint.layout import RNG_ENTRY
from torchkeep.hashing import hash_file


def _mlp(hidden: int = 8, out: int = 3, extra: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, out)]
    if extra:
        layers.append(nn.Linear(out, out))
    return nn.Sequential(*layers)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()


def _saved(tmp_path: Path, **objects: Any) -> tk.CheckpointManager:
    mgr = tk.CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, **objects)
    return mgr


def _bits(value: Any) -> Any:
    """A deep, comparable copy: tensors as (dtype, shape, raw bytes)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        return (str(value.dtype), tuple(value.shape), bytes(flat.view(torch.uint8).numpy()))
    if isinstance(value, dict):
        return {key: _bits(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_bits(item) for item in value)
    if isinstance(value, np.ndarray):
        return value.tobytes()
    return copy.deepcopy(value)


def _live(**objects: Any) -> Any:
    """Every byte a restore could change, generators included."""
    return _bits(
        {
            **{name: obj.state_dict() for name, obj in objects.items()},
            "python": random.getstate(),
            "numpy": list(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
    )


def _refused(
    mgr: tk.CheckpointManager,
    error: type[Exception],
    match: str,
    *,
    step: int | None = None,
    **objects: Any,
) -> Exception:
    """Restore must raise ``error`` and change nothing at all."""
    random.random(), np.random.rand(), torch.rand(1)  # generators differ from the saved ones
    before = _live(**objects)
    with pytest.raises(error, match=match) as info:
        mgr.restore(step, **objects)
    assert _live(**objects) == before
    return info.value


def test_a_layer_of_another_shape_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = _mlp(out=3)
    mgr = _saved(tmp_path, model=saved)
    live = _mlp(out=5)
    # torch alone copies the matching layer before it raises: the damage restore must avoid
    naive = _mlp(out=5)
    with pytest.raises(RuntimeError):
        naive.load_state_dict(tk.load_state_dict(mgr.directory / "step-00000001"))
    assert torch.equal(naive[0].weight, saved[0].weight)
    error = _refused(mgr, tk.StateDictMismatchError, r"entry 'model'", model=live)
    assert "2.weight: saved shape [3, 8], object [5, 8]" in str(error)
    assert "build the object with the sizes" in str(error)


@pytest.mark.parametrize(
    ("live", "listed"),
    [(lambda: _mlp(extra=True), "missing in the step"), (lambda: _mlp()[:1], "not in the object")],
)
def test_missing_or_extra_keys_change_nothing_unless_strict_is_off(
    tmp_path: Path, live: Callable[[], nn.Module], listed: str
) -> None:
    torch.manual_seed(0)
    saved = _mlp()
    mgr = _saved(tmp_path, model=saved)
    model = live()
    error = _refused(mgr, tk.StateDictMismatchError, listed, model=model)
    assert "strict=False" in str(error)
    mgr.restore(model=model, strict=False)
    assert torch.equal(model[0].weight, saved[0].weight)


def test_a_dtype_change_changes_nothing_unless_strict_is_off(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = _mlp()
    mgr = _saved(tmp_path, model=saved)
    live = _mlp().double()
    _refused(
        mgr,
        tk.StateDictMismatchError,
        r"saved dtype torch.float32, object torch.float64",
        model=live,
    )
    mgr.restore(model=live, strict=False)
    assert torch.equal(live[0].weight, saved[0].weight.double())


def _split(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups: weights with decay, biases without (the common split)."""
    named = dict(model.named_parameters())
    return [
        {"params": [p for n, p in named.items() if n.endswith("weight")], "weight_decay": 0.1},
        {"params": [p for n, p in named.items() if n.endswith("bias")], "weight_decay": 0.0},
    ]


def test_an_optimizer_with_another_group_count_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _train(model, opt)
    mgr = _saved(tmp_path, model=model, optimizer=opt)
    live = _mlp()
    live_opt = torch.optim.AdamW(_split(live), lr=0.5)
    _train(live, live_opt, 1)
    error = _refused(
        mgr, tk.StateDictMismatchError, "1 parameter groups, the optimizer 2", model=live,
        optimizer=live_opt,
    )  # fmt: skip
    assert "optimizer=None" in str(error)


def test_a_group_with_another_parameter_count_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(_split(model), lr=0.01, momentum=0.9)
    _train(model, opt)
    mgr = _saved(tmp_path, model=model, optimizer=opt)
    live = _mlp()
    params = list(live.parameters())  # [w0, b0, w2, b2]: 3 + 1 instead of 2 + 2
    live_opt = torch.optim.SGD(
        [{"params": params[:3]}, {"params": params[3:]}], lr=0.3, momentum=0.5
    )
    _train(live, live_opt, 1)
    _refused(
        mgr,
        tk.StateDictMismatchError,
        "parameter group 0: the step has 2 parameters, the optimizer 3",
        model=live,
        optimizer=live_opt,
    )


@pytest.mark.parametrize("stepped", [False, True], ids=["fresh", "stepped"])
def test_parameter_shapes_differing_only_in_optimizer_state_change_nothing(
    tmp_path: Path, stepped: bool
) -> None:
    torch.manual_seed(0)
    model = _mlp(hidden=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt)
    mgr = _saved(tmp_path, optimizer=opt)
    live = _mlp(hidden=6)  # same groups and counts, other shapes: torch would accept it
    live_opt = torch.optim.Adam(live.parameters(), lr=0.2)
    if stepped:
        _train(live, live_opt, 1)
    naive = copy.deepcopy(live_opt)
    naive.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's check lets it through
    error = _refused(
        mgr, tk.StateDictMismatchError, "state 'exp_avg' of parameter 0", optimizer=live_opt
    )
    assert "[8, 4]" in str(error)
    assert "[6, 4]" in str(error)


def test_a_scheduler_of_another_type_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    _train(model, opt)
    sched.step()
    mgr = _saved(tmp_path, model=model, optimizer=opt, scheduler=sched)
    live = _mlp()
    live_opt = torch.optim.SGD(live.parameters(), lr=0.7)
    live_sched = torch.optim.lr_scheduler.CosineAnnealingLR(live_opt, T_max=10)
    error = _refused(
        mgr, tk.StateDictMismatchError, "entry 'scheduler'", model=live, optimizer=live_opt,
        scheduler=live_sched,
    )  # fmt: skip
    assert "step_size" in str(error)
    assert "T_max" in str(error)


def test_a_scheduler_over_another_group_count_changes_nothing(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5)
    mgr = _saved(tmp_path, scheduler=sched)
    live_opt = torch.optim.SGD(_split(_mlp()), lr=0.1)
    live_sched = torch.optim.lr_scheduler.LambdaLR(live_opt, [lambda e: 0.5, lambda e: 0.1])
    _refused(
        mgr, tk.StateDictMismatchError, "base_lrs: 1 values saved, 2 expected", scheduler=live_sched
    )


def test_a_scaler_saved_disabled_changes_nothing(tmp_path: Path) -> None:
    mgr = _saved(tmp_path, scaler=torch.amp.GradScaler("cpu", enabled=False))
    live = torch.amp.GradScaler("cpu", init_scale=1024.0)
    if not live.state_dict():
        pytest.skip("this torch cannot enable a GradScaler on the CPU")
    _refused(mgr, tk.StateDictMismatchError, "saved while disabled", scaler=live)


class Refuses:
    """A user object whose own load_state_dict rejects the saved state."""

    def state_dict(self) -> dict[str, int]:
        return {"position": 3}

    def load_state_dict(self, state: dict[str, int]) -> None:
        raise KeyError("cursor")


def test_a_user_object_that_refuses_its_state_is_loaded_before_model_and_optimizer(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt)
    mgr = _saved(tmp_path, model=model, optimizer=opt, sampler=Refuses())
    live = _mlp()
    live_opt = torch.optim.SGD(live.parameters(), lr=0.2, momentum=0.3)
    error = _refused(
        mgr, tk.StateDictMismatchError, "Refuses.load_state_dict refused it", model=live,
        optimizer=live_opt, sampler=Refuses(),
    )  # fmt: skip
    assert isinstance(error.__cause__, KeyError)


def _rewrite_rng(step: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change the rng entry of state.json and re-record its hash (a well-formed, hostile step)."""
    state_path, manifest_path = step / "state.json", step / "manifest.json"
    state = json.loads(state_path.read_text())
    edit(state["entries"][RNG_ENTRY]["value"])
    state_path.write_text(json.dumps(state))
    manifest = json.loads(manifest_path.read_text())
    size, digest = hash_file(state_path)
    manifest["files"]["state.json"] = {"size": size, "hash": digest}
    manifest_path.write_text(json.dumps(manifest))


def _short_python_state(rng: dict[str, Any]) -> None:
    rng["python"]["$tuple"][1]["$tuple"] = [1, 2, 3]


def _python_state_as_text(rng: dict[str, Any]) -> None:
    rng["python"] = "seed"


def _numpy_state_of_another_generator(rng: dict[str, Any]) -> None:
    rng["numpy"]["$tuple"][0] = "PCG64"


def _unknown_generator(rng: dict[str, Any]) -> None:
    rng["quantum"] = 1


def _no_torch_state(rng: dict[str, Any]) -> None:
    del rng["torch"]


@pytest.mark.parametrize(
    "edit",
    [
        _short_python_state,
        _python_state_as_text,
        _numpy_state_of_another_generator,
        _unknown_generator,
        _no_torch_state,
    ],
)
def test_a_malformed_rng_entry_changes_nothing_and_the_step_is_skipped(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None]
) -> None:
    torch.manual_seed(0)
    model = _mlp()
    mgr = tk.CheckpointManager(tmp_path / "ckpt", keep_last=None)
    mgr.save(1, model=model)
    older = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    mgr.save(2, model=model)
    _rewrite_rng(mgr.directory / "step-00000002", edit)
    live = _mlp()
    error = _refused(
        mgr, tk.CorruptFileError, "random generator states are malformed", step=2, model=live
    )
    assert "skipped" in str(error)
    with pytest.warns(UserWarning, match="step 2 is unusable.*random generator states"):
        assert mgr.restore(model=live).step == 1  # the latest: skipped like a damaged step
    assert torch.equal(live[0].weight, older["0.weight"])
    with pytest.raises(tk.CorruptFileError, match="malformed"):  # damaged: never half-used
        mgr.restore(2, model=live, restore_rng=False)
    assert torch.equal(live[0].weight, older["0.weight"])


# --------------------------------------------------------------------------------------------
# load_weights: strict or not, a failure leaves the model as it was


class Picky(nn.Linear):
    """A layer whose own loading code refuses, after the layers before it were loaded."""

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("picky layer refuses")


def test_load_weights_strict_refuses_a_layer_of_another_shape_and_changes_nothing(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    tk.save_weights(_mlp(out=3), tmp_path / "w.safetensors")
    live = _mlp(out=5)
    before = _live(model=live)
    with pytest.raises(tk.StateDictMismatchError, match=r"2\.weight"):
        tk.load_weights(live, tmp_path / "w.safetensors")
    assert _live(model=live) == before


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("failure", ["post hook", "layer"])
def test_load_weights_rolls_back_when_the_models_own_loading_code_raises(
    tmp_path: Path, strict: bool, failure: str
) -> None:
    torch.manual_seed(0)
    tk.save_weights(_mlp(), tmp_path / "w.safetensors")
    live = _mlp()
    if failure == "layer":
        picky = Picky(8, 3)
        live[2] = picky
    else:

        def refuse(module: nn.Module, keys: Any) -> None:
            raise RuntimeError("post hook refuses")

        live.register_load_state_dict_post_hook(refuse)
    before = _live(model=live)
    # torch alone leaves the model half loaded
    naive = copy.deepcopy(live)
    with pytest.raises(RuntimeError, match="refuses"):
        naive.load_state_dict(tk.load_state_dict(tmp_path / "w.safetensors"))
    assert _live(model=naive) != before
    with pytest.raises(tk.StateDictMismatchError, match="put back as it was") as info:
        tk.load_weights(live, tmp_path / "w.safetensors", strict=strict)
    assert "refuses" in str(info.value)
    assert _live(model=live) == before


def test_an_optimizer_of_another_type_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt)
    mgr = _saved(tmp_path, optimizer=opt)
    live = _mlp()
    live_opt = torch.optim.Adam(live.parameters(), lr=0.3)
    _train(live, live_opt, 1)
    _refused(mgr, tk.StateDictMismatchError, "another optimizer type than Adam", optimizer=live_opt)


def test_a_model_whose_own_loading_code_raises_is_put_back_by_restore(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt)
    mgr = _saved(tmp_path, model=model, optimizer=opt)
    live = _mlp()
    live[2] = Picky(8, 3)  # same keys and shapes: only its own code can refuse
    live_opt = torch.optim.SGD(live.parameters(), lr=0.2, momentum=0.3)
    _train(live, live_opt, 1)
    error = _refused(
        mgr, tk.StateDictMismatchError, "picky layer refuses", model=live, optimizer=live_opt
    )
    assert isinstance(error.__cause__, RuntimeError)

"""torchkeep checkpoints inside the frameworks people train with.

Each module is import-guarded and needs its extra; importing it without the framework raises
:class:`~torchkeep.MissingDependencyError` with the install command:

- :mod:`torchkeep.integrations.lightning` (``torchkeep[lightning]``): a ``CheckpointIO`` plugin
  for ``Trainer`` and ``Fabric``, and ``TorchkeepModelParallelStrategy`` (FSDP2/TP, sharded
  steps; :mod:`torchkeep.integrations.lightning_sharded`);
- :mod:`torchkeep.integrations.transformers` (``torchkeep[transformers]``): a seal callback and
  ``last_valid_checkpoint`` for the Hugging Face ``Trainer``, and a full-takeover trainer;
- :mod:`torchkeep.integrations.accelerate` (``torchkeep[accelerate]``): ``save_state`` and
  ``load_state`` over :class:`~torchkeep.CheckpointManager`, and ``use_torchkeep_for_weights``.

The integrations import torchkeep and the framework; torchkeep never imports them.
"""

"""Sharded checkpoints written by N ranks through torch.distributed.checkpoint (DCP).

Internals of :mod:`torchkeep.distributed` (the public import path) and of the distributed
``CheckpointManager``: the on-disk layout (:mod:`.layout`), the per-chunk hashing of shard
files (:mod:`.segments`), DCP's ``StorageWriter``/``StorageReader`` (:mod:`.writer`,
:mod:`.reader`), the checkpoint process group and error translation (:mod:`.collective`), the
manager's collective save/restore (:mod:`.session`), single-process consolidation
(:mod:`.consolidate`) and the import of foreign DCP checkpoints (:mod:`.dcp_import`).

Importing this package does not import ``torch.distributed.checkpoint``: its modules do.
"""

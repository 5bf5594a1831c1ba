"""Engine-level pieces for torch.distributed.checkpoint (DCP) users: no pickle, verified, atomic.

``TorchkeepStorageWriter`` writes a DCP state dict as a torchkeep sharded step (one
safetensors file per rank, JSON index with per-chunk XXH3-128 hashes, ``manifest.json`` as the
commit); ``TorchkeepStorageReader`` reads it back on any number of ranks, verifying every chunk
before it is used; ``NoPickleLoadPlanner`` refuses DCP's pickled byte items. The
``CheckpointManager`` uses them when ``torch.distributed`` is initialised.

Example:
    >>> import torch.distributed.checkpoint as dcp
    >>> from torchkeep.distributed import TorchkeepStorageWriter, TorchkeepStorageReader
    >>> dcp.save(state, storage_writer=TorchkeepStorageWriter("ckpt/step-00000100"))
    >>> dcp.load(state, storage_reader=TorchkeepStorageReader("ckpt/step-00000100"),
    ...          planner=NoPickleLoadPlanner())
"""

from .checkpoint.distributed.reader import NoPickleLoadPlanner, TorchkeepStorageReader
from .checkpoint.distributed.writer import TorchkeepStorageWriter
from .errors import DistributedCheckpointError

__all__ = [
    "DistributedCheckpointError",
    "NoPickleLoadPlanner",
    "TorchkeepStorageReader",
    "TorchkeepStorageWriter",
]

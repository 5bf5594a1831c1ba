"""Write tests/golden/torchkeep-0.1.0 with torchkeep 0.1.0 itself (kept to show how it was made).

Run once, from a checkout of the 0.1.0 commit (6533a43), with that checkout's src/ first:
    PYTHONPATH=<checkout>/src python tests/golden/make_torchkeep_0_1_0.py <this folder>/...
"""

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

import torchkeep as tk

out = Path(sys.argv[1])
torch.manual_seed(0)
random.seed(0)
np.random.seed(0)
model = torch.nn.Linear(3, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model(torch.randn(4, 3)).sum().backward()
opt.step()
mgr = tk.CheckpointManager(out / "ckpt", keep_last=None)
mgr.save(7, model=model, optimizer=opt, epoch=3)
# What the generators give right after the save: a resume must give the same.
expected = {
    "torch": torch.rand(4).tolist(),
    "python": random.random(),
    "numpy": float(np.random.rand()),
}
(out / "expected_after_resume.json").write_text(json.dumps(expected, indent=1) + "\n")
print(tk.__version__, tk.__file__)

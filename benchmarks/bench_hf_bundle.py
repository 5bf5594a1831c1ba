"""Load time of a transformers Llama bundle vs ``from_pretrained`` of a ``save_pretrained``
directory of the same model (tiny but not trivial: 8 layers, 512 wide, 32k vocab, random
init, no download). Each load runs in a fresh interpreter with the library and its Llama
module already imported, so only the load is timed (a cold page cache is not forced: the
bundle is hashed on every load, the save_pretrained directory is not); the median of
``--repeat`` runs is printed.

    PYTHONPATH=src python benchmarks/bench_hf_bundle.py --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TIMED = {
    "tk.load_model(bundle)": "tk.load_model(root / 'bundle')",
    "from_pretrained(dir)": "transformers.LlamaForCausalLM.from_pretrained(root / 'hf')",
    "LlamaForCausalLM(config) (random init)": (
        "transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(root / 'hf'))"
    ),
}

CHILD = """
import sys, time, torch, transformers, torchkeep as tk
from pathlib import Path
transformers.logging.set_verbosity_error()
root = Path(sys.argv[1])
transformers.LlamaForCausalLM  # the library's lazy import of the model module, not timed
start = time.perf_counter()
model = {expr}
print(time.perf_counter() - start)
"""


def _save(root: Path) -> int:
    import torch
    import transformers

    import torchkeep as tk

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=32000,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "hf")
    tk.save_model(model, root / "bundle")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = _save(root)
        results = {}
        for label, expr in TIMED.items():
            times = [
                float(
                    subprocess.run(
                        [sys.executable, "-c", CHILD.format(expr=expr), str(root)],
                        check=True, capture_output=True, text=True,
                    ).stdout.split()[-1]
                )
                for _ in range(args.repeat)
            ]  # fmt: skip
            results[label] = statistics.median(times)
        print(json.dumps({"parameters": params, "median_seconds": results}, indent=2))


if __name__ == "__main__":
    main()

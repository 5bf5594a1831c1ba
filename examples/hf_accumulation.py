"""A transformers GPT-2 loop with gradient accumulation, checkpointed with torchkeep.

    python examples/hf_accumulation.py --epochs 2 --save-dir /tmp/gpt2

The shape of the transformers ``run_clm_no_trainer`` loop: a GPT-2 built from a tiny config
(random init, nothing downloaded), AdamW without weight decay on biases and LayerNorm weights,
``get_linear_schedule_with_warmup``, ``--gradient-accumulation-steps`` micro-batches per
optimizer step, gradient clipping. The tokens are made here: each sequence counts up from a
random start by a random stride (modulo the vocabulary), so the loss falls.

Checkpoints are taken only at optimizer-step boundaries, and the step number is the number of
optimizer steps done (as in the transformers Trainer). Everything else follows from it: the
epoch, and the first micro-batch to run. A gradient half accumulated is never saved (it would
cost as much space as the weights); a run killed in the middle of an accumulation resumes from
the last checkpoint and runs those micro-batches again, in the same order and with the same
dropout (the generators are restored too), so it ends bit-identical to an uninterrupted run.
Each epoch uses ``(batches // accumulation) * accumulation`` micro-batches; the few left over
are skipped, like ``drop_last``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from _common import epoch_loader, make_deterministic
from torch.utils.data import TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

import torchkeep as tk


def counting_sequences(size: int, length: int, vocab: int, seed: int) -> TensorDataset:
    """``size`` token sequences ``start, start + stride, ...`` modulo ``vocab``."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (size, 1), generator=generator)
    stride = torch.randint(1, 4, (size, 1), generator=generator)
    return TensorDataset((start + stride * torch.arange(length)) % vocab)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """AdamW groups: weight decay on weight matrices, none on biases and LayerNorm weights."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        (no_decay if name.endswith("bias") or ".ln_" in name else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of a transformers training script, tiny defaults, plus the checkpoint ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-device-train-batch-size", type=int, default=8)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--num-warmup-steps", type=int, default=2)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-size", type=int, default=256, help="synthetic sequences")
    parser.add_argument("--block-size", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--vocab-size", type=int, default=128)
    parser.add_argument("--n-embd", type=int, default=32)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--logging-steps", type=int, default=2, help="optimizer steps per log")
    parser.add_argument("--save-dir", type=Path, default=Path("checkpoints/gpt2"))
    parser.add_argument("--save-steps", type=int, default=3, help="optimizer steps per save")
    parser.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train with accumulation, checkpointing at optimizer steps; resume from ``--save-dir``."""
    args = parse_args(argv)
    make_deterministic(args.seed)
    dataset = counting_sequences(args.train_size, args.block_size, args.vocab_size, args.seed)
    config = GPT2Config(
        vocab_size=args.vocab_size,
        n_positions=args.block_size,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        bos_token_id=args.vocab_size - 1,
        eos_token_id=args.vocab_size - 1,
        loss_type="ForCausalLM",
    )
    model = GPT2LMHeadModel(config)  # random init from the seeded generator; lm_head is tied
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.learning_rate)
    accumulation, batch_size = args.gradient_accumulation_steps, args.per_device_train_batch_size
    steps_per_epoch = len(dataset) // batch_size // accumulation
    max_steps = args.epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, args.num_warmup_steps, max_steps)
    mgr = tk.CheckpointManager(args.save_dir, keep_last=args.keep_last)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    step, loss = 0, float("nan")  # optimizer steps done, the loss of the last one
    if mgr.latest_step is not None:  # restore() raises CheckpointNotFoundError on an empty folder
        restored = mgr.restore(**state)
        step, loss = restored.step, restored.metrics["loss"]
        print(f"resumed from step {step} (epoch {step // steps_per_epoch})")
    first_step = step
    model.train()
    while step < max_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        loader = epoch_loader(
            dataset,
            batch_size,
            seed=args.seed,
            epoch=epoch,
            start_batch=done_in_epoch * accumulation,
        )
        micro_batches = iter(loader)
        for _ in range(steps_per_epoch - done_in_epoch):
            loss = 0.0
            for _ in range(accumulation):
                (tokens,) = next(micro_batches)
                micro_loss = model(input_ids=tokens, labels=tokens).loss / accumulation
                micro_loss.backward()
                loss += micro_loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step % args.logging_steps == 0:
                lr = scheduler.get_last_lr()[0]
                print(f"epoch {epoch} step {step}/{max_steps} loss {loss:.4f} lr {lr:.2e}")
            if step % args.save_steps == 0 or step == max_steps:
                mgr.save(step, **state, metrics={"loss": loss}, epoch=epoch)
    print(
        f"hf_accumulation: optimizer steps {first_step}->{step} "
        f"({accumulation} micro-batches of {batch_size} each), last loss {loss:.4f}, "
        f"checkpoints {mgr.steps} in {args.save_dir}"
    )


if __name__ == "__main__":
    main()

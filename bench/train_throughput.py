"""Training throughput of every model: examples per second, measured here.

For each model: a forward pass alone (eval mode, no gradients) as the baseline, then full
training steps as trainer.train runs them (forward_logits, BCE-with-logits, backward, the
recipe's optimizer; autocast and GradScaler on GPU). Inputs are random waveforms of the
model's window, so this measures the network, not decoding.

    python bench/train_throughput.py                          # all models, CPU or the GPU
    python bench/train_throughput.py --models fcn4 samplecnn --batch 16 --steps 20
    python bench/train_throughput.py --device cpu --width 0.25 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from machine import cpu  # bench/machine.py
from torch import nn

from trainer.models import create_model, list_models
from trainer.models.registry import default_recipe
from trainer.recipes import RECIPES
from trainer.train import autocast_dtype, check_precision


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, steps: int, repeats: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``step``: the best of ``repeats`` rounds of ``steps`` calls.

    The best round, not the mean: on a shared machine the slow rounds measure the
    neighbours, not the model.
    """
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        best = min(best, (time.perf_counter() - started) / steps)
    return best


def measure(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = create_model(name, 50, width=args.width).to(device)
    recipe = RECIPES[default_recipe(name)]
    waves = torch.randn(args.batch, model.window_samples, device=device) * 0.1
    targets = (torch.rand(args.batch, 50, device=device) < 0.1).float()
    amp = autocast_dtype(args.precision, device)
    check_precision(model, amp)
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    loss_fn = nn.BCEWithLogitsLoss()

    def forward_only() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(waves)

    def train_step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model.forward_logits(waves).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    model.eval()
    forward_seconds = timed(forward_only, args.steps, args.repeats, args.warmup, device)
    model.train()
    train_seconds = timed(train_step, args.steps, args.repeats, args.warmup, device)
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "window_seconds": round(model.window_samples / model.sample_rate, 2),
        "batch": args.batch,
        "optimizer": recipe.optimizer,
        "forward_examples_per_second": round(args.batch / forward_seconds, 1),
        "train_examples_per_second": round(args.batch / train_seconds, 1),
        "train_over_forward": round(forward_seconds / train_seconds, 3),
        "audio_hours_per_hour": round(
            args.batch / train_seconds * model.window_samples / model.sample_rate, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list_models(), help="default: every model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, help="default: 16 on GPU, 4 on CPU")
    parser.add_argument(
        "--steps", type=int, help="timed steps per round; default: 20 on GPU, 2 on CPU"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the fastest counts")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--width", type=float, default=1.0, help="channel multiplier (1.0: paper size)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    on_gpu = device.type == "cuda"
    args.batch = args.batch or (16 if on_gpu else 4)
    args.steps = args.steps or (20 if on_gpu else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if on_gpu:
        torch.backends.cudnn.benchmark = True
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU {cpu()}, {torch.get_num_threads()} threads"
    amp = autocast_dtype(args.precision, device)
    print(
        f"# {where}; torch {torch.__version__}; batch {args.batch}; best of {args.repeats} x {args.steps} steps; "
        f"width {args.width}; autocast {amp or 'off'}"
    )
    header = f"{'model':<18} {'params':>11} {'window':>7} {'opt':>4} {'forward ex/s':>13} {'train ex/s':>11} {'train/fwd':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.models:
        try:
            row = measure(name, args, device)
        except ValueError as exc:  # fp16 with a log-mel front end
            print(f"{name:<18} skipped: {exc}")
            continue
        rows.append(row)
        print(
            f"{row['model']:<18} {row['parameters']:>11,} {row['window_seconds']:>6}s {row['optimizer']:>4} "
            f"{row['forward_examples_per_second']:>13} {row['train_examples_per_second']:>11} {row['train_over_forward']:>9}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"device": where, "batch": args.batch, "width": args.width, "rows": rows},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()

"""Benchmark one HookNet fine-tuning step (forward, Dice loss, backward, Adam) with and without
the context decoder past the hook: with `finetune.context_weight` 0 (the paper's lambda 1) no loss
reads the context logits, so `dsf finetune` skips those blocks and the context head.

The paper's geometry: ResNet-18, 6 classes, 256 px context and target inputs, random weights
(the speed does not depend on them). Prints JSON: seconds per step and tiles/s for each mode.

    python bench/finetune_step.py --batch 8 --steps 5
    python bench/finetune_step.py --device cuda --batch 64 --steps 20 --amp
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dsf.metrics import soft_dice_loss
from dsf.models.hooknet import HookNet


def step_seconds(model: HookNet, batch: int, steps: int, context: bool, amp: bool) -> float:
    """Median seconds of `steps` training steps (after one warm-up step)."""
    dev = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctx = torch.randn(batch, 3, 256, 256, device=dev)
    tgt = torch.randn(batch, 3, 256, 256, device=dev)
    lab = torch.randint(0, 6, (batch, 256, 256), device=dev)
    times = []
    for i in range(steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            t_logits, c_logits = model(ctx, tgt, context_logits=context)
        # as dsf finetune with context_weight 0 before the skip: the context logits computed,
        # read by no loss (so no backward through them)
        loss = soft_dice_loss(t_logits, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = p.parse_args()
    torch.manual_seed(0)
    model = HookNet(6).to(args.device).train()
    out = {"device": args.device, "torch": torch.__version__, "machine": platform.node()}
    for context in (True, False):
        s = step_seconds(model, args.batch, args.steps, context, args.amp)
        key = "with_context_logits" if context else "target_only"
        out[key] = {"s_per_step": round(s, 4), "tiles_per_s": round(args.batch / s, 2)}
    out["speedup"] = round(
        out["with_context_logits"]["s_per_step"] / out["target_only"]["s_per_step"], 3
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

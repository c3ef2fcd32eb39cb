"""How close the bf16 policy gradient is to the exact fp32 one, by micro-batch order and forward pass.

On one rollout of a recipe (default: the main job), the gradient of −Σ Â·log π (token-mean, fixed
random Â) is computed in fp32 without autocast (exact), then under the recipe's bf16 autocast with the
trainer's contiguous micro-batches (a prompt's G samples together) and with shuffled ones, each in the
three pass layouts (packed, the default; shared prefix; padded). Prints the cosine to the exact gradient
and the relative error.

    .venv/bin/python scripts/grad_precision.py [recipe.yaml] [key=value ...]
"""

import dataclasses
import sys
from contextlib import nullcontext

import torch

from rlhf_pg import core
from rlhf_pg.config import load_config
from rlhf_pg.forward import LAYOUTS, forward, with_layout
from rlhf_pg.trainer import Trainer


def main(argv: list[str]) -> None:
    recipe = argv[0] if argv and argv[0].endswith(".yaml") else "recipes/grpo_arithmetic.yaml"
    overrides = [a for a in argv if "=" in a]
    cfg = load_config(recipe, ["output_dir=runs/grad_precision", "overwrite=true", "data.eval_limit=1", *overrides])
    tr = Trainer(cfg)
    batch = tr.rollout(0)
    mask = batch.completion_mask
    adv = torch.randn(batch.size, 1, generator=torch.Generator().manual_seed(1)) * mask
    n = core.Normalisers(mask.sum().item(), batch.size, cfg.rollout.max_new_tokens)
    mbs = cfg.batch.micro_batch_size

    def grad(order: torch.Tensor, passes) -> torch.Tensor:
        tr.model.zero_grad(set_to_none=True)
        for rows in order.split(mbs):
            mb = batch.select(rows)
            logp = forward(tr.model, mb, passes).logprobs
            core.agg_token_mean(-adv[rows] * logp, mb.completion_mask, n).backward()
        return torch.cat([p.grad.flatten().float() for p in tr.model.parameters() if p.grad is not None])

    # accelerate's mixed precision wraps model.forward in autocast: the exact pass must not use it
    patched = tr.model.__dict__.pop("forward", None) if hasattr(tr.model, "_original_forward") else None
    exact = grad(torch.arange(batch.size), dataclasses.replace(with_layout(tr.passes, "padded"), autocast=nullcontext))
    if patched is not None:
        tr.model.forward = patched
    shuffled = torch.randperm(batch.size, generator=torch.Generator().manual_seed(2))
    precision = cfg.train.mixed_precision or "no"
    print(f"{precision} autocast vs exact fp32, {batch.size} completions, micro-batches of {mbs}")
    for name, order in (("contiguous", torch.arange(batch.size)), ("shuffled", shuffled)):
        for layout in LAYOUTS:
            g = grad(order, with_layout(tr.passes, layout)).double()
            cos = torch.nn.functional.cosine_similarity(g, exact.double(), dim=0).item()
            rel = ((g - exact.double()).norm() / exact.double().norm()).item()
            print(f"  {name:10s} {layout:13s}  cosine {cos:.5f}  relative error {rel:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])

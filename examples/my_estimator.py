"""An advantage estimator of your own, registered from a recipe (docs/architecture.md, "Adding a piece").

imports: [examples/my_estimator.py]
algo: {advantage: softmax_group, softmax_group: {temperature: 0.5}}
"""

import torch

from rlhf_pg import core


class SoftmaxGroupOptions(core.Options):
    temperature: float = 1.0
    """Temperature of the softmax over the group's rewards."""


@core.ADVANTAGES.register("softmax_group", min_group_size=2, options=SoftmaxGroupOptions)
def softmax_group(x: core.AdvantageInputs, opts: SoftmaxGroupOptions, state=None) -> core.AdvantageOutput:
    """Â_i = G·softmax(R/τ)_i − 1 within each prompt's group: mean 0, more weight to the best samples."""
    R = core.masked_sum(x.token_rewards, x.mask, dim=-1).view(-1, x.group_size)  # (B/G, G)
    w = torch.softmax(R / opts.temperature, dim=1) * x.group_size - 1  # (B/G, G), mean 0 per group
    return core.AdvantageOutput(w.reshape(-1, 1) * x.mask, R.reshape(-1, 1) * x.mask)

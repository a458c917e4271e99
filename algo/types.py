"""Names and shapes shared by every `algo/` function, and the one shape check they all use.

Conventions (one word per concept, used unchanged by actors/ and jobs/):

| name            | shape       | meaning                                                                   |
|-----------------|-------------|---------------------------------------------------------------------------|
| `logprobs`      | `[B, T]`    | log pi_theta(a_t | s_t) of the sampled response tokens, current policy      |
| `old_logprobs`  | `[B, T]`    | the same under the policy that generated the rollout (PPO's pi_old)        |
| `ref_logprobs`  | `[B, T]`    | the same under the frozen reference (SFT) model                           |
| `response_mask` | `[B, T]`    | 1 on response tokens that count, 0 on padding (bool, int or float)        |
| `values`        | `[B, T]`    | critic V(s_t) for each response position                                  |
| `returns`       | `[B, T]`    | regression targets for the critic (GAE advantages + values)               |
| `advantages`    | `[B, T]`    | per-token advantage estimates                                             |
| `rewards`       | `[B, T]`    | per-token shaped rewards (KL penalty + score on the last response token)  |
| `scores`        | `[B]`       | one reward-model score per response                                       |
| `logits`        | `[B, T, V]` | model outputs aligned so that `logits[:, t]` predicts token `t`           |

T indexes response tokens only (the prompt is cut off before these tensors are built). Batches are right-padded: row b
holds its response in the positions where `response_mask[b] == 1`. Masks may also have interior zeros (for instance
tool output inside a multi-turn response); every function here handles that case too.
"""
from __future__ import annotations

import torch


def check_token_tensors(response_mask: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError unless `response_mask` is `[B, T]` and every given tensor has exactly its shape.

    `None` entries are skipped, so optional inputs can be passed straight through.
    """
    if response_mask.dim() != 2:
        raise ValueError(
            f"response_mask must be [B, T] (batch, response tokens), got shape {tuple(response_mask.shape)}; "
            "add a batch dimension with .unsqueeze(0) for a single sequence"
        )
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != response_mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but response_mask has {tuple(response_mask.shape)}; "
                f"slice {name} to the response tokens ([B, T]) before calling"
            )


def check_scores(scores: torch.Tensor, response_mask: torch.Tensor) -> None:
    """Raise ValueError unless `scores` is `[B]` with the batch size of `response_mask`."""
    if scores.dim() != 1 or scores.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"scores must be [B] = [{response_mask.shape[0]}] (one score per response), got {tuple(scores.shape)}; "
            "squeeze the reward head's trailing dimension"
        )

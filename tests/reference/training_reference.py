"""The published training computation, written plainly: the reference the fast path is tested against.

One 77-token prompt per sample (no gather of repeated classes, no cut at the EOT, no shared
prefix) and the batch's targets re-encoded by ``model.encode_text`` at full length in fp32 on every
step, as the published code does. :func:`train_naive` runs :func:`protext.training.train` with this
loss, so the loop itself (schedule, shuffling, AdamW, resume) is the production one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from protext.prompts import PromptedTextEncoder
from protext.training import TextPairs, TrainConfig, TrainResult, prompt_loss, train


def naive_batch_loss(
    encoder: PromptedTextEncoder, class_index: torch.Tensor, tokens: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    """The reference batch loss: one 77-token prompt per sample, targets re-encoded at full length."""
    model = encoder.clip
    device = encoder.ctx.device
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        target = F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)
    features = encoder(class_index, truncate=False)
    pred = F.normalize(features.float(), dim=-1)
    return prompt_loss(pred, target, config.loss, config.weight)


def train_naive(
    encoder: PromptedTextEncoder, pairs: TextPairs, config: TrainConfig, tokens: torch.Tensor, **kwargs: Any
) -> TrainResult:
    """:func:`protext.training.train` on the reference loss; ``tokens`` are the tokenised descriptions."""
    return train(encoder, pairs, config, targets=tokens, batch_loss=naive_batch_loss, **kwargs)

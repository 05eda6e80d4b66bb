"""SparsePO token masks: a small learned mask head, and masks from reference activations.

Both read reference-model hidden states aligned with the response tokens: position ``t`` holds the
hidden state that predicts token ``t`` (the same shift as ``token_statistics``), as ``[B, T, H]`` (one
layer) or ``[B, T, L, H]`` (L layers). Masks are ``[B, T]``, 0 outside the response mask.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _scatter_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """[N] values at the True positions of mask [B, T] -> [B, T], 0 elsewhere."""
    out = values.new_zeros(mask.shape)
    return out.masked_scatter(mask, values)


class SparseMaskHead(nn.Module):
    """m_t = ReLU(mixer(ReLU(w_l . LayerNorm(h_t,l) + b_l) for each layer l)), with dropout.

    The SparsePO "simple_all" mask model: one linear unit per layer on layer-normalised reference
    hidden states (one LayerNorm shared by the layers), mixed by a bias-free linear layer; ReLU
    makes the masks non-negative and sparse. Trained with the policy by the preference loss.
    """

    def __init__(self, hidden_size: int, num_layers: int = 1, dropout: float = 0.01) -> None:
        super().__init__()
        self.num_layers = int(num_layers)
        self.layer_norm = nn.LayerNorm(hidden_size)
        self.per_layer = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(self.num_layers))
        self.mixer = nn.Linear(self.num_layers, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [N, H] or [N, L, H] -> mask values [N] (>= 0)."""
        if hidden.dim() == 2:
            hidden = hidden.unsqueeze(1)
        if hidden.shape[1] != self.num_layers:
            raise ValueError(
                f"ref_hidden: expected {self.num_layers} layer(s) for the mask head, "
                f"got {hidden.shape[1]}"
            )
        x = self.layer_norm(hidden.to(self.mixer.weight.dtype))
        per_layer = [
            self.dropout(torch.relu(linear(x[:, i]))) for i, linear in enumerate(self.per_layer)
        ]
        mixed = self.mixer(torch.cat(per_layer, dim=-1))
        return self.dropout(torch.relu(mixed)).squeeze(-1)

    def token_masks(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """hidden [B, T, (L,) H], mask [B, T] -> [B, T] masks, 0 outside the response."""
        return _scatter_tokens(self(hidden[mask]), mask)


def _rescaled_activation(activation: Tensor, mask: Tensor) -> Tensor:
    """MaPO's "zn_rescale": z-normalise over the response, then rescale to [0, 1]; [B, T]."""
    m = mask.to(activation.dtype)
    count = m.sum(dim=1, keepdim=True)
    mean = (activation * m).sum(dim=1, keepdim=True) / count.clamp(min=1)
    var = (((activation - mean) * m) ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    z = (activation - mean) / (var.sqrt() + 1e-12)
    big = torch.finfo(z.dtype).max
    low = torch.where(mask, z, big).amin(dim=1, keepdim=True)
    high = torch.where(mask, z, -big).amax(dim=1, keepdim=True)
    spread = high - low
    # Degenerate rows (one token, or all activations equal) would divide by zero: mask = 1.
    degenerate = (count < 2) | (spread <= 0)
    rescaled = (z - low) / torch.where(degenerate, torch.ones_like(spread), spread)
    rescaled = torch.where(degenerate, torch.ones_like(rescaled), rescaled)
    return rescaled * m


@torch.no_grad()
def activation_token_masks(hidden: Tensor, mask: Tensor) -> Tensor:
    """Masks from reference activations: mean over hidden units, rescaled per layer, layer mean.

    hidden [B, T, H] or [B, T, L, H], mask [B, T] bool -> [B, T] float64 in [0, 1], no gradient.
    Computed in float64 (the rescaling subtracts nearly equal numbers).
    """
    activation = hidden.mean(dim=-1, dtype=torch.float64)  # [B, T] or [B, T, L]
    if activation.dim() == 2:
        return _rescaled_activation(activation, mask)
    layers = [_rescaled_activation(activation[..., i], mask) for i in range(activation.shape[-1])]
    return torch.stack(layers, dim=-1).mean(dim=-1)

"""ESPnet master's SSVDLinear (espnet2/layers/lora/layers.py), reproduced for comparisons.

ESPnet factorises the taller orientation of W and rotates the singular vectors of its SMALLER
side with a first-order rotation A = I + 2S (not orthogonal: A A^T = I - 4 S^2), behind a
sigmoid gate on the singular-value shift:

    W' = W + U_k M V_k^T,   d' = sigmoid(g) d,
    out >= in:  M = diag(s_k + d') A - diag(s_k)      (P_in^T = A, the input side rotates)
    out <  in:  M = A^T diag(s_k + d') - diag(s_k)    (P_out = A^T, the output side rotates)

which is ``SsvdAdapter``'s M with the rotation map R(S) = A^T = (I + 2S)^T and k_in or k_out = k.
It starts where ESPnet's layer starts: g = 0 and d kaiming-uniform over a (1, k) tensor,
d_i ~ U(-sqrt(6 / k), sqrt(6 / k)), so W' = W + U_k diag(d / 2) V_k^T != W (``init_weights``;
without it: random g and d and angles, as ``SsvdAdapter``'s tests use).
Trainable parameters per layer: k + 1 + k (k - 1) / 2 (``ssvd_shift``, ``ssvd_gate``, and
``ssvd_inner`` or ``ssvd_outer``).
"""

from __future__ import annotations

import torch
from torch import nn

from ssvd_peft.layers.rotation import ROTATION_DTYPE, rotation_from_skew, skew_from_params
from ssvd_peft.layers.ssvd import SsvdAdapter, parameter_dtype


class EspnetSsvdAdapter(SsvdAdapter):
    """SSVD as ESPnet master computes it: gated shift, first-order rotation of the smaller side."""

    def __init__(self, base_layer: nn.Linear, k: int, init_weights: bool = True) -> None:
        rotates_input = base_layer.out_features >= base_layer.in_features
        k_in, k_out = (k, 0) if rotates_input else (0, k)
        super().__init__(base_layer, k, k_in, k_out, "first_order")
        factory = {"dtype": parameter_dtype(base_layer.weight.dtype), "device": base_layer.weight.device}
        self.ssvd_gate = nn.Parameter(torch.zeros(1, **factory))
        self.initialize_as_espnet(init_weights)

    def initialize_as_espnet(self, init_weights: bool) -> None:
        """ESPnet's start (gate 0, shift kaiming-uniform), or all parameters random for tests."""
        with torch.no_grad():
            if init_weights:
                nn.init.kaiming_uniform_(self.ssvd_shift[None, :])
            else:
                self.initialize(init_weights)
                self.ssvd_gate.normal_()

    def shifted_values(self) -> torch.Tensor:
        """s_k + sigmoid(g) d, in float64."""
        gate = torch.sigmoid(self.ssvd_gate.to(ROTATION_DTYPE))
        return self.singular_values.to(ROTATION_DTYPE) + gate * self.ssvd_shift.to(ROTATION_DTYPE)

    def rotation_matrix(self, params: torch.Tensor | None, size: int) -> torch.Tensor | None:
        """R = A^T = (I + 2S)^T, so that P_in^T = A and P_out = A^T as in ESPnet."""
        if params is None:
            return None
        return rotation_from_skew(skew_from_params(params.to(ROTATION_DTYPE), size), "first_order").T

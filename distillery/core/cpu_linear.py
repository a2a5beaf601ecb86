"""Inference-only float32 linear layers on a CPU through oneDNN with pre-packed weights.

torch runs a float32 `nn.Linear` on a CPU through MKL. On AMD CPUs MKL takes a generic code path: on the
2-core EPYC this project is measured on, oneDNN (which torch also ships) computes the same products 1.4x faster
for a teacher-forced batch (216 vs 156 GFLOPS at 1,024 rows) and 4x faster for a few rows of generation (23 vs
6 GB/s of weights at 6 rows), in float32 (no reduced-precision mode; outputs differ in summation order only).
`pack_linears` swaps a model's plain `nn.Linear` modules for `PackedLinear`s that hold the oneDNN-packed weight
instead of the original (memory stays the same, except for an output layer tied to the embeddings, which is packed
as a copy). The op is torch's own (`torch.ops.mkldnn`, what torch.compile's CPU freezing uses), not a public API:
where this torch lacks it, or it disagrees with `nn.Linear` on a probe, nothing is swapped.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def packed_linear_available() -> bool:
    """Whether this torch packs float32 linear weights for oneDNN and agrees with nn.Linear on a small probe (the
    probe draws from its own generator: the process's random state stays as it was)."""
    import torch

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(40, 24, device="meta").to_empty(device="cpu").requires_grad_(False)
    linear.weight.copy_(torch.randn(24, 40, generator=generator))
    linear.bias.copy_(torch.randn(24, generator=generator))
    x = torch.randn(3, 5, 40, generator=generator)
    try:
        out = packed_linear_class()(linear)(x)
    except RuntimeError as err:
        log.info("oneDNN packed linear unavailable: %s", err)
        return False
    return bool(torch.allclose(out, linear(x), rtol=1e-5, atol=1e-5))


@functools.cache
def packed_linear_class() -> type:
    """The PackedLinear module class (defined on first use: torch is imported only where a model runs)."""
    import torch

    class PackedLinear(torch.nn.Module):
        """y = x W^T + b with W held in oneDNN's packed layout; float32, inference only."""

        def __init__(self, linear: torch.nn.Linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            self.bias = None if linear.bias is None else linear.bias.detach()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(-1, self.in_features)
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
            return out.reshape(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN packed"

    return PackedLinear


def pack_linears(model: Any) -> int:
    """Replace every plain float32 `nn.Linear` of `model` on the CPU with a PackedLinear; returns how many.
    Subclasses of nn.Linear (4-bit layers), the layers inside a PEFT adapter layer (which reads its base layer's
    and its own weights) and other dtypes or devices are left as they are."""
    import torch

    in_adapters = {id(inner) for layer in model.modules() if hasattr(layer, "get_base_layer")
                   for inner in layer.modules()}
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32
               and child.weight.device.type == "cpu" and id(child) not in in_adapters]
    if not targets or not packed_linear_available():
        return 0
    cls = packed_linear_class()
    for parent, name in targets:  # by name, not holding the layers: each original weight goes once it is packed
        setattr(parent, name, cls(getattr(parent, name)))
    return len(targets)

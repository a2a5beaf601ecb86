"""Grouped-query attention with a mask on a CPU, without a copy of the keys and values per query head.

transformers' `sdpa` attention passes `enable_gqa` to torch's scaled_dot_product_attention only where no mask is
given (on CUDA, a mask with GQA falls back to the slow math kernel). Everywhere else it first repeats every key and
value head once per query head it serves: with a mask (a padded generation batch, the packed rows of held-out
scoring) on a CPU that copy is most of the attention's time. torch's CPU kernel takes the mask and the grouped
heads as they are and gives the same numbers, bit for bit (tested): on SmolLM2-135M (9 query heads, 3 key/value
heads) a 6-row generation step spent 0.9 of its 2.8 s in those copies.

`use_native_gqa(model)` switches a CPU model that runs `sdpa` to `sdpa_native_gqa`, registered with transformers'
AttentionInterface (and its mask function, sdpa's own); everything without a mask goes through transformers' sdpa
unchanged. Other attention implementations, models without grouped heads and other devices are left alone.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

NAME = "sdpa_native_gqa"


def sdpa_native_gqa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                    scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' sdpa attention, except that a masked call keeps the key/value heads grouped."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling,
                                                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def native_gqa_available() -> bool:
    """Whether this torch groups heads under a mask on a CPU and agrees with repeated heads on a small probe (its
    own generator: the process's random state stays as it was)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, heads, 5, 8, generator=generator) for heads in (6, 2, 2))
    mask = torch.rand(2, 1, 5, 5, generator=generator) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    try:
        grouped = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    except (RuntimeError, TypeError) as err:
        log.info("scaled_dot_product_attention cannot group heads under a mask here: %s", err)
        return False
    repeated = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask)
    return bool(torch.allclose(grouped, repeated, rtol=1e-5, atol=1e-6))


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_native_gqa)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_native_gqa(model: Any) -> bool:
    """Switch `model` (transformers, on a CPU, `sdpa`, fewer key/value heads than query heads) to sdpa_native_gqa;
    returns whether it did."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper's model
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    device = getattr(model, "device", None)
    if (config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not heads or kv_heads == heads
            or getattr(device, "type", None) != "cpu" or not native_gqa_available()):
        return False
    register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME

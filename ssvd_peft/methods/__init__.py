"""The built-in methods' homes: each module holds a method's config class and its registry entry
(its math is in ``ssvd_peft/layers``). Importing this package registers them."""

from ssvd_peft.methods import dora, hdmole, lora, pissa, ssvd

__all__ = ["dora", "hdmole", "lora", "pissa", "ssvd"]

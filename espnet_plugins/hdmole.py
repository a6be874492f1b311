"""HDMoLE in ESPnet: the domain router, the auxiliary losses, the routing statistics and the
domain labels.

    peft: hdmole
    peft_conf: {target_modules: [linear_q, linear_v], num_domains: 2, rank: 4}
    peft_hdmole: {domain_weight: 0.5, balance_weight: 0.01, router_source: encoder, router_side: input,
                  domains: [native, accent]}

``attach_hdmole`` adds the global domain router on ``router_source``'s input or output (its
feature dim from the model unless ``router_dim`` is set; see ``router_feature_dim``) and a
forward hook on the ESPnet model that turns its (loss, stats, weight) into

    loss = L_model + domain_weight L_dom + balance_weight L_bal

with ``stats`` extended by ``hdmole_balance``, ``hdmole_domain`` (batches with domain labels),
and in validation ``hdmole_active_experts``, ``hdmole_routing_entropy`` (means over layers)
and ``hdmole_domain_accuracy`` (with labels); ``stats["loss"]`` is the total. Without labels
L_dom is skipped and the router's logits enter the loss with weight 0, so every trainable
parameter is in the graph of every step (DDP needs no ``--unused_parameters``). Per-layer
validation statistics are summed in ``LayerStatistics`` and written by the trainer after every
validation epoch.

Domain labels come from the batch's ``domain`` entry, a per-utterance ``utt2domain`` file:

    utt1 accent     read as text: a name from ``domains`` (its index is the id), or UNLABELLED
    utt1 1          read as text_int: the id; a negative id marks an unlabelled utterance

``DomainNames`` (wrapped around the task's preprocessing) turns names into ids before
collation. Without the entry the router runs on its own prediction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from espnet2.torch_utils.device_funcs import force_gatherable
from torch import nn

from ssvd_peft.config import PeftConfigError
from ssvd_peft.layers.hdmole import (
    attach_domain_router,
    domain_router,
    hdmole_aux_losses,
    hdmole_statistics,
    routing_context,
)
from ssvd_peft.layers.routing import IGNORE_DOMAIN

DOMAIN_KEY = "domain"
UNLABELLED = "-"
ROUTING_STATS = ("active_experts", "routing_entropy", "domain_accuracy")
STATS_DIR = "hdmole_stats"


@dataclass(frozen=True)
class HdmoleOptions:
    """The ``peft_hdmole`` block: loss weights, where the domain router reads its features, and
    the names of the domain ids 0 .. M-1 (``domains``, optional)."""

    domain_weight: float = 0.5
    balance_weight: float = 0.01
    router_source: str = "encoder"
    router_side: str = "input"
    router_dim: int | None = None
    domains: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> HdmoleOptions:
        values = dict(values or {})
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PeftConfigError(f"peft_hdmole: unknown option(s) {unknown}; known: {sorted(known)}")
        if values.get("domains") is not None:
            values["domains"] = checked_domain_names(values["domains"])
        options = cls(**values)
        if options.router_side not in ("input", "output"):
            raise PeftConfigError(
                f"peft_hdmole: router_side must be 'input' or 'output', got {options.router_side!r}"
            )
        if options.domain_weight < 0 or options.balance_weight < 0:
            raise PeftConfigError("peft_hdmole: domain_weight and balance_weight must be >= 0")
        return options

    def domain_names(self, num_domains: int) -> tuple[str, ...] | None:
        """``domains``, checked to name exactly the ``num_domains`` domains of peft_conf."""
        if self.domains is not None and len(self.domains) != num_domains:
            raise PeftConfigError(
                f"peft_hdmole.domains names {len(self.domains)} domains {list(self.domains)} but "
                f"peft_conf.num_domains is {num_domains}; give one name per domain id 0 .. {num_domains - 1}"
            )
        return self.domains


def checked_domain_names(names: Any) -> tuple[str, ...]:
    """The ``domains`` list as a tuple of distinct single-word names that are not integer ids."""
    if not isinstance(names, list | tuple) or not names:
        raise PeftConfigError(f"peft_hdmole.domains must be a list of domain names, got {names!r}")
    bad = [name for name in names if not isinstance(name, str) or name.split() != [name]]
    if bad:
        raise PeftConfigError(
            f"peft_hdmole.domains must be single-word names (quote names YAML reads as numbers or "
            f"booleans), got {bad!r} in {list(names)!r}"
        )
    reserved = [name for name in names if name == UNLABELLED or is_domain_id(name)]
    if reserved:
        raise PeftConfigError(
            f"peft_hdmole.domains: {reserved} cannot be domain names ({UNLABELLED!r} marks an "
            "unlabelled utterance, integers are ids); rename them"
        )
    if len(set(names)) != len(names):
        raise PeftConfigError(f"peft_hdmole.domains has repeated names: {list(names)}")
    return tuple(names)


def domain_id(name: str, domains: tuple[str, ...] | None, utterance: str) -> int:
    """The id of a domain name from utt2domain: its index in ``domains``; UNLABELLED -> -1."""
    if name == UNLABELLED:
        return -1
    if domains is None:
        raise ValueError(
            f"utt2domain gives utterance {utterance!r} the domain name {name!r}, but peft_hdmole has "
            "no domains list; set peft_hdmole.domains to the names in id order, or write integer "
            "ids and read the file as text_int"
        )
    if name not in domains:
        raise ValueError(
            f"utt2domain gives utterance {utterance!r} the unknown domain {name!r}; known domains "
            f"(peft_hdmole.domains): {list(domains)}, or {UNLABELLED!r} for an utterance without a "
            "label (integer ids: read the file as text_int)"
        )
    return domains.index(name)


class DomainNames:
    """Preprocessing: a name-valued ``domain`` entry (utt2domain read as ``text``) becomes its
    (1,) int64 id (``domain_id``), then the task's own preprocessing (if any) runs."""

    def __init__(
        self,
        preprocess: Callable[[str, dict[str, Any]], dict[str, np.ndarray]] | None,
        domains: tuple[str, ...] | None,
    ) -> None:
        self.preprocess = preprocess
        self.domains = domains

    def __call__(self, uid: str, data: dict[str, Any]) -> dict[str, np.ndarray]:
        name = data.get(DOMAIN_KEY)
        if isinstance(name, str):
            data = {**data, DOMAIN_KEY: np.array([domain_id(name.strip(), self.domains, uid)])}
        return data if self.preprocess is None else self.preprocess(uid, data)


def is_domain_id(text: str) -> bool:
    """Whether ``text`` is an integer (a domain id, as opposed to a name)."""
    return text.removeprefix("-").isdigit()


class LayerStatistics:
    """Utterance-weighted sums of the per-layer routing statistics over one validation epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def add(self, stats: dict[str, float], weight: float) -> None:
        for key, value in stats.items():
            self.sums[key] += value * weight
            self.counts[key] += weight

    def means(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums if self.counts[key] > 0}

    def write(self, path: Path) -> None:
        """``<key> <mean>`` per line, sorted by key; nothing when no batch was added."""
        means = self.means()
        if means:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{key} {means[key]:.4f}\n" for key in sorted(means)), encoding="utf-8")


def router_feature_dim(model: nn.Module, options: HdmoleOptions) -> int:
    """``router_dim``; else ``output_size()`` of the source (output side) or the width of its last
    nn.Linear; on the input of ``encoder``, the frontend's output size."""
    if options.router_dim is not None:
        return options.router_dim
    source = model.get_submodule(options.router_source)
    if options.router_side == "output":
        if callable(getattr(source, "output_size", None)):
            return int(source.output_size())
        linears = [module for module in source.modules() if isinstance(module, nn.Linear)]
        if linears:
            return linears[-1].out_features
    frontend = getattr(model, "frontend", None)
    if options.router_side == "input" and options.router_source == "encoder" and frontend is not None:
        return int(frontend.output_size())
    raise PeftConfigError(
        f"peft_hdmole: cannot tell the feature dim of the {options.router_side} of "
        f"{options.router_source!r}; set peft_hdmole.router_dim"
    )


def check_router_source(model: nn.Module, options: HdmoleOptions) -> None:
    """Refuse a router on the encoder's input when ``utterance_mvn`` makes its time mean zero."""
    normalize = getattr(model, "normalize", None)
    if (
        options.router_source == "encoder"
        and options.router_side == "input"
        and getattr(normalize, "norm_means", False)
        and type(normalize).__name__ == "UtteranceMVN"
    ):
        raise PeftConfigError(
            "peft_hdmole: the domain router mean-pools the encoder's input over time, which "
            "utterance_mvn makes zero in every utterance, so it could not tell domains apart; read it "
            "from the subsampling output instead (router_source: encoder.embed, router_side: output)"
        )


def attach_hdmole(model: nn.Module, options: HdmoleOptions, adapter_name: str) -> None:
    """Attach the domain router and the hook that adds the auxiliary losses and statistics."""
    options.domain_names(routing_context(model, adapter_name).num_domains)
    check_router_source(model, options)
    attach_domain_router(
        model,
        router_feature_dim(model, options),
        adapter_name,
        source_module=options.router_source,
        source_side=options.router_side,
    )
    model.hdmole_layer_statistics = LayerStatistics()
    model.register_forward_hook(
        partial(_add_hdmole_terms, options=options, adapter_name=adapter_name), with_kwargs=True
    )


def domain_labels(batch: dict[str, Any], num_domains: int) -> torch.Tensor | None:
    """(B,) domain ids from the batch's ``domain`` entry (B, 1); negative ids -> IGNORE_DOMAIN."""
    domains = batch.get(DOMAIN_KEY)
    if domains is None:
        return None
    labels = domains.reshape(len(domains), -1)[:, 0].long()
    if (labels >= num_domains).any():
        raise ValueError(
            f"domain labels must be < num_domains={num_domains} (negative: unlabelled), "
            f"got {sorted(set(labels.tolist()))}; check utt2domain and peft_conf.num_domains"
        )
    return torch.where(labels < 0, IGNORE_DOMAIN, labels)


def _add_hdmole_terms(
    model: nn.Module,
    _args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
    options: HdmoleOptions,
    adapter_name: str,
) -> Any:
    if domain_router(model, adapter_name) is None:
        return output
    loss, stats, weight = output
    context = routing_context(model, adapter_name)
    labels = domain_labels(kwargs, context.num_domains)
    losses = hdmole_aux_losses(model, labels, adapter_name)
    total = loss + options.balance_weight * losses["balance"]
    if "domain" in losses:
        total = total + options.domain_weight * losses["domain"]
    elif context.domain_logits is not None:
        total = total + 0.0 * context.domain_logits.sum()
    added = {"loss": total.detach(), **{f"hdmole_{key}": value.detach() for key, value in losses.items()}}
    if not model.training:
        routing = hdmole_statistics(model, labels, adapter_name)
        added.update({f"hdmole_{key}": routing[key] for key in ROUTING_STATS if key in routing})
        model.hdmole_layer_statistics.add(routing, float(weight))
    return total, {**stats, **force_gatherable(added, loss.device)}, weight

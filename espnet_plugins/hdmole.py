"""HDMoLE in ESPnet: the router's feature width, the auxiliary losses, the routing statistics,
the domain labels and the fixed-domain export (``HdmoleExtension``, registered for ``hdmole``).

    peft: hdmole
    peft_conf: {target_modules: [linear_q, linear_v], num_domains: 2, rank: 4,
                domain_weight: 0.5, balance_weight: 0.01, router_source: encoder, router_side: input,
                domains: [native, accent]}

Every HDMoLE option is in ``peft_conf`` (``ssvd_peft.methods.hdmole.HdmoleConfig``); the core
attaches the global domain router at injection. Here, before injection, the router's width on the
input of ``encoder`` comes from the frontend (``router_dim`` wins), and a router on utterance-
normalised input is refused; after injection a forward hook on the ESPnet model turns its
(loss, stats, weight) into

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

import dataclasses
import logging
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import torch
from espnet2.torch_utils.device_funcs import force_gatherable
from torch import nn

from espnet_plugins.extensions import DOMAIN_KEY, EspnetExtension, Preprocess, register_extension
from ssvd_peft.config import PeftConfigError
from ssvd_peft.layers.routing import IGNORE_DOMAIN
from ssvd_peft.methods.hdmole import UNLABELLED, HdmoleConfig, is_domain_id
from ssvd_peft.methods.hdmole_routing import (
    domain_router,
    hdmole_aux_losses,
    hdmole_statistics,
    merge_domain_experts,
    routing_context,
)

logger = logging.getLogger(__name__)

ROUTING_STATS = ("active_experts", "routing_entropy", "domain_accuracy")
STATS_DIR = "hdmole_stats"


def domain_id(name: str, domains: list[str] | None, utterance: str) -> int:
    """The id of a domain name from utt2domain: its index in ``domains``; UNLABELLED -> -1."""
    if name == UNLABELLED:
        return -1
    if domains is None:
        raise ValueError(
            f"utt2domain gives utterance {utterance!r} the domain name {name!r}, but peft_conf has "
            "no domains list; set peft_conf.domains to the names in id order, or write integer "
            "ids and read the file as text_int"
        )
    if name not in domains:
        raise ValueError(
            f"utt2domain gives utterance {utterance!r} the unknown domain {name!r}; known domains "
            f"(peft_conf.domains): {list(domains)}, or {UNLABELLED!r} for an utterance without a "
            "label (integer ids: read the file as text_int)"
        )
    return domains.index(name)


class DomainNames:
    """Preprocessing: a name-valued ``domain`` entry (utt2domain read as ``text``) becomes its
    (1,) int64 id (``domain_id``), then the task's own preprocessing (if any) runs."""

    def __init__(
        self,
        preprocess: Preprocess,
        domains: list[str] | None,
    ) -> None:
        self.preprocess = preprocess
        self.domains = domains

    def __call__(self, uid: str, data: dict[str, Any]) -> dict[str, np.ndarray]:
        name = data.get(DOMAIN_KEY)
        if isinstance(name, str):
            data = {**data, DOMAIN_KEY: np.array([domain_id(name.strip(), self.domains, uid)])}
        return data if self.preprocess is None else self.preprocess(uid, data)


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


def encoder_input_dim(model: nn.Module, config: HdmoleConfig) -> HdmoleConfig:
    """The config with ``router_dim`` set to the frontend's output size when the router reads the
    input of ``encoder`` and no width is given (the core cannot tell it from the encoder)."""
    frontend = getattr(model, "frontend", None)
    reads_encoder_input = config.router_source == "encoder" and config.router_side == "input"
    if config.router_dim is None and reads_encoder_input and frontend is not None:
        return dataclasses.replace(config, router_dim=int(frontend.output_size()))
    return config


def check_router_source(model: nn.Module, config: HdmoleConfig) -> None:
    """Refuse a router on the encoder's input when ``utterance_mvn`` makes its time mean zero."""
    normalize = getattr(model, "normalize", None)
    if (
        config.router_source == "encoder"
        and config.router_side == "input"
        and getattr(normalize, "norm_means", False)
        and type(normalize).__name__ == "UtteranceMVN"
    ):
        raise PeftConfigError(
            "hdmole: the domain router mean-pools the encoder's input over time, which utterance_mvn "
            "makes zero in every utterance, so it could not tell domains apart; read it from the "
            "subsampling output instead (router_source: encoder.embed, router_side: output)"
        )


class HdmoleExtension(EspnetExtension):
    """HDMoLE's part of the ESPnet task (see the module docstring); it keeps each model's
    per-layer validation statistics."""

    def __init__(self) -> None:
        self.statistics: WeakKeyDictionary[nn.Module, LayerStatistics] = WeakKeyDictionary()

    def prepare_config(self, model: nn.Module, config: HdmoleConfig) -> HdmoleConfig:
        check_router_source(model, config)
        return encoder_input_dim(model, config)

    def wrap_preprocess(self, preprocess: Preprocess, config: HdmoleConfig) -> Preprocess:
        return DomainNames(preprocess, config.domains)

    def after_injection(self, model: nn.Module, config: HdmoleConfig, adapter_name: str) -> None:
        statistics = self.statistics.setdefault(model, LayerStatistics())
        model.register_forward_hook(
            partial(_add_hdmole_terms, config=config, adapter_name=adapter_name, statistics=statistics),
            with_kwargs=True,
        )

    def validation_started(self, model: nn.Module) -> None:
        self.statistics[model].reset()

    def validation_finished(self, model: nn.Module, output_dir: Path, epoch: int) -> None:
        """``<output_dir>/hdmole_stats/valid.<epoch>.txt``: the epoch's per-layer routing statistics."""
        self.statistics[model].write(output_dir / STATS_DIR / f"valid.{epoch}.txt")

    def fixed_merge(self, model: nn.Module, config: HdmoleConfig, adapter_name: str, choice: str) -> None:
        """Fold the experts of domain ``choice`` (an id, or a name from ``domains``) into the weights."""
        merge_domain_experts(model, export_domain(choice, config), adapter_name)


def export_domain(domain: str, config: HdmoleConfig) -> int:
    """The id of ``domain``: an integer string, or a name in the config's ``domains``."""
    if is_domain_id(domain):
        return int(domain)
    names = config.domains or []
    if domain not in names:
        known = f"the names {names}" if names else "no names (peft_conf.domains is not set)"
        raise ValueError(
            f"--peft_domain {domain!r} is not a domain of this adapter: its training config has "
            f"{known}; give a domain id or one of the names"
        )
    logger.info("Domain %r is domain id %d", domain, names.index(domain))
    return names.index(domain)


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
    config: HdmoleConfig,
    adapter_name: str,
    statistics: LayerStatistics,
) -> Any:
    if domain_router(model, adapter_name) is None:
        return output
    loss, stats, weight = output
    context = routing_context(model, adapter_name)
    labels = domain_labels(kwargs, context.num_domains)
    losses = hdmole_aux_losses(model, labels, adapter_name)
    total = loss + config.balance_weight * losses["balance"]
    if "domain" in losses:
        total = total + config.domain_weight * losses["domain"]
    elif context.domain_logits is not None:
        total = total + 0.0 * context.domain_logits.sum()
    added = {"loss": total.detach(), **{f"hdmole_{key}": value.detach() for key, value in losses.items()}}
    if not model.training:
        routing = hdmole_statistics(model, labels, adapter_name)
        added.update({f"hdmole_{key}": routing[key] for key in ROUTING_STATS if key in routing})
        statistics.add(routing, float(weight))
    return total, {**stats, **force_gatherable(added, loss.device)}, weight


register_extension("hdmole", HdmoleExtension())

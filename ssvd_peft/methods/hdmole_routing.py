"""HDMoLE at the level of the model: one routing context per adapter, the global domain router
(a model part, ``ssvd_peft.model_parts``), g set by hand, the fixed-domain merge, the auxiliary
losses and the routing statistics. The layer math: ``ssvd_peft.layers.hdmole`` and ``.routing``.

    inject_adapters(model, "hdmole", target_modules=[...], num_domains=2,
                    router_source="encoder.embed", router_side="output")   # router attached
    loss = asr_loss + config.domain_weight * losses["domain"] + config.balance_weight * losses["balance"]
    # with losses = hdmole_aux_losses(model, domain_labels)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.layers.base import AdapterLinear
from ssvd_peft.layers.hdmole import HdmoleAdapter
from ssvd_peft.layers.routing import IGNORE_DOMAIN, RoutingContext, domain_cross_entropy, masked_mean_pool
from ssvd_peft.model_parts import ModelPart, add_model_part, detach_model_parts, model_part

if TYPE_CHECKING:
    from ssvd_peft.methods.hdmole import HdmoleConfig

ROUTER_SIDES = ("input", "output")


class DomainRouter(ModelPart):
    """Global domain router: g(u) = softmax(W_g pool_t(h_t) + b_g), one per model.

    W_g and b_g start at zero, so g starts uniform (1 / M). The forward returns the logits
    W_g pool_t(h_t) + b_g (B, M) and hands g to ``context``, where the HDMoLE layers read it.
    ``route_inputs`` / ``route_outputs`` are forward (pre-)hooks that run it on another module's
    input or output (``source_module``, ``source_side``). Trainable parameters: M (d + 1).
    """

    def __init__(
        self,
        feature_dim: int,
        num_domains: int,
        context: RoutingContext | None = None,
        source_module: str | None = None,
        source_side: str = "input",
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, num_domains)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.context = context if context is not None else RoutingContext(num_domains)
        self.source_module, self.source_side = source_module, source_side
        self.source_hook: RemovableHandle | None = None

    @classmethod
    def on_injected(cls, model: nn.Module, adapter_name: str, config: HdmoleConfig) -> None:
        """One routing context for all the adapter's layers; the router if the config names a source."""
        bind_routing_context(model, adapter_name)
        if config.router_source is not None:
            feature_dim = config.router_dim or router_feature_dim(
                model, config.router_source, config.router_side
            )
            attach_domain_router(model, feature_dim, adapter_name, config.router_source, config.router_side)

    @classmethod
    def restore(cls, model: nn.Module, adapter_name: str, extra_state: dict[str, Any]) -> DomainRouter:
        return attach_domain_router(
            model,
            extra_state["feature_dim"],
            adapter_name,
            extra_state["source_module"],
            extra_state["source_side"],
        )

    def extra_state(self) -> dict[str, Any]:
        return {
            "feature_dim": self.proj.in_features,
            "source_module": self.source_module,
            "source_side": self.source_side,
        }

    def detach(self, model: nn.Module) -> None:
        """Remove the source hook; the layers fall back to uniform g."""
        if self.source_hook is not None:
            self.source_hook.remove()
            self.source_hook = None
        self.context.set(None)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        pooled = masked_mean_pool(features, lengths).to(self.proj.weight.dtype)
        logits = self.proj(pooled)
        self.context.set(logits.softmax(dim=-1), logits)
        return logits

    def route_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook (with_kwargs=True): route on the module's input features."""
        self._route_values(module, [*args, *kwargs.values()])

    def route_outputs(self, module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        """Forward hook: route on the module's output features."""
        self._route_values(module, [output])

    def _route_values(self, module: nn.Module, values: list[Any]) -> None:
        """Run on the first (B, T, d) tensor of ``values`` (tuples and lists searched depth first, as
        ESPnet's subsampling returns ((x, pos_emb), mask) with relative positions); lengths from a
        (B,) integer tensor, else from a (B, 1, T) boolean padding mask (as ESPnet's layers get)."""
        tensors = list(_tensors(values))
        dim = self.proj.in_features
        features = next((t for t in tensors if t.dim() == 3 and t.shape[-1] == dim), None)
        if features is None:
            raise ValueError(
                f"the domain router's source {type(module).__name__} gave no (B, T, {dim}) tensor "
                f"(got shapes {[tuple(t.shape) for t in tensors]}); pick another source module or "
                "feature_dim"
            )
        lengths = next(
            (t for t in tensors if t.dim() == 1 and len(t) == len(features) and not t.is_floating_point()),
            None,
        )
        if lengths is None:
            masks = (t for t in tensors if t.dtype == torch.bool and t.dim() == 3)
            mask = next((t for t in masks if t.shape == (len(features), 1, features.shape[1])), None)
            lengths = None if mask is None else mask[:, 0].sum(dim=-1)
        self(features, lengths)


def _tensors(values: list[Any] | tuple[Any, ...]) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, tuple | list):
            yield from _tensors(value)


def hdmole_adapters(model: nn.Module, adapter_name: str = "default") -> list[tuple[str, HdmoleAdapter]]:
    """(module name, adapter) for every HDMoLE adapter named ``adapter_name`` in ``model``."""
    found = [
        (name, adapter)
        for name, module in model.named_modules()
        if (adapter := _hdmole_adapter_of(module, adapter_name)) is not None
    ]
    if not found:
        raise ValueError(
            f"the model has no HDMoLE adapter named {adapter_name!r}; "
            "inject one with inject_adapters(model, 'hdmole', target_modules=[...])"
        )
    return found


def _hdmole_adapter_of(module: nn.Module, adapter_name: str) -> HdmoleAdapter | None:
    if not isinstance(module, AdapterLinear) or adapter_name not in module.peft_adapters:
        return None
    adapter = module.peft_adapters[adapter_name]
    return adapter if isinstance(adapter, HdmoleAdapter) else None


def bind_routing_context(model: nn.Module, adapter_name: str = "default") -> RoutingContext:
    """Give every HDMoLE layer of ``adapter_name`` one shared RoutingContext (at injection)."""
    adapters = hdmole_adapters(model, adapter_name)
    context = adapters[0][1].context
    for name, adapter in adapters:
        if adapter.num_domains != context.num_domains:
            raise ValueError(
                f"module {name!r} has num_domains={adapter.num_domains} but other HDMoLE layers of "
                f"adapter {adapter_name!r} have {context.num_domains}; one domain router serves them "
                "all, so num_domains must not differ per module"
            )
        adapter.context = context
    return context


def routing_context(model: nn.Module, adapter_name: str = "default") -> RoutingContext:
    """The RoutingContext the HDMoLE layers of ``adapter_name`` share."""
    return hdmole_adapters(model, adapter_name)[0][1].context


def set_domain_probs(model: nn.Module, probs: torch.Tensor | None, adapter_name: str = "default") -> None:
    """Route the next forwards with domain probabilities ``probs`` (B, M), e.g. one-hot labels;
    None: the global router's next output, or uniform g without a router."""
    routing_context(model, adapter_name).set(probs)


def attach_domain_router(
    model: nn.Module,
    feature_dim: int,
    adapter_name: str = "default",
    source_module: str | None = None,
    source_side: str = "input",
) -> DomainRouter:
    """Add the global domain router of adapter ``adapter_name`` as ``model.peft_adapters[adapter_name]``.

    Its parameters sit under ``peft_adapters.<adapter_name>.`` like every adapter parameter, so
    freezing and adapter-only state dicts keep them. With ``source_module`` a hook runs the
    router on that module's input (``source_side="input"``, before it runs: the HDMoLE layers
    inside it see g) or output (``"output"``: for HDMoLE layers after it), taking the first
    (B, T, feature_dim) tensor as features and a following (B,) integer tensor as lengths (or,
    without one, a (B, 1, T) boolean padding mask).
    Without it, call ``router(features, lengths)`` before the model's forward. (A config with
    ``router_source`` attaches it at injection.)
    """
    if source_side not in ROUTER_SIDES:
        raise ValueError(f"source_side must be 'input' or 'output', got {source_side!r}")
    context = routing_context(model, adapter_name)
    adapters = hdmole_adapters(model, adapter_name)
    if source_module is not None and source_side == "output":
        inside = [
            name
            for name, _ in adapters
            if not source_module or name == source_module or name.startswith(f"{source_module}.")
        ]
        if inside:
            raise PeftConfigError(
                f"hdmole: the router reads the output of {source_module!r}, which holds HDMoLE layers "
                f"({inside[0]!r}{' and more' if len(inside) > 1 else ''}): they would run before the "
                "router, routed by the previous batch's g; use router_side='input' or a source module "
                "that runs before every HDMoLE layer"
            )
    reference = adapters[0][1].lora_A
    router = DomainRouter(feature_dim, context.num_domains, context, source_module, source_side)
    add_model_part(model, adapter_name, router.to(reference.device, reference.dtype))
    if source_module is not None:
        source = model.get_submodule(source_module)
        if source_side == "input":
            router.source_hook = source.register_forward_pre_hook(router.route_inputs, with_kwargs=True)
        else:
            router.source_hook = source.register_forward_hook(router.route_outputs)
    return router


def router_feature_dim(model: nn.Module, source_module: str, source_side: str) -> int:
    """The width of the router's features: on the output side ``output_size()`` of the source or the
    width of its last nn.Linear; on the input side the source's own in_features (a Linear)."""
    source = model.get_submodule(source_module)
    if source_side == "output":
        if callable(getattr(source, "output_size", None)):
            return int(source.output_size())
        linears = [module for module in source.modules() if isinstance(module, nn.Linear)]
        if linears:
            return linears[-1].out_features
    elif isinstance(source, nn.Linear | AdapterLinear):
        return source.in_features
    raise PeftConfigError(
        f"hdmole: cannot tell the feature dim of the {source_side} of {source_module!r}; set router_dim"
    )


def domain_router(model: nn.Module, adapter_name: str = "default") -> DomainRouter | None:
    """The global domain router attached for ``adapter_name``, if any."""
    part = model_part(model, adapter_name)
    return part if isinstance(part, DomainRouter) else None


def detach_domain_router(model: nn.Module, adapter_name: str = "default") -> None:
    """Remove the global domain router (and its hook); the layers fall back to uniform g."""
    if domain_router(model, adapter_name) is not None:
        detach_model_parts(model, adapter_name)


def merge_domain_experts(model: nn.Module, domain: int, adapter_name: str = "default") -> None:
    """Fold the fixed-domain update delta W_d of every HDMoLE layer into its base weight.

    The model then runs at the speed of the base model and computes, for domain ``domain``,
    the routed output with g = e_d and uniform local routing (see the module docstring).
    ``unmerge_adapters`` restores the base weights; ``merge_and_unload`` keeps W + delta W_d.
    """
    num_domains = routing_context(model, adapter_name).num_domains
    if not 0 <= domain < num_domains:
        raise ValueError(f"domain must be in [0, {num_domains}) for adapter {adapter_name!r}, got {domain}")
    for name, adapter in hdmole_adapters(model, adapter_name):
        module = model.get_submodule(name)
        module.set_adapter(adapter_name)
        module.unmerge()
        adapter.merge_domain(module.base_layer, domain)
        module.merged_adapter = adapter_name


def hdmole_aux_losses(
    model: nn.Module, domain_labels: torch.Tensor | None = None, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """{"balance": mean over layers of N sum_i f_i P_i, "domain": CE(g logits, labels)} of the
    latest forward; "domain" only with ``domain_labels`` (B,), where IGNORE_DOMAIN marks unknown.

    Use as L = L_asr + l_dom * losses["domain"] + l_bal * losses["balance"].
    """
    adapters = hdmole_adapters(model, adapter_name)
    records = [adapter.last_routing for _, adapter in adapters]
    if any(record is None for record in records):
        raise RuntimeError(
            "no routing recorded yet: run the model's forward before asking for the HDMoLE losses"
        )
    losses = {"balance": torch.stack([record.balance_loss() for record in records]).mean()}
    if domain_labels is not None:
        logits = routing_context(model, adapter_name).domain_logits
        if logits is None:
            raise RuntimeError(
                "no domain router output for this batch: attach_domain_router(model, feature_dim, ...) "
                "and run the forward (or call the router) before asking for the domain loss"
            )
        losses["domain"] = domain_cross_entropy(logits, domain_labels)
    return losses


def hdmole_statistics(
    model: nn.Module, domain_labels: torch.Tensor | None = None, adapter_name: str = "default"
) -> dict[str, float]:
    """Routing statistics of the latest forward.

    ``<layer>.active_experts`` (mean_t k_t), ``<layer>.routing_entropy`` (mean_t H(q_t), nats),
    their means over layers (``active_experts``, ``routing_entropy``) and, with labels and a
    g for the batch, ``domain_accuracy`` (argmax g = label over the labelled utterances).
    """
    stats: dict[str, float] = {}
    for name, adapter in hdmole_adapters(model, adapter_name):
        if adapter.last_routing is not None:
            stats[f"{name}.active_experts"] = float(adapter.last_routing.active_experts)
            stats[f"{name}.routing_entropy"] = float(adapter.last_routing.entropy)
    for key in ("active_experts", "routing_entropy"):
        values = [value for name, value in stats.items() if name.endswith(f".{key}")]
        if values:
            stats[key] = sum(values) / len(values)
    probs = routing_context(model, adapter_name).domain_probs
    if domain_labels is not None and probs is not None:
        labels = domain_labels.to(probs.device)
        labelled = labels != IGNORE_DOMAIN
        if labelled.any():
            stats["domain_accuracy"] = float((probs.argmax(dim=-1) == labels)[labelled].float().mean())
    return stats

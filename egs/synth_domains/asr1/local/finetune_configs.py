"""Stage 8 set-up: one training YAML per fine-tuning run, every PEFT method at the same budget, and the
list of runs (``runs.tsv``) that stages 8-10 work through.

``full.yaml`` is a complete config for stock ``espnet2.bin.asr_train --init_param <base>``: the
base's model options (``config.yaml`` next to the base model) plus the fine-tuning options.
``<method>.yaml`` (lora, dora, pissa, ssvd, ssvd_o, hdmole) holds the fine-tuning options and a
``peft:`` block for ``espnet_plugins.bin.asr_train``, which takes the model options from the base; so
does ``<variant>.yaml`` for a variant of the adapters file (``variants.<name>: {method: ssvd,
espnet_compat: true}``: a row of its own, e.g. ESPnet master's SSVD beside the exact one).
A feature-fusion row ``<name>.yaml`` (the adapters file's ``fusion.<name>``) holds a ``fusion:``
block instead (and a ``peft:`` block for its encoder adapters, if any); ``layer_analysis.yaml`` the
adapters file's ``layer_analysis`` block, which stage 14 trains on one tap at a time.
The fine-tuning options are the finetune file's, with the top-level keys of the adapters file's
``training.<method>`` (e.g. a method's own ``optim_conf``) in place of its.
The budget B is the trainable count of the adapters file's ``budget`` entry (a method at a rank or
k) on the base model; each method's rank or k is the one whose count is closest to B.

Runs (one line each in ``runs.tsv``, see local/runs.py):

- main: every method on every domain's adapt split (``<domain>/<method>``); HDMoLE once on all
  domains' adapt splits together, with ``utt2domain`` labels (``all/hdmole``), tested on each domain
  and each out-of-distribution domain, at B times the number of domains (what the per-domain
  adapters of one method hold together);
- seed (``--seeds n``): every main and joint run again with the seeds after the finetune file's
  (``seed``: s, ``seed + 1``, ..., n seeds in all): ``<run>@seed<i>``, its config
  ``<config>@seed<i>.yaml`` (the run's config, ``seed`` s + i); the run itself is seed s. Stages 10
  and 13 report each cell over its seeds;
- joint (``--joint_methods``, for the merging stages): one model per method on all domains' adapt
  splits together (``all/<method>``, the method's main config: a joint adapter has budget B), tested
  on each domain and each out-of-distribution domain: what a user would train instead of merging;
- sweep ``budget``: methods at the budgets of the reference method at other ranks or k
  (``<domain>/<method>@b<value>``);
- sweep ``split``: SSVD-O with other inner/outer splits of its rotations (``outer_share``) at the main
  run's k (``<domain>/ssvd_o@outer<value>``; the count moves by the rounding of each side's
  k_side (k_side - 1) / 2 share of the rotation budget);
- sweep ``allocation``: methods with their adapters on one part of the model only (``sweeps.allocation
  .parts``: a part's options over the method's, e.g. ``exclude_modules`` or ``target_modules``), the
  rank or k chosen again for budget B, so the same total goes to fewer layers
  (``<domain>/<method>@<part>``);
- sweep ``fewshot``: methods on the first n utterances of the adapt split, balanced over speakers
  (``<domain>/<method>@n<value>``; data dir ``<data>/fewshot/<domain>_adapt_n<value>``).

The sweeps run on the ``sweeps.domains`` of the adapters file. ``trainable.json`` records the
planned trainable count of every config (full: every parameter of the model),
``budget_shortfalls.json`` every config whose method cannot come within one rank or k step of its
budget (its budget and trainable count; also printed), ``main_settings.json`` the main runs' place
on the sweeps' axes (the reference rank or k, SSVD-O's outer share, ``all`` layers).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from freeze import TUNE, frozen_rate
from runs import SEED, SWEEPS, Run, write_runs

from espnet_plugins.fusion import DEFAULT_TRAIN_MODULES, TRAIN_MODULES_KEY
from espnet_plugins.modules import build_meta_model, stock_task
from espnet_plugins.pretrained import architecture_keys
from ssvd_peft.budget import BudgetMatch, BudgetShortfallWarning, equal_budget_configs, estimate_budget
from ssvd_peft.fusion import FusionConfig, build_fusion_head, resolve_taps
from ssvd_peft.registry import get_method

# The base's model options a full fine-tuning config copies: those that define the model (the
# plugin's list, ``architecture_keys``) and the base's own augmentation and preprocessing switches.
MODEL_KEYS = (
    *architecture_keys(stock_task("asr").class_choices_list),
    "specaug",
    "specaug_conf",
    "init",
    "use_preprocessor",
)
ALL_DOMAINS = "all"
ALL_LAYERS = "all"  # the main runs' place on the allocation sweep: every target module


def method_options(adapters: dict[str, Any], method: str, domains: list[str]) -> dict[str, Any]:
    """A method's options besides its rank or k: targets, the adapters file's options, HDMoLE's domains.
    A variant (the adapters file's ``variants.<name>``: a registry ``method`` with other options) takes
    that method's options with its own over them."""
    variant = dict((adapters.get("variants") or {}).get(method) or {})
    base = variant.pop("method", method)
    options = {
        "target_modules": list(adapters["target_modules"]),
        **adapters["methods"].get(base, {}),
        **variant,
    }
    if base == "hdmole":
        options.update(num_domains=len(domains), domains=list(domains))
    return options


def registry_method(adapters: dict[str, Any], name: str) -> str:
    """The registry method of a row: the variant's ``method``, or the name itself."""
    return ((adapters.get("variants") or {}).get(name) or {}).get("method", name)


def reference_budget(model: Any, adapters: dict[str, Any], value: int | None = None) -> int:
    """Trainable count of the ``budget`` entry (its rank or k replaced by ``value`` when given)."""
    reference = dict(adapters["budget"])
    method = reference.pop("method")
    if value is not None:
        reference[get_method(method).knob] = value
    return estimate_budget(model, method, **{**method_options(adapters, method, []), **reference}).trainable


def budget_matches(model: Any, budget: int, methods: dict[str, dict[str, Any]]) -> dict[str, BudgetMatch]:
    """Each method's rank or k for the budget (a shortfall is recorded by the planner, not warned)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetShortfallWarning)
        return equal_budget_configs(model, budget, methods)


class Planner:
    """Writes the configs into ``out_dir`` and collects the runs."""

    def __init__(
        self,
        model: Any,
        base: dict,
        finetune: dict,
        adapters: dict,
        out_dir: Path,
        data: str,
        domains: list[str],
    ) -> None:
        self.model, self.base, self.finetune, self.adapters = model, base, finetune, adapters
        self.out_dir, self.data, self.domains = out_dir, data, domains
        self.ood_domains: list[str] = []
        self.trainable: dict[str, int] = {}
        self.shortfalls: dict[str, dict[str, int]] = {}
        self.runs: list[Run] = []
        self.frozen_rates: dict[str, float] = {}  # method -> learning rate frozen on dev (freeze.py)

    def peft_config(
        self, name: str, options: dict[str, Any], match: BudgetMatch, row: str = ""
    ) -> tuple[str, dict[str, Any]]:
        """Write the config of ``match`` (the method's ``options`` at its rank or k), with the training
        options and frozen rate of ``row`` (default: the method); a budget out of the method's reach is
        recorded in ``shortfalls`` and printed. (config path, peft_conf block)"""
        if not match.reached:
            print(f"warning: {name}: {match.describe()}", file=sys.stderr)
            self.shortfalls[name] = {"budget": match.budget, "trainable": match.trainable}
        block = {**options, match.knob: match.value}
        return self.write_config(name, match.method, block, row), block

    def write_config(self, name: str, method: str, block: dict[str, Any] | None, row: str = "") -> str:
        """Full fine-tuning (``block`` None) or a PEFT method's ``peft_conf`` block; ``row``: whose
        training options and frozen rate (default: the method's)."""
        if method == "full":
            config = {key: self.base[key] for key in MODEL_KEYS if key in self.base}
            trainable = sum(parameter.numel() for parameter in self.model.parameters())
            return self.write_training(name, method, config, trainable)
        trainable = estimate_budget(self.model, method, **block).trainable
        return self.write_training(name, row or method, {"peft": method, "peft_conf": block}, trainable)

    def write_training(self, name: str, method: str, model_options: dict[str, Any], trainable: int) -> str:
        """``<name>.yaml``: ``model_options``, then the fine-tuning options with the adapters file's
        ``training.<method>`` over them; ``trainable`` goes into ``trainable.json``."""
        training = {**self.finetune, **((self.adapters.get("training") or {}).get(method) or {})}
        if method in self.frozen_rates:
            training["optim_conf"] = {**(training.get("optim_conf") or {}), "lr": self.frozen_rates[method]}
        config = dict(model_options)
        if method != "full":
            config["peft_save"] = "adapter"
        config.update(training)
        self.trainable[name] = trainable
        path = self.out_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return str(path)

    def fusion_config(self, name: str, entry: dict[str, Any]) -> str:
        """A feature-fusion config (a row of the adapters file's ``fusion``, or its ``layer_analysis``):
        ``entry["fusion"]`` over the frozen encoder, the head, decoder and CTC head trained; with
        ``adapters: <method>``, that method's adapters at budget B's rank or k in every encoder block as
        well (the decoder is trained in full)."""
        block = dict(entry["fusion"])
        encoder = self.model.encoder
        head_options = {key: value for key, value in block.items() if key != TRAIN_MODULES_KEY}
        taps = resolve_taps(block.get("taps", "all"), len(encoder.encoders))
        head = build_fusion_head(FusionConfig.from_dict(head_options), encoder.output_size(), taps)
        trained = block.get(TRAIN_MODULES_KEY, list(DEFAULT_TRAIN_MODULES))
        gate = encoder.output_size() if head_options.get("residual") else 0  # residual: g in R^D
        trainable = (
            sum(p.numel() for p in head.parameters())
            + gate
            + sum(p.numel() for module in trained for p in getattr(self.model, module).parameters())
        )
        options: dict[str, Any] = {"fusion": block}
        method = entry.get("adapters")
        if method is not None:
            adapter = method_options(self.adapters, method, self.domains)
            match = budget_matches(self.model, reference_budget(self.model, self.adapters), {method: adapter})
            adapter = {**adapter, match[method].knob: match[method].value}
            adapter["target_modules"] = [rf"encoder\..*\.{re.escape(t)}" for t in adapter["target_modules"]]
            trainable += estimate_budget(self.model, method, **adapter).trainable
            options.update(peft=method, peft_conf=adapter)
        return self.write_training(name, name, options, trainable)

    def add_domain_run(
        self, domain: str, name: str, method: str, sweep: str, value: str, config: str, train: str = ""
    ) -> None:
        """A run on one domain: trained on its adapt split (or ``train``), validated on its dev split."""
        train = train or f"{self.data}/{domain}_adapt"
        dev = f"{self.data}/{domain}_dev"
        self.runs.append(Run(f"{domain}/{name}", method, sweep, value, config, train, dev, [domain]))

    def main_runs(self, methods: list[str]) -> dict[str, dict[str, Any]]:
        budget = reference_budget(self.model, self.adapters)
        fusion = [m for m in methods if m in (self.adapters.get("fusion") or {})]
        peft = [m for m in methods if m != "full" and m not in fusion]
        options = {m: method_options(self.adapters, m, self.domains) for m in peft}
        variants = [m for m in peft if registry_method(self.adapters, m) != m]
        plain = {m: o for m, o in options.items() if m != "hdmole" and m not in variants}
        matches = budget_matches(self.model, budget, plain)
        for name in variants:  # a variant: its registry method's knob, matched on its own options
            method = registry_method(self.adapters, name)
            matches[name] = budget_matches(self.model, budget, {method: options[name]})[method]
        if "hdmole" in options:  # one model for every domain: the budget of the per-domain adapters together
            hdmole_budget = budget * len(self.domains)
            matches.update(budget_matches(self.model, hdmole_budget, {"hdmole": options["hdmole"]}))
        blocks: dict[str, dict[str, Any]] = {}
        for method in methods:
            if method == "full":
                config = self.write_config(method, method, None)
            elif method in fusion:
                config = self.fusion_config(method, self.adapters["fusion"][method])
            else:
                config, blocks[method] = self.peft_config(method, options[method], matches[method], method)
            if method == "hdmole":
                self.add_joint_run(method, "main", config)
                continue
            for domain in self.domains:
                self.add_domain_run(domain, method, method, "main", "-", config)
        return blocks

    def add_joint_run(self, method: str, sweep: str, config: str, name: str = "", value: str = "-") -> None:
        """A run on every domain's adapt split together (``all/<name>``, name default the method), tested
        on every domain and every out-of-distribution domain."""
        data = f"{self.data}/combined"
        tests = [*self.domains, *self.ood_domains]
        name = f"{ALL_DOMAINS}/{name or method}"
        self.runs.append(Run(name, method, sweep, value, config, f"{data}/adapt", f"{data}/dev", tests))

    def tuning_runs(self, methods: list[str]) -> None:
        """Every method's main config at each rate of ``tuning.lr`` (``<method>@lr<rate>``), trained on
        each domain of ``tuning.domains`` and validated on its dev split (HDMoLE: on all domains
        together, as its main run); never decoded on a test (local/freeze.py reads their dev scores)."""
        tuning = self.adapters.get("tuning") or {}
        if not tuning.get("lr") or not tuning.get("domains"):
            raise SystemExit(
                "--tune needs a tuning block in the adapters file: tuning: {lr: [...], domains: [...]}"
            )
        unknown = sorted(set(tuning["domains"]) - set(self.domains))
        if unknown:
            raise SystemExit(f"tuning.domains {unknown} are not among the target domains {self.domains}")
        for method in methods:
            main = yaml.safe_load((self.out_dir / f"{method}.yaml").read_text())
            for rate in (float(value) for value in tuning["lr"]):
                name = f"{method}@lr{rate:g}"
                config = {**main, "optim_conf": {**(main.get("optim_conf") or {}), "lr": rate}}
                path = self.out_dir / f"{name}.yaml"
                path.write_text(yaml.safe_dump(config, sort_keys=False))
                self.trainable[name] = self.trainable[method]
                if method == "hdmole":
                    self.add_joint_run(method, TUNE, str(path), name, f"{rate:g}")
                    continue
                for domain in tuning["domains"]:
                    self.add_domain_run(domain, name, method, TUNE, f"{rate:g}", str(path))

    def seed_runs(self, seeds: int) -> None:
        """Every main and joint run again at each further seed (module docstring): sweep ``seed``,
        value ``i``."""
        if seeds < 1:
            raise SystemExit(f"--seeds is the number of seeds per main run (1 or more), got {seeds}")
        first = int(self.finetune.get("seed", 0))
        for run in [run for run in self.runs if run.sweep in ("main", "joint")]:
            main = Path(run.config)
            for index in range(1, seeds):
                path = main.with_name(f"{main.stem}@seed{index}.yaml")
                config = yaml.safe_load(main.read_text())
                path.write_text(yaml.safe_dump({**config, "seed": first + index}, sort_keys=False))
                self.trainable[path.stem] = self.trainable[main.stem]
                name = f"{run.name}@seed{index}"
                self.runs.append(
                    Run(name, run.method, SEED, str(index), str(path), run.train, run.dev, run.tests)
                )

    def joint_runs(self, methods: list[str], main_methods: list[str]) -> None:
        """The joint runs of ``methods`` (each with its main config; HDMoLE is always joint)."""
        missing = sorted(set(methods) - set(main_methods))
        if missing:
            raise SystemExit(f"joint runs reuse the main configs: add {missing} to --methods")
        for method in methods:
            if method != "hdmole":
                self.add_joint_run(method, "joint", str(self.out_dir / f"{method}.yaml"))

    def sweep_runs(self, sweeps: list[str], methods: list[str]) -> None:
        spec = self.adapters.get("sweeps") or {}
        missing = [sweep for sweep in sweeps if sweep not in spec]
        if missing:
            raise SystemExit(
                f"--sweeps {' '.join(missing)}: the adapters file has no sweeps.{missing[0]} entry"
            )
        needed = ({"ssvd_o"} if "split" in sweeps else set()) | set(
            spec["fewshot"]["methods"] if "fewshot" in sweeps else []
        )
        if needed - set(methods):
            add = sorted(needed - set(methods))
            raise SystemExit(f"the split and fewshot sweeps reuse main configs: add {add} to --methods")
        domains = [domain for domain in spec["domains"] if domain in self.domains]
        configs: list[tuple[str, str, str, str]] = []  # (method, sweep, value, config)
        if "budget" in sweeps:
            for value in spec["budget"]["values"]:
                options = {
                    m: method_options(self.adapters, m, self.domains) for m in spec["budget"]["methods"]
                }
                budget = reference_budget(self.model, self.adapters, value)
                for method, match in budget_matches(self.model, budget, options).items():
                    config, _ = self.peft_config(f"{method}@b{value}", options[method], match)
                    configs.append((method, "budget", str(value), config))
        if "allocation" in sweeps:
            configs += self.allocation_configs(spec["allocation"])
        if "split" in sweeps:
            main = yaml.safe_load((self.out_dir / "ssvd_o.yaml").read_text())["peft_conf"]
            for share in spec["split"]["outer_share"]:
                block = {**main, "outer_share": share}  # the main k: only the rotations' split moves
                config = self.write_config(f"ssvd_o@outer{share}", "ssvd_o", block)
                configs.append(("ssvd_o", "split", str(share), config))
        for domain in domains:
            for method, sweep, value, config in configs:
                self.add_domain_run(domain, Path(config).stem, method, sweep, value, config)
            if "fewshot" in sweeps:
                for size in spec["fewshot"]["sizes"]:
                    for method in spec["fewshot"]["methods"]:
                        config = str(self.out_dir / f"{method}.yaml")
                        train = f"{self.data}/fewshot/{domain}_adapt_n{size}"
                        self.add_domain_run(
                            domain, f"{method}@n{size}", method, "fewshot", str(size), config, train
                        )

    def allocation_configs(self, spec: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        """(method, "allocation", part, config) for each method of ``spec`` with its adapters on each part
        only (the part's options over the method's), matched to budget B."""
        budget = reference_budget(self.model, self.adapters)
        configs = []
        for part, overrides in spec["parts"].items():
            options = {
                m: {**method_options(self.adapters, m, self.domains), **overrides} for m in spec["methods"]
            }
            for method, match in budget_matches(self.model, budget, options).items():
                config, _ = self.peft_config(f"{method}@{part}", options[method], match)
                configs.append((method, "allocation", part, config))
        return configs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_config", type=Path, required=True, help="config.yaml of the base model")
    parser.add_argument("--finetune", type=Path, required=True, help="training options of every run")
    parser.add_argument("--adapters", type=Path, required=True, help="methods, targets, budget, sweeps")
    parser.add_argument("--out_dir", type=Path, required=True)
    parser.add_argument("--data", required=True, help="data dir of the profile")
    parser.add_argument("--methods", required=True, help="space-separated methods of the main runs")
    parser.add_argument("--domains", required=True, help="space-separated target domains")
    parser.add_argument("--sweeps", default="", help=f"space-separated sweeps to run: {' '.join(SWEEPS)}")
    parser.add_argument(
        "--joint_methods", default="", help="space-separated methods also trained on all domains together"
    )
    parser.add_argument(
        "--ood_domains", default="", help="space-separated out-of-distribution test domains of joint runs"
    )
    parser.add_argument("--tune", action="store_true", help="also the tuning runs of every main method")
    parser.add_argument(
        "--seeds", type=int, default=1, help="seeds per main and joint run (the finetune file's first)"
    )
    parser.add_argument(
        "--frozen", type=Path, default=None, help="learning rates frozen on dev (local/freeze.py), per method"
    )
    args = parser.parse_args(argv)
    adapters = yaml.safe_load(args.adapters.read_text())
    methods, domains, sweeps = args.methods.split(), args.domains.split(), args.sweeps.split()
    unknown = sorted(set(sweeps) - set(SWEEPS))
    if unknown:
        raise SystemExit(f"--sweeps: unknown {unknown}; known: {' '.join(SWEEPS)}")
    planner = Planner(
        build_meta_model(args.base_config),
        yaml.safe_load(args.base_config.read_text()),
        yaml.safe_load(args.finetune.read_text()),
        adapters,
        args.out_dir,
        args.data,
        domains,
    )
    planner.ood_domains = args.ood_domains.split()
    if args.frozen is not None:
        planner.frozen_rates = {method: frozen_rate(args.frozen, method) for method in methods}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    blocks = planner.main_runs(methods)
    planner.joint_runs(args.joint_methods.split(), methods)
    planner.seed_runs(args.seeds)
    if args.tune:
        planner.tuning_runs(methods)
    if sweeps:
        planner.sweep_runs(sweeps, methods)
    if "layer_analysis" in adapters:
        planner.fusion_config("layer_analysis", adapters["layer_analysis"])
    (args.out_dir / "trainable.json").write_text(json.dumps(planner.trainable, indent=1) + "\n")
    (args.out_dir / "budget_shortfalls.json").write_text(json.dumps(planner.shortfalls, indent=1) + "\n")
    reference = dict(adapters["budget"])
    main_settings = {"budget": str(reference[get_method(reference["method"]).knob])}
    if "ssvd_o" in blocks:
        main_settings["split"] = str(blocks["ssvd_o"].get("outer_share", ""))
    main_settings["allocation"] = ALL_LAYERS
    (args.out_dir / "main_settings.json").write_text(json.dumps(main_settings) + "\n")
    write_runs(args.out_dir / "runs.tsv", planner.runs)
    knob_of = {m: get_method(registry_method(adapters, m)).knob for m in blocks}
    knobs = ", ".join(
        f"{m} {knob_of[m]}={b[knob_of[m]]} ({planner.trainable[m]:,})" for m, b in blocks.items()
    )
    print(f"{len(planner.runs)} runs; main budget: {knobs}; full {planner.trainable.get('full', 0):,}")


if __name__ == "__main__":
    main()

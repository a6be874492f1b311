"""The round-trip matrix through ESPnet: every method (HDMoLE where it applies) x {plugin inference
load, --peft_merge load, merged export loaded and decoded by stock ESPnet, DDP training}.

In process, ``PeftASRTask`` builds an adapted tiny Transformer ASR model on a stock base, takes a
few Adam steps on a batch, and writes the model file and config.yaml as ESPnet training writes
them. Every way back to a model is compared with the model in memory on the encoder output of a
batch: the plugin's load (from another random state) bit for bit, the merged load and the stock
export to 1e-5 relative (a merge folds the update into W in float32), and the stock decoding of
the export gives the plugin decoding's hypotheses. DDP runs ``espnet_plugins.bin.asr_train`` in two
gloo processes with ESPnet's default ``--unused_parameters false``. A decoder adapter that the
loss never reaches (ctc_weight 1.0) fails the first training step.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from espnet2.bin import asr_inference as stock_inference
from espnet2.tasks.asr import ASRTask
from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump
from espnet_runs import TINY_CONFIG, data_args, read_text_file, run_module
from tiny_corpus import TOKENS, write_data_dir, write_token_list

from espnet_plugins.bin import asr_inference as plugin_inference
from espnet_plugins.export import export_merged
from espnet_plugins.modules import stock_task
from espnet_plugins.task import with_merged_adapters
from espnet_plugins.tasks.asr import PeftASRTask
from ssvd_peft.checkpoint import load_adapter
from ssvd_peft.gradient_check import AdapterGradientError
from ssvd_peft.methods.hdmole_routing import merge_domain_experts

TARGETS = ["linear_q", "linear_v", "w_1", "w_2"]
METHODS = {
    "lora": {"peft": "lora", "peft_conf": {"rank": 2}},
    "dora": {"peft": "dora", "peft_conf": {"rank": 2}},
    "pissa": {"peft": "pissa", "peft_conf": {"rank": 2}},
    "pissa-randomized": {"peft": "pissa", "peft_conf": {"rank": 2, "svd_method": "randomized"}},
    "ssvd": {"peft": "ssvd", "peft_conf": {"k_ratio": 0.25}},
    "ssvd_o": {"peft": "ssvd_o", "peft_conf": {"k_ratio": 0.25, "outer_share": 0.5}},
    "hdmole": {
        "peft": "hdmole",
        "peft_conf": {
            "rank": 2,
            "num_domains": 2,
            "router_source": "encoder.embed",
            "router_side": "output",
            "domains": ["a", "b"],
        },
    },
}
DECODING = ["--batch_size", "1", "--beam_size", "2", "--ctc_weight", "0.5", "--ngpu", "0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stock tiny ASR model (random weights: every path must reproduce it, trained or not), with
    its config.yaml, and a few utterances."""
    root = tmp_path_factory.mktemp("round_trip")
    write_data_dir(root / "data" / "test", 4, shift=1.1, seed=5)
    write_data_dir(root / "data" / "train", 16, shift=1.1, seed=6)
    task = stock_task("asr")
    args = task.get_parser().parse_args(
        ["--config", str(TINY_CONFIG), "--token_list", str(write_token_list(root / "tokens.txt"))]
    )
    torch.manual_seed(0)
    model = task.build_model(args)
    (root / "base").mkdir()
    with (root / "base" / "config.yaml").open("w") as f:
        yaml_no_alias_safe_dump(vars(args), f)
    torch.save(model.state_dict(), root / "base" / "model.pth")
    return root


def batch(data: Path) -> dict[str, torch.Tensor]:
    """The data dir's utterances as one padded ESPnet batch (speech, text and their lengths)."""
    wavs = [soundfile.read(line.split()[1])[0] for line in (data / "wav.scp").read_text().splitlines()]
    texts = [line.split()[1] for line in (data / "text").read_text().splitlines()]
    speech = torch.zeros(len(wavs), max(len(w) for w in wavs))
    for row, wav in enumerate(wavs):
        speech[row, : len(wav)] = torch.from_numpy(np.asarray(wav, dtype=np.float32))
    ids = [[TOKENS.index(char) for char in text] for text in texts]
    text = torch.full((len(ids), max(len(t) for t in ids)), -1, dtype=torch.long)
    for row, tokens in enumerate(ids):
        text[row, : len(tokens)] = torch.tensor(tokens)
    return {
        "speech": speech,
        "speech_lengths": torch.tensor([len(w) for w in wavs]),
        "text": text,
        "text_lengths": torch.tensor([len(t) for t in ids]),
    }


def encoder_output(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.encode(data["speech"], data["speech_lengths"])[0]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(
        torch.linalg.norm(value.double() - reference.double()) / torch.linalg.norm(reference.double())
    )


class Experiment:
    """A trained adapter as ESPnet writes it, and the encoder output of the model in memory."""

    def __init__(self, work: Path, case: str) -> None:
        self.case, self.exp = case, work / "exp" / case
        self.exp.mkdir(parents=True)
        block = METHODS[case]
        config = {
            **block,
            "peft_conf": {"target_modules": TARGETS, **block["peft_conf"]},
            "peft_pretrained": str(work / "base" / "model.pth"),
            "peft_modules_to_save": ["ctc.ctc_lo"],
            "output_dir": str(self.exp),
        }
        (self.exp / "in.yaml").write_text(yaml.safe_dump(config))
        args = PeftASRTask.get_parser().parse_args(["--config", str(self.exp / "in.yaml")])
        PeftASRTask.check_required_command_args(args)
        model = PeftASRTask.build_model(args)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        train = batch(work / "data" / "train")
        model.train()
        for _ in range(3):
            optimizer.zero_grad()
            model(**train)[0].backward()
            optimizer.step()
        self.data = batch(work / "data" / "test")
        self.expected = encoder_output(model, self.data)
        self.model = model
        self.config, self.model_file = self.exp / "config.yaml", self.exp / "valid.acc.best.pth"
        with self.config.open("w") as f:
            yaml_no_alias_safe_dump(vars(args), f)
        torch.save(model.state_dict(), self.model_file)


MERGEABLE = [case for case in METHODS if case != "hdmole"]


@pytest.fixture(scope="module")
def experiments(work: Path) -> dict[str, Experiment]:
    """Each case's experiment, made on first use and shared by the cells."""
    return {}


@pytest.fixture
def experiment(request: pytest.FixtureRequest, work: Path, experiments: dict[str, Experiment]) -> Experiment:
    case = request.param
    if case not in experiments:
        experiments[case] = Experiment(work, case)
    return experiments[case]


@pytest.mark.parametrize("experiment", list(METHODS), indirect=True)
def test_the_model_file_holds_the_adapter_only(experiment: Experiment) -> None:
    state = torch.load(experiment.model_file, map_location="cpu")
    assert any(".peft_adapters.default." in key for key in state)
    assert "encoder.encoders.0.feed_forward.w_1.weight" not in state


@pytest.mark.parametrize("experiment", list(METHODS), indirect=True)
def test_the_plugin_loads_the_trained_model_bit_for_bit(experiment: Experiment) -> None:
    torch.manual_seed(12345)  # a randomized SVD at load time would now differ
    model, _ = PeftASRTask.build_model_from_file(experiment.config, experiment.model_file)
    assert torch.equal(encoder_output(model, experiment.data), experiment.expected)


@pytest.mark.parametrize("experiment", list(METHODS), indirect=True)
def test_load_adapter_opens_what_espnet_training_wrote_on_the_plain_model(
    experiment: Experiment, work: Path
) -> None:
    """The stock ESPnet model (no plugin) with its pretrained weights, and the adapter-only model file
    with the experiment's config.yaml: the trained model, bit for bit."""
    plain, _ = ASRTask.build_model_from_file(work / "base" / "config.yaml", work / "base" / "model.pth")
    torch.manual_seed(4321)
    load_adapter(plain, experiment.model_file)
    assert torch.equal(encoder_output(plain, experiment.data), experiment.expected)


@pytest.mark.parametrize("experiment", MERGEABLE, indirect=True)
def test_merged_load_gives_the_trained_model(experiment: Experiment) -> None:
    model, _ = with_merged_adapters(PeftASRTask).build_model_from_file(
        experiment.config, experiment.model_file
    )
    assert relative_error(encoder_output(model, experiment.data), experiment.expected) < 1e-5


@pytest.mark.parametrize("experiment", list(METHODS), indirect=True)
def test_the_merged_export_is_the_trained_model_for_stock_espnet(experiment: Experiment) -> None:
    domain = "b" if experiment.case == "hdmole" else None
    config, model_file = export_merged(
        PeftASRTask, experiment.config, experiment.model_file, experiment.exp / "export", domain
    )
    stock, _ = ASRTask.build_model_from_file(config, model_file)
    if experiment.case == "hdmole":
        reference, _ = PeftASRTask.build_model_from_file(experiment.config, experiment.model_file)
        merge_domain_experts(reference, domain=1)
        assert torch.equal(encoder_output(stock, experiment.data), encoder_output(reference, experiment.data))
        return
    assert relative_error(encoder_output(stock, experiment.data), experiment.expected) < 1e-5


def decode(module: object, config: Path, model_file: Path, output_dir: Path, data: Path, *extra: str) -> dict:
    cmd = ["--asr_train_config", str(config), "--asr_model_file", str(model_file)]
    cmd += ["--output_dir", str(output_dir), "--data_path_and_name_and_type", f"{data}/wav.scp,speech,sound"]
    module.main(cmd=[*cmd, *DECODING, *extra])
    return read_text_file(output_dir / "1best_recog" / "text")


@pytest.mark.parametrize("experiment", MERGEABLE, indirect=True)
def test_stock_espnet_decodes_the_export_as_the_plugin_decodes_the_adapter(
    experiment: Experiment, work: Path
) -> None:
    data = work / "data" / "test"
    export = experiment.exp / "export"
    if not (export / "model.pth").is_file():
        export_merged(PeftASRTask, experiment.config, experiment.model_file, export)
    plugin = decode(
        plugin_inference, experiment.config, experiment.model_file, experiment.exp / "plugin", data
    )
    merged = decode(
        plugin_inference,
        experiment.config,
        experiment.model_file,
        experiment.exp / "merged",
        data,
        "--peft_merge",
        "true",
    )
    stock = decode(
        stock_inference, export / "config.yaml", export / "model.pth", experiment.exp / "stock", data
    )
    assert plugin.keys() == read_text_file(data / "text").keys()
    assert merged == plugin and stock == plugin


# Every method trains under DDP in tests/test_round_trip.py (two gloo processes, DDP's defaults);
# through ESPnet's entry point CI runs the methods whose parameters differ in kind (SSVD: rotations
# that may be empty, PiSSA: a rewritten base, HDMoLE: a model part), the rest with -m slow.
DDP_IN_CI = ("ssvd", "pissa", "hdmole")


@pytest.mark.parametrize(
    "case", [case if case in DDP_IN_CI else pytest.param(case, marks=pytest.mark.slow) for case in METHODS]
)
def test_distributed_training_through_the_entry_point(case: str, work: Path) -> None:
    """Two gloo processes, ESPnet's default --unused_parameters false: no unused parameter anywhere."""
    block = METHODS[case]
    config = yaml.safe_load((Path(TINY_CONFIG)).read_text())
    config = {
        key: config[key] for key in ("batch_type", "optim", "optim_conf", "use_matplotlib", "use_tensorboard")
    }
    config.update(
        block, peft_conf={"target_modules": TARGETS, **block["peft_conf"]}, batch_size=4, num_workers=0
    )
    (work / f"ddp_{case}.yaml").write_text(yaml.safe_dump(config))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exp = work / "exp" / f"ddp_{case}"
    args = ["--nproc_per_node", "2", "--master_port", str(port), "-m", "espnet_plugins.bin.asr_train"]
    args += [
        "--config",
        str(work / f"ddp_{case}.yaml"),
        "--peft_pretrained",
        str(work / "base" / "model.pth"),
    ]
    args += ["--output_dir", str(exp), "--ngpu", "0", "--dist_backend", "gloo", "--max_epoch", "1"]
    args += data_args("train", work / "data" / "train") + data_args("valid", work / "data" / "test")
    log = run_module("torch.distributed.run", args, work, work / f"ddp_{case}.log")
    assert re.search(r":0/2\] .* 1epoch results", log)
    state = torch.load(exp / "1epoch.pth", map_location="cpu")
    assert state and all("peft_adapters." in key or "fingerprint" in key for key in state)


def test_an_adapter_the_loss_never_reaches_fails_the_first_training_step(work: Path, monkeypatch) -> None:
    """A module that bypasses its Linear's adapter (here: keeps only the base layer's output of one
    attention projection) would train that adapter not at all, silently; ESPnet's trainer stops."""
    build_model = PeftASRTask.build_model.__func__

    def bypassing(cls, args):
        model = build_model(cls, args)
        projection = model.encoder.encoders[1].self_attn.linear_v
        projection.register_forward_hook(lambda module, inputs, _output: module.base_layer(inputs[0]))
        return model

    monkeypatch.setattr(PeftASRTask, "build_model", classmethod(bypassing))
    config = {
        "peft": "lora",
        "peft_conf": {"target_modules": TARGETS, "rank": 2},
        "peft_pretrained": str(work / "base" / "model.pth"),
        "batch_type": "unsorted",
        "batch_size": 4,
        "num_workers": 0,
        "use_matplotlib": False,
        "use_tensorboard": False,
    }
    (work / "bypass.yaml").write_text(yaml.safe_dump(config))
    exp = work / "exp" / "bypass"
    cmd = ["--config", str(work / "bypass.yaml"), "--output_dir", str(exp), "--ngpu", "0", "--max_epoch", "1"]
    cmd += data_args("train", work / "data" / "train") + data_args("valid", work / "data" / "test")
    with pytest.raises(AdapterGradientError, match=r"in 1 modules: encoder.encoders.1.self_attn.linear_v\."):
        PeftASRTask.main(cmd=cmd)
    assert not list(exp.glob("*epoch.pth"))

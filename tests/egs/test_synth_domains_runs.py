"""egs/synth_domains/asr1 helpers of stages 2, 5 and 8: voices per sentence, token lists, derived data
dirs (HDMoLE's combined set, few-shot subsets) and the list of fine-tuning runs with its sweeps."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

RECIPE = Path(__file__).resolve().parents[2] / "egs" / "synth_domains" / "asr1"
sys.path.insert(0, str(RECIPE / "local"))

import derived_data_dirs  # noqa: E402
import plan  # noqa: E402
import token_list  # noqa: E402

DOMAINS = yaml.safe_load((RECIPE / "conf" / "domains.yaml").read_text())
PARTS = ("encoder", "decoder", "attention", "feed_forward")  # the allocation sweep's points


def test_each_sentence_is_spoken_by_distinct_voices_in_turn() -> None:
    sentences = [f"sentence {i}" for i in range(9)]
    rows = plan.split_plan("source_train", sentences, DOMAINS, 0, [], voices_per_sentence=2)
    voices = DOMAINS["domains"]["source"]["splits"]["train"]
    assert len(rows) == 18 and len({row["utt"] for row in rows}) == 18
    for i, sentence in enumerate(sentences):
        pair = [row for row in rows if row["text"] == sentence]
        assert [row["voice"] for row in pair] == [voices[(2 * i) % 6], voices[(2 * i + 1) % 6]]
    assert set(Counter(row["voice"] for row in rows).values()) == {3}


def test_one_voice_per_sentence_keeps_the_plan_unchanged() -> None:
    sentences = ["a b c", "d e f"]
    default = plan.split_plan("accent_adapt", sentences, DOMAINS, 0, [])
    assert default == plan.split_plan("accent_adapt", sentences, DOMAINS, 0, [], voices_per_sentence=1)
    assert [row["utt"] for row in default] == [
        "joe.scotland-accent_adapt-00000",
        "joe.caribbean-accent_adapt-00001",
    ]


def test_more_voices_per_sentence_than_voices_is_refused() -> None:
    with pytest.raises(ValueError, match=r"voices_per_sentence of child_test is 3: .* 2 voices"):
        plan.split_plan("child_test", ["a b c"], DOMAINS, 0, [], voices_per_sentence=3)


def test_bpe_token_list_follows_espnet_and_encodes_every_sentence(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    words = ["the", "cat", "dog", "sat", "on", "a", "mat", "red", "blue", "green", "house", "runs"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 4)) for i in range(200)]
    tokens = token_list.bpe_token_list(texts, 24, tmp_path / "bpe.model")
    assert tokens[:2] == ["<blank>", "<unk>"] and tokens[-1] == "<sos/eos>"
    assert len(tokens) == 24 - 3 + 3 and len(set(tokens)) == len(tokens)
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "bpe.model"))
    known = set(tokens)
    for text in texts[:20]:
        pieces = processor.encode(text, out_type=str)
        assert set(pieces) <= known and processor.decode(pieces) == text


def test_character_token_list_ranks_characters_by_count() -> None:
    assert token_list.character_token_list(["aab", "b a"]) == [
        "<blank>",
        "<unk>",
        "a",
        "b",
        "<space>",
        "<sos/eos>",
    ]


def data_dir(path: Path, speakers: dict[str, int], domain: str) -> Path:
    """A Kaldi data dir with speakers[spk] utterances each (ids <spk>-<n>)."""
    utts = [f"{spk}-{n}" for spk, count in speakers.items() for n in range(count)]
    path.mkdir(parents=True)
    tables = {
        "wav.scp": {u: f"/audio/{u}.wav" for u in utts},
        "text": {u: f"words of {u}" for u in utts},
        "utt2spk": {u: u.split("-")[0] for u in utts},
        "utt2domain": dict.fromkeys(utts, domain),
        "speech_shape": {u: "16000" for u in utts},
    }
    for name, table in tables.items():
        (path / name).write_text("".join(f"{u} {v}\n" for u, v in sorted(table.items())))
    return path


def read(path: Path) -> dict[str, str]:
    return derived_data_dirs.read_table(path)


def test_few_shot_subsets_are_balanced_over_speakers_and_nested(tmp_path: Path) -> None:
    source = data_dir(tmp_path / "child_adapt", {"a": 5, "b": 2, "c": 5}, "child")
    derived_data_dirs.subset(tmp_path / "n7", source, 7)
    derived_data_dirs.subset(tmp_path / "n3", source, 3)
    small, large = read(tmp_path / "n3" / "utt2spk"), read(tmp_path / "n7" / "utt2spk")
    assert Counter(small.values()) == {"a": 1, "b": 1, "c": 1}
    assert Counter(large.values()) == {"a": 3, "b": 2, "c": 2}
    assert set(small) <= set(large)
    for name in ("wav.scp", "text", "utt2domain", "speech_shape"):
        table = read(tmp_path / "n7" / name)
        assert list(table) == sorted(large) and table == {u: read(source / name)[u] for u in large}
    assert read(tmp_path / "n7" / "spk2utt") == {"a": "a-0 a-1 a-2", "b": "b-0 b-1", "c": "c-0 c-1"}


def test_a_subset_larger_than_its_source_is_refused(tmp_path: Path) -> None:
    source = data_dir(tmp_path / "child_adapt", {"a": 2}, "child")
    with pytest.raises(SystemExit, match="has 2 utterances: cannot take 3"):
        derived_data_dirs.subset(tmp_path / "n3", source, 3)
    assert not (tmp_path / "n3").exists()


def test_combined_dir_keeps_every_utterance_and_its_domain(tmp_path: Path) -> None:
    accent = data_dir(tmp_path / "accent_adapt", {"x": 2}, "accent")
    child = data_dir(tmp_path / "child_adapt", {"y": 3}, "child")
    assert derived_data_dirs.combine(tmp_path / "combined", [accent, child]) == 5
    domains = read(tmp_path / "combined" / "utt2domain")
    assert domains == {"x-0": "accent", "x-1": "accent", "y-0": "child", "y-1": "child", "y-2": "child"}
    with pytest.raises(SystemExit, match="same utterance id"):
        derived_data_dirs.combine(tmp_path / "twice", [accent, accent])


def test_a_stale_speech_shape_is_refused_with_the_stage_to_rerun(tmp_path: Path) -> None:
    accent = data_dir(tmp_path / "accent_adapt", {"x": 2}, "accent")
    (accent / "speech_shape").write_text("x-0 16000\nold-utt 16000\n")  # written before wav.scp changed
    with pytest.raises(SystemExit, match=r"speech_shape lacks 1 utterances .* \(e.g. x-1\): .* run stage 6"):
        derived_data_dirs.combine(tmp_path / "combined", [accent])
    assert not (tmp_path / "combined").exists()


def write_base_config(path: Path) -> Path:
    """config.yaml of a small ESPnet Transformer ASR model: ESPnet's defaults plus the model options."""
    from espnet2.tasks.asr import ASRTask

    with mock.patch.object(sys, "argv", [sys.argv[0]]):  # ESPnet parses the process's argv for its defaults
        defaults = ASRTask.get_default_config()
    config = {
        **defaults,
        "token_list": ["<blank>", "<unk>", "a", "b", "<sos/eos>"],
        "input_size": 20,
        "frontend": None,
        "normalize": None,
        "specaug": None,
        "encoder": "transformer",
        "encoder_conf": {"output_size": 96, "attention_heads": 2, "linear_units": 192, "num_blocks": 2},
        "decoder": "transformer",
        "decoder_conf": {"attention_heads": 2, "linear_units": 192, "num_blocks": 1},
        "model_conf": {"ctc_weight": 0.3},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def plan_runs(tmp_path: Path, methods: str, sweeps: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Stage 8's planner (local/finetune_configs.py) on the full profile's adapters, in this process
    (``extra``: more of its options): its exit code and what it printed."""
    pytest.importorskip("espnet2")
    import finetune_configs

    argv = [
        "--base_config", str(write_base_config(tmp_path / "config.yaml")),
        "--finetune", str(RECIPE / "conf" / "asr" / "ci" / "finetune.yaml"),
        "--adapters", str(RECIPE / "conf" / "asr" / "full" / "adapters.yaml"),
        "--out_dir", str(tmp_path / "conf"), "--data", "data", "--methods", methods,
        "--domains", "accent child noisy", "--sweeps", sweeps, *extra,
    ]  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            finetune_configs.main(argv)
        except SystemExit as exit_:
            code = 1 if exit_.code not in (0, None) else 0
            if isinstance(exit_.code, str):
                err.write(exit_.code)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def test_runs_cover_every_method_domain_and_sweep_point(tmp_path: Path) -> None:
    result = plan_runs(tmp_path, "full lora dora pissa ssvd ssvd_o hdmole", "budget split allocation fewshot")
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in (tmp_path / "conf" / "runs.tsv").read_text().splitlines()]
    assert all(len(line) == 8 for line in lines)
    runs = {line[0]: line for line in lines}
    main = [name for name, line in runs.items() if line[2] == "main"]
    assert len(main) == 6 * 3 + 1
    assert runs["all/hdmole"][5:] == ["data/combined/adapt", "data/combined/dev", "accent child noisy"]
    assert runs["child/lora"][5:] == ["data/child_adapt", "data/child_dev", "child"]
    swept = sorted(name for name, line in runs.items() if line[2] != "main")
    assert swept == sorted(
        [f"child/{m}@b{v}" for m in ("lora", "ssvd", "ssvd_o") for v in (2, 32)]
        + [f"child/ssvd_o@outer{s}" for s in (0.0, 0.5, 0.75)]
        + [f"child/{m}@{part}" for m in ("lora", "ssvd", "ssvd_o") for part in PARTS]
        + [f"child/{m}@n{n}" for m in ("full", "lora", "ssvd", "ssvd_o") for n in (50, 100)]
    )
    assert runs["child/lora@n50"][4] == str(tmp_path / "conf" / "lora.yaml")
    assert runs["child/lora@n50"][5] == "data/fewshot/child_adapt_n50"


def test_joint_runs_train_on_every_domain_with_the_main_config_and_test_out_of_distribution_too(
    tmp_path: Path,
) -> None:
    joint = ["--joint_methods", "full lora hdmole", "--ood_domains", "phone"]
    assert plan_runs(tmp_path, "full lora ssvd_o hdmole", "", *joint).returncode == 0
    lines = [line.split("\t") for line in (tmp_path / "conf" / "runs.tsv").read_text().splitlines()]
    runs = {line[0]: line for line in lines}
    assert len(lines) == len(runs) == 3 * 3 + 1 + 2
    tests = "accent child noisy phone"
    combined = ["data/combined/adapt", "data/combined/dev", tests]
    for method in ("full", "lora"):
        assert runs[f"all/{method}"] == [
            f"all/{method}",
            method,
            "joint",
            "-",
            str(tmp_path / "conf" / f"{method}.yaml"),
            *combined,
        ]
    assert runs["all/hdmole"][1:3] == ["hdmole", "main"] and runs["all/hdmole"][5:] == combined
    assert runs["child/lora"][7] == "child"  # per-domain runs are tested on their own domain only
    (tmp_path / "refused").mkdir()
    result = plan_runs(tmp_path / "refused", "lora", "", "--joint_methods", "full")
    assert result.returncode != 0 and "add ['full'] to --methods" in result.stderr


def test_every_peft_config_trains_the_budget_and_hdmole_that_of_all_domains(tmp_path: Path) -> None:
    assert plan_runs(tmp_path, "lora ssvd ssvd_o hdmole", "budget split").returncode == 0
    conf = tmp_path / "conf"
    trainable = yaml.safe_load((conf / "trainable.json").read_text())
    budget = trainable["lora"]
    for method in ("ssvd", "ssvd_o", "ssvd_o@outer0.5"):
        assert abs(trainable[method] - budget) <= 0.05 * budget, trainable
    assert trainable["lora@b2"] < budget < trainable["lora@b32"]
    one_rank_of_three_experts = 3 * budget / 8  # the budget is LoRA rank 8; HDMoLE's knob moves 3 experts
    assert abs(trainable["hdmole"] - 3 * budget) <= one_rank_of_three_experts / 2 + 0.02 * budget, trainable
    hdmole = yaml.safe_load((conf / "hdmole.yaml").read_text())
    assert hdmole["peft_conf"]["domains"] == ["accent", "child", "noisy"]
    assert hdmole["peft_conf"]["router_source"] == "encoder.embed" and "peft_hdmole" not in hdmole
    assert hdmole["peft_conf"]["num_domains"] == 3
    split = yaml.safe_load((conf / "ssvd_o@outer0.5.yaml").read_text())["peft_conf"]
    main = yaml.safe_load((conf / "ssvd_o.yaml").read_text())["peft_conf"]
    assert split == {**main, "outer_share": 0.5}  # at the main k
    assert yaml.safe_load((conf / "main_settings.json").read_text()) == {
        "budget": "8", "split": "0.25", "allocation": "all"
    }  # fmt: skip
    shortfalls = yaml.safe_load((conf / "budget_shortfalls.json").read_text())
    for name, entry in shortfalls.items():
        assert entry["trainable"] == trainable[name] and entry["budget"] != entry["trainable"], name
    within_reach = [name for name in trainable if name not in shortfalls and name.split("@")[0] != "hdmole"]
    assert {"lora", "ssvd", "ssvd_o"} <= set(within_reach)


def test_allocation_points_put_budget_b_on_one_part_of_the_model_each(tmp_path: Path) -> None:
    from espnet_plugins.modules import build_meta_model
    from ssvd_peft.budget import estimate_budget
    from ssvd_peft.config import PeftConfigError

    assert plan_runs(tmp_path, "lora ssvd ssvd_o", "allocation").returncode == 0
    conf = tmp_path / "conf"
    trainable = yaml.safe_load((conf / "trainable.json").read_text())
    shortfalls = yaml.safe_load((conf / "budget_shortfalls.json").read_text())
    assert set(shortfalls) == {
        "ssvd@feed_forward",
        "ssvd_o@feed_forward",
    }  # k <= 96 = min(in, out) of w_1, w_2
    model = build_meta_model(tmp_path / "config.yaml")
    layers = {}
    for method in ("lora", "ssvd", "ssvd_o"):  # the full profile's allocation methods
        main = yaml.safe_load((conf / f"{method}.yaml").read_text())["peft_conf"]
        knob = "rank" if method == "lora" else "k"
        for part in PARTS:
            block = yaml.safe_load((conf / f"{method}@{part}.yaml").read_text())["peft_conf"]
            report = estimate_budget(model, method, **block)
            assert block[knob] > main[knob]  # the same total on fewer layers
            if f"{method}@{part}" in shortfalls:  # B out of reach: the largest rank or k, recorded
                assert shortfalls[f"{method}@{part}"]["trainable"] == report.trainable < trainable[method]
                with pytest.raises(PeftConfigError):
                    estimate_budget(model, method, **{**block, knob: block[knob] + 1})
            else:
                assert abs(report.trainable - trainable[method]) <= 0.1 * trainable[method], part
            layers[part] = {module.name for module in report.modules}
    assert all(name.startswith("encoder.") for name in layers["encoder"])
    assert all(name.startswith("decoder.") for name in layers["decoder"])
    assert layers["encoder"] | layers["decoder"] == layers["attention"] | layers["feed_forward"]
    assert not layers["attention"] & layers["feed_forward"]
    assert all(name.rsplit(".", 1)[1] in ("w_1", "w_2") for name in layers["feed_forward"])


def test_each_method_trains_with_its_own_options_over_the_shared_ones(tmp_path: Path) -> None:
    assert plan_runs(tmp_path, "full lora ssvd ssvd_o", "budget split").returncode == 0
    conf = tmp_path / "conf"
    shared = yaml.safe_load((RECIPE / "conf" / "asr" / "ci" / "finetune.yaml").read_text())
    training = yaml.safe_load((RECIPE / "conf" / "asr" / "full" / "adapters.yaml").read_text())["training"]
    assert {"full", "ssvd", "ssvd_o"} <= set(training)

    def lr(config: str) -> float:
        return yaml.safe_load((conf / f"{config}.yaml").read_text())["optim_conf"]["lr"]

    assert lr("lora") == lr("lora@b32") == shared["optim_conf"]["lr"]
    for method in ("full", "ssvd", "ssvd_o"):
        assert lr(method) == training[method]["optim_conf"]["lr"] != shared["optim_conf"]["lr"]
    assert lr("ssvd@b2") == training["ssvd"]["optim_conf"]["lr"]  # the sweeps' configs too
    assert lr("ssvd_o@outer0.5") == training["ssvd_o"]["optim_conf"]["lr"]
    assert yaml.safe_load((conf / "ssvd.yaml").read_text())["max_epoch"] == shared["max_epoch"]


def test_fusion_rows_fuse_the_frozen_encoder_and_count_the_head_decoder_and_ctc(tmp_path: Path) -> None:
    from espnet_plugins.modules import build_meta_model

    methods = "lora fusion_sum fusion_grouped fusion_ladder fusion_grouped_lora"
    assert plan_runs(tmp_path, methods, "").returncode == 0
    conf = tmp_path / "conf"
    runs = [line.split("\t") for line in (conf / "runs.tsv").read_text().splitlines()]
    assert [line[0] for line in runs if line[1] == "fusion_ladder"] == [
        f"{domain}/fusion_ladder" for domain in ("accent", "child", "noisy")
    ]
    model = build_meta_model(tmp_path / "config.yaml")
    trained = sum(p.numel() for module in (model.decoder, model.ctc) for p in module.parameters())
    trainable = yaml.safe_load((conf / "trainable.json").read_text())
    taps = 2 + 1  # the test model's 2 blocks and the embedding output
    assert trainable["fusion_sum"] == trained + taps + 96  # softmax weights, the residual gate g in R^96
    assert trainable["fusion_grouped"] > trainable["fusion_sum"]
    lora = yaml.safe_load((conf / "lora.yaml").read_text())["peft_conf"]
    fused = yaml.safe_load((conf / "fusion_grouped_lora.yaml").read_text())
    assert "peft" not in yaml.safe_load((conf / "fusion_grouped.yaml").read_text())
    assert fused["peft"] == "lora" and fused["peft_conf"]["rank"] == lora["rank"]
    assert fused["peft_conf"]["target_modules"] == [rf"encoder\..*\.{t}" for t in lora["target_modules"]]
    encoder_lora = trainable["fusion_grouped_lora"] - trainable["fusion_grouped"]
    assert 0 < encoder_lora < trainable["lora"]  # the decoder is trained in full, so no LoRA there
    layers = yaml.safe_load((conf / "layer_analysis.yaml").read_text())
    assert layers["fusion"] == {"variant": "weighted_sum"} and layers["optim_conf"]["lr"] == 0.0005


def test_tuning_runs_train_every_method_at_each_rate_on_the_tuning_domains(tmp_path: Path) -> None:
    assert plan_runs(tmp_path, "full lora hdmole", "", "--tune").returncode == 0
    conf = tmp_path / "conf"
    tuning = yaml.safe_load((RECIPE / "conf" / "asr" / "full" / "adapters.yaml").read_text())["tuning"]
    assert len(tuning["lr"]) >= 4
    runs = {line.split("\t")[0]: line.split("\t") for line in (conf / "runs.tsv").read_text().splitlines()}
    tuned = {name: line for name, line in runs.items() if line[2] == "tune"}
    rates = [f"{float(rate):g}" for rate in tuning["lr"]]
    expected = [f"{d}/{m}@lr{r}" for m in ("full", "lora") for r in rates for d in tuning["domains"]]
    assert sorted(tuned) == sorted(expected + [f"all/hdmole@lr{r}" for r in rates])
    for name, line in tuned.items():
        method, rate = line[1], float(line[3])
        config = yaml.safe_load(Path(line[4]).read_text())
        main = yaml.safe_load((conf / f"{method}.yaml").read_text())
        assert config == {**main, "optim_conf": {**main["optim_conf"], "lr": rate}}, name
    assert runs["all/hdmole@lr0.001"][5] == "data/combined/adapt"


def test_frozen_rates_set_every_config_of_their_method(tmp_path: Path) -> None:
    import freeze

    frozen = freeze.write_frozen(
        {"scores": {}, "choices": {"lora": 0.0007, "ssvd_o": 0.0003}}, tmp_path / "f"
    )
    assert plan_runs(tmp_path, "lora ssvd_o", "budget split", "--frozen", str(frozen)).returncode == 0
    conf = tmp_path / "conf"

    def lr(config: str) -> float:
        return yaml.safe_load((conf / f"{config}.yaml").read_text())["optim_conf"]["lr"]

    assert lr("lora") == lr("lora@b32") == 0.0007
    assert lr("ssvd_o") == lr("ssvd_o@outer0.5") == lr("ssvd_o@b2") == 0.0003
    (tmp_path / "missing").mkdir()
    missing = plan_runs(tmp_path / "missing", "lora dora", "", "--frozen", str(frozen))
    assert missing.returncode != 0 and "has no frozen rate for dora" in missing.stderr


def test_seed_runs_repeat_every_main_and_joint_run_at_the_next_seeds_and_nothing_else(tmp_path: Path) -> None:
    import freeze

    frozen = freeze.write_frozen(
        {"scores": {}, "choices": {"full": 1e-4, "lora": 7e-4, "hdmole": 2e-3}}, tmp_path
    )
    options = ("--seeds", "3", "--frozen", str(frozen), "--joint_methods", "full")
    result = plan_runs(tmp_path, "full lora hdmole", "budget", *options)
    assert result.returncode == 0, result.stderr
    conf = tmp_path / "conf"
    runs = {line.split("\t")[0]: line.split("\t") for line in (conf / "runs.tsv").read_text().splitlines()}
    repeated = [name for name, line in runs.items() if line[2] in ("main", "joint")]
    assert "all/full" in repeated and "all/hdmole" in repeated
    seeded = {name: line for name, line in runs.items() if line[2] == "seed"}
    assert sorted(seeded) == sorted(f"{name}@seed{i}" for name in repeated for i in (1, 2))
    finetune_seed = yaml.safe_load((RECIPE / "conf" / "asr" / "ci" / "finetune.yaml").read_text())["seed"]
    for name, line in seeded.items():
        main_line = runs[name.rsplit("@", 1)[0]]
        assert line[1] == main_line[1] and line[5:] == main_line[5:], name  # method, data and tests
        config = yaml.safe_load(Path(line[4]).read_text())
        main_config = yaml.safe_load(Path(main_line[4]).read_text())
        assert config == {**main_config, "seed": finetune_seed + int(line[3])}, name  # the frozen rate too
    trainable = json.loads((conf / "trainable.json").read_text())
    assert trainable["lora@seed2"] == trainable["lora"]
    assert not any(name.startswith("child/lora@b") and "@seed" in name for name in runs)  # sweeps: one seed
    (tmp_path / "none").mkdir()
    no_seed = plan_runs(tmp_path / "none", "lora", "", "--seeds", "0")
    assert no_seed.returncode != 0 and "--seeds is the number of seeds" in no_seed.stderr


def test_a_variant_row_is_its_registry_method_with_its_options_at_the_same_budget(tmp_path: Path) -> None:
    """ssvd_espnet (the full adapters file's variant: ESPnet master's SSVD) is an SSVD config with
    espnet_compat, its own row, rate and trainable count within one k step of the budget."""
    import freeze

    frozen = freeze.write_frozen({"scores": {}, "choices": {"ssvd": 5e-4, "ssvd_espnet": 2e-3}}, tmp_path)
    result = plan_runs(tmp_path, "ssvd ssvd_espnet", "", "--frozen", str(frozen))
    assert result.returncode == 0, result.stderr
    conf = tmp_path / "conf"
    exact, espnet = (yaml.safe_load((conf / f"{m}.yaml").read_text()) for m in ("ssvd", "ssvd_espnet"))
    assert exact["peft"] == espnet["peft"] == "ssvd"
    assert espnet["peft_conf"]["espnet_compat"] is True and "espnet_compat" not in exact["peft_conf"]
    assert (exact["optim_conf"]["lr"], espnet["optim_conf"]["lr"]) == (5e-4, 2e-3)
    runs = [line.split("\t") for line in (conf / "runs.tsv").read_text().splitlines()]
    assert sorted(line[0] for line in runs if line[1] == "ssvd_espnet") == [
        f"{d}/ssvd_espnet" for d in ("accent", "child", "noisy")
    ]
    trainable = json.loads((conf / "trainable.json").read_text())
    assert abs(trainable["ssvd_espnet"] - trainable["ssvd"]) < 0.05 * trainable["ssvd"], trainable
    assert json.loads((conf / "budget_shortfalls.json").read_text()) == {}  # both within one k step


def test_a_sweep_needs_the_main_config_it_varies(tmp_path: Path) -> None:
    result = plan_runs(tmp_path, "lora", "split")
    assert result.returncode != 0 and "add ['ssvd_o'] to --methods" in result.stderr
    result = plan_runs(tmp_path, "lora", "depth")
    assert result.returncode != 0 and "--sweeps: unknown ['depth']" in result.stderr


def fake_base(base_dir: Path, model_bytes: int) -> Path:
    """A stage-7 output dir: weights, config.yaml with a bpemodel, and a pretraining log."""
    base_dir.mkdir(parents=True)
    (base_dir / "valid.acc.ave_10best.pth").write_bytes(b"w" * model_bytes)
    (base_dir / "valid.acc.ave.pth").symlink_to("valid.acc.ave_10best.pth")
    (base_dir / "bpe.model").write_bytes(b"sentencepiece")
    config = {"token_list": ["<blank>", "<unk>", "a", "<sos/eos>"], "bpemodel": str(base_dir / "bpe.model")}
    (base_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (base_dir / "pretrain.log").write_text("noise\nINFO: 1epoch results: [valid] acc=0.5\nmore noise\n")
    return base_dir


def pack(recipe: Path, base_dir: Path, out: str, *options: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        str(RECIPE / "local" / "pack_base.py"),
        "--base_dir",
        str(base_dir),
        "--out",
        out,
    ]
    return subprocess.run([*command, *options], cwd=recipe, capture_output=True, text=True)


def test_packed_base_is_self_contained_and_relative_to_the_recipe(tmp_path: Path) -> None:
    base_dir = fake_base(tmp_path / "exp" / "full" / "base", 1000)
    result = pack(tmp_path, base_dir, "pretrained/full")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "pretrained" / "full"
    assert sorted(p.name for p in out.iterdir()) == [
        "bpe.model",
        "config.yaml",
        "train.log",
        "valid.acc.ave.pth",
    ]
    assert not (out / "valid.acc.ave.pth").is_symlink()
    assert (out / "valid.acc.ave.pth").read_bytes() == b"w" * 1000
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["bpemodel"] == "pretrained/full/bpe.model"
    assert config["token_list"] == ["<blank>", "<unk>", "a", "<sos/eos>"]
    assert (out / "train.log").read_text() == "INFO: 1epoch results: [valid] acc=0.5\n"


def test_half_packing_stores_float16_that_loads_into_the_float32_model(tmp_path: Path) -> None:
    base_dir = fake_base(tmp_path / "exp" / "full" / "base", 0)
    layer = torch.nn.Linear(4, 3)
    state = {**layer.state_dict(), "steps": torch.tensor([7, 8])}
    target = (base_dir / "valid.acc.ave.pth").resolve()
    target.unlink()
    torch.save(state, target)
    result = pack(tmp_path, base_dir, "pretrained/full", "--half")
    assert result.returncode == 0, result.stderr
    packed = torch.load(tmp_path / "pretrained" / "full" / "valid.acc.ave.pth")
    assert packed["weight"].dtype == torch.float16 and packed["bias"].dtype == torch.float16
    assert torch.equal(packed["weight"], state["weight"].half())
    assert torch.equal(packed["steps"], state["steps"])
    fresh = torch.nn.Linear(4, 3)
    fresh.load_state_dict({k: packed[k] for k in ("weight", "bias")})
    assert fresh.weight.dtype == torch.float32
    assert torch.allclose(fresh.weight, layer.weight, atol=1e-3)
    assert not torch.equal(fresh.weight, layer.weight)


def test_packing_refuses_a_large_model_and_an_absolute_path(tmp_path: Path) -> None:
    base_dir = fake_base(tmp_path / "base", 3 * 2**20)
    result = pack(tmp_path, base_dir, "pretrained/full", "--max_mb", "2")
    assert result.returncode != 0 and "makes a 3.0 MB model file, more than --max_mb 2.0" in result.stderr
    assert "pass --half" in result.stderr
    assert not (tmp_path / "pretrained" / "full").exists()
    result = pack(tmp_path, base_dir, str(tmp_path / "abs"))
    assert result.returncode != 0 and "--out must be relative to the recipe dir" in result.stderr


def test_a_failed_packing_leaves_the_previous_package_and_no_staging_dir(tmp_path: Path) -> None:
    base_dir = fake_base(tmp_path / "exp" / "full" / "base", 1000)
    previous = tmp_path / "pretrained" / "full"
    previous.mkdir(parents=True)
    (previous / "valid.acc.ave.pth").write_bytes(b"old")
    result = pack(tmp_path, base_dir, "pretrained/full", "--half")  # the fake weights are no torch file
    assert result.returncode != 0 and "is not a torch checkpoint" in result.stderr
    assert [p.name for p in (tmp_path / "pretrained").iterdir()] == ["full"]
    assert (previous / "valid.acc.ave.pth").read_bytes() == b"old"
    (base_dir / "bpe.model").unlink()
    result = pack(tmp_path, base_dir, "pretrained/full")
    assert result.returncode != 0 and "names bpemodel" in result.stderr and "does not exist" in result.stderr
    assert [p.name for p in (tmp_path / "pretrained").iterdir()] == ["full"]

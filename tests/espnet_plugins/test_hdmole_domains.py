"""HDMoLE domain names: ``peft_conf.domains`` names the ids 0 .. M-1, utt2domain read as text
holds names (``-`` = unlabelled) that the task's preprocessing turns into ids, and
``export_merged --peft_domain`` takes a name or an id."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from espnet_runs import TINY_CONFIG
from tiny_corpus import TOKENS

from espnet_plugins.hdmole import DomainNames, domain_id, export_domain
from espnet_plugins.tasks.asr import PeftASRTask
from ssvd_peft.config import PeftConfigError, config_from_dict
from ssvd_peft.methods.hdmole import UNLABELLED

pytest.importorskip("espnet2")

DOMAINS = ("native", "accent", "child")


def task_args(tmp_path: Path, options: str, num_domains: int = 3) -> argparse.Namespace:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(TOKENS) + "\n")
    return PeftASRTask.get_parser().parse_args(
        [
            "--config",
            str(TINY_CONFIG),
            "--token_list",
            str(tokens),
            "--output_dir",
            str(tmp_path),
            "--peft",
            "hdmole",
            "--peft_conf",
            f"{{target_modules: [linear_q], num_domains: {num_domains}, rank: 2, {options}}}",
        ]
    )


def test_names_map_to_their_index_and_the_marker_to_unlabelled() -> None:
    assert [domain_id(name, DOMAINS, "utt1") for name in DOMAINS] == [0, 1, 2]
    assert domain_id(UNLABELLED, DOMAINS, "utt1") == -1
    assert domain_id(UNLABELLED, None, "utt1") == -1


def test_an_unknown_name_names_the_utterance_the_name_and_the_known_names() -> None:
    with pytest.raises(ValueError) as error:
        domain_id("scottish", DOMAINS, "spk1-utt007")
    message = str(error.value)
    assert "'spk1-utt007'" in message and "'scottish'" in message
    assert "['native', 'accent', 'child']" in message and "'-'" in message


def test_a_name_without_a_domains_list_says_how_to_fix_it() -> None:
    with pytest.raises(ValueError, match=r"'utt1'.*'accent'.*peft_conf.domains.*text_int"):
        domain_id("accent", None, "utt1")


@pytest.mark.parametrize(
    ("domains", "message"),
    [
        ("accent", "must be a list"),
        ([], "must be a list"),
        (["native", 1], "single-word names"),
        (["native", "two words"], "single-word names"),
        (["native", "-"], r"\['-'\] cannot be domain names"),
        (["native", "3"], r"\['3'\] cannot be domain names"),
        (["native", "native"], "repeated names"),
    ],
)
def test_bad_domains_lists_are_refused(domains, message) -> None:
    with pytest.raises(PeftConfigError, match=message):
        config_from_dict("hdmole", {"target_modules": ["x"], "num_domains": 2, "domains": domains})


def test_the_domains_list_must_name_every_domain_of_peft_conf(tmp_path: Path) -> None:
    config = config_from_dict("hdmole", {"target_modules": ["x"], "num_domains": 3, "domains": list(DOMAINS)})
    assert config.domains == list(DOMAINS)
    args = task_args(tmp_path, "domains: [native, accent]", num_domains=3)
    with pytest.raises(PeftConfigError, match=r"names 2 domains \['native', 'accent'\].*num_domains is 3"):
        PeftASRTask.build_model(args)


def test_the_wrapper_maps_names_before_the_inner_preprocessing_and_keeps_ids() -> None:
    seen = []

    def inner(uid: str, data: dict) -> dict:
        seen.append((uid, data["domain"]))
        return data

    wrapper = DomainNames(inner, DOMAINS)
    mapped = wrapper("utt1", {"domain": "child"})
    assert mapped["domain"].dtype == np.int64 and mapped["domain"].tolist() == [2]
    assert seen == [("utt1", mapped["domain"])]
    ids = np.array([1])
    assert wrapper("utt2", {"domain": ids})["domain"] is ids
    assert DomainNames(None, DOMAINS)("utt3", {"domain": "-"})["domain"].tolist() == [-1]


def test_the_task_preprocessing_turns_names_into_ids_and_text_into_tokens(tmp_path: Path) -> None:
    args = task_args(tmp_path, "domains: [native, accent, child]")
    preprocess = PeftASRTask.build_preprocess_fn(args, train=True)
    data = preprocess("utt1", {"speech": np.zeros(800, dtype=np.float32), "text": "abd", "domain": "accent"})
    assert data["domain"].tolist() == [1]
    assert data["text"].tolist() == [TOKENS.index(char) for char in "abd"]
    with pytest.raises(ValueError, match=r"'utt2'.*'welsh'"):
        preprocess("utt2", {"speech": np.zeros(800, dtype=np.float32), "text": "a", "domain": "welsh"})


def test_export_takes_a_domain_name_or_an_id() -> None:
    config = config_from_dict("hdmole", {"target_modules": ["x"], "num_domains": 3, "domains": list(DOMAINS)})
    assert [export_domain(domain, config) for domain in ("child", "1", "0")] == [2, 1, 0]
    with pytest.raises(ValueError, match=r"'welsh'.*\['native', 'accent', 'child'\]"):
        export_domain("welsh", config)
    without_names = config_from_dict("hdmole", {"target_modules": ["x"], "num_domains": 3})
    with pytest.raises(ValueError, match=r"peft_conf\.domains is not set"):
        export_domain("accent", without_names)

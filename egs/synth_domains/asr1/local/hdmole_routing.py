"""Stage 9 diagnostics of an HDMoLE run: where its domain router sends each test utterance.

For every test split given as ``<domain>=<data dir>``, each utterance is encoded once by the trained
model (``espnet_plugins``' task, adapters and router loaded from the run's config.yaml and model file)
and the router's domain probabilities g(u) = softmax(W_g pool_t(h_t) + b_g) are read from the HDMoLE
layers' routing context; the routed domain is argmax_m g_m(u). Per split:

    routing accuracy = share of utterances routed to the split's own domain (a target domain; an
                       out-of-distribution split has no own domain, so no accuracy)
    confusion row    = share of the split's utterances routed to each trained domain, in %

Writes ``<out_dir>/routing.csv`` (one row per split: domain, utterances, accuracy, one column per
trained domain) and ``<out_dir>/routing_utterances.tsv`` (utterance, split, routed domain, g).

    local/hdmole_routing.py --config exp/quick/all/hdmole/config.yaml \\
        --model exp/quick/all/hdmole/valid.acc.best.pth --out_dir exp/quick/decode/all/hdmole/routing \\
        --test accent=data/quick/accent_test --test phone=data/quick/phone_test
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import soundfile
import torch
from kaldi_files import read_table

from espnet_plugins.tasks.asr import PeftASRTask
from ssvd_peft.methods.hdmole_routing import routing_context

ACCURACY = "routing accuracy %"


def routed_probabilities(model: torch.nn.Module, wav: Path) -> torch.Tensor:
    """g(u) of one utterance (M,): the router runs inside the encoder's forward."""
    audio, _ = soundfile.read(wav, dtype="float32")
    speech = torch.from_numpy(audio).unsqueeze(0)
    context = routing_context(model)
    context.set(None)
    with torch.no_grad():
        model.encode(speech, torch.tensor([speech.shape[1]]))
    if context.domain_probs is None:
        raise SystemExit("the model's HDMoLE layers have no domain router: nothing routes the utterances")
    return context.domain_probs[0].detach().clone()


def split_row(domain: str, routed: list[int], names: list[str]) -> dict[str, object]:
    """The split's row of routing.csv: its utterances, its accuracy and its confusion row."""
    count = len(routed)
    shares = {name: round(100.0 * routed.count(index) / count, 1) for index, name in enumerate(names)}
    accuracy = shares[domain] if domain in names else ""
    return {"split": domain, "utterances": count, ACCURACY: accuracy, **shares}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="config.yaml of the HDMoLE run")
    parser.add_argument("--model", type=Path, required=True, help="its model file (adapter-only or full)")
    parser.add_argument("--out_dir", type=Path, required=True)
    parser.add_argument("--test", action="append", default=[], help="<domain>=<data dir with wav.scp>")
    args = parser.parse_args(argv)
    tests = dict(entry.split("=", 1) for entry in args.test)
    if not tests or any(not Path(path, "wav.scp").is_file() for path in tests.values()):
        raise SystemExit(f"--test <domain>=<data dir> with a wav.scp, one or more; got {args.test}")
    model, train_args = PeftASRTask.build_model_from_file(args.config, args.model, "cpu")
    model.eval()
    names = list((train_args.peft_conf or {}).get("domains") or [])
    if not names:
        raise SystemExit(f"{args.config} names no HDMoLE domains (peft_conf.domains): not an HDMoLE run")
    rows, utterances = [], []
    for domain, data_dir in tests.items():
        routed = []
        for utt, wav in read_table(Path(data_dir) / "wav.scp").items():
            probabilities = routed_probabilities(model, Path(wav))
            routed.append(int(probabilities.argmax()))
            shares = " ".join(f"{p:.4f}" for p in probabilities.tolist())
            utterances.append(f"{utt}\t{domain}\t{names[routed[-1]]}\t{shares}\n")
        rows.append(split_row(domain, routed, names))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "routing.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out_dir / "routing_utterances.tsv").write_text("".join(utterances))
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()

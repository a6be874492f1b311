"""What the OWSM fine-tuning recipes (egs/myst, egs/l2arctic) share: the speech-to-text data dir
layout, the local copy of the pretrained model, the fine-tuning configs and the scorer. Run as
``python -m owsm.<module>`` with egs/common/pyscripts on PYTHONPATH (a recipe's path.sh sets it)."""

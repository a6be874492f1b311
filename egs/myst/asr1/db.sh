# Corpus paths, as in ESPnet's egs2/*/db.sh: run.sh passes MYST to stage 1 as --corpus_dir (an
# explicit --corpus_dir wins). MYST: the MyST root, the folder that holds data/ (or the LDC release's
# root, with myst_child_conv_speech/data/).
MYST=

# Corpus paths, as in ESPnet's egs2/*/db.sh: run.sh passes L2ARCTIC to stage 1 as --corpus_dir (an
# explicit --corpus_dir wins). L2ARCTIC: the L2-ARCTIC v5.0 root, the folder of the speaker folders.
L2ARCTIC=

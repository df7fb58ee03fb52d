"""The command-line programs: vicreg-train (pretrain.py), vicreg-eval (linear_eval.py), launch_local.

Installed as `vicreg_tf.trainers`. Read pretrain.py top to bottom; the glue it uses is
build.py (config -> parts), checks.py (setup checks), workdirs.py (the workdir's record),
cli.py (command-line handling) and cluster.py (multi-worker roles).
"""

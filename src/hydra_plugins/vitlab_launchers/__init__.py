"""vitlab's Hydra launcher plugins: `hydra/launcher=slurm` and `hydra/launcher=submitit_local`.

Hydra instantiates launchers only from the `hydra_plugins` namespace package, so the
classes are defined here; `vitlab.runs.launchers` documents and implements what they add.
"""

"""From a config to a finished run: configs to objects (`build`), checks (`validate`),
`train` / `evaluate` (`tasks`), run folders and resolvers (`folders`), resuming, multiruns,
launchers and provenance. Hydra appears here and in the entry points only."""

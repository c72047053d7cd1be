"""The Lightning pieces: `ImageClassifier` (the one LightningModule), optimizer groups and
schedules, callbacks, checkpoint IO, loggers, FSDP. Plain arguments only: no Hydra, no runs/."""

"""Training side of the workbench: configuration, trainer, run store, background jobs and the CLI."""

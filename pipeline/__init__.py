"""Data movement and scheduling: configuration, storage, stages, Ray actors and the CLI."""

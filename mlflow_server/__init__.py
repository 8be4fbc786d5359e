"""MLflow tracking server lifecycle and the logging helpers."""

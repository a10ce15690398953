"""The training engine: the only code that knows DeepSpeed (tracking alone knows MLflow)."""

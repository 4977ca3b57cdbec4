"""ml_collections presets: `--config=configs/<file>.py:<preset>` (big_vision/MaxText style)."""

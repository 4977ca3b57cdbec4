"""The library's checkpoint format: orbax params + `config.json` + tokenizer + image
settings (`format`), the low-level I/O it stands on (`io`) and image settings (`assets`).

    config, model = load_checkpoint("ckpt/llava-1.5-7b", mesh, "fsdp", scan_layers=True)
"""

from safevlm_jax.checkpoint.format import load_checkpoint, load_config, save_checkpoint

__all__ = ["load_checkpoint", "load_config", "save_checkpoint"]

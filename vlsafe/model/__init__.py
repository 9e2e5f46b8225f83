"""Models. Importing this package registers the vlsafe VLM with transformers' Auto classes (no remote code), so
`AutoModelForCausalLM.from_pretrained(vlm_dir)` works. `import vlsafe` alone stays light (no transformers import)."""

from vlsafe.model.vlm import VisionLanguageModel, VlmConfig, register

register()

__all__ = ["VisionLanguageModel", "VlmConfig", "register"]

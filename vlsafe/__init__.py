"""vlsafe: what vision-language adaptation does to an LLM's safety, and how to get it back.

Build a LLaVA-style VLM from any LLM, adapt it, evaluate text and multimodal safety, over-refusal and helpfulness,
safety-tune it, analyse its layers, merge, and report. `import vlsafe.model` registers the VLM with transformers.
"""

__version__ = "0.1.0"

"""Training: one engine (engine.py) for every stage; a stage (stages.py) is its data, trainable parameters and loss."""

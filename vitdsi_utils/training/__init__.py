"""Training the DSI: settings, tasks, the training loop and the checkpoint format."""

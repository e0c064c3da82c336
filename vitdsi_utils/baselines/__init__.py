"""Learned encoders beside the DSI: the dense retrieval baseline, self-supervised pretraining, encoder initialisation."""

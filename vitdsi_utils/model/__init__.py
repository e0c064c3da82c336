"""The DSI model (a ViT encoder and an ID decoder) and the decoders that turn it into ranked lists."""

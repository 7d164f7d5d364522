"""One level's decoding and the chain of levels: the decoder, its runner, verification, sampling, token trees,
the hierarchical loop and the packaged models. Imports nothing from the rest of the project."""

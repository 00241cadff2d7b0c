"""Distilling: losses, data (text sources, packing, chat data), teachers and the logit cache,
the training recipe and evaluation. Imports only :mod:`potstill.core`.
"""

"""Offline data preparation: documents -> sentences -> tokens -> BERT pairs -> Arrow shards."""

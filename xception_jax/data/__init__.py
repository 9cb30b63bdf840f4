"""Data: sources, preprocessing, the data order (logical shards), feeding the devices."""

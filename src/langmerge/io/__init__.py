"""Checkpoint input and output: lazy sharded reader, streaming sharded writer, metadata."""

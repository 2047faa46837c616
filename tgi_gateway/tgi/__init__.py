"""The upstream, Text-Generation-Inference: its wire protocol (:mod:`.protocol`, no I/O) and the client that
speaks it (:mod:`.client`, the I/O only)."""

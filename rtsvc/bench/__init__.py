"""Measurement: per-block compute of a voice with its per-stage breakdown (`blocks.py`, `rtsvc bench`),
many streams through the real server (`streams.py`, `bench --streams`) and the PulseAudio latency rig
(`loopback.py`, `bench --loopback`)."""

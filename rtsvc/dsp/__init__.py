"""Signal processing with no networks: audio I/O and resampling, mel and RMS, SOLA crossfade,
slicing at silences. Everything above builds on these."""

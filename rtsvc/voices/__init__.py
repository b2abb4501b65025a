"""Voices the engine runs: the built-in DSP voice and model voices (features -> DiT -> vocoder).
`VoiceSpec` + `open_voice` (`spec.py`) is the one place a voice is opened."""

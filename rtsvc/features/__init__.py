"""Conditioning features on the mel frame grid: F0 extractors (RMVPE, FCPE, WORLD), ContentVec,
Whisper, the per-clip `FeatureExtractor` and the streaming `FeatureCache`. A new F0 extractor or
content encoder goes in this folder."""

"""Reference transcriptions of upstream RIFT-SVC (Pur1zumu/RIFT-SVC), written for parity tests.

Written from reading the upstream code at the named commits, structured and named as upstream
(so a reader can compare them side by side), independent of `rtsvc`: `modules.py` (blocks shared by
V2 and V3, x-transformers' rotary embedding), `v2_release.py` (DiT at ec67126, the V2 release),
`v3_head.py` (DiT, LoRA and `RF.sample` at c03fa59), `fixtures.py` (checkpoints in the official
Lightning layout, OmegaConf config pickled as upstream does).
"""

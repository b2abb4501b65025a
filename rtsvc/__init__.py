"""rtsvc: real-time streaming voice conversion with RIFT-SVC models.

    voice = rtsvc.open_voice(rtsvc.VoiceSpec(model="voice.rtsvc"))
    engine = rtsvc.StreamingConverter(voice, rtsvc.RuntimeSettings(rtsvc.Knobs(pitch_shift=5)))
    out_block = engine.process(in_block)      # or rtsvc.convert_offline(voice, audio, knobs)
"""

__version__ = "0.1.0"

from rtsvc.engine import StreamConfig, StreamingConverter  # noqa: E402
from rtsvc.offline import convert_offline  # noqa: E402
from rtsvc.settings import Knobs, RuntimeSettings  # noqa: E402
from rtsvc.voices.spec import VoiceSpec, open_voice  # noqa: E402

__all__ = ["Knobs", "RuntimeSettings", "StreamConfig", "StreamingConverter", "VoiceSpec", "convert_offline",
           "open_voice"]

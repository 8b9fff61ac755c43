"""voicegw: a real-time voice gateway for Orpheus TTS served by vLLM."""

__version__ = "0.1.0"

"""tgi-gateway: an OpenAI-compatible gateway for MeetKai Functionary models served by TGI."""

__version__ = "0.1.0"

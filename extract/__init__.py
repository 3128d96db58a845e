"""Stage one: pretrained encoders run once over a catalogue, rows written to the feature store.

``extract.registry`` names the encoders (``create_encoder("swin-b", random_init=True)``),
``extract.image`` / ``extract.text`` build them as stem / blocks / pool, ``extract.job``
runs an extraction (streaming, resumable, distributed) and ``extract.cli`` holds the
``featurestore extract`` and ``featurestore encoders`` commands.
"""

from extract.registry import (
    EncoderConfig,
    create_encoder,
    get_encoder_config,
    list_encoders,
    register_encoder,
)

__all__ = ["EncoderConfig", "create_encoder", "get_encoder_config", "list_encoders", "register_encoder"]

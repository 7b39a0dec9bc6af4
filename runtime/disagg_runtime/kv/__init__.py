"""KV cache transport: the per-request KV payload and the channels that ship it prefill -> decode."""

from .channel import ChannelKind, KVChannel, TransferStats, payload_layers
from .codec import Fp8Codec, RawCodec, make_codec
from .errors import DirectReadUnavailable, KVChannelError, KVForbidden, KVMismatchError, KVNotFound, KVTimeout
from .links import Endpoint, choose_channel
from .payload import KVHeader, KVPayload
from .puller import KVAddress, KVPuller
from .server import KVLease, KVServer, KVSource
from .staged import StagedKV

__all__ = [
    "ChannelKind", "DirectReadUnavailable", "Endpoint", "Fp8Codec", "KVAddress", "KVChannel", "KVChannelError", "KVForbidden", "KVHeader", "KVLease",
    "KVMismatchError", "KVNotFound", "KVPayload", "KVPuller", "KVServer", "KVSource", "KVTimeout", "RawCodec",
    "StagedKV",
    "TransferStats", "choose_channel", "make_codec", "payload_layers",
]

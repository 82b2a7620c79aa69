"""Federation vocabulary: the message keys client and server share (``protocol``, ``stats_protocol``)."""

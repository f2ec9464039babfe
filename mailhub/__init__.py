"""mailhub: a secure email coordination hub for medical-tourism facilitators.

The package is laid out along the path a message takes: ``ingress`` (SMTP listeners, IMAP
watcher) -> ``spool`` (durable, encrypted on disk) -> ``parse`` -> ``policy`` -> ``crypto`` ->
``cases`` (threading, store) -> ``outbound`` (render, sign, encrypt) -> ``deliver``; the
``scheduler`` feeds the same outbound path.
"""

__version__ = "0.1.0"

"""The stream transport (TCP and Unix stream sockets): bytes in, requests to dispatch,
replies out. Callbacks only parse and schedule; modules run in tasks.

A connection is served in stages, one ``asyncio.Protocol`` each: sniffer.py admits it and
reads its first bytes, then hands it to oneshot.py or framed.py; base.py holds what they
share.
"""

"""A module with no handlers, kept from the original to show the error path.

Every call answers ``501: Module fail has no TCP handler``; a datagram is logged as failed.
"""

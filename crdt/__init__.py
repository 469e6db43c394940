"""Delta-state CRDTs for chatnode: causal machinery, an add-wins LWW map, the segmented room
log on pycrdt, and their sans-I/O sync protocols.

Pure: imports only the standard library, pycrdt and msgpack. Time and randomness are passed
in by the caller.
"""

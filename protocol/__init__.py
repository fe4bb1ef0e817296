"""Wire formats of the service: the trickle transport and the public API schemas.

Nothing here imports torch, so a client can use the trickle clients without a model stack.
"""

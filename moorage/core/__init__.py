"""The ground floor: what every layer shares and nothing above it defines.

Modules here import only the standard library, third-party packages and each
other; never ``moorage.cri``, ``moorage.runtime``, ``moorage.images`` or
``moorage.cni``.
"""

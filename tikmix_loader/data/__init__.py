"""The data side: domains, on-disk token formats, shuffling, quotas, batch planning and the ``MixtureLoader``.

Also ``convert`` (text to datasets), and ``corpus`` with ``noise``: the demo corpus builder, which is demo
code (the loader, influence, mixing and quality code never import it; tests/test_architecture.py checks).
"""

"""Training-framework integrations that drive a ``MixtureController``, one module per framework (``hf``,
``lightning``, ``composer``); each imports its framework, so import only the one you use."""

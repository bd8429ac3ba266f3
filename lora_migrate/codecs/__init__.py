"""The registry of codecs: one line per convention family (see :mod:`lora_migrate.codecs.base`)."""

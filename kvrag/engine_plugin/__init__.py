"""SGLang plugin: compressing attention backend and eviction policy. Empty until issue 4."""

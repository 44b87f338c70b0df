"""KV-cache compression methods as pure tensor code (score + select). Empty until issue 3."""

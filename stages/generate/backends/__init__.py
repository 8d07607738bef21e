"""The generate backends, one module each; ``base`` holds what they share."""

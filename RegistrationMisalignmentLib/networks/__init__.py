"""Networks of the method: RegNet Uadv encoders, decoders, and the assembled models."""

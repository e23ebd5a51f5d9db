"""The embedded offline suite (digits zoo), real-size synthetic stand-ins, and tiny hub-format fixtures."""

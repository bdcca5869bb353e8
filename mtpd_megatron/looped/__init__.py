"""Looped extension of the MTP heads (1 -> 2 -> 4 -> 8 -> 16): stages, weight extension, the stage CLI."""

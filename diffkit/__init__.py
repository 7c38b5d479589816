"""diffkit: the small library behind the executable book on diffusion models.

Each module holds one idea of the book; chapters import it and never re-implement it.
"""

__version__ = "0.1.0"

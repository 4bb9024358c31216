"""The version of cram_ext: the one place it is written. pyproject.toml reads it for the
package's metadata ([tool.setuptools.dynamic]); cram_ext.__version__ is it."""

__version__ = "0.1.0"

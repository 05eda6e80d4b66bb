"""midpo: MI-DPO alignment pipeline (library). Stages live in ``stages/``; docs/architecture.md
says what lives where. Importing the library changes nothing in the environment: entry points
apply the offline defaults (``pipeline.offline``)."""

__version__ = "0.1.0"

"""The HTTP front end: Falcon resources and error mapping, nothing else."""

from sockworker.api.app import create_app

__all__ = ["create_app"]

"""VISTA (Chen et al. 2025): history summarisation by learned seeds and quasi-linear attention.

docs/vista.md says what is built and what is not yet."""

from flexgr.vista.qla import qla

__all__ = ["qla"]

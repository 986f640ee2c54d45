"""Preset run configs (installed as ``flexgr.configs``); list them with ``flexgr presets``."""

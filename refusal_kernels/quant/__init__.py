"""Quantized formats."""

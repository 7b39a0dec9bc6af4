"""Prefill, decode and colocated workers: one engine each, behind an aiohttp server the router talks to."""

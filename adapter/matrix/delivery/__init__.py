"""Delivery: the durable inbox (``inbox``) and a worker per room draining it (``lanes``)."""

"""Timing marks shared by the bench scripts that trace where one process spends its time."""

import time


def mark_after(marks, module, name, label):
    """Replace module.name with a wrapper that appends (label, time) to `marks` each time it returns."""
    function = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        marks.append((label, time.time()))
        return result

    setattr(module, name, wrapper)

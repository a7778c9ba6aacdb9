"""Pure tensor functions for compressing what crosses the node boundary.

Nothing here touches a process group, so every function is testable in isolation.
"""

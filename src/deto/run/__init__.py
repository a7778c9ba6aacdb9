"""One rank's training run behind ``deto train``: its settings (config, presets), the embedded
tasks, models and data, the loop, the optimizer it builds, checkpoints and snapshots, and what
it writes (summary, report, console). Imports the library core only."""

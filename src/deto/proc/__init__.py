"""Child processes, with no knowledge of training: the one SIGTERM strategy, stopping
children, children that die with their parent. Imports the standard library only."""

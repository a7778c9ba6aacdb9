"""``deto bench``: schemes side by side over links and seeds (sweep), its report and plots,
statistics over seeds, and re-running a record (reproduce). Starts ``deto train`` as child
processes; imports run/, netem/ and proc/, never launch/. Also ``deto selftest``, the first
checks on a GPU machine (selftest, selftest_fsdp)."""

"""How the ranks of a ``deto train`` run start and end: the launch paths (torchrun, a simulated
cluster on this machine, emulated links, torchft), the checks before any rank starts, and a
failed rank's cause in one line. Imports run/, netem/, proc/ and the library core."""

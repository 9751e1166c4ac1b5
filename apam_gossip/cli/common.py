"""What every part of the command line shares."""

PROG = "apam-gossip"  # the prefix of every line the command line prints
